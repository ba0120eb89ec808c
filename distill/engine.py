"""The trial engine contract a worker runs, and kdsearch's distillation engine.

Contract for a ``TrialEngine``:
- ``prepare(spec)`` is called before the first trial of a study in a process, and may be called again for each
  trial (cache what is costly). Any exception it raises is a study-level failure: the study is marked ``failed``
  with the message, and the worker goes on with other studies.
- ``run_trial(prepared, params, seed, on_epoch_end, checkpoint_dir)`` trains one configuration. It calls
  ``on_epoch_end`` after every epoch with that epoch's eval accuracy, stops when the callback returns a reason,
  and writes the best epoch's model to ``checkpoint_dir`` (a Hugging Face model directory). An exception is a
  trial-level failure: the trial is FAIL and its slot retried.
- ``teacher_accuracy(prepared)`` is the teacher's eval accuracy, a reference for the dashboard and model card.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from distill.data import DataError, TokenizedSplit, concat_splits
from distill.student import build_student
from distill.teacher import TeacherCache, build_or_load_cache, build_or_load_transfer_set, split_revision
from distill.train import EpochCallback, EpochResult, TrainConfig, train_student
from search_space import StudySpec, tokenizers_compatible
from storage import ArtifactLayout


@dataclasses.dataclass
class TrialOutcome:
    history: list[EpochResult]
    best_epoch: int
    best_accuracy: float
    stopped: str | None
    train_samples_per_second: float = 0.0


class TrialEngine(ABC):
    @abstractmethod
    def prepare(self, spec: StudySpec) -> Any: ...

    @abstractmethod
    def run_trial(self, prepared: Any, params: dict[str, Any], seed: int, on_epoch_end: EpochCallback | None,
                  checkpoint_dir: Path) -> TrialOutcome: ...

    def teacher_accuracy(self, prepared: Any) -> float | None:
        return None


@dataclasses.dataclass
class PreparedStudy:
    spec: StudySpec
    cache: TeacherCache
    train: TokenizedSplit  # on the training device; train rows, then the transfer set's (label NO_LABEL) if any
    train_logits: torch.Tensor
    eval: TokenizedSplit
    tokenizer: Any
    teacher_config: Any
    teacher_state: dict[str, torch.Tensor] | None  # only for students built from the teacher's weights


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


class DistillationEngine(TrialEngine):
    def __init__(self, artifacts: str | Path, device: str | None = None, log=print) -> None:  # type: ignore[no-untyped-def]
        self.layout = artifacts if isinstance(artifacts, ArtifactLayout) else ArtifactLayout(artifacts)
        self.device = resolve_device(device)
        self.log = log
        self._prepared: tuple[str, PreparedStudy] | None = None  # last study, reused across its trials

    def prepare(self, spec: StudySpec) -> PreparedStudy:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        fingerprint = spec.model_dump_json()
        if self._prepared is not None and self._prepared[0] == fingerprint:
            return self._prepared[1]
        self._prepared = None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cache = build_or_load_cache(self.layout, spec, self.device, log=self.log)
        transfer = build_or_load_transfer_set(self.layout, spec, self.device, log=self.log)
        train, train_logits = cache.train, cache.train_logits
        if transfer is not None:  # one epoch = every train row and every teacher-labelled variant, shuffled together
            train = concat_splits(train, transfer.split)
            train_logits = torch.cat([train_logits, transfer.logits])
        name, revision = split_revision(spec.teacher)
        teacher_config = AutoConfig.from_pretrained(name, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        teacher_state = None
        if spec.student.needs_teacher_weights:
            teacher_state = AutoModelForSequenceClassification.from_pretrained(name, revision=revision).state_dict()
        if spec.student.model is not None:
            s_name, s_revision = split_revision(spec.student.model)
            problem = tokenizers_compatible(tokenizer, AutoTokenizer.from_pretrained(s_name, revision=s_revision))
            if problem:
                raise DataError(f"teacher and student tokenizers differ: {problem}")
        # Fail the study now, not in every trial, if the student cannot be built.
        build_student(spec.student, teacher_config, seed=spec.seed, teacher_state=teacher_state)
        prepared = PreparedStudy(
            spec=spec,
            cache=cache,
            train=train.to(self.device),
            train_logits=train_logits.to(self.device),
            eval=cache.eval.to(self.device),
            tokenizer=tokenizer,
            teacher_config=teacher_config,
            teacher_state=teacher_state,
        )
        self._prepared = (fingerprint, prepared)
        return prepared

    def teacher_accuracy(self, prepared: PreparedStudy) -> float | None:
        return prepared.cache.teacher_accuracy

    def run_trial(self, prepared: PreparedStudy, params: dict[str, Any], seed: int,
                  on_epoch_end: EpochCallback | None, checkpoint_dir: Path) -> TrialOutcome:
        cfg = TrainConfig(
            learning_rate=float(params["learning_rate"]),
            temperature=float(params["temperature"]),
            alpha=float(params["alpha"]),
            num_train_epochs=int(params["num_train_epochs"]),
            batch_size=int(params.get("batch_size", 128)),
            weight_decay=float(params.get("weight_decay", 0.0)),
            warmup_ratio=float(params.get("warmup_ratio", 0.0)),
            seed=seed,
        )
        model = build_student(prepared.spec.student, prepared.teacher_config, seed=seed,
                              teacher_state=prepared.teacher_state)
        result = train_student(model, prepared.train, prepared.train_logits, prepared.eval, cfg, on_epoch_end)
        model.load_state_dict(result.best_state)
        save_checkpoint(model.cpu(), prepared.tokenizer, checkpoint_dir, {
            "params": params,
            "seed": seed,
            "best_epoch": result.best_epoch,
            "eval_accuracy": result.best_accuracy,
            "history": [dataclasses.asdict(h) for h in result.history],
            "teacher_eval_accuracy": prepared.cache.teacher_accuracy,
            "stopped": result.stopped,
        })
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return TrialOutcome(result.history, result.best_epoch, result.best_accuracy, result.stopped,
                            result.samples_per_second)


TRIAL_RECORD = "kdsearch_trial.json"


def save_checkpoint(model, tokenizer, directory: Path, record: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / TRIAL_RECORD).write_text(json.dumps(record, indent=2))


def load_engine(dotted: str | None, *, artifacts: str | Path | ArtifactLayout, device: str | None,
                log=print) -> TrialEngine:  # type: ignore[no-untyped-def]
    """``package.module:ClassName`` → an engine instance (tests plug in a fast fake this way); None → the
    distillation engine."""
    if not dotted:
        return DistillationEngine(artifacts, device=device, log=log)
    module_name, _, class_name = dotted.partition(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(artifacts=artifacts, device=device)

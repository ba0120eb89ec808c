"""The trial engine contract a worker runs, and kdsearch's distillation engine.

Contract for a ``TrialEngine``:
- ``prepare(spec, progress)`` is called before the first trial of a study in a process, and may be called again for
  each trial (cache what is costly); it calls ``progress(stage, done, total)`` (``distill.progress``) while it
  builds something long. An error that is the user's fault (``kdsearch.errors.fault_of``: a ``DataError``, a spec
  that does not validate) fails the study with the message; any other exception (out of memory, network, disk,
  database) fails only this attempt, and the study is prepared again later, on any worker, up to
  ``KDSEARCH_MAX_PREPARE_ATTEMPTS`` times.
- ``task(prepared)`` is the study's task (classification or regression, its labels) and the metric it maximises;
  the worker leaves the task's ignored parameters (temperature for regression) out of the search.
- ``run_trial(prepared, params, seed, on_epoch_end, checkpoint_dir)`` trains one configuration. It calls
  ``on_epoch_end`` after every epoch with that epoch's metrics and score (the study's metric), stops when the
  callback returns a reason, and writes the best epoch's model to ``checkpoint_dir`` (a Hugging Face model
  directory). An exception is a trial-level failure: the trial is FAIL and its slot retried (unless it is the
  infrastructure's, a full disk say: then the trial waits to run again, untried; ``service.worker``). A loss, gradient
  or weights gone NaN or infinite raise ``TrainingDiverged`` at that step.
- ``run_pack(prepared, members, batch_seed)`` (optional) trains several configurations of one student shape and
  batch size together (``PackedTrial``: params, seed, callback, checkpoint directory each), sharing the batch order
  drawn from ``batch_seed``. It returns one result per member, in order: its ``TrialOutcome`` (checkpoint written
  as ``run_trial`` writes it), or the exception that failed that member alone (its trial is FAIL and its slot
  retried; the others go on). ``on_member_done(index, result)``, when given, is called with each member's result as
  soon as it is final (checkpoint written), while the others may still train: the worker stores and tells that
  trial at once. An exception raised out of ``run_pack`` fails every member not yet done. The default runs the
  members one after another through ``run_trial``; ``DistillationEngine`` trains them in one loop
  (``distill.packed``), each member's numbers equal to its solo run with ``batch_seed``.
- ``teacher_metrics(prepared)`` is the teacher's score on the eval split for every metric of the task, a reference
  for the dashboard and model card.
- ``student_space(prepared, spec)`` is the student shapes the study may sample (``search_space.shapes``): only valid
  ones, given the teacher. A searched shape reaches ``run_trial`` in ``params``, under the dimensions' names.
- ``profile(prepared, params)`` is the student's profile before training (``distill.profile``: shape, parameters,
  FLOPs, CPU latency), and ``teacher_profile(prepared)`` the teacher's; None where an engine cannot tell (a study
  with several objectives or constraints then fails its trials with the reason).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from distill.data import DataError, TokenizedSplit, concat_splits
from distill.models import load_config, load_tokenizer, split_revision
from distill.packed import PackStepName, carried_step, resolve_pack_step, train_pack
from distill.precision import Precision, native_bf16, resolve_precision
from distill.predistill import Predistilled, build_or_load_predistilled
from distill.profile import architecture, profile_model
from distill.progress import Progress
from distill.student import build_student, fit_pair_head, student_config
from distill.teacher import TeacherCache, build_or_load_cache
from distill.train import (
    EpochCallback,
    EpochResult,
    MemberDiverged,
    PackMember,
    TrainConfig,
    TrainResult,
    train_student,
)
from distill.transfer import build_or_load_transfer_set
from search_space import (
    MetricMismatch,
    SpecError,
    StudentSpace,
    StudentSpec,
    StudySpec,
    TaskInfo,
    resolve_task,
    student_space,
    teacher_dims,
    tokenizers_compatible,
    values_of,
)
from storage import ArtifactLayout, make_layout

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase



@dataclasses.dataclass
class TrialOutcome:
    history: list[EpochResult]
    best_epoch: int
    best_score: float  # the study's metric at the best epoch
    stopped: str | None
    train_samples_per_second: float = 0.0
    precision: Precision | None = None  # what the student's forward pass ran in (None: an engine that cannot tell)

    @property
    def best_metrics(self) -> dict[str, float]:
        return next((h.metrics for h in self.history if h.epoch == self.best_epoch), {})

    @property
    def degenerate(self) -> str | None:
        """Why the best epoch's outputs are degenerate (``distill.task_metrics.degenerate_reason``); None when not."""
        return next((h.degenerate for h in self.history if h.epoch == self.best_epoch), None)


# Told each pack member's final result (its index in the pack, its outcome or the exception that failed it).
MemberDone = Callable[[int, TrialOutcome | Exception], None]


@dataclasses.dataclass
class PackedTrial:
    """One member of a pack, as ``TrialEngine.run_pack`` takes it."""

    params: dict[str, Any]
    seed: int  # its initial weights and dropout stream, as run_trial's seed
    on_epoch_end: EpochCallback | None
    checkpoint_dir: Path


class TrialEngine(ABC):
    # How run_pack's members step together (distill.packed.resolve_pack_step); this base runs them one after another.
    pack_step: str = "sequential"

    @abstractmethod
    def prepare(self, spec: StudySpec, progress: Progress | None = None) -> Any: ...

    @abstractmethod
    def task(self, prepared: Any) -> TaskInfo: ...

    @abstractmethod
    def run_trial(self, prepared: Any, params: dict[str, Any], seed: int, on_epoch_end: EpochCallback | None,
                  checkpoint_dir: Path) -> TrialOutcome: ...

    def run_pack(self, prepared: Any, members: list[PackedTrial], batch_seed: int,
                 on_member_done: MemberDone | None = None) -> list[TrialOutcome | Exception]:
        """Members one after another (an engine that cannot train them together); see the contract above."""
        results: list[TrialOutcome | Exception] = []
        for index, member in enumerate(members):
            result: TrialOutcome | Exception
            try:
                result = self.run_trial(prepared, member.params, member.seed, member.on_epoch_end,
                                        member.checkpoint_dir)
            except Exception as exc:  # noqa: BLE001 - that member's failure alone
                result = exc
            results.append(result)
            if on_member_done is not None:
                on_member_done(index, result)
        return results

    def teacher_metrics(self, prepared: Any) -> dict[str, float] | None:
        return None

    def student_space(self, prepared: Any, spec: StudySpec) -> StudentSpace:
        return student_space(spec.student)  # no teacher known: only the spec's own rules

    def profile(self, prepared: Any, params: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def teacher_profile(self, prepared: Any) -> dict[str, Any] | None:
        return None


@dataclasses.dataclass
class PreparedStudy:
    spec: StudySpec
    task: TaskInfo
    cache: TeacherCache
    train: TokenizedSplit  # on the training device; train rows, then the transfer set's (label NO_LABEL) if any
    train_logits: torch.Tensor
    # len(train) when a trial trains on k = 0, 1, ... copies of the transfer set (its first k rounds); one entry: none.
    train_rows: tuple[int, ...]
    eval: TokenizedSplit
    tokenizer: Any
    teacher_config: Any
    teacher_state: dict[str, torch.Tensor] | None  # only for students built from the teacher's weights
    space: StudentSpace  # the student shapes this study samples (valid for this teacher)
    teacher_profile: dict[str, Any] | None = None  # measured on first use
    # Pre-distilled encoder weights by student shape (its spec's JSON), loaded or built on first use.
    predistilled: dict[str, Predistilled] = dataclasses.field(default_factory=dict)
    progress: Progress | None = None  # told of a pre-distillation built on a trial's first use of its shape
    # The teacher itself, on the training device: loaded on the first trial whose terms read its internals
    # (hidden states, attention relations: run live, once per batch), then kept for the study's later trials.
    teacher_model: Any = None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


class DistillationEngine(TrialEngine):
    def __init__(self, artifacts: str | Path | ArtifactLayout, device: str | None = None,
                 log: Callable[[str], None] = print, precision: str = "auto", pack_step: str = "auto") -> None:
        self.layout = artifacts if isinstance(artifacts, ArtifactLayout) else make_layout(artifacts)
        self.device = resolve_device(device)
        self.log = log
        self.precision = resolve_precision(precision, self.device)
        self.pack_step: PackStepName = resolve_pack_step(pack_step, self.device)  # how a pack's members step together
        if precision == "bf16" and not native_bf16(self.device):
            log(f"precision bf16 asked for, but {self.device.type} has no native bf16 here: it is emulated, and "
                "slower than fp32")
        self._prepared: tuple[str, PreparedStudy] | None = None  # last study, reused across its trials

    def prepare(self, spec: StudySpec, progress: Progress | None = None) -> PreparedStudy:
        from transformers import AutoModelForSequenceClassification

        fingerprint = spec.model_dump_json()
        if self._prepared is not None and self._prepared[0] == fingerprint:
            return self._prepared[1]
        self._prepared = None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        teacher_config = load_config(spec.teacher)
        try:
            task = resolve_task(teacher_config, spec.metric)
        except MetricMismatch as exc:
            raise DataError(f"metric: {exc}") from exc
        tokenizer = load_tokenizer(spec.teacher)
        if spec.dataset.text_pair_column is not None and not _encodes_pairs(tokenizer):
            raise DataError(f"the teacher's tokenizer ({type(tokenizer).__name__}) has no pair encoding, so "
                            "dataset.text_pair_column cannot be used with it")
        cache = build_or_load_cache(self.layout, spec, task, self.device, log=self.log, progress=progress)
        transfer = build_or_load_transfer_set(self.layout, spec, task, self.device, log=self.log, progress=progress)
        train, train_logits = cache.train, cache.train_logits
        train_rows: tuple[int, ...] = (len(train),)
        if transfer is not None:  # one epoch = every train row and every teacher-labelled variant, shuffled together
            train = concat_splits(train, transfer.split)
            train_logits = torch.cat([train_logits, transfer.logits])
            train_rows += tuple(train_rows[0] + end for end in transfer.round_ends)
        teacher_state = None
        if spec.student.needs_teacher_weights:
            name, revision = split_revision(spec.teacher)
            teacher_state = AutoModelForSequenceClassification.from_pretrained(name, revision=revision).state_dict()
        if spec.student.model is not None:
            problem = tokenizers_compatible(tokenizer, load_tokenizer(spec.student.model))
            if problem:
                raise DataError(f"teacher and student tokenizers differ: {problem}")
        try:
            space = student_space(spec.student, *teacher_dims(teacher_config))
        except SpecError as exc:  # a hub teacher: its width and depth are only known now
            raise DataError(str(exc)) from exc
        # Fail the study now, not in every trial, if the student (one valid shape of it) cannot be built.
        build_student(space.student_for(spec.student, space.example()), teacher_config, seed=spec.seed,
                      teacher_state=teacher_state)
        prepared = PreparedStudy(
            spec=spec,
            task=task,
            cache=cache,
            train=train.to(self.device),
            train_logits=train_logits.to(self.device),
            train_rows=train_rows,
            eval=cache.eval.to(self.device),
            tokenizer=tokenizer,
            teacher_config=teacher_config,
            teacher_state=teacher_state,
            space=space,
            progress=progress,
        )
        if 1 in values_of(spec.search_space.predistilled) and not space.shape_names:
            # One student shape: its pre-distilled weights are built (or loaded) now, with the preparation's progress.
            self._predistilled(prepared, space.student_for(spec.student, {}))
        prepared.progress = None  # a shape first used by a trial reports to the trial's log only
        self._prepared = (fingerprint, prepared)
        return prepared

    def _predistilled(self, prepared: PreparedStudy, student: StudentSpec) -> Predistilled:
        """The pre-distilled encoder weights of one student shape (``distill.predistill``), built once per key."""
        shape = student.model_dump_json()
        if shape not in prepared.predistilled:
            prepared.predistilled[shape] = build_or_load_predistilled(
                self.layout, prepared.spec, student, prepared.teacher_config, self.device, self.precision,
                teacher_state=prepared.teacher_state, log=self.log, progress=prepared.progress)
        return prepared.predistilled[shape]

    def task(self, prepared: PreparedStudy) -> TaskInfo:
        return prepared.task

    def teacher_metrics(self, prepared: PreparedStudy) -> dict[str, float] | None:
        return prepared.cache.teacher_metrics

    def student_space(self, prepared: PreparedStudy, spec: StudySpec) -> StudentSpace:
        return prepared.space

    def profile(self, prepared: PreparedStudy, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's student measured before training (the architecture with random weights: the trained one
        has the same size, FLOPs and speed)."""
        student = prepared.space.student_for(prepared.spec.student, params)
        return profile_model(architecture(student_config(student, prepared.teacher_config)), prepared.eval)

    def teacher_profile(self, prepared: PreparedStudy) -> dict[str, Any]:
        if prepared.teacher_profile is None:
            prepared.teacher_profile = profile_model(architecture(prepared.teacher_config), prepared.eval)
        return prepared.teacher_profile

    def train_config(self, prepared: PreparedStudy, params: dict[str, Any], seed: int,
                     batch_seed: int | None = None) -> TrainConfig:
        """The trial's typed config from its parameters (``TrainConfig.from_params``), in this engine's precision."""
        return TrainConfig.from_params(params, regression=prepared.task.is_regression, seed=seed,
                                       batch_seed=batch_seed, shape_names=prepared.space.shape_names,
                                       precision=self.precision)

    def live_teacher(self, prepared: PreparedStudy, cfgs: list[TrainConfig]) -> PreTrainedModel | None:
        """The teacher model for trials whose terms read its internals (loaded once per prepared study), else None:
        a term whose weight is 0 needs nothing, and a logit-only trial never loads it."""
        if not any(cfg.needs.teacher_internals for cfg in cfgs):
            return None
        if prepared.teacher_model is None:
            from transformers import AutoModelForSequenceClassification

            name, revision = split_revision(prepared.spec.teacher)
            teacher = AutoModelForSequenceClassification.from_pretrained(name, revision=revision)
            prepared.teacher_model = teacher.to(self.device).eval()
        return cast("PreTrainedModel", prepared.teacher_model)

    def train_split(self, prepared: PreparedStudy, cfg: TrainConfig) -> tuple[TokenizedSplit, torch.Tensor]:
        """The trial's train split and teacher outputs: the train rows and the transfer set's first
        ``cfg.transfer_copies`` rounds (None: all of it)."""
        copies = cfg.transfer_copies
        if copies is None:
            return prepared.train, prepared.train_logits
        if not 0 <= copies < len(prepared.train_rows):
            raise ValueError(f"transfer_copies {copies}: the transfer set has {len(prepared.train_rows) - 1} copies")
        rows = prepared.train_rows[copies]
        return prepared.train.head(rows), prepared.train_logits[:rows]

    def _student(self, prepared: PreparedStudy, params: dict[str, Any], seed: int) -> PreTrainedModel:
        """The trial's student: its shape (a searched one: the trial's), its head initialised from ``seed``, its
        encoder from the shape's pre-distilled weights when the trial's ``predistilled`` is 1."""
        student = prepared.space.student_for(prepared.spec.student, params)  # a searched shape: the trial's
        model = build_student(student, prepared.teacher_config, seed=seed, teacher_state=prepared.teacher_state)
        if self.train_config(prepared, params, seed).predistilled:
            weights = self._predistilled(prepared, student).weights
            _missing, unexpected = model.load_state_dict(weights, strict=False)  # missing: the head, the pooler
            if unexpected:
                raise RuntimeError(f"pre-distilled weights do not fit the student: unexpected {unexpected[:5]}")
        if student.pair_encoding == "siamese":  # its head starts fitted to the teacher (about a second)
            fit_pair_head(model, prepared.train, prepared.train_logits)
        return model

    def _store(self, prepared: PreparedStudy, model: PreTrainedModel, result: TrainResult, params: dict[str, Any],
               seed: int, checkpoint_dir: Path, extra: dict[str, Any] | None = None) -> TrialOutcome:
        """The best epoch's weights written to ``checkpoint_dir`` (a Hugging Face model directory), as the outcome."""
        model.load_state_dict(result.best_state)
        save_checkpoint(model.cpu(), prepared.tokenizer, checkpoint_dir, {
            "params": params,
            "seed": seed,
            "task": prepared.task.to_json(),
            "metric": prepared.task.metric,
            "best_epoch": result.best_epoch,
            "score": result.best_score,
            "metrics": result.best_metrics,
            "history": [dataclasses.asdict(h) for h in result.history],
            "teacher_metrics": prepared.cache.teacher_metrics,
            "stopped": result.stopped,
            "precision": self.precision,
            **self._predistilled_record(prepared, params),
            **(extra or {}),
        })
        return TrialOutcome(result.history, result.best_epoch, result.best_score, result.stopped,
                            result.samples_per_second, self.precision)

    def _predistilled_record(self, prepared: PreparedStudy, params: dict[str, Any]) -> dict[str, Any]:
        """What the trial record (and the model card) says of a pre-distilled student's start."""
        if not self.train_config(prepared, params, 0).predistilled:
            return {}
        built = self._predistilled(prepared, prepared.space.student_for(prepared.spec.student, params))
        return {"predistilled": {"key": built.key, "sentences": built.meta["sentences"],
                                 "epochs": built.meta["recipe"]["epochs"],
                                 "relation_heads": built.meta["recipe"]["relation_heads"],
                                 "hidden_weight": built.meta["recipe"].get("hidden_weight", 0.0),
                                 "task_pairs": built.meta.get("task_pairs", 0),
                                 "task_pair_copies": built.meta["recipe"].get("task_pairs", 0),
                                 "task_pair_splits": built.meta.get("task_pair_splits", []),
                                 "scored_split": prepared.spec.dataset.eval_split,
                                 "build_seconds": built.meta["build_seconds"]}}

    def run_trial(self, prepared: PreparedStudy, params: dict[str, Any], seed: int,
                  on_epoch_end: EpochCallback | None, checkpoint_dir: Path) -> TrialOutcome:
        cfg = self.train_config(prepared, params, seed)
        model = self._student(prepared, params, seed)
        train, train_logits = self.train_split(prepared, cfg)
        result = train_student(model, train, train_logits, prepared.eval, cfg, on_epoch_end, task=prepared.task,
                               teacher=self.live_teacher(prepared, [cfg]))
        outcome = self._store(prepared, model, result, params, seed, checkpoint_dir)
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return outcome

    def run_pack(self, prepared: PreparedStudy, members: list[PackedTrial], batch_seed: int,
                 on_member_done: MemberDone | None = None) -> list[TrialOutcome | Exception]:
        """The members trained together (``distill.packed.train_pack``); they must share the student's shape, the
        batch size and the transfer copies (ValueError otherwise)."""
        shapes = {prepared.space.student_for(prepared.spec.student, m.params).model_dump_json() for m in members}
        if len(shapes) > 1:
            raise ValueError(f"a pack trains one student shape, not {len(shapes)}")
        configs = [self.train_config(prepared, m.params, m.seed, batch_seed) for m in members]
        if len({cfg.transfer_copies for cfg in configs}) > 1:
            raise ValueError("a pack trains on one train split: its members' transfer_copies differ")
        train, train_logits = self.train_split(prepared, configs[0])
        pack = [PackMember(self._student(prepared, m.params, m.seed), cfg, m.on_epoch_end)
                for m, cfg in zip(members, configs, strict=True)]
        outcomes: dict[int, TrialOutcome | Exception] = {}
        pack_step = carried_step(self.pack_step, pack)  # a pack with layer-wise terms steps in the loop

        def done(index: int, result: TrainResult | MemberDiverged) -> None:
            """A member left the pack: its checkpoint is written now, while the others train on."""
            member = members[index]
            outcome: TrialOutcome | Exception = result if isinstance(result, Exception) else self._store(
                prepared, pack[index].model, result, member.params, member.seed, member.checkpoint_dir,
                {"batch_seed": batch_seed, "pack_size": len(members), "pack_step": pack_step})
            outcomes[index] = outcome
            if on_member_done is not None:
                on_member_done(index, outcome)

        train_pack(pack, train, train_logits, prepared.eval, batch_seed, prepared.task, pack_step, done,
                   self.live_teacher(prepared, [m.cfg for m in pack]))
        pack.clear()  # the members' models: free before the cache is emptied
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [outcomes[index] for index in range(len(members))]


def _encodes_pairs(tokenizer: Any) -> bool:
    """Whether the tokenizer joins two texts into one pair encoding (BERT's [SEP] and segment ids, or the like)."""
    try:
        single = tokenizer("a b", truncation=True, max_length=16)["input_ids"]
        pair = tokenizer("a", "b", truncation=True, max_length=16)["input_ids"]
    except Exception:  # noqa: BLE001 - any failure means it cannot encode pairs
        return False
    return pair != single


TRIAL_RECORD = "kdsearch_trial.json"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                    record: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / TRIAL_RECORD).write_text(json.dumps(record, indent=2))


def load_trial_engine(dotted: str | None, *, artifacts: str | Path | ArtifactLayout, device: str | None,
                log: Callable[[str], None] = print, precision: str = "auto", pack_step: str = "auto") -> TrialEngine:
    """``package.module:ClassName`` → an engine instance (tests plug in a fast fake this way); None → the
    distillation engine, training in ``precision`` (``distill.precision``), packs stepping as ``pack_step``
    (``distill.packed.resolve_pack_step``)."""
    if not dotted:
        return DistillationEngine(artifacts, device=device, log=log, precision=precision, pack_step=pack_step)
    module_name, _, class_name = dotted.partition(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(artifacts=artifacts, device=device)

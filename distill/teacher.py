"""Teacher logits, computed once per (teacher, dataset, task, max_seq_length) and cached for every trial and worker.

The cache entry holds the tokenized train and eval splits (token ids, segment ids of sentence pairs, labels) and
the teacher's outputs for each row (``distill.cache``: one process builds, the others wait and load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from distill.cache import CACHE_FORMAT, Entry, build_once, split_from_tensors, split_tensors
from distill.data import DataError, TextSplit, TokenizedSplit, load_split, subsample, tokenize
from distill.models import fingerprint, load_teacher
from distill.progress import TEACHER_STAGE, Progress
from distill.task_metrics import compute_metrics
from distill.train import RowsDone, predict
from search_space import StudySpec, TaskInfo
from storage import ArtifactLayout

SUBSET_SEED = 0  # fixed, so studies that differ only in their search seed share one cache entry


def cache_key(spec: StudySpec, task: TaskInfo) -> str:
    """Everything that changes the cached tensors: the teacher, the dataset (columns, pair column, subset, max
    length), the task type and the label mapping. Not the study's metric: studies of any metric share an entry."""
    payload = {
        "format": CACHE_FORMAT,
        "teacher": fingerprint(spec.teacher),
        "dataset": spec.dataset.model_dump(),
        "subset_seed": SUBSET_SEED,
        "task": {"type": task.type, "num_labels": task.num_labels, "label_names": list(task.label_names)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def predict_logits(model: Any, split: TokenizedSplit, batch_size: int, device: torch.device,
                   on_rows: RowsDone | None = None) -> torch.Tensor:
    """The teacher's outputs for every row, in row order, on the CPU."""
    model.eval().to(device)
    return predict(model, split, batch_size, out_device="cpu", on_rows=on_rows)


ROWS_NAMED = 5  # a non-finite output's rows the error lists; it counts them all


def check_finite_outputs(outputs: torch.Tensor, split: str) -> None:
    """A ``DataError`` (the study's fault: it fails the study) when any of the teacher's outputs on ``split`` is
    NaN or infinite, naming the first rows (numbered from 0, in the order the split is loaded) and counting them:
    students distilled from them would learn nothing, and score as if they had."""
    bad = (~torch.isfinite(outputs)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        rows = ", ".join(map(str, bad[:ROWS_NAMED])) + (", ..." if len(bad) > ROWS_NAMED else "")
        raise DataError(f"the teacher's outputs are not finite (NaN or infinite) for {len(bad)} of {len(outputs)} "
                        f"{split} rows (rows {rows}): check the teacher's weights")


@dataclasses.dataclass
class TeacherCache:
    key: str
    train: TokenizedSplit
    train_logits: torch.Tensor
    eval: TokenizedSplit
    eval_logits: torch.Tensor
    meta: dict[str, Any]

    @property
    def teacher_metrics(self) -> dict[str, float]:
        """Every metric of the task, for the teacher on the eval split."""
        return dict(self.meta["teacher_metrics"])


def load_train_texts(spec: StudySpec, task: TaskInfo) -> TextSplit:
    """The train split exactly as the cache holds it (same subset)."""
    return subsample(load_split(spec.dataset, spec.dataset.train_split, task), spec.dataset.max_train_samples,
                     SUBSET_SEED)


def build_or_load_cache(layout: ArtifactLayout, spec: StudySpec, task: TaskInfo, device: torch.device,
                        batch_size: int = 128, log: Callable[[str], None] = print,
                        progress: Progress | None = None) -> TeacherCache:
    """The study's teacher-logit cache entry, built once (``progress`` hears of every batch the teacher labels)."""
    key = cache_key(spec, task)

    def build() -> Entry:
        log(f"building teacher-logit cache {key} for {spec.teacher}")
        started = time.perf_counter()
        model, tokenizer = load_teacher(spec.teacher)
        splits = {}
        for name in ("train", "eval"):
            text = (load_train_texts(spec, task) if name == "train"
                    else load_split(spec.dataset, spec.dataset.eval_split, task))
            splits[name] = tokenize(tokenizer, text, spec.dataset.max_seq_length)
        # The costly part: one teacher forward over every train and eval row, done once for all trials.
        total = sum(len(split) for split in splits.values())
        logits, offset = {}, 0
        for name, split in splits.items():
            on_rows = None if progress is None else (
                lambda done, offset=offset: progress(TEACHER_STAGE, offset + done, total))
            logits[name] = predict_logits(model, split, batch_size, device, on_rows)
            check_finite_outputs(logits[name], name)
            offset += len(split)
        teacher_metrics = compute_metrics(task, logits["eval"].numpy(), splits["eval"].labels.numpy())
        meta = {
            "format": CACHE_FORMAT,
            "teacher": spec.teacher,
            "dataset": spec.dataset.model_dump(),
            "task": {"type": task.type, "num_labels": task.num_labels, "label_names": list(task.label_names)},
            "pad_id": splits["train"].pad_id,
            "n_train": len(splits["train"]),
            "n_eval": len(splits["eval"]),
            "teacher_metrics": teacher_metrics,
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        scores = ", ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.items())
        log(f"teacher-logit cache {key}: {meta['n_train']} train / {meta['n_eval']} eval rows in "
            f"{meta['build_seconds']} s; teacher on the eval split: {scores}")
        tensors: dict[str, torch.Tensor] = {}
        for name, split in splits.items():
            tensors |= split_tensors(f"{name}.", split, logits[name])
        return tensors, meta

    tensors, meta = build_once(layout, key, build)
    return TeacherCache(key, split_from_tensors("train.", tensors, meta["pad_id"]), tensors["train.teacher_logits"],
                        split_from_tensors("eval.", tensors, meta["pad_id"]), tensors["eval.teacher_logits"], meta)

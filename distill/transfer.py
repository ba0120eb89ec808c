"""The augmented transfer set: teacher-labelled variants of the train rows (``distill.augment``), built once per
(teacher, dataset, task, augment) and cached like the teacher logits. A sentence pair is augmented side by side;
the teacher labels the pair."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from distill.augment import Augmenter
from distill.cache import CACHE_FORMAT, Entry, build_once, split_from_tensors, split_tensors
from distill.data import DataError, TextSplit, TokenizedSplit, tokenize, unlabelled_like
from distill.models import load_teacher
from distill.progress import TRANSFER_STAGE, Progress
from distill.teacher import cache_key, load_train_texts, predict_logits
from search_space import StudySpec, TaskInfo
from storage import ArtifactLayout


@dataclasses.dataclass
class TransferSet:
    """Teacher-labelled variants of the train rows: no gold labels (``NO_LABEL`` / NaN), the teacher's logits as
    target."""

    key: str
    split: TokenizedSplit
    logits: torch.Tensor
    sources: torch.Tensor  # [N] the train row each variant came from
    meta: dict[str, Any]


def transfer_key(spec: StudySpec, task: TaskInfo) -> str:
    payload = {"format": CACHE_FORMAT, "cache": cache_key(spec, task), "augment": spec.augment.model_dump()}
    return "aug-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_or_load_transfer_set(layout: ArtifactLayout, spec: StudySpec, task: TaskInfo, device: torch.device,
                               batch_size: int = 128, log: Callable[[str], None] = print,
                               progress: Progress | None = None) -> TransferSet | None:
    """The study's augmented transfer set (None when ``augment.copies`` is 0)."""
    if spec.augment.copies == 0:
        return None
    key = transfer_key(spec, task)

    def build() -> Entry:
        log(f"building the augmented transfer set {key} ({spec.augment.copies} copies per train row)")
        started = time.perf_counter()
        model, tokenizer = load_teacher(spec.teacher)
        train = load_train_texts(spec, task)
        try:
            augmenter = Augmenter([*train.texts, *(train.text_pairs or [])], spec.augment, tokenizer.mask_token)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        variants, variant_pairs, sources = augmenter.transfer_set(train.texts, train.text_pairs)
        if not variants:
            raise DataError("the augmented transfer set is empty (no words in the train texts)")
        text = TextSplit(variants, unlabelled_like(len(variants), task.is_regression), variant_pairs)
        split = tokenize(tokenizer, text, spec.dataset.max_seq_length)
        augmented_s = time.perf_counter() - started
        # The costly part: the teacher labels every variant, once for all trials and workers.
        on_rows = None if progress is None else (lambda done: progress(TRANSFER_STAGE, done, len(split)))
        logits = predict_logits(model, split, batch_size, device, on_rows)
        meta = {
            "format": CACHE_FORMAT,
            "augment": spec.augment.model_dump(),
            "pad_id": split.pad_id,
            "n_rows": len(split),
            "n_source_rows": len(train.texts),
            "augment_seconds": round(augmented_s, 2),
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        log(f"transfer set {key}: {meta['n_rows']} rows from {meta['n_source_rows']} train rows in "
            f"{meta['build_seconds']} s")
        return split_tensors("", split, logits) | {"sources": torch.from_numpy(sources)}, meta

    tensors, meta = build_once(layout, key, build)
    return TransferSet(key, split_from_tensors("", tensors, meta["pad_id"]), tensors["teacher_logits"],
                       tensors["sources"], meta)

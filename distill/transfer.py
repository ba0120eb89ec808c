"""The augmented transfer set: teacher-labelled variants of the train rows (``distill.augment``; for sentence pairs
also recombined and perturbed pairs, ``distill.pair_corpus``), built once per (teacher, dataset, task, augment) and
cached like the teacher logits; the teacher labels the pair. It is built in rounds of one row per train row, so a
trial that trains on k copies (``search_space.transfer_copies``) takes its first ``round_ends[k - 1]`` rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from distill.cache import CACHE_FORMAT, Entry, build_once, split_from_tensors, split_tensors
from distill.data import DataError, TextSplit, TokenizedSplit, tokenize, unlabelled_like
from distill.models import load_teacher
from distill.pair_corpus import build_corpus
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

    @property
    def round_ends(self) -> list[int]:
        """Rows of the first 1, 2, ... ``copies`` rounds: ``round_ends[k - 1]`` rows are the k-copy set."""
        return [int(n) for n in self.meta["round_ends"]]


# Bumped whenever the transfer set's rows change for the same spec: 2 built it in rounds (distill.pair_corpus).
TRANSFER_FORMAT = 2


def transfer_key(spec: StudySpec, task: TaskInfo) -> str:
    """Everything that changes the transfer set: the teacher-logit cache's key (teacher, dataset, task) and the whole
    ``augment`` block; not ``search_space.transfer_copies`` (a trial's prefix of it)."""
    payload = {"format": CACHE_FORMAT, "transfer_format": TRANSFER_FORMAT, "cache": cache_key(spec, task),
               "augment": spec.augment.model_dump()}
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
        pairs = spec.augment.pairs
        # Word replacement by the teacher's embedding-space neighbours reads the teacher's input embeddings.
        embeddings = model.get_input_embeddings().weight if pairs.perturbed and pairs.p_neighbour else None
        try:
            corpus = build_corpus(train.texts, train.text_pairs, spec.augment, tokenizer, embeddings)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        if not corpus.texts:
            raise DataError("the augmented transfer set is empty (no words in the train texts)")
        text = TextSplit(corpus.texts, unlabelled_like(len(corpus.texts), task.is_regression), corpus.pairs)
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
            "round_ends": corpus.round_ends,
            "strategy_rows": corpus.strategy_rows(),
            "augment_seconds": round(augmented_s, 2),
            "generate_seconds": corpus.seconds,
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        log(f"transfer set {key}: {meta['n_rows']} rows from {meta['n_source_rows']} train rows in "
            f"{meta['build_seconds']} s (generated in {corpus.seconds['total']} s; rows by strategy "
            f"{meta['strategy_rows']})")
        return split_tensors("", split, logits) | {"sources": torch.from_numpy(corpus.sources),
                                                   "strategies": torch.from_numpy(corpus.strategies)}, meta

    tensors, meta = build_once(layout, key, build)
    return TransferSet(key, split_from_tensors("", tensors, meta["pad_id"]), tensors["teacher_logits"],
                       tensors["sources"], meta)

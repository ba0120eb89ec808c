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

import numpy as np
import torch

from distill.cache import CACHE_FORMAT, Entry, build_once, split_from_tensors, split_tensors
from distill.data import DataError, TextSplit, TokenizedSplit, tokenize, unlabelled_like
from distill.models import load_teacher
from distill.pair_corpus import build_corpus, strategy_rows
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


def label_mix_rows(predicted: np.ndarray, round_ends: list[int], shares: np.ndarray,
                   seed: int) -> tuple[np.ndarray, list[int]]:
    """The rows to keep so that each round's predicted class mix is ``shares`` (per class, summing to 1), and the
    new round ends: per round the largest such sample, every row of the class scarcest for its share and a seeded
    random sample of each other class, in row order (so the first k rounds are still the k-copy set)."""
    rng = np.random.default_rng(seed)
    wanted = np.flatnonzero(shares > 0)
    kept: list[np.ndarray] = []
    ends: list[int] = []
    start, total = 0, 0
    for end in round_ends:
        labels = predicted[start:end]
        counts = np.bincount(labels, minlength=len(shares))
        size = float(np.min(counts[wanted] / shares[wanted]))  # rows of the round at the target mix
        chosen = [start + rng.choice(np.flatnonzero(labels == c),
                                     size=min(int(counts[c]), int(size * shares[c] + 1e-6)), replace=False)
                  for c in wanted]
        round_rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
        kept.append(round_rows)
        total += len(round_rows)
        ends.append(total)
        start = end
    return np.concatenate(kept).astype(np.int64), ends


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
        round_ends, sources, strategies = corpus.round_ends, corpus.sources, corpus.strategies
        mix: dict[str, Any] = {}
        if spec.augment.match_label_mix:
            if task.is_regression:
                raise DataError("augment.match_label_mix applies to classification tasks; this task is regression")
            shares = np.bincount(train.labels, minlength=task.num_labels) / len(train.labels)
            predicted = logits.argmax(-1).numpy()
            keep, round_ends = label_mix_rows(predicted, corpus.round_ends, shares, spec.augment.seed)
            mix = {"label_mix": {"train": shares.round(4).tolist(),
                                 "labelled": (np.bincount(predicted, minlength=task.num_labels)
                                              / len(predicted)).round(4).tolist(),
                                 "rows_before": len(split), "rows_kept": len(keep)}}
            log(f"transfer set {key}: the teacher's class mix {mix['label_mix']['labelled']} matched to the train "
                f"split's {mix['label_mix']['train']}: {len(keep)} of {len(split)} rows kept")
            if not len(keep):
                raise DataError("augment.match_label_mix keeps no row: the teacher predicts no transfer row of some "
                                f"class of the train split (its mix {mix['label_mix']['labelled']})")
            index = torch.from_numpy(keep)
            split, logits, sources, strategies = split.take(index), logits[index], sources[keep], strategies[keep]
        meta = {
            "format": CACHE_FORMAT,
            "augment": spec.augment.model_dump(),
            "pad_id": split.pad_id,
            "n_rows": len(split),
            "n_source_rows": len(train.texts),
            "round_ends": round_ends,
            "strategy_rows": strategy_rows(strategies),
            **mix,
            "augment_seconds": round(augmented_s, 2),
            "generate_seconds": corpus.seconds,
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        log(f"transfer set {key}: {meta['n_rows']} rows from {meta['n_source_rows']} train rows in "
            f"{meta['build_seconds']} s (generated in {corpus.seconds['total']} s; rows by strategy "
            f"{meta['strategy_rows']})")
        return split_tensors("", split, logits) | {"sources": torch.from_numpy(sources),
                                                   "strategies": torch.from_numpy(strategies)}, meta

    tensors, meta = build_once(layout, key, build)
    return TransferSet(key, split_from_tensors("", tensors, meta["pad_id"]), tensors["teacher_logits"],
                       tensors["sources"], meta)

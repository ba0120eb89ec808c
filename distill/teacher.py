"""Teacher logits, computed once per (teacher, dataset, max_seq_length) and cached for every trial and worker.

The cache entry holds the tokenized train and eval splits and the teacher's logits for each row, in one
safetensors file plus ``meta.json``. One process builds it under a file lock while others wait; it is written to
a temporary directory and renamed into place, so a reader never sees half an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.augment import Augmenter
from distill.data import (
    DataError,
    TextSplit,
    TokenizedSplit,
    length_bucketed_batches,
    load_split,
    subsample,
    tokenize,
)
from distill.loss import NO_LABEL
from search_space import StudySpec, looks_local
from storage import ArtifactLayout

CACHE_FORMAT = 1
SUBSET_SEED = 0  # fixed, so studies that differ only in their search seed share one cache entry


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@rev`` → (``owner/name``, ``rev``); local paths are returned as they are."""
    if looks_local(ref) or "@" not in ref:
        return ref, None
    name, revision = ref.split("@", 1)
    return name, revision


def load_teacher(ref: str):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    name, revision = split_revision(ref)
    config = AutoConfig.from_pretrained(name, revision=revision)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise DataError(f"teacher {ref!r} is not a sequence classifier (architectures: {architectures})")
    model = AutoModelForSequenceClassification.from_pretrained(name, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    return model, tokenizer


def _fingerprint(ref: str) -> str:
    """Identity of a model reference: hub id (with revision) or a local directory's file sizes and times."""
    if not looks_local(ref):
        return ref
    path = Path(ref)
    parts = [str(path.resolve())]
    for item in sorted(path.iterdir()):
        if item.is_file():
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def cache_key(spec: StudySpec) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "teacher": _fingerprint(spec.teacher),
        "dataset": spec.dataset.model_dump(),
        "subset_seed": SUBSET_SEED,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def predict_logits(model, split: TokenizedSplit, batch_size: int, device: torch.device) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits for every row, in row order; batches of similar length so little is padded."""
    model.eval().to(device)
    out = torch.empty(len(split), model.config.num_labels, dtype=torch.float32)
    for idx in length_bucketed_batches(split.lengths, batch_size):
        ids, mask = split.batch(idx)
        out[idx] = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
    return out


@dataclasses.dataclass
class TeacherCache:
    key: str
    train: TokenizedSplit
    train_logits: torch.Tensor
    eval: TokenizedSplit
    eval_logits: torch.Tensor
    meta: dict[str, Any]

    @property
    def teacher_accuracy(self) -> float:
        return float(self.meta["teacher_eval_accuracy"])


Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a cache entry: safetensors tensors and meta.json


def _build_once(layout: ArtifactLayout, key: str, build: Callable[[], Entry]) -> Entry:
    """Cache entry ``key``, built first if missing. One process builds it under the entry's file lock while the
    others wait; it is written to a temporary directory and renamed into place, so a reader never sees half."""
    with layout.locked(key) as directory:
        if not (directory / "meta.json").is_file():
            tensors, meta = build()
            tmp = directory.with_name(f".{key}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "data.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            tmp.rename(directory)
        return load_file(str(directory / "data.safetensors")), json.loads((directory / "meta.json").read_text())


def _split_tensors(name: str, split: TokenizedSplit, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{name}input_ids": split.input_ids.to(torch.int32),  # vocab ids fit; halves the file
            f"{name}lengths": split.lengths, f"{name}teacher_logits": logits}


def load_train_texts(spec: StudySpec) -> TextSplit:
    """The train split exactly as the cache holds it (same subset)."""
    return subsample(load_split(spec.dataset, spec.dataset.train_split), spec.dataset.max_train_samples, SUBSET_SEED)


def build_or_load_cache(layout: ArtifactLayout, spec: StudySpec, device: torch.device,
                        batch_size: int = 128, log=print) -> TeacherCache:  # type: ignore[no-untyped-def]
    key = cache_key(spec)

    def build() -> Entry:
        log(f"building teacher-logit cache {key} for {spec.teacher}")
        started = time.perf_counter()
        model, tokenizer = load_teacher(spec.teacher)
        num_labels = model.config.num_labels
        splits = {}
        for name, split_name in (("train", spec.dataset.train_split), ("eval", spec.dataset.eval_split)):
            text = load_train_texts(spec) if name == "train" else load_split(spec.dataset, split_name)
            bad = (text.labels < 0) | (text.labels >= num_labels)
            if bad.any():
                raise DataError(f"split {split_name!r} has labels outside the teacher's 0..{num_labels - 1}")
            splits[name] = tokenize(tokenizer, text, spec.dataset.max_seq_length)
        # The costly part: one teacher forward over every train and eval row, done once for all trials.
        logits = {name: predict_logits(model, split, batch_size, device) for name, split in splits.items()}
        teacher_acc = (logits["eval"].argmax(-1) == splits["eval"].labels).float().mean().item()
        meta = {
            "format": CACHE_FORMAT,
            "teacher": spec.teacher,
            "dataset": spec.dataset.model_dump(),
            "num_labels": num_labels,
            "id2label": {str(k): v for k, v in model.config.id2label.items()},
            "pad_id": splits["train"].pad_id,
            "n_train": len(splits["train"]),
            "n_eval": len(splits["eval"]),
            "teacher_eval_accuracy": teacher_acc,
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        log(f"teacher-logit cache {key}: {meta['n_train']} train / {meta['n_eval']} eval rows in "
            f"{meta['build_seconds']} s, teacher eval accuracy {teacher_acc:.4f}")
        tensors = {}
        for name, split in splits.items():
            tensors |= _split_tensors(f"{name}.", split, logits[name]) | {f"{name}.labels": split.labels}
        return tensors, meta

    tensors, meta = _build_once(layout, key, build)

    def split(name: str) -> TokenizedSplit:
        return TokenizedSplit(tensors[f"{name}.input_ids"].long(), tensors[f"{name}.lengths"],
                              tensors[f"{name}.labels"], meta["pad_id"])

    return TeacherCache(key, split("train"), tensors["train.teacher_logits"], split("eval"),
                        tensors["eval.teacher_logits"], meta)


@dataclasses.dataclass
class TransferSet:
    """Teacher-labelled variants of the train rows: no gold labels (``NO_LABEL``), the teacher's logits as target."""

    key: str
    split: TokenizedSplit
    logits: torch.Tensor
    sources: torch.Tensor  # [N] the train row each variant came from
    meta: dict[str, Any]


def transfer_key(spec: StudySpec) -> str:
    payload = {"format": CACHE_FORMAT, "cache": cache_key(spec), "augment": spec.augment.model_dump()}
    return "aug-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_or_load_transfer_set(layout: ArtifactLayout, spec: StudySpec, device: torch.device,
                               batch_size: int = 128, log=print) -> TransferSet | None:  # type: ignore[no-untyped-def]
    """The study's augmented transfer set, built once per (teacher, dataset, augment) like the teacher cache."""
    if spec.augment.copies == 0:
        return None
    key = transfer_key(spec)

    def build() -> Entry:
        log(f"building the augmented transfer set {key} ({spec.augment.copies} copies per train row)")
        started = time.perf_counter()
        model, tokenizer = load_teacher(spec.teacher)
        texts = load_train_texts(spec).texts
        try:
            augmenter = Augmenter(texts, spec.augment, tokenizer.mask_token)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        variants, sources = augmenter.transfer_set(texts)
        if not variants:
            raise DataError("the augmented transfer set is empty (no words in the train texts)")
        split = tokenize(tokenizer, TextSplit(variants, np.full(len(variants), NO_LABEL)), spec.dataset.max_seq_length)
        augmented_s = time.perf_counter() - started
        # The costly part: the teacher labels every variant, once for all trials and workers.
        logits = predict_logits(model, split, batch_size, device)
        meta = {
            "format": CACHE_FORMAT,
            "augment": spec.augment.model_dump(),
            "pad_id": split.pad_id,
            "n_rows": len(split),
            "n_source_rows": len(texts),
            "augment_seconds": round(augmented_s, 2),
            "build_seconds": round(time.perf_counter() - started, 2),
            "device": str(device),
        }
        log(f"transfer set {key}: {meta['n_rows']} rows from {meta['n_source_rows']} train rows in "
            f"{meta['build_seconds']} s")
        return _split_tensors("", split, logits) | {"sources": torch.from_numpy(sources)}, meta

    tensors, meta = _build_once(layout, key, build)
    lengths = tensors["lengths"]
    split = TokenizedSplit(tensors["input_ids"].long(), lengths, torch.full_like(lengths, NO_LABEL), meta["pad_id"])
    return TransferSet(key, split, tensors["teacher_logits"], tensors["sources"], meta)

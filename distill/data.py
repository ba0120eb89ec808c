"""Text classification data: read a split, tokenize it once, and serve length-bucketed batches.

Batches are drawn from one padded id matrix held in memory (on the training device), padded only to the longest
row of each batch: no per-step tokenization, collation or DataLoader workers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from search_space import DatasetSpec, split_file


class DataError(ValueError):
    """The dataset cannot be used as specified (missing column, bad label, empty split)."""


@dataclasses.dataclass
class TextSplit:
    texts: list[str]
    labels: np.ndarray  # int64


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".tsv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"unsupported data file {path}")


def _load_hub_rows(spec: DatasetSpec, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError("hub datasets need the 'datasets' package: pip install 'kdsearch[hub]'") from exc
    return datasets.load_dataset(spec.hub, spec.config, split=split).to_list()


def load_split(spec: DatasetSpec, split: str) -> TextSplit:
    if spec.path is not None:
        path = split_file(Path(spec.path), split)
        if path is None:
            raise DataError(f"no file for split {split!r} in {spec.path}")
        rows = _read_rows(path)
    else:
        rows = _load_hub_rows(spec, split)
    if not rows:
        raise DataError(f"split {split!r} is empty")
    for column in (spec.text_column, spec.label_column):
        if column not in rows[0]:
            raise DataError(f"split {split!r} has no column {column!r} (columns: {sorted(rows[0])})")
    try:
        labels = np.array([int(r[spec.label_column]) for r in rows], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"split {split!r}: labels in {spec.label_column!r} must be integers ({exc})") from exc
    return TextSplit([str(r[spec.text_column]) for r in rows], labels)


def subsample(split: TextSplit, n: int | None, seed: int) -> TextSplit:
    """A fixed random subset of ``n`` rows (all rows when n is None or too large)."""
    if n is None or n >= len(split.texts):
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split.texts))[:n])
    return TextSplit([split.texts[i] for i in idx], split.labels[idx])


@dataclasses.dataclass
class TokenizedSplit:
    input_ids: torch.Tensor  # [N, max_len] int64, right-padded with pad_id
    lengths: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64
    pad_id: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TokenizedSplit:
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device), lengths=self.lengths.to(device), labels=self.labels.to(device)
        )

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) for rows ``idx``, trimmed to their longest row."""
        width = int(self.lengths[idx].max())
        ids = self.input_ids[idx, :width]
        mask = torch.arange(width, device=ids.device)[None, :] < self.lengths[idx, None]
        return ids, mask.long()


def concat_splits(first: TokenizedSplit, second: TokenizedSplit) -> TokenizedSplit:
    """Rows of both splits in one padded matrix (the narrower one is padded to the wider's width)."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def widen(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=first.pad_id)

    return TokenizedSplit(torch.cat([widen(first.input_ids), widen(second.input_ids)]),
                          torch.cat([first.lengths, second.lengths]), torch.cat([first.labels, second.labels]),
                          first.pad_id)


def tokenize(tokenizer, split: TextSplit, max_seq_length: int) -> TokenizedSplit:  # type: ignore[no-untyped-def]
    encoded = tokenizer(split.texts, truncation=True, max_length=max_seq_length, padding=False)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return TokenizedSplit(input_ids, lengths, torch.from_numpy(split.labels.copy()), pad_id)


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
                            bucket_batches: int = 50) -> list[torch.Tensor]:
    """Index batches of rows of similar length.

    With a generator: shuffle, sort within chunks of ``bucket_batches`` batches by length, then shuffle the batch
    order (random yet cheap to pad). Without: one pass sorted by length (evaluation).
    """
    lengths = lengths.cpu()
    if generator is None:
        order = torch.argsort(lengths, stable=True)
        return list(order.split(batch_size))
    perm = torch.randperm(len(lengths), generator=generator)
    chunk = batch_size * bucket_batches
    batches: list[torch.Tensor] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches.extend(part.split(batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]

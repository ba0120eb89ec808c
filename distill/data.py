"""Text classification and regression data: read a split with ``datasets``, tokenize it once, and serve
length-bucketed batches.

Batches are drawn from one padded id matrix held in memory (on the training device), padded only to the longest
row of each batch: no per-step tokenization, collation or DataLoader workers. Sentence pairs keep their segment ids
(``token_type_ids``) beside the token ids, through the teacher cache, the transfer set, training and evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdsearch.errors import UserError
from kdsearch.terms import NO_LABEL
from search_space import DatasetSpec, SpecError, StudySpec, TaskInfo, split_file

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


class DataError(UserError):
    """The dataset cannot be used as specified (missing column, bad label, empty split).

    ``Fault.USER``: the user's data; retrying cannot help, so the study fails with this message as its reason. A
    ``ValueError`` still (through ``UserError``)."""


@dataclasses.dataclass
class TextSplit:
    texts: list[str]
    labels: np.ndarray  # int64 class ids, or float32 targets for regression; NO_LABEL / NaN: no gold label
    text_pairs: list[str] | None = None  # the second text of each row, for sentence-pair tasks


# How each local file type is read by datasets. GLUE-style TSVs hold raw '"' characters: no quoting. No value is
# read as missing ("NA", "null" and "nan" are words in a sentence); labels are interpreted by the task below.
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".csv": ("csv", {"keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


def read_split(spec: DatasetSpec, split: str) -> datasets.Dataset:
    """The split as a ``datasets.Dataset``: a local ``<split>.<ext>`` file, or a hub dataset (needs network)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.path is not None:
            path = split_file(Path(spec.path), split)
            if path is None:
                raise DataError(f"no file for split {split!r} in {spec.path}")
            builder, kwargs = _BUILDERS[path.suffix]
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
        return datasets.load_dataset(spec.hub, spec.config, split=split)
    except datasets.exceptions.DatasetGenerationError as exc:
        raise DataError(f"cannot read split {split!r}: {_parse_problem(exc.__cause__ or exc)}") from exc
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        if "corresponds to no data" in str(exc):
            raise DataError(f"split {split!r} is empty") from exc
        raise DataError(f"cannot read split {split!r}: {_parse_problem(exc)}") from exc


# Where a parser says it stopped ("line 3", "row 12"): the only part of its message kept, since the rest may quote
# the file (pandas and Arrow echo the cell they could not parse).
_PARSE_PLACE = re.compile(r"\b(line|row)\s+(\d+)", re.IGNORECASE)


def _parse_problem(exc: BaseException) -> str:
    """The kind of a parser's error and where it stopped, never its text (which may quote a cell of the file)."""
    place = _PARSE_PLACE.search(str(exc))
    where = f"; the parser stopped at its {place.group(1).lower()} {place.group(2)}" if place else ""
    return f"the file does not parse ({type(exc).__name__}{where})"


def _column(ds: datasets.Dataset, name: str, split: str) -> list[Any]:
    if name not in ds.column_names:
        # The file's own column names are not listed: without a header row they are its first row's cells.
        raise DataError(f"split {split!r} has no column {name!r} (it has {len(ds.column_names)} columns; see "
                        "dataset.text_column, text_pair_column and label_column)")
    return ds.data.column(name).to_pylist()


def _where(row: int, split: str, column: str) -> str:
    """Where a bad value is, never what it is (a cell may hold anything: errors reach the API and webhooks):
    the data row's number, counting from 1 (a header line not counted), its split and column."""
    return f"row {row + 1} of split {split!r}, column {column!r}"


def _kind(value: Any) -> str:
    return "empty" if value is None or value == "" else f"a {type(value).__name__}"


def _is_integral(value: Any) -> bool:
    return isinstance(value, int | np.integer) or (isinstance(value, float) and value.is_integer())


def _class_ids(values: list[Any], column: str, split: str, task: TaskInfo | None) -> np.ndarray:
    """Integer ids as they are; label names through the teacher's ``label2id``; anything else is refused."""
    label2id = {name: i for i, name in enumerate(task.label_names)} if task else {}
    folded = {name.lower(): i for name, i in label2id.items()}
    ids = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str):
            known = label2id.get(value, folded.get(value.strip().lower()))
            if known is None and value.strip().lstrip("-").isdigit():
                known = int(value)
            if known is None:
                # The teacher's label names are its config's, not the file's: they may be named.
                known_names = f"one of the teacher's labels ({', '.join(label2id)}), nor " if label2id else ""
                raise DataError(f"{_where(row, split, column)}: not {known_names}a class id")
            ids[row] = known
        elif _is_integral(value):
            ids[row] = int(value)
        else:
            why = "a float label in a classification study" if isinstance(value, float) else (
                f"not a class label ({_kind(value)})")
            raise DataError(f"{_where(row, split, column)}: {why} (the teacher is a "
                            f"{task.num_labels if task else 'multi'}-class classifier; give class ids or names)")
    if task is not None:
        bad = (ids < 0) | (ids >= task.num_labels)
        if bad.any():
            raise DataError(f"{_where(int(np.flatnonzero(bad)[0]), split, column)}: a class id outside the "
                            f"teacher's 0..{task.num_labels - 1}")
    return ids


def _targets(values: list[Any], column: str, split: str) -> np.ndarray:
    """Float regression targets; a value that is not a finite number is refused."""
    out = np.empty(len(values), dtype=np.float32)
    for row, value in enumerate(values):
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            what = "not a finite number" if number is not None else f"not a number ({_kind(value)})"
            raise DataError(f"{_where(row, split, column)}: {what}, and this is a regression study (the teacher "
                            "has one output)")
        out[row] = number
    return out


def _label_values(ds: datasets.Dataset, column: str, split: str, task: TaskInfo | None) -> list[Any]:
    """Raw label values; a hub ``ClassLabel`` column gives its names when the teacher knows every one of them,
    so a dataset whose ids are ordered differently from the teacher's is still mapped right."""
    import datasets

    values = _column(ds, column, split)
    feature = ds.features.get(column)
    if isinstance(feature, datasets.ClassLabel) and task is not None and not task.is_regression:
        known = {n.lower() for n in task.label_names}
        if all(name.lower() in known for name in feature.names):
            return [feature.int2str(v) if v is not None and v >= 0 else v for v in values]
    return values


def load_split(spec: DatasetSpec, split: str, task: TaskInfo | None = None) -> TextSplit:
    """Texts (and pair texts) and labels of a split, labels interpreted for ``task`` (None: integer class ids)."""
    ds = read_split(spec, split)
    if len(ds) == 0:
        raise DataError(f"split {split!r} is empty")
    texts = [("" if t is None else str(t)) for t in _column(ds, spec.text_column, split)]
    pairs = None
    if spec.text_pair_column is not None:
        pairs = [("" if t is None else str(t)) for t in _column(ds, spec.text_pair_column, split)]
    values = _label_values(ds, spec.label_column, split, task)
    if task is not None and task.is_regression:
        labels = _targets(values, spec.label_column, split)
    else:
        labels = _class_ids(values, spec.label_column, split, task)
    return TextSplit(texts, labels, pairs)


def subsample(split: TextSplit, n: int | None, seed: int) -> TextSplit:
    """A fixed random subset of ``n`` rows (all rows when n is None or too large)."""
    if n is None or n >= len(split.texts):
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split.texts))[:n])
    pairs = None if split.text_pairs is None else [split.text_pairs[i] for i in idx]
    return TextSplit([split.texts[i] for i in idx], split.labels[idx], pairs)


def unlabelled_like(n: int, regression: bool) -> np.ndarray:
    """Labels for rows without a gold label (transfer-set rows): NO_LABEL ids, or NaN targets."""
    return np.full(n, np.nan, dtype=np.float32) if regression else np.full(n, NO_LABEL, dtype=np.int64)


@dataclasses.dataclass
class TokenizedSplit:
    input_ids: torch.Tensor  # [N, max_len] int64, right-padded with pad_id
    lengths: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64 class ids, or float32 regression targets
    pad_id: int
    token_type_ids: torch.Tensor | None = None  # [N, max_len] segment ids of sentence pairs; None: all zeros

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TokenizedSplit:
        types = None if self.token_type_ids is None else self.token_type_ids.to(device)
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), lengths=self.lengths.to(device),
                                   labels=self.labels.to(device), token_type_ids=types)

    def head(self, n: int) -> TokenizedSplit:
        """The first ``n`` rows (views, no copy)."""
        types = None if self.token_type_ids is None else self.token_type_ids[:n]
        return dataclasses.replace(self, input_ids=self.input_ids[:n], lengths=self.lengths[:n],
                                   labels=self.labels[:n], token_type_ids=types)

    def take(self, idx: torch.Tensor) -> TokenizedSplit:
        """Rows ``idx``, in that order (copies)."""
        types = None if self.token_type_ids is None else self.token_type_ids[idx]
        return dataclasses.replace(self, input_ids=self.input_ids[idx], lengths=self.lengths[idx],
                                   labels=self.labels[idx], token_type_ids=types)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of rows ``idx``, trimmed to their longest row."""
        width = int(self.lengths[idx].max())
        ids = self.input_ids[idx, :width]
        mask = torch.arange(width, device=ids.device)[None, :] < self.lengths[idx, None]
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids[idx, :width]
        return inputs


def concat_splits(first: TokenizedSplit, second: TokenizedSplit) -> TokenizedSplit:
    """Rows of both splits in one padded matrix (the narrower one is padded to the wider's width)."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def widen(ids: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=value)

    types = None
    if first.token_type_ids is not None or second.token_type_ids is not None:
        types = torch.cat([widen(s.token_type_ids if s.token_type_ids is not None else torch.zeros_like(s.input_ids),
                                 0) for s in (first, second)])
    return TokenizedSplit(torch.cat([widen(first.input_ids, first.pad_id), widen(second.input_ids, first.pad_id)]),
                          torch.cat([first.lengths, second.lengths]),
                          torch.cat([first.labels, second.labels.to(first.labels.dtype)]), first.pad_id, types)


def _padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for row, ids in enumerate(rows):
        out[row, : len(ids)] = ids
    return torch.from_numpy(out)


def tokenize(tokenizer: PreTrainedTokenizerBase, split: TextSplit, max_seq_length: int) -> TokenizedSplit:
    """The tokenizer's encoding of every row (its pair encoding when the split has pair texts), truncated to
    ``max_seq_length``."""
    encoded = tokenizer(split.texts, split.text_pairs, truncation=True, max_length=max_seq_length, padding=False)
    input_ids = encoded["input_ids"]
    lengths = torch.tensor([len(ids) for ids in input_ids], dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = int(lengths.max())
    types = None
    if split.text_pairs is not None and "token_type_ids" in encoded:
        types = _padded(encoded["token_type_ids"], width, 0)
    labels = torch.from_numpy(split.labels.copy())
    return TokenizedSplit(_padded(input_ids, width, pad_id), lengths, labels, pad_id, types)


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


# What a submit checks of each split: its first rows, read as ``read_split`` reads the whole split (same builders,
# same options), so the API and the workers never disagree on a column or a label.
SAMPLE_ROWS = 1000


class SampleProblem(DataError):
    """A mistake found in a split's first rows before a study is queued: ``field`` is the spec field to fix. The
    message names the file, the column and the row, never a cell's value.

    ``Fault.USER`` (a ``DataError``): the submit is refused naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def read_sample(path: Path, rows: int = SAMPLE_ROWS) -> datasets.Dataset:
    """The first ``rows`` rows of a local split file, streamed (a large file is not read whole)."""
    import datasets

    datasets.disable_progress_bars()
    builder, kwargs = _BUILDERS[path.suffix]
    try:
        stream = datasets.load_dataset(builder, data_files={"sample": str(path)}, split="sample", streaming=True,
                                       **kwargs)
        return datasets.Dataset.from_list(list(itertools.islice(stream, rows)), features=stream.features)
    except Exception as exc:  # a malformed file: pandas' reason (it names lines), never arrow's (it quotes cells)
        parser_error = type(exc).__name__ == "ParserError" and type(exc).__module__.startswith("pandas")
        reason = str(exc).strip().splitlines() if parser_error else []
        raise DataError(f"cannot read {path.name}: {type(exc).__name__}{': ' + reason[0] if reason else ''}") from exc


def _label_problem(value: Any, task: TaskInfo) -> str:
    """What is wrong with a label the task refuses, said without the label itself."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "the label is empty"
    if task.is_regression:
        return "the label is not a number, and the teacher is a regression model (one output)"
    classes = f"the teacher's {task.num_labels} classes"
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        return f"the label is not one of {classes} ({', '.join(task.label_names)}) by name"
    if isinstance(value, float) and not value.is_integer():
        return (f"the label is a fraction, and the teacher is a {task.num_labels}-class classifier (give class ids "
                "or names; a regression study needs a teacher with one output)")
    if isinstance(value, str | int | float | np.integer):
        return f"the label is a class id outside 0..{task.num_labels - 1} (the teacher has {task.num_labels} classes)"
    return "the label is not a class id or name"


def check_sample(spec: DatasetSpec, task: TaskInfo | None, rows: int = SAMPLE_ROWS) -> None:
    """Each split of a local dataset: its file readable and not empty, the spec's columns present and (when the
    task is known) the labels of its first ``rows`` rows ones the task takes, as ``load_split`` interprets them.
    Raises ``SampleProblem`` naming the spec field."""
    assert spec.path is not None
    columns = [("dataset.text_column", spec.text_column), ("dataset.text_pair_column", spec.text_pair_column),
               ("dataset.label_column", spec.label_column)]
    for split_field, split in (("dataset.train_split", spec.train_split), ("dataset.eval_split", spec.eval_split)):
        path = split_file(Path(spec.path), split)
        if path is None:
            raise SampleProblem(split_field, f"no file for split {split!r} in {spec.path}")
        try:
            sample = read_sample(path, rows)
        except DataError as exc:
            raise SampleProblem(split_field, str(exc)) from exc
        if len(sample) == 0:
            raise SampleProblem(split_field, f"{path.name} has no rows")
        for field, column in columns:
            if column is not None and column not in sample.column_names:
                # Its column names are not listed: without a header row they are its first row's cells. Only a
                # near-spelling of the name asked for is offered (a typo), which a cell is all but never.
                close = difflib.get_close_matches(column, sample.column_names, n=1, cutoff=0.8)
                raise SampleProblem(field, f"{path.name} has no column {column!r} (it has "
                                           f"{len(sample.column_names)} columns"
                                           + (f"; did you mean {close[0]!r}?)" if close else ")"))
        if task is None:
            continue  # a hub teacher: its labels are known once a worker loads it
        values = _label_values(sample, spec.label_column, split, task)
        for row, value in enumerate(values):
            try:
                if task.is_regression:
                    _targets([value], spec.label_column, split)
                else:
                    _class_ids([value], spec.label_column, split, task)
            except DataError as exc:
                raise SampleProblem("dataset.label_column", f"row {row + 1} of {path.name}, column "
                                                            f"{spec.label_column!r}: {_label_problem(value, task)}"
                                    ) from exc


def check_data(spec: StudySpec, task: TaskInfo | None) -> None:
    """A submitted study's local dataset, checked before it is queued (the API calls it after
    ``search_space.validate_spec``): its split files, columns and (the task known) the labels of their first rows,
    read by the workers' own reader (``check_sample``); raises ``SpecError`` naming the field. Hub datasets are only
    read by workers (online)."""
    if spec.dataset.path is None:
        return
    try:
        check_sample(spec.dataset, task)
    except SampleProblem as exc:
        raise SpecError(exc.field, str(exc)) from exc

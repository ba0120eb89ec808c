"""The trial engine's parts: data formats, batching, student construction, determinism, the teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill import (
    DataError,
    DistillationEngine,
    cache_key,
    length_bucketed_batches,
    load_split,
    truncated_layer_indices,
)
from kdsearch.testing import tiny_spec
from search_space import DatasetSpec, StudySpec

ROWS = [{"sentence": "a good film", "label": 1}, {"sentence": 'bad, "quoted" plot', "label": 0}]


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_load_split_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"train.{fmt}"
    if fmt == "tsv":
        path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in ROWS))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    split = load_split(DatasetSpec(path=str(tmp_path)), "train")
    assert split.texts == [r["sentence"] for r in ROWS]
    assert split.labels.tolist() == [1, 0]


def test_load_split_errors(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match="no column 'sentence'"):
        load_split(DatasetSpec(path=str(tmp_path)), "train")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty"):
        load_split(DatasetSpec(path=str(tmp_path)), "train")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nhello\tpositive\n")
    with pytest.raises(DataError, match="row 1 of split 'train', column 'label': not a class id"):
        load_split(DatasetSpec(path=str(tmp_path)), "train")


def test_bucketed_batches_cover_every_row_once() -> None:
    lengths = torch.randint(3, 60, (1000,))
    batches = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    # Padding stays small: rows of a batch come from one length-sorted bucket.
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    assert padded < 1.15 * int(lengths.sum())
    again = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_truncated_layers_are_evenly_spaced() -> None:
    assert truncated_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert truncated_layer_indices(6, 3) == [0, 2, 4]
    assert truncated_layer_indices(6, 2) == [0, 3]
    assert truncated_layer_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(DataError):
        truncated_layer_indices(4, 5)


PARAMS = {"learning_rate": 5e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 32}


def test_trial_is_deterministic_and_checkpoints_best_epoch(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu")
    prepared = engine.prepare(spec)
    seen = []
    first = engine.run_trial(prepared, PARAMS, 7, lambda r: seen.append(r.epoch) or None, tmp_path / "a")
    second = engine.run_trial(prepared, PARAMS, 7, None, tmp_path / "b")
    assert seen == [1, 2]
    assert [h.metrics for h in first.history] == [h.metrics for h in second.history]
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]
    record = json.loads((tmp_path / "a" / "kdsearch_trial.json").read_text())
    assert record["best_epoch"] == first.best_epoch
    assert record["score"] == max(h.score for h in first.history) == max(h.metrics["accuracy"] for h in first.history)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).is_file()


def test_callback_stops_training(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu")
    out = engine.run_trial(engine.prepare(spec), {**PARAMS, "num_train_epochs": 3}, 7, lambda r: "pruned",
                           tmp_path / "c")
    assert out.stopped == "pruned" and len(out.history) == 1


def test_cache_is_built_once_and_shared(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    built = []
    DistillationEngine(tmp_path / "art", device="cpu", log=built.append).prepare(spec)
    DistillationEngine(tmp_path / "art", device="cpu", log=built.append).prepare(spec.model_copy(update={"seed": 1}))
    assert sum("building" in line for line in built) == 1
    entries = list((tmp_path / "art" / "cache").glob("*/meta.json"))
    assert len(entries) == 1
    meta = json.loads(entries[0].read_text())
    assert meta["n_train"] == 160 and meta["n_eval"] == 48
    other = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"max_seq_length": 12})})
    task = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec).task
    assert cache_key(other, task) != cache_key(spec, task)


def test_truncated_student_copies_teacher_layers(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForSequenceClassification

    spec = StudySpec.model_validate(tiny_spec(tiny_assets, student={"truncate_teacher": {"num_layers": 2}}))
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    from distill import build_student

    student = build_student(spec.student, prepared.teacher_config, seed=0, teacher_state=prepared.teacher_state)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_assets["teacher"])
    assert student.config.num_hidden_layers == 2
    s_layers, t_layers = student.bert.encoder.layer, teacher.bert.encoder.layer
    for new, old in enumerate([0, 2]):
        assert torch.equal(s_layers[new].output.dense.weight, t_layers[old].output.dense.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_bad_student_fails_at_prepare(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, student={"truncate_teacher": {"num_layers": 9}}))
    with pytest.raises(DataError, match=r"1\.\.4"):
        DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, student={"model": str(tiny_assets["other_vocab_student"])}))
    with pytest.raises(DataError, match="tokenizers differ"):
        DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)


def test_engine_reports_preparation_progress(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, augment={"copies": 2}))
    calls: list[tuple[str, int, int]] = []
    DistillationEngine(tmp_path / "art", device="cpu").prepare(spec, progress=lambda *a: calls.append(a))
    teacher = [c for c in calls if c[0] == "teacher_logits"]
    transfer = [c for c in calls if c[0] == "transfer_set"]
    assert teacher[-1] == ("teacher_logits", 160 + 48, 160 + 48) and transfer[-1] == ("transfer_set", 320, 320)
    assert [c[1] for c in teacher] == sorted(c[1] for c in teacher) and len(teacher) > 2
    again: list[tuple[str, int, int]] = []
    DistillationEngine(tmp_path / "art", device="cpu").prepare(spec, progress=lambda *a: again.append(a))
    assert again == []  # loaded from the cache: nothing to report

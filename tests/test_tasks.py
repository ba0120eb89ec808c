"""Every text-classification task: sentence pairs, regression, multi-class, string labels, task metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from distill import (
    Augmenter,
    DataError,
    DistillationEngine,
    TextSplit,
    compute_metrics,
    load_split,
    load_teacher,
    predict_logits,
    tokenize,
    train_student,
)
from distill.models import load_config
from kdsearch.terms import regression_distillation_loss
from kdsearch.testing import write_tiny_model
from search_space import (
    AugmentSpec,
    DatasetSpec,
    MetricMismatch,
    StudySpec,
    TaskInfo,
    optuna_distributions,
    resolve_task,
    trial_params,
)
from service.api import create_app
from service.settings import Settings
from tests.conftest import NLI_LABELS, pair_spec

CLASSES3 = TaskInfo("classification", 3, "accuracy", ("a", "b", "c"))
BINARY = TaskInfo("classification", 2, "f1", ("no", "yes"))
REGRESSION = TaskInfo("regression", 1, "pearson")


# ------------------------------------------------------------------------------------------------ metrics


def test_classification_metrics_match_hand_computed_values() -> None:
    gold = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    logits = np.eye(2)[pred] * 3.0 - 1.0
    tp, fp, fn, tn = 4, 1, 1, 2  # counted by hand from the two rows above
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1_pos = 2 * precision * recall / (precision + recall)
    f1_neg = 2 * tn / (2 * tn + fp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    got = compute_metrics(BINARY, logits, gold)
    assert got == pytest.approx({"accuracy": 6 / 8, "f1": f1_pos, "macro_f1": (f1_pos + f1_neg) / 2,
                                 "matthews_correlation": mcc})

    # Three classes: no binary F1; macro F1 averages every class, including one never predicted.
    gold3 = np.array([0, 1, 2, 2, 1, 0])
    pred3 = np.array([0, 1, 1, 2, 1, 1])
    got3 = compute_metrics(CLASSES3, np.eye(3)[pred3], gold3)
    assert set(got3) == {"accuracy", "macro_f1", "matthews_correlation"}
    f1s = [2 * 1 / (2 * 1 + 0 + 1), 2 * 2 / (2 * 2 + 2 + 0), 2 * 1 / (2 * 1 + 0 + 1)]
    assert got3["accuracy"] == pytest.approx(4 / 6) and got3["macro_f1"] == pytest.approx(sum(f1s) / 3)
    # A model that says "positive" to everything: F1 flatters it, Matthews correlation does not.
    always = compute_metrics(BINARY, np.tile([0.0, 1.0], (8, 1)), gold)
    assert always["f1"] == pytest.approx(2 * 5 / (2 * 5 + 3)) and always["matthews_correlation"] == 0.0


def test_regression_metrics_match_independent_values() -> None:
    x = np.linspace(-2, 2, 9)
    target = x**3  # monotone, not linear: Spearman is 1, Pearson is not
    got = compute_metrics(REGRESSION, x[:, None].astype(np.float32), target.astype(np.float32))
    pearson = float(np.corrcoef(x, target)[0, 1])
    assert got["spearmanr"] == pytest.approx(1.0) and got["pearson"] == pytest.approx(pearson, abs=1e-6)
    assert got["pearson"] < 0.95 and got["pearson_spearman"] == pytest.approx((pearson + 1) / 2, abs=1e-6)

    rng = np.random.default_rng(0)
    pred, gold = rng.normal(size=50), rng.normal(size=50)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 - no ties in continuous draws
    got = compute_metrics(REGRESSION, pred[:, None], gold)
    assert got["pearson"] == pytest.approx(float(np.corrcoef(pred, gold)[0, 1]), abs=1e-9)
    assert got["spearmanr"] == pytest.approx(float(np.corrcoef(ranks(pred), ranks(gold))[0, 1]), abs=1e-9)
    # A constant prediction has no correlation: 0, not NaN (a trial must still report a number).
    assert compute_metrics(REGRESSION, np.ones((5, 1)), np.arange(5.0)) == {
        "pearson": 0.0, "spearmanr": 0.0, "pearson_spearman": 0.0}


def test_regression_loss_against_hand_computed_values() -> None:
    student = torch.tensor([[1.0], [2.0], [0.5]])
    teacher = torch.tensor([[1.5], [1.0], [0.0]])
    gold = torch.tensor([2.0, 2.0, float("nan")])  # the last row is a transfer-set row: no gold target
    alpha = 0.25
    rows = [alpha * (1 - 2) ** 2 + 0.75 * (1 - 1.5) ** 2, alpha * 0 + 0.75 * (2 - 1) ** 2, (0.5 - 0) ** 2]
    loss = regression_distillation_loss(student, teacher, gold, alpha)
    assert loss.item() == pytest.approx(sum(rows) / 3)
    assert regression_distillation_loss(student, teacher, gold, 1.0).item() == pytest.approx((1 + 0 + 0.25) / 3)


# --------------------------------------------------------------------------------------------- the task


def test_task_comes_from_the_teacher_config(tmp_path: Path) -> None:
    regression = load_config(str(write_tiny_model(tmp_path / "r", regression=True)))
    assert resolve_task(regression, None) == TaskInfo("regression", 1, "pearson")
    regression.problem_type = None  # one output alone also means regression
    assert resolve_task(regression, "spearmanr").type == "regression"
    nli = load_config(str(write_tiny_model(tmp_path / "n", labels=NLI_LABELS)))
    task = resolve_task(nli, "macro_f1")
    assert task.label_names == tuple(NLI_LABELS) and task.metrics == ("accuracy", "macro_f1", "matthews_correlation")
    with pytest.raises(MetricMismatch, match=r"'f1' does not fit .*3-class"):
        resolve_task(nli, "f1")
    with pytest.raises(MetricMismatch, match=r"'accuracy' does not fit .*regression"):
        resolve_task(regression, "accuracy")
    nli.problem_type = "multi_label_classification"
    with pytest.raises(MetricMismatch, match="multi-label"):
        resolve_task(nli, None)


def test_regression_does_not_search_temperature() -> None:
    space = StudySpec.model_validate({"name": "x", "teacher": "a/b", "student": {"model": "c/d"},
                                      "dataset": {"hub": "glue"}}).search_space
    assert "temperature" in optuna_distributions(space)
    assert "temperature" not in optuna_distributions(space, REGRESSION.ignored_params)
    fixed = space.model_copy(update={"temperature": 4.0})
    assert "temperature" not in trial_params(fixed, {"learning_rate": 1e-3}, REGRESSION.ignored_params)
    assert trial_params(fixed, {"learning_rate": 1e-3})["temperature"] == 4.0


# ---------------------------------------------------------------------------------------------- data


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_pairs_and_label_names_are_read(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel",
           ['a "quoted" film\tNA\tentailment', "null\tit is\tContradiction", "x\ty\t1"])
    split = load_split(DatasetSpec(path=str(tmp_path), text_column="sentence1", text_pair_column="sentence2"),
                       "train", TaskInfo("classification", 3, "accuracy", tuple(NLI_LABELS)))
    # Raw quotes stay, and no word is read as a missing value; names map through label2id, ids are ids.
    assert split.texts == ['a "quoted" film', "null", "x"] and split.text_pairs == ["NA", "it is", "y"]
    assert split.labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize(("bad", "task", "message"), [
    ("maybe", TaskInfo("classification", 3, "accuracy", tuple(NLI_LABELS)),
     "row 2 of split 'train', column 'label': not one of the teacher's labels (entailment, neutral, contradiction), "
     "nor a class id"),
    ("0.5", TaskInfo("classification", 3, "accuracy", tuple(NLI_LABELS)),
     "row 2 of split 'train', column 'label': a float label in a classification study (the teacher is a 3-class "
     "classifier; give class ids or names)"),
    ("7", TaskInfo("classification", 3, "accuracy", tuple(NLI_LABELS)),
     "row 2 of split 'train', column 'label': a class id outside the teacher's 0..2"),
    ("similar", REGRESSION, "row 2 of split 'train', column 'label': not a number (a str), and this is a regression "
                            "study (the teacher has one output)"),
    ("nan", REGRESSION, "row 2 of split 'train', column 'label': not a finite number, and this is a regression study"),
])
def test_bad_labels_name_the_row_and_column_never_the_value(tmp_path: Path, bad: str, task: TaskInfo,
                                                            message: str) -> None:
    good = "0.5" if task.is_regression else "1"
    _write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel", [f"a\tb\t{good}", f"a\tb\t{bad}"])
    spec = DatasetSpec(path=str(tmp_path), text_column="sentence1", text_pair_column="sentence2")
    with pytest.raises(DataError) as raised:
        load_split(spec, "train", task)
    assert message in str(raised.value)
    if bad != "nan":  # "nan" is a word of the message's own ("not a finite number" aside, it must not appear)
        assert bad not in str(raised.value).replace("0..2", "")


def test_missing_pair_column_and_other_formats(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence1\tlabel", ["a\t1"])
    with pytest.raises(DataError, match="no column 'sentence2'"):
        load_split(DatasetSpec(path=str(tmp_path), text_column="sentence1", text_pair_column="sentence2"), "train")
    # .json (JSON lines too) and regression targets given as numbers.
    (tmp_path / "validation.json").write_text('{"s": "a b", "t": "c", "score": 3.5}\n{"s": "d", "t": "e f", '
                                              '"score": 1}\n')
    split = load_split(DatasetSpec(path=str(tmp_path), text_column="s", text_pair_column="t", label_column="score"),
                       "validation", REGRESSION)
    assert split.labels.dtype == np.float32 and split.labels.tolist() == [3.5, 1.0]


def test_hub_class_labels_are_mapped_by_name(tmp_path: Path) -> None:
    """A dataset whose ClassLabel ids are ordered differently from the teacher's is mapped through the names."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["contradiction", "entailment", "neutral"])})
    datasets.Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["d", "e", "f"], "label": [0, 1, 2]},
                               features=features).to_parquet(str(tmp_path / "train.parquet"))
    split = load_split(DatasetSpec(path=str(tmp_path), text_column="premise", text_pair_column="hypothesis"),
                       "train", TaskInfo("classification", 3, "accuracy", tuple(NLI_LABELS)))
    assert split.labels.tolist() == [NLI_LABELS.index(n) for n in ("contradiction", "entailment", "neutral")]


# ------------------------------------------------------------------------------- pairs through the engine


def test_segment_ids_are_cached_batched_and_fed_to_the_student(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(pair_spec(pair_assets, "nli"))
    engine = DistillationEngine(tmp_path / "art", device="cpu")
    prepared = engine.prepare(spec)
    assert prepared.task.label_names == tuple(NLI_LABELS) and prepared.task.metric == "accuracy"
    # Built: the pair encoding's segment ids, 1 on the second sentence ([CLS] a [SEP] b [SEP]).
    _, tokenizer = load_teacher(spec.teacher)
    text = load_split(spec.dataset, "train", prepared.task)
    expected = tokenizer(text.texts[0], text.text_pairs[0])
    row = prepared.train.token_type_ids[0, : prepared.train.lengths[0]].tolist()
    assert row == expected["token_type_ids"] and 1 in row
    # Cached: a second engine loads them from the cache entry instead of re-tokenizing.
    again = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    assert torch.equal(again.train.token_type_ids, prepared.train.token_type_ids)
    assert torch.equal(again.eval.token_type_ids, prepared.eval.token_type_ids)
    entry = next((tmp_path / "art" / "cache").glob("*/data.safetensors"))
    from safetensors.torch import load_file

    assert {"train.token_type_ids", "eval.token_type_ids"} <= set(load_file(str(entry)))
    # Batched and fed: every forward pass of training and evaluation gets the rows' segment ids.
    from distill import build_student
    from distill.train import TrainConfig

    student = build_student(spec.student, prepared.teacher_config, seed=0)
    seen: list[bool] = []
    student.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs.get("token_type_ids") is not None
                                           and bool((kwargs["token_type_ids"] == 1).any())), with_kwargs=True)
    train_student(student, prepared.train, prepared.train_logits, prepared.eval,
                  TrainConfig.from_params({"learning_rate": 1e-3, "alpha": 0.5, "num_train_epochs": 1,
                                           "batch_size": 32}, regression=False, seed=33), task=prepared.task)
    assert seen and all(seen)


def test_pair_transfer_set_is_labelled_on_pairs(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(pair_spec(pair_assets, "sts", augment={"copies": 2, "seed": 3}))
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    n_train = prepared.cache.meta["n_train"]
    assert len(prepared.train) == 3 * n_train
    assert torch.isnan(prepared.train.labels[n_train:]).all() and not torch.isnan(prepared.train.labels[:n_train]).any()

    train = load_split(spec.dataset, "train", prepared.task)
    augmenter = Augmenter([*train.texts, *train.text_pairs], spec.augment, "[MASK]")
    variants, pairs, sources = augmenter.transfer_set(train.texts, train.text_pairs)
    assert pairs is not None and len(pairs) == len(variants) == 2 * n_train
    assert any(p != train.text_pairs[s] for p, s in zip(pairs, sources, strict=True))  # second sides vary too
    teacher, tokenizer = load_teacher(spec.teacher)
    split = tokenize(tokenizer, TextSplit(variants, np.full(len(variants), np.nan, dtype=np.float32), pairs), 16)
    fresh = predict_logits(teacher, split, 64, torch.device("cpu"))
    torch.testing.assert_close(prepared.train_logits[n_train:], fresh, rtol=1e-4, atol=1e-5)
    assert (prepared.train.token_type_ids[n_train:] == 1).any()


def test_pair_augmentation_is_deterministic_and_side_by_side() -> None:
    firsts, seconds = ["the movie was good", "a plot"], ["it is great", "very dull"]
    spec = AugmentSpec(copies=3, p_mask=0.3, p_replace=0.0, p_ngram=0.0, seed=5)
    one = Augmenter(firsts + seconds, spec, "[MASK]").transfer_set(firsts, seconds)
    two = Augmenter(firsts + seconds, spec, "[MASK]").transfer_set(firsts, seconds)
    # In rounds: one variant of every row, then the next (the first k rounds are the k-copy set).
    assert one[0] == two[0] and one[1] == two[1] and one[2].tolist() == [0, 1, 0, 1, 0, 1]
    for a, b, source in zip(one[0], one[1] or [], one[2], strict=True):
        # Masking keeps each side's length: the two sides were augmented separately.
        assert len(a.split()) == len(firsts[source].split()) and len(b.split()) == len(seconds[source].split())
        assert (a, b) != (firsts[source], seconds[source])


def test_regression_trial_records_every_metric(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(pair_spec(pair_assets, "sts", metric="spearmanr"))
    engine = DistillationEngine(tmp_path / "art", device="cpu")
    prepared = engine.prepare(spec)
    assert engine.task(prepared) == TaskInfo("regression", 1, "spearmanr")
    assert prepared.train.labels.dtype == torch.float32
    assert set(engine.teacher_metrics(prepared) or {}) == {"pearson", "spearmanr", "pearson_spearman"}
    out = engine.run_trial(prepared, {"learning_rate": 5e-3, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 32},
                           seed=3, on_epoch_end=None, checkpoint_dir=tmp_path / "ckpt")
    assert all(set(h.metrics) == {"pearson", "spearmanr", "pearson_spearman"} for h in out.history)
    assert out.best_score == max(h.metrics["spearmanr"] for h in out.history)
    record = json.loads((tmp_path / "ckpt" / "kdsearch_trial.json").read_text())
    assert record["metric"] == "spearmanr" and record["task"]["type"] == "regression"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["problem_type"] == "regression"


def test_unknown_labels_fail_prepare_with_the_reason(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    for split in ("train", "validation"):
        _write(bad / f"{split}.tsv", "sentence1\tsentence2\tlabel", ["good film\tbad film\tparaphrase"])
    spec = StudySpec.model_validate(pair_spec(pair_assets, "nli", dataset={
        "path": str(bad), "text_column": "sentence1", "text_pair_column": "sentence2"}))
    with pytest.raises(DataError, match="row 1 of split 'train', column 'label': not one of the teacher's labels"):
        DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)


# ------------------------------------------------------------------------------------------ through the API


def test_api_refuses_metrics_that_do_not_fit(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a")
    with TestClient(create_app(settings)) as client:
        def refused(kind: str, **overrides) -> tuple[list, str]:  # type: ignore[no-untyped-def]
            response = client.post("/api/studies", json=pair_spec(pair_assets, kind, **overrides))
            assert response.status_code == 422, response.text
            return response.json()["detail"][0]["loc"], response.json()["detail"][0]["msg"]

        loc, _ = refused("nli", metric="bleu")
        assert loc == ["body", "metric"]
        loc, msg = refused("nli", metric="pearson")
        assert loc == ["body", "metric"] and "3-class classification" in msg
        loc, msg = refused("nli", metric="f1")
        assert loc == ["body", "metric"] and "macro_f1" in msg
        loc, msg = refused("sts", metric="accuracy")
        assert loc == ["body", "metric"] and "regression" in msg
        loc, _ = refused("nli", dataset={"path": str(pair_assets["nli_data"]), "text_column": "sentence1",
                                         "text_pair_column": "sentence1"})
        assert loc[:2] == ["body", "dataset"]

        # Accepted: the detail names the task and metric at once (local teacher), and says temperature is ignored.
        created = client.post("/api/studies", json=pair_spec(
            pair_assets, "sts", name="sts-ok", search_space={"temperature": {"low": 1, "high": 9}}))
        assert created.status_code == 201, created.text
        detail = created.json()
        assert detail["metric"] == "pearson" and detail["task"]["type"] == "regression"
        assert detail["task"]["ignored_params"] == ["temperature"]
        assert any("temperature" in note and "ignored" in note for note in detail["notes"])
        assert client.get("/api/studies").json()[0]["metric"] == "pearson"

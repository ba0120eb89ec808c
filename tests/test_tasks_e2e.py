"""Pair and regression tasks end to end: the real API under uvicorn, a real ``kdsearch worker`` subprocess,
``export-best``, and the exported model re-scored through ``transformers.pipeline`` with pair inputs."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill import compute_metrics
from kdsearch.testing import KDSEARCH, Stack
from search_space import TaskInfo
from tests.conftest import NLI_LABELS, PRECISIONS, pair_spec, queue_unchecked


def _rows(data: Path) -> list[dict[str, str]]:
    with open(data / "validation.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _export(stack: Stack, study: str, out: Path) -> subprocess.CompletedProcess:
    # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    done = subprocess.run([*KDSEARCH, "export-best", study, "--out", str(out), "--force"], env=stack.env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pair_task_with_string_labels(stack: Stack, pair_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      precision: str) -> None:
    stack.submit(pair_spec(pair_assets, "nli", name="nli", metric="macro_f1"))
    study = stack.wait_status("nli")
    assert study["status"] == "finished", study
    assert study["metric"] == "macro_f1" and study["task"]["label_names"] == NLI_LABELS
    assert set(study["teacher_metrics"]) == {"accuracy", "macro_f1", "matthews_correlation"}
    assert study["teacher_metric"] == study["teacher_metrics"]["macro_f1"]
    for trial in stack.trials("nli"):
        assert trial["precision"] == precision
        assert trial["value"] == trial["metrics"]["macro_f1"] == max(e["score"] for e in trial["epochs"])
        assert all(set(e["metrics"]) == {"accuracy", "macro_f1", "matthews_correlation"} for e in trial["epochs"])

    out = tmp_path / "nli-export"
    printed = _export(stack, "nli", out).stdout
    assert "eval macro_f1" in printed and "accuracy" in printed
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # The Hub's metric ids: macro F1 is "f1" with its averaging in args; the study's metric comes first.
    entries = front["model-index"][0]["results"][0]["metrics"]
    best = study["best_trial"]
    assert entries[0] == {"type": "f1", "args": {"average": "macro"}, "name": "Macro F1",
                          "value": round(best["metrics"]["macro_f1"], 4)}
    assert {m["type"]: m["value"] for m in entries} == {
        "f1": round(best["metrics"]["macro_f1"], 4), "accuracy": round(best["metrics"]["accuracy"], 4),
        "matthews_correlation": round(best["metrics"]["matthews_correlation"], 4)}
    assert front["pipeline_tag"] == "text-classification" and front["base_model"] == "nli-teacher"
    assert "generated_from_trainer" not in front["tags"] and "widget" not in front  # no one-text widget for pairs
    assert "datasets" not in front  # a local folder is no Hub dataset id
    assert 'classifier({"text": "first sentence", "text_pair": "second sentence"})' in card
    assert "text_pair" in card and "3-class classification" in card and "- temperature:" in card

    # The export is a ready pair classifier: given {"text", "text_pair"}, the pipeline reproduces the metrics.
    from transformers import pipeline

    rows = _rows(pair_assets["nli_data"])
    classifier = pipeline("text-classification", model=str(out), device="cpu")
    predictions = classifier([{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows], batch_size=16)
    predicted = np.array([NLI_LABELS.index(p["label"]) for p in predictions])
    gold = np.array([NLI_LABELS.index(r["label"]) for r in rows])
    rescored = compute_metrics(TaskInfo("classification", 3, "macro_f1", tuple(NLI_LABELS)), np.eye(3)[predicted], gold)
    assert rescored["macro_f1"] == pytest.approx(best["value"], abs=1e-6)
    assert rescored["accuracy"] == pytest.approx(best["metrics"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_regression_task(stack: Stack, pair_assets, tmp_path: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    spec = pair_spec(pair_assets, "sts", name="sts", augment={"copies": 1},
                     search_space={"num_train_epochs": 2, "batch_size": 32, "temperature": {"low": 2, "high": 9},
                                   "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}})
    stack.submit(spec)
    study = stack.wait_status("sts")
    assert study["status"] == "finished", study
    assert study["metric"] == "pearson" and study["task"]["ignored_params"] == ["temperature"]
    assert any("temperature" in n for n in study["notes"])
    trials = stack.trials("sts")
    assert len(trials) == 3
    for trial in trials:
        assert trial["precision"] == precision
        assert "temperature" not in trial["params"]  # not sampled, not shown
        assert set(trial["metrics"]) == {"pearson", "spearmanr", "pearson_spearman"}
    status = subprocess.run([*KDSEARCH, "status", "sts", "--url", stack.url], env=stack.env, capture_output=True,
                            text=True)
    assert status.returncode == 0 and "pearson" in status.stdout and "temperature" in status.stdout  # in the note
    assert "alpha" in status.stdout

    out = tmp_path / "sts-export"
    _export(stack, "sts", out)
    card = (out / "README.md").read_text()
    assert "regression" in card and "MSE(student, teacher)" in card and "- temperature:" not in card
    front = yaml.safe_load(card.split("---")[1])
    # pearson_spearman has no Hub metric id: in the card's text, not its model-index.
    assert [m["type"] for m in front["model-index"][0]["results"][0]["metrics"]] == ["pearsonr", "spearmanr"]
    assert "Mean of Pearson and Spearman" in card

    # Re-scored through the pipeline: raw scores (no sigmoid), pair inputs, same Pearson as the search recorded.
    from transformers import pipeline

    rows = _rows(pair_assets["sts_data"])
    regressor = pipeline("text-classification", model=str(out), device="cpu")
    outputs = regressor([{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows], batch_size=16)
    predicted = np.array([[o["score"]] for o in outputs])
    gold = np.array([float(r["label"]) for r in rows])
    rescored = compute_metrics(TaskInfo("regression", 1, "pearson"), predicted, gold)
    assert rescored["pearson"] == pytest.approx(study["best_trial"]["value"], abs=1e-4)


def test_bad_task_input_fails_the_study_and_the_worker_goes_on(stack: Stack, pair_assets,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    def data(name: str, header: str, rows: list[str]) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for split in ("train", "validation"):
            (directory / f"{split}.tsv").write_text(header + "\n" + "\n".join(rows) + "\n")
        return directory

    cases = {
        "no-pair-column": (data("np", "sentence1\tlabel", ["good film\tentailment"]), "nli",
                           "no column 'sentence2'"),
        "unknown-label": (data("ul", "sentence1\tsentence2\tlabel", ["good\tbad\tparaphrase"]), "nli",
                          "row 1 of split 'train', column 'label': not one of the teacher's labels "
                          "(entailment, neutral, contradiction), nor a class id"),
        "float-label": (data("fl", "sentence1\tsentence2\tlabel", ["good\tbad\t0.5"]), "nli",
                        "row 1 of split 'train', column 'label': a float label in a classification study"),
        "text-label": (data("tl", "sentence1\tsentence2\tlabel", ["good\tbad\thigh"]), "sts",
                       "row 1 of split 'train', column 'label': not a number"),
    }
    for name, (directory, kind, _) in cases.items():  # as if changed after submit (the API refuses them)
        queue_unchecked(stack.env["KDSEARCH_DATABASE_URL"], pair_spec(
            pair_assets, kind, name=name, priority=5,
            dataset={"path": str(directory), "text_column": "sentence1", "text_pair_column": "sentence2"}))
    stack.submit(pair_spec(pair_assets, "nli", name="fine", n_trials=1))
    for name, (_, _, reason) in cases.items():
        failed = stack.wait_status(name)
        assert failed["status"] == "failed" and reason in failed["error"], failed
        assert "'label'" in failed["error"] or "sentence2" in failed["error"]
    assert stack.wait_status("fine")["status"] == "finished"
    assert stack.workers[0].poll() is None, "the worker keeps running"


@pytest.mark.parametrize("precision", ["fp32"])
def test_a_pair_study_with_every_lever_end_to_end(stack: Stack, pair_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  precision: str) -> None:
    """Issue 25's levers together through the REST API, a real worker and export-best: a pre-distilled student, a
    pair corpus (hard negatives, random pairs, perturbed copies) of a searched size, and the layer-wise terms in two
    stages; the export re-scores to the recorded metric through ``transformers.pipeline``."""
    spec = pair_spec(
        pair_assets, "sts", name="levers", n_trials=3,
        augment={"copies": 2, "pairs": {"hard_negatives": 0.3, "random_pairs": 0.2, "perturbed": 0.3}},
        predistill={"epochs": 30},
        search_space={"num_train_epochs": 2, "batch_size": 32, "learning_rate": {"low": 1e-3, "high": 1e-2,
                                                                                 "log": True},
                      "predistilled": 1, "transfer_copies": {"low": 1, "high": 2}, "hidden_weight": 1.0,
                      "attention_weight": 1.0, "embedding_weight": 0.5, "intermediate_epochs": 1})
    stack.submit(spec)
    study = stack.wait_status("levers")
    assert study["status"] == "finished", study
    trials = stack.trials("levers")
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    for trial in trials:
        assert trial["params"]["predistilled"] == 1 and trial["params"]["transfer_copies"] in (1, 2)
        assert trial["params"]["intermediate_epochs"] == 1
        assert [e["epoch"] for e in trial["epochs"]] == [1, 2]  # the intermediate stage is not reported
    logs = stack.worker_logs()
    # The pre-distillation is built once, with its progress reported as a preparation stage (API, dashboard, log).
    assert logs.count("pre-distilling pre-") == 1
    assert re.search(r"study levers: predistill [\d,]+ / [\d,]+ rows \(100%\)", logs), logs[-2000:]

    out = tmp_path / "levers-export"
    _export(stack, "levers", out)
    card = (out / "README.md").read_text()
    assert "its encoder was pre-distilled from the teacher" in card
    assert "hidden-state distillation" in card and "TF-IDF hard negatives" in card
    from safetensors.torch import load_file

    assert not any("projection" in k for k in load_file(str(out / "model.safetensors")))  # never exported
    from transformers import pipeline

    rows = _rows(pair_assets["sts_data"])
    regressor = pipeline("text-classification", model=str(out), device="cpu")
    outputs = regressor([{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows], batch_size=16)
    rescored = compute_metrics(TaskInfo("regression", 1, "pearson"), np.array([[o["score"]] for o in outputs]),
                               np.array([float(r["label"]) for r in rows]))
    assert rescored["pearson"] == pytest.approx(study["best_trial"]["value"], abs=1e-4)

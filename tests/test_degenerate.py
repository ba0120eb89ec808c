"""Degenerate students are flagged (issue 25, item 5): a trial whose best epoch predicts one class for every row (MCC
near 0), or gives a (near-)constant or uncorrelated score (Pearson near 0), is marked in the API's trial rows,
``kdsearch status``, ``kdsearch trials`` and the model card; ``export-best`` refuses it without ``--force``, naming
why. End to end on a real worker whose students are made to predict one class (``service.testing.OneClassEngine``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from distill.hub_model import model_card
from distill.task_metrics import CORRELATION_FLOOR, degenerate_reason
from kdsearch.testing import KDSEARCH, Stack, tiny_spec
from search_space import TaskInfo
from service.cli import main
from tests.test_model_card import HISTORY, _record, _spec

BINARY = TaskInfo("classification", 2, "f1", ("not_equivalent", "equivalent"))
CLASSES3 = TaskInfo("classification", 3, "accuracy", ("entailment", "neutral", "contradiction"))
REGRESSION = TaskInfo("regression", 1, "pearson")


def _logits(predicted: np.ndarray, num_labels: int) -> np.ndarray:
    return np.eye(num_labels)[predicted] * 4.0 - 2.0


# -- the definition ---------------------------------------------------------------------------------------------------


def test_one_class_for_every_row_is_degenerate() -> None:
    gold = np.array([1, 0] * 204)  # balanced, 408 rows (MRPC's eval split size)
    reason = degenerate_reason(BINARY, _logits(np.ones(408, dtype=int), 2), gold)
    assert reason == "it predicts 'equivalent' for 408 of 408 eval rows (MCC 0.00)"


def test_a_good_classifier_is_not_degenerate() -> None:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.8, gold, (gold + 1) % 3)  # 80% right, every class predicted
    assert degenerate_reason(CLASSES3, _logits(predicted, 3), gold) is None


def test_nearly_one_class_is_degenerate_unless_the_labels_are_as_lopsided() -> None:
    gold = np.array([0, 1, 2] * 100)
    predicted = np.zeros(300, dtype=int)
    predicted[1:3] = gold[1:3]  # a "neutral" and a "contradiction" right, 298 rows predicted "entailment"
    reason = degenerate_reason(CLASSES3, _logits(predicted, 3), gold)
    # Its MCC is just above the floor: the share of one class flags it.
    assert reason == "it predicts 'entailment' for 298 of 300 eval rows (MCC 0.07)"
    # The same share of one class, where the labels have it too and the model is right on every row: not degenerate.
    lopsided = np.zeros(300, dtype=int)
    lopsided[:2] = [1, 2]
    assert degenerate_reason(CLASSES3, _logits(lopsided, 3), lopsided) is None


def test_predictions_unrelated_to_the_labels_are_degenerate() -> None:
    rng = np.random.default_rng(1)
    gold, predicted = rng.integers(0, 2, 4000), rng.integers(0, 2, 4000)  # both classes predicted, by chance
    reason = degenerate_reason(BINARY, _logits(predicted, 2), gold)
    assert reason is not None and reason.startswith("its predictions do not correlate with the labels (MCC ")


def test_regression_constant_or_uncorrelated_outputs_are_degenerate() -> None:
    rng = np.random.default_rng(2)
    targets = rng.uniform(0, 5, 200)
    constant = degenerate_reason(REGRESSION, np.full((200, 1), 2.5), targets)
    assert constant is not None and constant.startswith("its output is (nearly) constant: 2.5 ± 0 over 200 eval rows")
    assert constant.endswith("(Pearson 0.00)")
    # Correlated, but within a hair of a constant: still degenerate.
    nearly = degenerate_reason(REGRESSION, (2.5 + 1e-4 * targets)[:, None], targets)
    assert nearly is not None and nearly.startswith("its output is (nearly) constant")
    noise = degenerate_reason(REGRESSION, rng.normal(size=(200, 1)), targets)
    assert noise is not None and noise.startswith("its output does not correlate with the targets (Pearson ")
    assert degenerate_reason(REGRESSION, (targets + rng.normal(0, 0.5, 200))[:, None], targets) is None
    assert CORRELATION_FLOOR < 0.1  # a real student of a GLUE task is far above it


def test_the_model_card_warns_of_a_degenerate_student() -> None:
    reason = "it predicts 'positive' for 48 of 48 eval rows (MCC 0.00)"
    flagged = _record(history=[{**HISTORY[0], "degenerate": reason}])
    card = model_card(name="s", spec=_spec("owner/teacher"), record=flagged, trial_number=3, n_trials_run=5,
                      study_name="s")
    assert f"> **Warning: this student is degenerate: {reason}.**" in card
    plain = model_card(name="s", spec=_spec("owner/teacher"), record=_record(), trial_number=3, n_trials_run=5,
                       study_name="s")
    assert "degenerate" not in plain


# -- end to end: a student made to predict one class ------------------------------------------------------------------

REASON = "it predicts 'negative' for 48 of 48 eval rows (MCC 0.00)"  # the tiny eval split: 48 rows


@pytest.fixture(scope="module")
def one_class(tmp_path_factory: pytest.TempPathFactory, tiny_assets: dict[str, Path]) -> Iterator[Stack]:
    """A finished study, "onesided", whose every student predicts class 0 ("negative") for every row: a real worker
    on ``OneClassEngine`` (the distillation engine with the classifier's bias for class 0 set to 1,000). Ordinary
    tiny students tend to predict "positive" (the majority class), so the flag names what this engine did."""
    root = tmp_path_factory.mktemp("degenerate")
    stack = Stack(f"sqlite:///{root / 'kdsearch.db'}", root, KDSEARCH_ENGINE="service.testing:OneClassEngine",
                  KDSEARCH_TEST_ONE_CLASS="0")
    try:
        stack.start_api()
        stack.submit(tiny_spec(tiny_assets, name="onesided", n_trials=2,
                               search_space={"num_train_epochs": 2, "batch_size": 32, "learning_rate": 1e-2}))
        stack.start_worker()
        assert stack.wait_status("onesided")["status"] == "finished"
        yield stack
    finally:
        stack.stop()


def test_the_api_flags_the_trials_and_the_best_trial(one_class: Stack) -> None:
    trials = one_class.trials("onesided")
    assert len(trials) == 2
    for trial in trials:
        assert trial["state"] == "COMPLETE" and trial["degenerate"] == REASON
        assert trial["metrics"]["matthews_correlation"] == 0.0 and trial["metrics"]["f1"] == 0.0
        assert [e["degenerate"] for e in trial["epochs"]] == [REASON, REASON]  # every epoch judged
    best = one_class.study("onesided")["best_trial"]
    assert best["degenerate"] == REASON
    detail = httpx.get(f"{one_class.url}/api/studies/onesided/trials/{best['number']}", timeout=30).json()
    assert detail["degenerate"] == REASON
    assert any(line["level"] == "WARNING" and line["message"].endswith(f"is degenerate: {REASON}")
               for line in detail["log"])


def test_status_and_trials_show_it(one_class: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    best = one_class.study("onesided")["best_trial"]["number"]
    assert main(["status", "onesided", "--url", one_class.url]) == 0
    status = capsys.readouterr().out
    assert f"the best trial ({best}) is degenerate: {REASON}; export-best refuses it without --force" in status
    rows = [line for line in status.splitlines() if "COMPLETE" in line]
    assert len(rows) == 2 and all("degenerate" in row for row in rows)
    assert main(["trials", "onesided", "--url", one_class.url]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "COMPLETE" in line]
    assert len(rows) == 2 and all(f"degenerate: {REASON}" in row for row in rows)


def _export(stack: Stack, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KDSEARCH, "export-best", "onesided", "--out", str(out), *args], env=stack.env,
                          capture_output=True, text=True, timeout=300)


def test_export_best_refuses_it_without_force(one_class: Stack, tmp_path: Path) -> None:
    best = one_class.study("onesided")["best_trial"]["number"]
    out = tmp_path / "student"
    refused = _export(one_class, out)
    assert refused.returncode == 1
    assert (f"kdsearch: error: trial {best} is degenerate: {REASON}; pass --force to export it anyway"
            in refused.stderr), refused.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written"

    forced = _export(one_class, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"warning: trial {best} is degenerate: {REASON}" in forced.stdout
    card = (out / "README.md").read_text()
    assert f"> **Warning: this student is degenerate: {REASON}.**" in card
    # What was exported is the student the engine made: class 0's bias still dwarfs every other logit.
    weights: dict[str, Any] = load_file(str(out / "model.safetensors"))
    bias = weights["classifier.bias"]
    assert bias[0] > 900 and abs(bias[1]) < 10

"""End to end through the real API: uvicorn on a loopback port, a real ``kdsearch worker`` subprocess, tiny
random models made in the test. Launch → trials finish → budget exact → export-best → pipeline reproduces."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import optuna
import pytest
import yaml

from kdsearch.testing import KDSEARCH, Stack, tiny_spec
from tests.conftest import PRECISIONS, queue_unchecked


@pytest.fixture
def stack(db_url: str, tmp_path: Path, precision: str) -> Iterator[Stack]:
    s = Stack(db_url, tmp_path, KDSEARCH_PRECISION=precision)
    s.start_api()
    s.start_worker()
    yield s
    s.stop()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_launch_to_export(stack: Stack, tiny_assets, tmp_path: Path, db_url: str,  # type: ignore[no-untyped-def]
                          precision: str) -> None:
    spec = tiny_spec(tiny_assets, name="e2e", n_trials=5)
    assert httpx.post(f"{stack.url}/api/studies", json=spec).status_code == 201
    study = stack.wait_status("e2e")
    assert study["status"] == "finished", study
    assert study["finished"] == 5 and study["counts"]["complete"] + study["counts"]["pruned"] == 5
    assert study["counts"]["running"] == study["counts"]["failed"] == study["counts"]["waiting"] == 0
    assert study["metric"] == "accuracy" and study["teacher_metric"] == study["teacher_metrics"]["accuracy"]
    assert set(study["teacher_metrics"]) == {"accuracy", "f1", "macro_f1", "matthews_correlation"}

    trials = httpx.get(f"{stack.url}/api/studies/e2e/trials").json()["trials"]
    assert len(trials) == 5
    for t in trials:
        assert t["state"] == "COMPLETE" and t["worker"] and t["duration_s"] > 0
        assert t["precision"] == precision  # forced by KDSEARCH_PRECISION, recorded on every trial
        assert len(t["epochs"]) == t["params"]["num_train_epochs"]
        assert set(t["intermediate"]) == {str(e) for e in range(1, t["params"]["num_train_epochs"] + 1)}
        assert t["value"] == max(e["score"] for e in t["epochs"]) == max(e["metrics"]["accuracy"] for e in t["epochs"])
    best = study["best_trial"]
    assert best["value"] == max(t["value"] for t in trials)

    # The store is Optuna's own schema: plain Optuna reads the same study.
    plain = optuna.load_study(study_name="e2e", storage=db_url)
    assert len(plain.trials) == 5 and plain.best_value == best["value"]

    out = tmp_path / "export"
    # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    export = subprocess.run([sys.executable, "-c", "from service.cli import export_best_main; "
                             "raise SystemExit(export_best_main())", "e2e", "--out", str(out), "--force"],
                            env=stack.env, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    assert f"hf upload YOUR-USER/export {out}" in export.stdout  # the one command that uploads it
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == round(best["value"], 4)
    for key in ("learning_rate", "temperature", "alpha", "num_epochs", "train_batch_size", "seed", "teacher",
                "student", "Training results", "Framework versions"):
        assert key in card
    assert f"- training_precision: {precision}" in card and "(measured in fp32" in card

    # Refuses a non-empty directory without --force; works with it.
    again = subprocess.run([*KDSEARCH, "export-best", "e2e", "--out", str(out)], env=stack.env,
                           capture_output=True, text=True)
    assert again.returncode != 0 and "--force" in again.stderr
    forced = subprocess.run([*KDSEARCH, "export-best", "e2e", "--out", str(out), "--force"], env=stack.env,
                            capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr

    # The export is a ready HF model: the pipeline reproduces the recorded accuracy on the eval split, whatever
    # precision the trial trained in (its metric is the fp32 model's).
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(out), device="cpu")
    with open(Path(tiny_assets["data"]) / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    predictions = classifier([r["sentence"] for r in rows], batch_size=16)
    label2id = {"negative": 0, "positive": 1}
    accuracy = sum(label2id[p["label"]] == int(r["label"]) for p, r in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(best["value"], abs=1e-4)


def test_bad_data_fails_study_and_worker_goes_on(stack: Stack, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad-data"
    bad.mkdir()
    for split in ("train", "validation"):
        (bad / f"{split}.tsv").write_text("text\tlabel\nhello\t1\n")
    broken = tiny_spec(tiny_assets, name="broken", dataset={"path": str(bad)}, priority=5)
    # The API refuses it (tests/test_submit_checks.py): the data changed after submit.
    queue_unchecked(stack.env["KDSEARCH_DATABASE_URL"], broken)
    fine = tiny_spec(tiny_assets, name="fine", n_trials=2)
    assert httpx.post(f"{stack.url}/api/studies", json=fine).status_code == 201
    failed = stack.wait_status("broken")
    assert failed["status"] == "failed" and "no column 'sentence'" in failed["error"]
    assert stack.wait_status("fine")["status"] == "finished"
    assert stack.workers[0].poll() is None, "the worker keeps running"


def test_cancel_stops_running_trial_at_epoch_boundary(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    spec = tiny_spec(tiny_assets, name="cancel-me", n_trials=50,
                     search_space={"num_train_epochs": 100, "batch_size": 16, "learning_rate": 1e-3})
    assert httpx.post(f"{stack.url}/api/studies", json=spec).status_code == 201
    deadline = time.monotonic() + 120
    while httpx.get(f"{stack.url}/api/studies/cancel-me").json()["counts"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.post(f"{stack.url}/api/studies/cancel-me/cancel", json={}).json()["status"] == "cancelled"
    deadline = time.monotonic() + 120
    while (study := httpx.get(f"{stack.url}/api/studies/cancel-me").json())["counts"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert study["status"] == "cancelled" and study["finished"] <= 1 and study["counts"]["waiting"] == 0
    trials = httpx.get(f"{stack.url}/api/studies/cancel-me/trials").json()["trials"]
    assert len(trials) == 1 and trials[0]["stop_reason"] == "study cancelled"
    assert len(trials[0]["epochs"]) < 100

"""A two-objective study end to end: the real API under uvicorn, a real ``kdsearch worker`` subprocess, tiny random
models. Launch → every trial measured → the front (API, Optuna, ``kdsearch status``) → export-best refuses without a
selector and exports within ``--max-params``, with the size and the front on the card."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import optuna

from kdsearch.testing import KDSEARCH, ROOT, Stack
from tests.conftest import front_spec


def test_two_objective_study_end_to_end(stack: Stack, tiny_assets, tmp_path: Path, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    stack.submit(front_spec(tiny_assets, "front", n_trials=5))
    study = stack.wait_status("front")
    assert study["status"] == "finished" and study["finished"] == 5, study
    assert study["objectives"] == ["metric", "params"] and study["best_trial"] is None
    teacher = study["teacher_profile"]
    assert teacher["shape"]["num_hidden_layers"] == 4 and teacher["params"] > 0 and teacher["latency_ms"] > 0

    trials = stack.trials("front")
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(trials) == 5 and complete
    for t in trials:
        shape, profile = t["profile"]["shape"], t["profile"]
        assert shape["hidden_size"] % shape["num_attention_heads"] == 0
        assert {k: t["params"][k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size")} == {
            k: shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size")}
        assert profile["machine"] and profile["latency_threads"] == 1 and profile["flops"] > 0
        assert profile["params"] < teacher["params"]
    for t in complete:
        assert t["values"] == [t["value"], t["profile"]["params"]]
        assert len(t["epochs"]) <= t["params"]["num_train_epochs"]

    pareto = httpx.get(f"{stack.url}/api/studies/front/pareto").json()
    plain = optuna.load_study(study_name="front", storage=sqlite_url)
    assert {p["number"] for p in pareto["front"]} == {t.number for t in plain.best_trials}
    assert [p["number"] for p in study["front"]] == [p["number"] for p in pareto["front"]]
    assert pareto["teacher_profile"] == teacher and pareto["teacher_metric"] == study["teacher_metric"]
    # Learning curves of a multi-objective study come from the recorded epochs (Optuna keeps none for it).
    summary = httpx.get(f"{stack.url}/api/studies/front/summary").json()
    assert {int(n) for n in summary["curves"]} >= {t["number"] for t in complete}

    status = subprocess.run([*KDSEARCH, "status", "front", "--url", stack.url], env={**stack.env, "COLUMNS": "250"},
                            capture_output=True, text=True, cwd=ROOT)
    assert status.returncode == 0, status.stderr
    assert "Pareto front: accuracy (higher) vs params (lower)" in status.stdout and "teacher" in status.stdout

    refused = subprocess.run([*KDSEARCH, "export-best", "front", "--out", str(tmp_path / "none")], env=stack.env,
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1 and "two objectives" in refused.stderr
    for point in pareto["front"]:
        assert f"trial {point['number']}: accuracy" in refused.stderr
    assert not (tmp_path / "none").exists()

    # The largest front student's size as the limit: the most accurate trial within it is the front's most accurate.
    limit = max(p["profile"]["params"] for p in pareto["front"])
    chosen = max(pareto["front"], key=lambda p: (p["value"], -p["cost"]))
    out = tmp_path / "export"
    # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    done = subprocess.run([*KDSEARCH, "export-best", "front", "--out", str(out), "--max-params", str(limit),
                           "--force"], env=stack.env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"exported trial {chosen['number']}, the most accurate trial within --max-params {limit:,}" in done.stdout
    card = (out / "README.md").read_text()
    assert "## Size and speed" in card and "## Pareto front" in card and f"| {chosen['number']} (this model) |" in card
    assert f"| this student | {chosen['profile']['shape']['num_hidden_layers']} layers" in card
    assert f"{teacher['params']:,}" in card and "student_shape" in card

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.num_parameters() == chosen["profile"]["params"]
    assert model.config.hidden_size == chosen["profile"]["shape"]["hidden_size"]

    picked = subprocess.run([*KDSEARCH, "export-best", "front", "--out", str(tmp_path / "by-number"), "--trial",
                             str(complete[0]["number"]), "--force"], env=stack.env, capture_output=True, text=True,
                            cwd=ROOT)
    assert picked.returncode == 0, picked.stderr
    assert f"exported trial {complete[0]['number']}, chosen with --trial" in picked.stdout

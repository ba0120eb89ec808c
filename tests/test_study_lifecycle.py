"""A study's end of life through the API and the CLI: cancel, retry its failed trials, delete it and reuse its
name; read-only commands never create an empty database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from kdsearch.testing import ROOT, Stack, tiny_spec
from service.api import create_app
from service.settings import Settings
from storage import (
    ArtifactLayout,
    SlotState,
    TrialSlotRow,
    claim_slot,
    fail_study,
    finish_slot,
    make_engine,
    make_optuna_storage,
    preparation_failed,
    session_scope,
)


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=db_url, artifacts=tmp_path / "artifacts"))) as c:
        # A server without a token takes state changes (delete, retry, cancel) as JSON only, as the CLI sends them.
        c.headers["Content-Type"] = "application/json"
        yield c


def _checkpoint(db_url: str, artifacts: Path, study_name: str, tmp_path: Path) -> Path:
    """A finished trial with a checkpoint, as a worker records it; returns the checkpoint's file."""
    storage = make_optuna_storage(db_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        trial = study.ask()
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        artifact_id = ArtifactLayout(artifacts).store_checkpoint(checkpoint, trial, storage=storage)
        trial.set_user_attr("checkpoint_artifact_id", artifact_id)
        study.tell(trial, 0.5)
    finally:
        storage.engine.dispose()
    return artifacts / "optuna" / artifact_id


def _slots(db_url: str, study_id: int) -> dict[str, int]:
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            rows = session.execute(select(TrialSlotRow.state, func.count()).where(TrialSlotRow.study_id == study_id)
                                   .group_by(TrialSlotRow.state)).all()
            return {state: n for state, n in rows}
    finally:
        engine.dispose()


def test_delete_removes_slots_checkpoints_and_optuna_study_and_frees_the_name(
        client: TestClient, db_url: str, tmp_path: Path, tiny_assets, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    spec = tiny_spec(tiny_assets, name="gone")
    study = client.post("/api/studies", json=spec).json()
    checkpoint_file = _checkpoint(db_url, tmp_path / "artifacts", "gone", tmp_path)
    assert checkpoint_file.is_file()

    busy = client.delete("/api/studies/gone")
    assert busy.status_code == 409 and "kdsearch cancel gone" in busy.json()["detail"], "a queued study stays"
    taken = client.post("/api/studies", json=spec)
    assert taken.status_code == 409
    assert "kdsearch delete gone" in taken.json()["detail"] and "--name" in taken.json()["detail"]

    engine = make_engine(db_url)
    try:
        claim = claim_slot(engine, "w1")
        assert claim is not None
        client.post("/api/studies/gone/cancel")
        stopping = client.delete("/api/studies/gone")
        assert stopping.status_code == 409 and "still stopping" in stopping.json()["detail"], "a trial still runs"
        finish_slot(engine, claim.slot_id, "w1", outcome=SlotState.DONE)
    finally:
        engine.dispose()

    with caplog.at_level(logging.INFO, logger="kdsearch.audit"):
        deleted = client.delete(f"/api/studies/{study['id']}")
    assert deleted.status_code == 204, deleted.text
    audit = [r.getMessage() for r in caplog.records if r.name == "kdsearch.audit"]
    assert len(audit) == 1 and "name='gone'" in audit[0] and "4 slots, 1 checkpoints removed" in audit[0]
    assert not checkpoint_file.exists()
    assert _slots(db_url, study["id"]) == {}
    storage = make_optuna_storage(db_url)
    try:
        assert "gone" not in [s.study_name for s in optuna.get_all_study_summaries(storage)]
    finally:
        storage.engine.dispose()
    assert client.get("/api/studies/gone").status_code == 404
    assert client.delete("/api/studies/gone").status_code == 404
    assert client.post("/api/studies", json=spec).status_code == 201, "the name is free again"


def test_retry_queues_the_failed_trials_again(client: TestClient, db_url: str, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    study = client.post("/api/studies", json=tiny_spec(tiny_assets, name="again", n_trials=3)).json()
    engine = make_engine(db_url)
    try:
        claim = claim_slot(engine, "w1")
        assert claim is not None
        finish_slot(engine, claim.slot_id, "w1", outcome=SlotState.FAILED, error="oom", max_attempts=1)
        claim = claim_slot(engine, "w1")
        assert claim is not None
        finish_slot(engine, claim.slot_id, "w1", outcome=SlotState.DONE)
        fail_study(engine, study["id"], "the teacher cannot be loaded")
    finally:
        engine.dispose()
    assert _slots(db_url, study["id"]) == {"failed": 1, "done": 1, "cancelled": 1}

    retried = client.post("/api/studies/again/retry")
    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert body["status"] == "queued" and body["error"] is None and body["finished_at"] is None
    assert body["counts"]["waiting"] == 2, "the failed trial and the one the failure stopped"
    assert _slots(db_url, study["id"]) == {"pending": 2, "done": 1}

    nothing = client.post("/api/studies/again/retry")
    assert nothing.status_code == 409 and "no failed trials" in nothing.json()["detail"]
    assert client.post("/api/studies/nope/retry").status_code == 404


def _cli(*args: str, url: str, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args, *(["--url", url] if url else [])],
                          capture_output=True, text=True, timeout=120, cwd=cwd or ROOT,
                          env=env or {**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_submit_status_cancel_retry_delete(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack = Stack(sqlite_url, tmp_path)
    try:
        stack.start_api()
        # Paths relative to where the user stands (the API runs elsewhere): the CLI sends them absolute.
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "teacher").symlink_to(tiny_assets["teacher"])
        (tmp_path / "data").symlink_to(tiny_assets["data"])
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(tiny_spec(tiny_assets, name="cli", teacher="models/teacher",
                                                  dataset={"path": "./data", "max_seq_length": 16})))
        submitted = _cli("submit", "spec.json", url=stack.url, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        spec = stack.study("cli")["spec"]
        assert (spec["teacher"], spec["dataset"]["path"]) == (str(Path(tiny_assets["teacher"]).resolve()),
                                                              str(Path(tiny_assets["data"]).resolve()))

        engine = make_engine(sqlite_url)
        try:  # a worker could not prepare the study twice (not the data's fault): it is retried, and status says so
            for _ in range(2):
                preparation_failed(engine, stack.study("cli")["id"], "OSError: No space left on device",
                                   retry_delay_s=60)
        finally:
            engine.dispose()
        listed = _cli("status", url=stack.url, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        assert "queued (preparation failed 2x)" in listed.stdout, listed.stdout
        shown = _cli("status", "cli", url=stack.url, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        assert "preparation failed 2 time(s) in a row" in shown.stdout, shown.stdout
        assert "OSError: No space left on device" in shown.stdout

        busy = _cli("delete", "cli", url=stack.url)
        assert busy.returncode == 1 and "409" in busy.stderr and "kdsearch cancel cli" in busy.stderr
        again = _cli("submit", "spec.json", url=stack.url, cwd=tmp_path)
        assert again.returncode == 1 and "kdsearch delete cli" in again.stderr

        cancelled = _cli("cancel", "cli", url=stack.url)
        assert cancelled.returncode == 0 and "study cli is cancelled" in cancelled.stdout, cancelled.stderr
        nothing = _cli("retry", "cli", url=stack.url)
        assert nothing.returncode == 1 and "no failed trials" in nothing.stderr

        engine = make_engine(sqlite_url)
        try:
            fail_study(engine, stack.study("cli")["id"], "boom")  # already cancelled: stays cancelled
            with session_scope(engine) as session:
                session.execute(update(TrialSlotRow).where(TrialSlotRow.slot_no == 0).values(state=SlotState.FAILED))
        finally:
            engine.dispose()
        retried = _cli("retry", "cli", url=stack.url)
        assert retried.returncode == 0 and "study cli is queued: 1 failed trial(s) queued again" in retried.stdout, \
            retried.stderr
        assert stack.study("cli")["counts"]["waiting"] == 1

        assert _cli("cancel", "cli", url=stack.url).returncode == 0
        deleted = _cli("delete", "cli", url=stack.url)
        assert deleted.returncode == 0 and "deleted study cli" in deleted.stdout, deleted.stderr
        audit = [line for line in stack.log("api.log").splitlines() if " AUDIT " in line]
        assert len(audit) == 2, "the API records both, at any --log-level (this one runs at warning)"
        assert "RETRY study" in audit[0] and "name='cli'" in audit[0] and "1 trial slots queued again" in audit[0]
        assert "DELETE study" in audit[1] and "name='cli'" in audit[1]
        assert _cli("submit", "spec.json", url=stack.url, cwd=tmp_path).returncode == 0, "the name is free again"
        missing = _cli("delete", "ghost", url=stack.url)
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        stack.stop()


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    """``export-best`` and ``db current`` with no KDSEARCH_DATABASE_URL name the URL they tried and leave no empty
    ``kdsearch.db`` behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDSEARCH_")}
    env["PYTHONPATH"] = str(ROOT)
    export = _cli("export-best", "sst2", "--out", "out", url="", cwd=tmp_path, env=env)
    assert export.returncode != 0 and "Traceback" not in export.stderr
    assert "no database at sqlite:///./kdsearch.db" in export.stderr
    assert str(tmp_path / "kdsearch.db") in export.stderr, "the file it resolved to"
    current = _cli("db", "current", url="", cwd=tmp_path, env=env)
    assert current.returncode == 2 and "no database at sqlite:///./kdsearch.db" in current.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no database and no export directory were created"

"""Faults while a trial trains or is stored, sorted by whose they are (issue 26, item 2): the infrastructure's (a
full disk) spends no trial and loses nothing; a trial's own failure, every time, ends the study ``failed`` with the
reason, and its webhook says so. Real API and worker processes (``service.testing.FlakyEngine``)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import IntegrityError, OperationalError

from kdsearch.testing import Stack, tiny_spec
from storage import TrialSlotRow, make_engine, session_scope
from tests.test_notify import Receiver


@pytest.fixture
def flaky_env() -> dict[str, str]:
    return {"KDSEARCH_PREPARE_RETRY_DELAY": "0.2", "KDSEARCH_MAX_INFRA_FAULTS": "3", "KDSEARCH_MAX_TRIAL_ATTEMPTS": "2",
            "KDSEARCH_TEST_DISK_FULL_WRITES": "2"}


@pytest.fixture
def stack(flaky_stack: Stack) -> Stack:
    return flaky_stack


def _spec(assets, name: str, n_trials: int = 3, **overrides) -> dict:  # type: ignore[no-untyped-def]
    return tiny_spec(assets, name=name, n_trials=n_trials, search_space={"num_train_epochs": 2}, **overrides)


@pytest.mark.parametrize("pack", ["1", "3"])
def test_a_full_disk_spends_no_trial(stack: Stack, tiny_assets, pack: str) -> None:  # type: ignore[no-untyped-def]
    """The first two checkpoint writes fail with ENOSPC: each trial goes back untried (WAITING, then run again with
    the same parameters), the worker backs off, and once the disk has room the study finishes with all 3 trials
    COMPLETE, none FAIL, no slot attempt spent. Packed (3 slots per claim): two members are given back alone while
    the third is stored."""
    stack.submit(_spec(tiny_assets, "enospc-a"))
    stack.start_worker("--pack", pack)
    study = stack.wait_status("enospc-a")
    assert study["status"] == "finished" and study["error"] is None, study
    trials = stack.trials("enospc-a")
    assert sorted(t["state"] for t in trials) == ["COMPLETE"] * 3, trials
    assert study["counts"]["failed"] == 0 and study["finished"] == 3
    db = make_engine(stack.env["KDSEARCH_DATABASE_URL"])
    try:
        with session_scope(db) as session:
            slots = session.query(TrialSlotRow).all()
            assert [(s.state, s.attempts) for s in slots] == [("done", 1)] * 3, "a full disk spends no attempt"
    finally:
        db.dispose()
    logs = stack.worker_logs()
    assert logs.count("is the infrastructure's fault, not the trial's") == 2
    assert "OSError: [Errno 28] No space left on device" in logs
    assert ("backing off" in logs) == (pack == "1"), "a claim that stored a trial does not back off"
    assert stack.workers[0].poll() is None, "the worker keeps running"


def test_a_disk_that_stays_full_stops_the_worker_and_loses_nothing(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack.submit(_spec(tiny_assets, "enospc-always-b", n_trials=2))
    worker = stack.start_worker()
    assert worker.wait(timeout=120) == 1
    logs = stack.worker_logs()
    assert "stopping: 3 claims in a row hit an infrastructure fault (last: OSError: [Errno 28] No space left on " \
           "device" in logs, logs[-3000:]
    study = stack.study("enospc-always-b")
    assert study["status"] == "running" and study["counts"]["failed"] == 0, study
    assert study["counts"]["waiting"] == 2 and study["counts"]["running"] == 0
    assert {t["state"] for t in stack.trials("enospc-always-b")} == {"WAITING"}


def test_a_study_whose_every_trial_fails_ends_failed(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver()
    stack.stop()  # again with webhooks allowed to the receiver
    stack.env["KDSEARCH_WEBHOOK_ALLOWED_HOSTS"] = f"http://127.0.0.1:{receiver.port}"  # an origin: its port too
    stack.workers, stack.api = [], None
    try:
        stack.start_api()
        stack.submit(_spec(tiny_assets, "diverge-always-c", n_trials=2, notify={
            "webhook": f"http://127.0.0.1:{receiver.port}/kd", "events": ["finished", "failed"]}))
        stack.start_worker()
        study = stack.wait_status("diverge-always-c")
        reason = "no trial completed: 2 failed (last: TrainingDiverged: loss diverged (nan) at epoch 1 step 3)"
        assert (study["status"], study["error"]) == ("failed", reason)
        assert study["counts"]["failed"] == 4  # two slots, two attempts each
        stack.wait_for(lambda: receiver.events("diverge-always-c"), 60, "the webhook")
        (body,) = [r["body"] for r in receiver.received]
        assert (body["event"], body["status"], body["error"]) == ("failed", "failed", reason)
    finally:
        receiver.close()


def test_infrastructure_faults_are_told_from_the_trials() -> None:
    from kdsearch.errors import Fault, fault_of

    def infrastructure_fault(exc: BaseException) -> bool:
        return fault_of(exc) is Fault.INFRASTRUCTURE

    full = OSError(errno.ENOSPC, "No space left on device")
    assert infrastructure_fault(full) and infrastructure_fault(OSError(errno.EIO, "Input/output error"))
    assert infrastructure_fault(OSError(errno.EROFS, "Read-only file system"))
    try:  # wrapped, as safetensors and torch report a failed write
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("saving the checkpoint failed") from exc
    except RuntimeError as wrapped:
        assert infrastructure_fault(wrapped)
    assert infrastructure_fault(RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                                             'on device" })'))
    outage = OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
    assert infrastructure_fault(outage)
    try:
        raise StorageInternalError("An exception is raised during the commit.") from outage
    except StorageInternalError as optuna_wrapped:
        assert infrastructure_fault(optuna_wrapped)
    from botocore.exceptions import EndpointConnectionError

    assert infrastructure_fault(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket"))
    # The trial's own faults, and bugs: never given back.
    for own in (ValueError("hidden size 48 is not a multiple of 5 heads"), OSError(errno.ENOENT, "No such file"),
                ArithmeticError("loss diverged (nan) at epoch 1 step 3"), MemoryError(),
                IntegrityError("INSERT", {}, Exception("duplicate key value"))):
        assert not infrastructure_fault(own), own


def test_a_database_outage_before_training_spends_no_attempt(sqlite_url: str, tmp_path: Path, tiny_assets,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The database drops while a worker reads the study's attributes after preparing and while it asks for the
    trial (the fault bench's PostgreSQL stop landed there twice): the worker waits for it, and every slot is done
    on its first attempt, no trial FAIL (before, the claim broke off and the reaper spent an attempt)."""
    import sqlite3

    import optuna
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings
    from service.worker import Worker

    settings = Settings(database_url=sqlite_url, artifacts=tmp_path / "artifacts", poll_interval=0.1,
                        engine="service.testing:SleepEngine")
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=_spec(tiny_assets, "db-blip")).status_code == 201
    outage = {"ask": 2, "user_attrs": 2}

    def dropped(where: str) -> None:
        if outage[where]:
            outage[where] -= 1
            raise OperationalError(where, {}, sqlite3.OperationalError("database is locked"))

    real_ask, real_attrs = optuna.Study.ask, optuna.Study.user_attrs

    def ask(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        dropped("ask")
        return real_ask(self, *args, **kwargs)

    def user_attrs(self):  # type: ignore[no-untyped-def]
        dropped("user_attrs")
        return real_attrs.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(optuna.Study, "ask", ask)
    monkeypatch.setattr(optuna.Study, "user_attrs", property(user_attrs))
    Worker(settings, device="cpu", exit_when_idle=True).run()
    assert outage == {"ask": 0, "user_attrs": 0}, "the outage met the worker"
    study = optuna.load_study(study_name="db-blip", storage=sqlite_url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
    db = make_engine(sqlite_url)
    try:
        with session_scope(db) as session:
            assert [(s.state, s.attempts) for s in session.query(TrialSlotRow).all()] == [("done", 1)] * 3
    finally:
        db.dispose()


def test_an_ask_cut_short_leaves_no_running_trial_behind(sqlite_url: str, tmp_path: Path, tiny_assets,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The database drops inside ``ask``, after Optuna created the trial and before its parameters are sampled (the
    soak's PostgreSQL restarts and SIGKILLs landed there): the retried ask makes a new trial, and the one cut short
    goes back to WAITING, where a later ask runs it. No trial is left RUNNING with no slot naming it, and every slot
    is done on its first attempt."""
    import sqlite3

    import optuna
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings
    from service.worker import Worker

    settings = Settings(database_url=sqlite_url, artifacts=tmp_path / "artifacts", poll_interval=0.1,
                        engine="service.testing:SleepEngine")
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=_spec(tiny_assets, "ask-cut")).status_code == 201
    outage = {"suggest": 1}
    real_suggest = optuna.trial.Trial._suggest

    def suggest(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if outage["suggest"]:
            outage["suggest"] -= 1
            raise OperationalError("suggest", {}, sqlite3.OperationalError("database is locked"))
        return real_suggest(self, *args, **kwargs)

    monkeypatch.setattr(optuna.trial.Trial, "_suggest", suggest)
    Worker(settings, device="cpu", exit_when_idle=True).run()
    assert outage == {"suggest": 0}, "the outage met the worker"
    study = optuna.load_study(study_name="ask-cut", storage=sqlite_url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3, [t.state for t in study.trials]
    db = make_engine(sqlite_url)
    try:
        with session_scope(db) as session:
            slots = session.query(TrialSlotRow).all()
            assert [(s.state, s.attempts) for s in slots] == [("done", 1)] * 3
            assert sorted(s.optuna_trial_id for s in slots) == sorted(t._trial_id for t in study.trials)
    finally:
        db.dispose()

"""Scale-out and failures with real processes: many workers, SIGKILL, SIGTERM, a PostgreSQL restart.

Trials run on ``service.testing.SleepEngine`` (sleeps per epoch) so the tests exercise the real worker, queue
and Optuna paths in seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.testing import Stack, tiny_spec
from storage import TrialSlotRow, make_engine, session_scope


def sleep_spec(assets, name: str, n: int, epochs: int = 2, **kw) -> dict:  # type: ignore[no-untyped-def]
    return tiny_spec(assets, name=name, n_trials=n, search_space={"num_train_epochs": epochs}, **kw)


def finished_trials(db_url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=db_url).get_trials(deepcopy=False)


def assert_exact(db_url: str, name: str, n: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly n finished trials, one per slot, nothing left RUNNING."""
    trials = finished_trials(db_url, name)
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    slots = Counter(t.user_attrs["slot"] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert sorted(slots) == list(range(n)) and set(slots.values()) == {1}, "a slot finished twice"
    return trials


# Packed: workers that claim up to 3 slots of a study at once (--pack 3, service.trial_runner) beside solo ones.
PACKS = pytest.mark.parametrize("pack", [None, "3"], ids=["solo", "packed"])


def worker_args(pack: str | None, index: int) -> list[str]:
    """Every other worker packed when ``pack`` is set (so packed and solo workers share the queue)."""
    return ["--pack", pack] if pack is not None and index % 2 == 0 else []


@PACKS
def test_eight_workers_three_priorities_on_postgres(make_stack, postgres_url: str, tiny_assets,  # type: ignore[no-untyped-def]
                                                     pack: str | None) -> None:
    stack = make_stack(postgres_url)
    sizes = {"low": (0, 10), "mid": (5, 12), "high": (10, 14)}
    for name, (priority, n) in sizes.items():
        stack.submit(sleep_spec(tiny_assets, name, n, priority=priority))
    for i in range(8):
        stack.start_worker(*worker_args(pack, i))
    for name in sizes:
        assert stack.wait_status(name)["status"] == "finished"
    for name, (_, n) in sizes.items():
        trials = assert_exact(postgres_url, name, n)
        assert all(t.state != TrialState.FAIL for t in trials)
    assert len({w for n in sizes for w in (t.user_attrs["worker"] for t in finished_trials(postgres_url, n))}) > 1
    # Higher priority first: every slot of a study is claimed before (within scheduling jitter) the next one's.
    engine = make_engine(postgres_url)
    with session_scope(engine) as session:
        claimed: dict[int, list[float]] = {}
        for slot in session.query(TrialSlotRow):
            claimed.setdefault(slot.study_id, []).append(slot.claimed_at.timestamp())
    engine.dispose()
    ids = {s["name"]: s["id"] for s in stack_studies(stack)}
    assert max(claimed[ids["high"]]) <= min(claimed[ids["mid"]]) + 0.3
    assert max(claimed[ids["mid"]]) <= min(claimed[ids["low"]]) + 0.3


def stack_studies(stack: Stack) -> list[dict]:
    import httpx

    return httpx.get(f"{stack.url}/api/studies").json()


@PACKS
def test_three_workers_and_api_share_sqlite(make_stack, sqlite_url: str, tiny_assets,  # type: ignore[no-untyped-def]
                                            pack: str | None) -> None:
    stack = make_stack(sqlite_url, KDSEARCH_TEST_EPOCH_S="0.02")
    for name in ("a", "b"):
        stack.submit(sleep_spec(tiny_assets, name, 12))
    for i in range(3):
        stack.start_worker(*worker_args(pack, i))
    # Read through the API all the while, as a dashboard would.
    stack.wait_for(lambda: all(s["status"] == "finished" for s in stack_studies(stack)), what="both studies")
    for name in ("a", "b"):
        assert all(t.state == TrialState.COMPLETE for t in assert_exact(sqlite_url, name, 12))
    logs = stack.worker_logs() + stack.log("api.log")
    assert "database is locked" not in logs and "Traceback" not in logs


@PACKS
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_worker_trial_is_retried(make_stack, request, backend: str, tiny_assets,  # type: ignore[no-untyped-def]
                                        pack: str | None) -> None:
    """SIGKILL mid-trial: the slot (a packed worker: all 3 of its pack's) is retried once, the budget exact."""
    db_url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    stack = make_stack(db_url, KDSEARCH_TEST_EPOCH_S="0.4")
    stack.submit(sleep_spec(tiny_assets, "kill", 5, epochs=4))
    victim = stack.start_worker(*worker_args(pack, 0))
    lost = 1 if pack is None else 3
    stack.wait_for(lambda: stack.study("kill")["counts"]["running"] == lost, what="running trials")
    time.sleep(0.6)  # into an epoch, after the first report
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.start_worker(*worker_args(pack, 0))
    assert stack.wait_status("kill")["status"] == "finished"
    trials = assert_exact(db_url, "kill", 5)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == lost and all(t.system_attrs.get("fail_reason") == "stale heartbeat" for t in failed)
    for slot in {t.user_attrs["slot"] for t in failed}:
        retried = [t for t in trials if t.user_attrs["slot"] == slot and t.state == TrialState.COMPLETE]
        assert len(retried) == 1 and retried[0].user_attrs["attempt"] == 2
    if pack is not None:
        assert {t.user_attrs["pack"]["size"] for t in failed} == {3}


@PACKS
def test_sigterm_exits_cleanly_and_leaves_nothing_running(make_stack, sqlite_url: str, tiny_assets,  # type: ignore[no-untyped-def]
                                                          pack: str | None) -> None:
    stack = make_stack(sqlite_url, KDSEARCH_TEST_EPOCH_S="0.3")
    stack.submit(sleep_spec(tiny_assets, "term", 3, epochs=50))
    worker = stack.start_worker(*worker_args(pack, 0))
    running = 1 if pack is None else 3
    stack.wait_for(lambda: stack.study("term")["counts"]["running"] == running, what="running trials")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    study = stack.study("term")
    assert study["counts"]["running"] == 0 and study["counts"]["failed"] == running
    assert study["counts"]["waiting"] == 3
    assert study["status"] == "running", "the interrupted slot is back in the queue"


@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None or os.geteuid() != 0, reason="needs pg_ctlcluster as root")
def test_postgres_restart_mid_study(make_stack, postgres_url: str, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(postgres_url, KDSEARCH_TEST_EPOCH_S="0.3")
    stack.submit(sleep_spec(tiny_assets, "outage", 8, epochs=3))
    stack.start_worker()
    stack.start_worker()
    stack.wait_for(lambda: stack.study("outage")["counts"]["complete"] >= 2, what="two complete trials")
    before = {t.number: t.value for t in finished_trials(postgres_url, "outage") if t.state == TrialState.COMPLETE}
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True)
    assert stack.wait_status("outage", timeout_s=180)["status"] == "finished"
    trials = assert_exact(postgres_url, "outage", 8)
    after = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert before.items() <= after.items(), "results reported before the outage survived"
    assert all(w.poll() is None for w in stack.workers), "workers reconnected instead of dying"


def test_api_restart_loses_nothing(make_stack, sqlite_url: str, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(sqlite_url, KDSEARCH_TEST_EPOCH_S="0.1")
    stack.submit(sleep_spec(tiny_assets, "api-down", 10, epochs=3))
    stack.start_worker()
    stack.wait_for(lambda: stack.study("api-down")["counts"]["complete"] >= 2, what="two complete trials")
    stack.api.send_signal(signal.SIGTERM)
    assert stack.api.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
    time.sleep(2)  # workers never talk to the API: they go on meanwhile
    stack.start_api()
    assert stack.wait_status("api-down")["status"] == "finished"
    assert_exact(sqlite_url, "api-down", 10)


def test_teacher_cache_built_once_by_concurrent_workers(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import sys

    spec = json.dumps(tiny_spec(tiny_assets))
    code = ("import json, sys; from distill import DistillationEngine; from search_space import StudySpec; "
            f"engine = DistillationEngine({str(tmp_path / 'art')!r}, 'cpu'); "
            "engine.prepare(StudySpec.model_validate(json.loads(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, spec], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=Path(__file__).parent.parent) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("building teacher-logit cache" in out for out in outputs) == 1
    cache = tmp_path / "art" / "cache"
    assert len(list(cache.glob("*/meta.json"))) == 1
    assert not list(cache.glob(".*tmp*")), "no half-written entry left behind"

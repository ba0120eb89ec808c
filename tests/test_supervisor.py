"""Several CPU worker processes under one supervisor (``kdsearch worker --procs N``): the layout ``auto`` picks,
signals passed on, a killed child started again, exact budgets on SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
from optuna.trial import TrialState

from kdsearch.testing import Stack
from service import supervisor
from tests.test_reliability import PACKS, assert_exact, sleep_spec, worker_args


@pytest.mark.parametrize(("procs", "threads", "expected"), [
    ("auto", "auto", (4, 1)),  # one single-threaded process per physical core
    ("2", "auto", (2, 2)),  # the cores shared out
    ("1", "auto", (1, 4)),
    ("3", "2", (3, 2)),
    ("8", "auto", (8, 1)),
])
def test_cpu_layout(monkeypatch: pytest.MonkeyPatch, procs: str, threads: str, expected: tuple[int, int]) -> None:
    monkeypatch.setattr(supervisor, "physical_cores", lambda: 4)
    assert supervisor.cpu_layout(procs, threads) == expected


def test_children_run_single_worker_processes_with_their_threads() -> None:
    children = supervisor.cpu_children(2, 1, ["--log-level", "info"])
    assert len(children) == 2
    for child in children:
        assert child.args[:6] == ["--device", "cpu", "--procs", "1", "--threads-per-proc", "1"]
        assert child.env["KDSEARCH_THREADS"] == child.env["OMP_NUM_THREADS"] == "1"


def children_of(pid: int, count: int, timeout_s: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if len(children) == count:
            return children
        time.sleep(0.1)
    raise AssertionError(f"supervisor {pid} did not have {count} children")


@PACKS
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_procs_share_the_budget_and_a_killed_child_is_replaced(make_stack, request, backend: str,  # type: ignore[no-untyped-def]
                                                               tiny_assets, pack: str | None) -> None:
    """Packed: each child claims and runs 3 trials at once (--pack 3); the killed one's 3 are all retried."""
    db_url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    stack: Stack = make_stack(db_url, KDSEARCH_TEST_EPOCH_S="0.3")
    stack.submit(sleep_spec(tiny_assets, "procs", 8, epochs=3))
    parent = stack.start_worker("--procs", "2", "--threads-per-proc", "1", *worker_args(pack, 0))
    first, second = children_of(parent.pid, 2)
    per_child = 1 if pack is None else 3
    stack.wait_for(lambda: stack.study("procs")["counts"]["running"] == 2 * per_child,
                   what="both children's trials running at once")
    time.sleep(0.4)  # into an epoch
    first.send_signal(signal.SIGKILL)
    assert stack.wait_status("procs")["status"] == "finished"
    trials = assert_exact(db_url, "procs", 8)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # The killed child's unfinished trials are reaped and retried. Packed, its members run one after another here
    # (the sleep engine), and a member it had already handed over (told COMPLETE) stays done: 1 to 3 are reaped.
    assert 1 <= len(failed) <= per_child
    assert all(t.system_attrs.get("fail_reason") == "stale heartbeat" for t in failed)
    assert all(t.user_attrs["worker"].split(":")[1] == str(first.pid) for t in failed)
    assert {str(first.pid), str(second.pid)} <= {t.user_attrs["worker"].split(":")[1] for t in trials}
    assert "was killed by signal 9; starting it again" in stack.worker_logs()
    # Each child, and the killed one's replacement, is a worker with one torch thread.
    stack.wait_for(lambda: stack.worker_logs().count("1 torch thread(s)") == 3, 60, "the replacement to start")
    assert len(children_of(parent.pid, 2)) == 2

    current = psutil.Process(parent.pid).children()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(current, timeout=10)
    assert not alive


def two_children_training(stack: Stack, tiny_assets, name: str) -> tuple[subprocess.Popen, list[psutil.Process]]:  # type: ignore[no-untyped-def]
    """A supervisor of two single-threaded workers, each in the middle of a long trial of study ``name``."""
    stack.submit(sleep_spec(tiny_assets, name, 4, epochs=50))
    parent = stack.start_worker("--procs", "2", "--threads-per-proc", "1")
    children = children_of(parent.pid, 2)
    stack.wait_for(lambda: stack.study(name)["counts"]["running"] == 2, what="two trials running")
    return parent, children


def test_sigterm_reaches_every_child(make_stack, sqlite_url: str, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(sqlite_url, KDSEARCH_TEST_EPOCH_S="0.3")
    parent, children = two_children_training(stack, tiny_assets, "term")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    study = stack.study("term")
    # Both trials stopped at their next epoch boundary and went back to the queue; nothing is left running.
    assert study["counts"]["running"] == 0 and study["counts"]["failed"] == 2 and study["status"] == "running"


def test_children_die_with_a_killed_supervisor(make_stack, sqlite_url: str, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(sqlite_url, KDSEARCH_TEST_EPOCH_S="0.3")
    parent, children = two_children_training(stack, tiny_assets, "orphans")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # PR_SET_PDEATHSIG: each child gets SIGTERM and leaves at its next epoch boundary, no orphan keeps training.
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    stack.wait_for(lambda: stack.study("orphans")["counts"]["running"] == 0, 30, "the trials to be given back")

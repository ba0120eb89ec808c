"""The work queue on both backends: exact budgets under concurrency, priorities, retries, cancel, timeouts."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest

from storage import (
    SlotState,
    StudyExistsError,
    StudyRow,
    StudyStatus,
    TrialSlotRow,
    cancel_study,
    claim_slot,
    claim_slots,
    create_study,
    fail_study,
    finish_slot,
    heartbeat_slot,
    init_db,
    make_engine,
    notifications,
    reap_stale_slots,
    session_scope,
    settle_expired_studies,
    study_should_stop,
    utcnow,
)


@pytest.fixture
def db(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(db_url, pool_size=10, max_overflow=10)
    init_db(engine)
    yield engine
    engine.dispose()


def _new(db, name: str, n: int, priority: int = 0, timeout_s: float | None = None) -> StudyRow:  # type: ignore[no-untyped-def]
    return create_study(db, name=name, spec={"name": name}, n_trials=n, priority=priority, timeout_s=timeout_s)


def _status(db, study_id: int) -> str:  # type: ignore[no-untyped-def]
    with session_scope(db) as s:
        return s.get(StudyRow, study_id).status


def test_duplicate_name_rejected(db) -> None:  # type: ignore[no-untyped-def]
    _new(db, "same", 1)
    with pytest.raises(StudyExistsError):
        _new(db, "same", 2)


def test_priority_then_first_come(db) -> None:  # type: ignore[no-untyped-def]
    low = _new(db, "low", 2, priority=0)
    high = _new(db, "high", 2, priority=5)
    low_later = _new(db, "low-later", 1, priority=0)
    order = [claim_slot(db, "w").study_id for _ in range(5)]
    assert order == [high.id, high.id, low.id, low.id, low_later.id]
    assert claim_slot(db, "w") is None


@pytest.mark.parametrize("pack", [1, 3], ids=["solo", "packed"])
def test_concurrent_workers_never_exceed_budget(db, pack: int) -> None:  # type: ignore[no-untyped-def]
    """Six workers; packed: half claim up to 3 slots at once (claim_slots), half one (claim_slot)."""
    studies = [_new(db, f"s{i}", n) for i, n in enumerate((7, 5, 9))]
    claimed: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker(worker_id: str, k: int) -> None:
        while claims := (claim_slots(db, worker_id, k) if k > 1 else [c for c in [claim_slot(db, worker_id)] if c]):
            assert len(claims) <= k and len({c.study_id for c in claims}) == 1
            with lock:
                claimed.extend((claim.slot_id, claim.study_id) for claim in claims)
            for claim in claims:
                finish_slot(db, claim.slot_id, worker_id, outcome=SlotState.DONE)

    threads = [threading.Thread(target=worker, args=(f"w{i}", pack if i % 2 else 1)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({slot for slot, _ in claimed}) == len(claimed), "a slot was claimed twice"
    per_study = Counter(study for _, study in claimed)
    assert per_study == {s.id: s.n_trials for s in studies}
    assert all(_status(db, s.id) == StudyStatus.FINISHED for s in studies)


def test_claim_slots_takes_one_study_in_one_statement(db) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import event

    high = _new(db, "high", 2, priority=5)
    low = _new(db, "low", 4)
    statements: list[str] = []

    def record(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(db, "before_cursor_execute", record)
    try:
        first = claim_slots(db, "w", 3)  # K larger than the study's budget: its 2 slots, never the next study's
    finally:
        event.remove(db, "before_cursor_execute", record)
    assert [(c.study_id, c.slot_no, c.attempt) for c in first] == [(high.id, 0, 1), (high.id, 1, 1)]
    assert len([s for s in statements if "UPDATE kd_trial_slots" in s]) == 1, statements
    assert _status(db, high.id) == StudyStatus.RUNNING
    second = claim_slots(db, "w", 3)
    assert [(c.study_id, c.slot_no) for c in second] == [(low.id, 0), (low.id, 1), (low.id, 2)]
    # A failed slot goes back to pending and is claimed again, with the one left.
    finish_slot(db, second[1].slot_id, "w", outcome=SlotState.FAILED)
    third = claim_slots(db, "w", 3)
    assert [(c.slot_no, c.attempt) for c in third] == [(1, 2), (3, 1)]
    assert claim_slots(db, "w", 3) == [] and claim_slot(db, "w") is None
    with pytest.raises(ValueError):
        claim_slots(db, "w", 0)


def test_status_moves_queued_running_finished(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "flow", 2)
    assert _status(db, study.id) == StudyStatus.QUEUED
    a = claim_slot(db, "w1")
    assert _status(db, study.id) == StudyStatus.RUNNING
    b = claim_slot(db, "w2")
    finish_slot(db, a.slot_id, "w1", outcome=SlotState.DONE)
    assert _status(db, study.id) == StudyStatus.RUNNING
    finish_slot(db, b.slot_id, "w2", outcome=SlotState.DONE)
    assert _status(db, study.id) == StudyStatus.FINISHED


def test_failed_trial_is_retried_then_given_up(db) -> None:  # type: ignore[no-untyped-def]
    study = create_study(db, name="retry", n_trials=1, priority=0, timeout_s=None, spec={
        "name": "retry", "notify": {"webhook": "http://hooks.example/kd", "events": ["finished", "failed"]}})
    attempts = []
    while (claim := claim_slot(db, "w")) is not None:
        attempts.append(claim.attempt)
        finish_slot(db, claim.slot_id, "w", outcome=SlotState.FAILED, error="boom", max_attempts=3)
    assert attempts == [1, 2, 3]
    with session_scope(db) as s:
        slot = s.query(TrialSlotRow).filter_by(study_id=study.id).one()
        assert (slot.state, slot.last_error) == (SlotState.FAILED, "boom")
        # No trial completed: the study failed, saying why, and its webhook event says failed (not finished).
        row = s.get(StudyRow, study.id)
        assert (row.status, row.error) == (StudyStatus.FAILED, "no trial completed: 1 failed (last: boom)")
        assert [(n.event, n.payload) for n in notifications(s, study.id)] == [
            ("failed", {"error": "no trial completed: 1 failed (last: boom)"})]


def test_a_study_with_one_trial_done_finishes(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "one-good", 2)
    first, second = claim_slot(db, "w"), claim_slot(db, "w")
    finish_slot(db, first.slot_id, "w", outcome=SlotState.FAILED, error="boom", max_attempts=1)
    finish_slot(db, second.slot_id, "w", outcome=SlotState.DONE)
    assert _status(db, study.id) == StudyStatus.FINISHED


def test_cancel_stops_new_claims_and_signals_running(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "cancel", 5)
    running = claim_slot(db, "w")
    assert study_should_stop(db, study.id) is None
    cancel_study(db, study.id)
    assert _status(db, study.id) == StudyStatus.CANCELLED
    assert study_should_stop(db, study.id) == "study cancelled"
    assert claim_slot(db, "w") is None
    finish_slot(db, running.slot_id, "w", outcome=SlotState.DONE)
    assert _status(db, study.id) == StudyStatus.CANCELLED


def test_failed_study_closes_its_slots(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "broken", 3)
    other = _new(db, "fine", 1)
    claim = claim_slot(db, "w")
    fail_study(db, claim.study_id, "DataError: no column 'sentence'")
    finish_slot(db, claim.slot_id, "w", outcome=SlotState.FAILED, max_attempts=0)
    with session_scope(db) as s:
        row = s.get(StudyRow, study.id)
        assert (row.status, row.error) == (StudyStatus.FAILED, "DataError: no column 'sentence'")
    assert claim_slot(db, "w").study_id == other.id


def test_stale_slot_is_taken_over_and_retried(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "stale", 1)
    claim = claim_slot(db, "dead", now=utcnow() - timedelta(seconds=120))
    assert reap_stale_slots(db, grace_period_s=300, reaper_id="r") == []
    reaped = reap_stale_slots(db, grace_period_s=60, reaper_id="reaper")
    assert [(slot_id, study_id) for slot_id, study_id, _ in reaped] == [(claim.slot_id, study.id)]
    assert not heartbeat_slot(db, claim.slot_id, "dead"), "the dead worker lost its claim"
    finish_slot(db, claim.slot_id, "dead", outcome=SlotState.DONE)  # ignored: no longer its slot
    finish_slot(db, claim.slot_id, "reaper", outcome=SlotState.FAILED, max_attempts=3)
    again = claim_slot(db, "alive")
    assert (again.slot_id, again.attempt) == (claim.slot_id, 2)


def test_timeout_finishes_study(db) -> None:  # type: ignore[no-untyped-def]
    study = _new(db, "timed", 3, timeout_s=30)
    first = claim_slot(db, "w", now=utcnow() - timedelta(seconds=60))
    assert claim_slot(db, "w") is None, "deadline passed: no new trial"
    assert study_should_stop(db, study.id) == "study timeout reached"
    settle_expired_studies(db)
    finish_slot(db, first.slot_id, "w", outcome=SlotState.DONE)
    assert _status(db, study.id) == StudyStatus.FINISHED


def test_artifact_writes_are_atomic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    import pytest as _pytest

    from storage import AtomicFileSystemArtifactStore

    store = AtomicFileSystemArtifactStore(tmp_path / "store")
    store.write("ok", io.BytesIO(b"complete"))
    assert (tmp_path / "store" / "ok").read_bytes() == b"complete"

    class Broken(io.BytesIO):
        def read(self, *args):  # type: ignore[no-untyped-def]
            if self.tell() > 0:
                raise OSError("disk went away")
            return super().read(4)

    with _pytest.raises(OSError):
        store.write("half", Broken(b"partial content"))
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ok"], "no half-written file, no temp file"


def test_heartbeat_never_mistakes_its_own_finished_slot_for_one_taken_over(db, caplog) -> None:  # type: ignore[no-untyped-def]
    """A beat racing the worker's own ``finish_slot`` used to find the slot closed and log it as taken over (and
    set ``lost``): ``release`` first, and only a real takeover sets ``lost``."""
    import time

    from service.heartbeat import SlotHeartbeat

    _new(db, "beats", 2)
    mine, theirs = claim_slot(db, "w"), claim_slot(db, "w")
    lost = {mine.slot_id: threading.Event(), theirs.slot_id: threading.Event()}
    with caplog.at_level("WARNING", logger="kdsearch.worker"), \
            SlotHeartbeat(db, "w", lost, interval_s=0.001, grace_period_s=60) as heart:
        time.sleep(0.05)
        heart.release(mine.slot_id)
        finish_slot(db, mine.slot_id, "w", outcome=SlotState.DONE)
        # The other slot is really taken over: a reaper on a clock 120 s ahead finds it stale. On PostgreSQL the
        # reaper skips a row locked by a beat in flight (SKIP LOCKED), and beats come every 1 ms here: it tries
        # again until the row is free, as the next housekeeping round would.
        reaped: list[int] = []
        deadline = time.monotonic() + 10
        while not reaped and time.monotonic() < deadline:
            reaped = [s for s, _, _ in reap_stale_slots(db, grace_period_s=60, reaper_id="reaper",
                                                        now=utcnow() + timedelta(seconds=120))]
        assert reaped == [theirs.slot_id]
        deadline = time.monotonic() + 10
        while not lost[theirs.slot_id].is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # many more beats
    assert lost[theirs.slot_id].is_set() and not lost[mine.slot_id].is_set()
    taken = [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()]
    assert len(taken) == 1 and taken[0].startswith(f"slot {theirs.slot_id} was taken over"), taken
    assert "now claimed, held by reaper" in taken[0]  # the log names who holds it now

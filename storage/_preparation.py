"""Study preparation as the queue sees it: progress reports, failures that hold a study back, slots released.

A preparation failure that is nobody's data error must never lose the study: the slot goes back to ``pending``
without using up one of its trial attempts, and the study's slots are not claimed again before ``retry_at``
(exponential backoff). Only ``max_attempts`` consecutive failures fail the study.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kdsearch.retry import backoff_delay
from storage._db import db_now, session_scope
from storage._models import PreparationRow, SlotState, TrialSlotRow


def _row(session: Session, study_id: int) -> PreparationRow:
    """The study's preparation row, locked; created on first use."""
    row = session.get(PreparationRow, study_id, with_for_update=True, populate_existing=True)
    if row is None:
        try:
            with session.begin_nested():
                row = PreparationRow(study_id=study_id, done=0, total=0, attempts=0)
                session.add(row)
        except IntegrityError:  # another worker created it meanwhile
            row = session.get(PreparationRow, study_id, with_for_update=True, populate_existing=True)
            assert row is not None
    return row


def report_progress(engine: Engine, study_id: int, worker_id: str, stage: str, done: int, total: int,
                    rate: float | None, now: datetime | None = None) -> None:
    """Record how far a preparation stage is (called a few times a minute, not per batch)."""
    with session_scope(engine, write_lock=True) as session:
        now = now or db_now(session)
        row = _row(session, study_id)
        if row.stage != stage or row.worker_id != worker_id:
            row.started_at = now
        row.stage, row.done, row.total, row.rate, row.worker_id, row.updated_at = (
            stage, done, total, rate, worker_id, now)


def preparation_succeeded(engine: Engine, study_id: int, build_seconds: float | None = None) -> None:
    """The study is ready to train: progress cleared, failures forgotten, the build's duration kept."""
    with session_scope(engine) as session:
        row = session.get(PreparationRow, study_id)
        if build_seconds is None and (row is None or (row.stage is None and row.attempts == 0)):
            return  # the usual case, every trial: nothing built, nothing failed, nothing to write
    with session_scope(engine, write_lock=True) as session:
        row = _row(session, study_id)
        row.stage, row.attempts, row.retry_at, row.updated_at = None, 0, None, db_now(session)
        if build_seconds is not None:
            row.build_seconds = build_seconds


def preparation_failed(engine: Engine, study_id: int, reason: str, *, retry_delay_s: float,
                       max_delay_s: float = 300.0, now: datetime | None = None) -> int:
    """Count one more consecutive failure and hold the study back (``backoff_delay``: ``retry_delay_s * 2^(n-1)``,
    at most ``max_delay_s``); returns the number of consecutive failures so far."""
    with session_scope(engine, write_lock=True) as session:
        now = now or db_now(session)
        row = _row(session, study_id)
        row.attempts += 1
        row.last_error = reason
        row.stage = None
        row.retry_at = now + timedelta(seconds=backoff_delay(retry_delay_s, row.attempts, max_delay_s))
        return row.attempts


def release_slot(engine: Engine, slot_id: int, worker_id: str) -> None:
    """Give a claimed slot back untried (its trial never started): pending again, the claim's attempt not counted."""
    with session_scope(engine, write_lock=True) as session:
        session.execute(
            update(TrialSlotRow)
            .where(TrialSlotRow.id == slot_id, TrialSlotRow.worker_id == worker_id,
                   TrialSlotRow.state == SlotState.CLAIMED)
            .values(state=SlotState.PENDING, worker_id=None, attempts=TrialSlotRow.attempts - 1)
        )


@dataclasses.dataclass(frozen=True)
class Preparing:
    """What the API shows of a preparation under way."""

    stage: str
    done: int
    total: int
    rate: float | None
    eta_s: float | None  # from the rows and the rate as reported: all three are as of ``updated_at``
    updated_at: datetime
    age_s: float  # how long ago the worker reported them


def preparations(session: Session, study_ids: list[int]) -> dict[int, PreparationRow]:
    if not study_ids:
        return {}
    rows = session.scalars(select(PreparationRow).where(PreparationRow.study_id.in_(study_ids))).all()
    return {row.study_id: row for row in rows}


def preparing(row: PreparationRow | None, now: datetime) -> Preparing | None:
    """The preparation under way (None when none is): its rows, rate and ETA as the worker last reported them, and
    how long ago that was, from ``now`` (the database's clock, as the row's stamps).

    The ETA is not counted down from the report: rows written a few times a minute beside an ETA that runs on
    disagreed ("1,000 / 4,000 rows, 100 rows/s, ETA 12 s"); the three agree, and the page says how old they are."""
    if row is None or row.stage is None or row.updated_at is None:
        return None
    eta = (row.total - row.done) / row.rate if row.rate and row.total > row.done else None
    age = max(0.0, (now - row.updated_at).total_seconds())
    return Preparing(row.stage, row.done, row.total, row.rate, eta, row.updated_at, age)

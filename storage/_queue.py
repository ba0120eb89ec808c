"""The work queue: studies in priority order, one trial slot claimed per statement.

Contract (both backends):
- ``claim_slot`` hands a pending slot of the highest-priority, oldest active study to exactly one worker.
  PostgreSQL: ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)``; SQLite: the same statement inside
  ``BEGIN IMMEDIATE``, which serialises writers.
- ``claim_slots`` (a packed worker) hands up to k pending slots of one study to one worker, in one statement of
  the same kind: the study of the first slot ``claim_slot`` would take, then up to k of its pending slots (SKIP
  LOCKED). It never claims more slots than are pending, so a budget stays exact whatever k is.
- A study's slots only ever end ``done``, ``failed`` or ``cancelled``; at most ``n_trials`` are ``done``.
- Study status changes (``settle_study``) lock the study row first, so two workers finishing the last slots at the
  same moment cannot both miss the transition to ``finished``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Engine, Select, Table, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kdsearch.errors import UserError
from storage._db import db_now, session_scope
from storage._models import PreparationRow, SlotState, StudyRow, StudyStatus, TrialSlotRow, WorkerRow
from storage._notifications import enqueue


class StudyExistsError(UserError):
    """A study with that name already exists.

    ``Fault.USER``: the request names a study that is taken; only another name (or deleting the old study) helps,
    so it is refused with the reason (the API's 409), never retried."""


@dataclasses.dataclass(frozen=True)
class Claim:
    slot_id: int
    study_id: int
    study_name: str
    slot_no: int
    attempt: int
    spec: dict[str, Any]


def create_study(
    engine: Engine, *, name: str, spec: dict[str, Any], n_trials: int, priority: int, timeout_s: float | None
) -> StudyRow:
    """Insert a queued study and its ``n_trials`` pending slots in one transaction."""
    try:
        with session_scope(engine) as session:
            study = StudyRow(name=name, spec=spec, n_trials=n_trials, priority=priority, timeout_s=timeout_s)
            session.add(study)
            session.flush()
            session.execute(
                cast(Table, TrialSlotRow.__table__).insert(),
                [{"study_id": study.id, "slot_no": i, "state": SlotState.PENDING} for i in range(n_trials)],
            )
            return study
    except IntegrityError as exc:
        raise StudyExistsError(name) from exc


def get_study(session: Session, id_or_name: str | int) -> StudyRow | None:
    """A study by id (ASCII digits) or by name; new names are never all digits, so the two cannot collide."""
    text = str(id_or_name)
    if isinstance(id_or_name, int) or (text.isascii() and text.isdigit() and len(text) <= 18):
        row = session.get(StudyRow, int(id_or_name))
        if row is not None:
            return row
    return session.scalar(select(StudyRow).where(StudyRow.name == str(id_or_name)))


def claim_slot(engine: Engine, worker_id: str, now: datetime | None = None) -> Claim | None:
    """Claim the next pending slot for ``worker_id``, or return None when there is no work. Times are the
    database's (``db_now``): the claim, the first heartbeat and a study's deadline."""
    with session_scope(engine, write_lock=True) as session:
        return _claim(session, worker_id, now or db_now(session))


def claim_slots(engine: Engine, worker_id: str, k: int, now: datetime | None = None) -> list[Claim]:
    """Claim up to ``k`` pending slots of one study (the one ``claim_slot`` would pick) for ``worker_id``, in one
    statement, in slot order; an empty list when there is no work."""
    if k < 1:
        raise ValueError(f"k must be 1 or more, not {k}")
    with session_scope(engine, write_lock=True) as session:
        return _claim_many(session, worker_id, now or db_now(session), k)


def _eligible_slots(now: datetime) -> Select[int]:
    """Pending slots of active studies, in the order workers take them (priority, then study age, then slot)."""
    return (
        select(TrialSlotRow.id)
        .join(StudyRow, StudyRow.id == TrialSlotRow.study_id)
        .outerjoin(PreparationRow, PreparationRow.study_id == StudyRow.id)
        .where(
            TrialSlotRow.state == SlotState.PENDING,
            StudyRow.status.in_(StudyStatus.ACTIVE),
            or_(StudyRow.deadline_at.is_(None), StudyRow.deadline_at > now),
            # A study whose preparation just failed (not the data's fault) waits out its backoff.
            or_(PreparationRow.retry_at.is_(None), PreparationRow.retry_at <= now),
        )
        .order_by(StudyRow.priority.desc(), StudyRow.id, TrialSlotRow.slot_no)
    )


def _claim(session: Session, worker_id: str, now: datetime) -> Claim | None:
    next_slot = _eligible_slots(now).limit(1).with_for_update(skip_locked=True, of=TrialSlotRow).scalar_subquery()
    claims = _take(session, worker_id, now, TrialSlotRow.id == next_slot)
    return claims[0] if claims else None


def _claim_many(session: Session, worker_id: str, now: datetime, k: int) -> list[Claim]:
    first_study = (
        _eligible_slots(now).with_only_columns(TrialSlotRow.study_id)
        .limit(1).with_for_update(skip_locked=True, of=TrialSlotRow).scalar_subquery()
    )
    # A materialised CTE: PostgreSQL evaluates it once. As a plain ``IN (SELECT ... LIMIT k FOR UPDATE SKIP LOCKED)``
    # the planner may run the sub-select again and claim more than k slots (seen here: 5 of k=3).
    picked = (
        select(TrialSlotRow.id)
        .where(TrialSlotRow.study_id == first_study, TrialSlotRow.state == SlotState.PENDING)
        .order_by(TrialSlotRow.slot_no)
        .limit(k)
        .with_for_update(skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    return _take(session, worker_id, now, TrialSlotRow.id.in_(select(picked.c.id)),
                 TrialSlotRow.state == SlotState.PENDING)


def _take(session: Session, worker_id: str, now: datetime, *where: ColumnElement[bool]) -> list[Claim]:
    """Claim the slots ``where`` picks (one study's) in one UPDATE ... RETURNING; start their study if queued."""
    claim_stmt = (
        update(TrialSlotRow)
        .where(*where)
        .values(
            state=SlotState.CLAIMED,
            worker_id=worker_id,
            claimed_at=now,
            heartbeat_at=now,
            attempts=TrialSlotRow.attempts + 1,
            optuna_trial_id=None,
        )
        .returning(TrialSlotRow.id, TrialSlotRow.study_id, TrialSlotRow.slot_no, TrialSlotRow.attempts)
        .execution_options(synchronize_session=False)
    )
    rows = sorted(session.execute(claim_stmt).all(), key=lambda row: row.slot_no)
    if not rows:
        return []
    assert len({row.study_id for row in rows}) == 1
    study = session.get(StudyRow, rows[0].study_id)
    assert study is not None
    if study.status == StudyStatus.QUEUED:
        study.status = StudyStatus.RUNNING
        study.started_at = now
        if study.timeout_s is not None:
            study.deadline_at = now + timedelta(seconds=study.timeout_s)
    return [Claim(row.id, study.id, study.name, row.slot_no, row.attempts, dict(study.spec)) for row in rows]


def record_slot_trial(engine: Engine, slot_id: int, optuna_trial_id: int) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(TrialSlotRow).where(TrialSlotRow.id == slot_id).values(optuna_trial_id=optuna_trial_id)
        )


def heartbeat_slot(engine: Engine, slot_id: int, worker_id: str, now: datetime | None = None) -> bool:
    """Refresh a claimed slot's heartbeat; False when the slot is no longer this worker's (it was reaped)."""
    with session_scope(engine) as session:
        result = session.execute(
            update(TrialSlotRow)
            .where(
                TrialSlotRow.id == slot_id,
                TrialSlotRow.worker_id == worker_id,
                TrialSlotRow.state == SlotState.CLAIMED,
            )
            .values(heartbeat_at=now or db_now(session))
        )
        # An UPDATE's result is a CursorResult (Session.execute is typed to return the base Result).
        return cast(CursorResult[Any], result).rowcount == 1


def slot_holder(engine: Engine, slot_id: int) -> tuple[str, str | None] | None:
    """A slot's state and the worker that holds it (None once it is gone): what a lost heartbeat reports."""
    with session_scope(engine) as session:
        row = session.execute(select(TrialSlotRow.state, TrialSlotRow.worker_id)
                              .where(TrialSlotRow.id == slot_id)).first()
        return None if row is None else (row.state, row.worker_id)


def study_should_stop(engine: Engine, study_id: int, now: datetime | None = None) -> str | None:
    """Why a running trial of this study should stop at its epoch boundary (cancelled, failed, timed out)."""
    with session_scope(engine) as session:
        now = now or db_now(session)
        study = session.get(StudyRow, study_id)
        if study is None:
            return "study deleted"
        if study.status not in StudyStatus.ACTIVE:
            return f"study {study.status}"
        if study.deadline_at is not None and study.deadline_at <= now:
            return "study timeout reached"
        return None


def finish_slot(engine: Engine, slot_id: int, worker_id: str, *, outcome: str, error: str | None = None,
                max_attempts: int = 3) -> None:
    """Close a claimed slot: ``outcome`` is ``done`` or ``failed`` (retried while attempts remain)."""
    with session_scope(engine, write_lock=True) as session:
        slot = session.get(TrialSlotRow, slot_id, with_for_update=True)
        if slot is None or slot.worker_id != worker_id or slot.state != SlotState.CLAIMED:
            return  # reaped as stale meanwhile: whoever reaped it owns it now
        study = _lock_study(session, slot.study_id)
        if outcome == SlotState.DONE:
            slot.state = SlotState.DONE
        elif study.status in StudyStatus.ACTIVE and slot.attempts < max_attempts:
            slot.state = SlotState.PENDING
        else:
            slot.state = SlotState.FAILED
        slot.last_error = error or slot.last_error
        slot.worker_id = None if slot.state == SlotState.PENDING else slot.worker_id
        _settle(session, study)


def fail_study(engine: Engine, study_id: int, reason: str) -> None:
    """A study-level error (bad data, model that will not load): no more trials, reason kept for the API."""
    with session_scope(engine, write_lock=True) as session:
        study = _lock_study(session, study_id)
        if study.status in StudyStatus.ACTIVE:
            study.status = StudyStatus.FAILED
            study.error = reason
            study.finished_at = db_now(session)
            enqueue(session, study, "failed", {"error": reason})
        _close_pending(session, study.id)


def cancel_study(engine: Engine, study_id: int) -> StudyRow:
    with session_scope(engine, write_lock=True) as session:
        study = _lock_study(session, study_id)
        if study.status in StudyStatus.ACTIVE:
            study.status = StudyStatus.CANCELLED
            study.finished_at = db_now(session)
            _close_pending(session, study.id)
        return study


def reap_stale_slots(engine: Engine, *, grace_period_s: float, reaper_id: str,
                     now: datetime | None = None) -> list[tuple[int, int, int | None]]:
    """Take over slots whose worker stopped heart-beating; returns (slot_id, study_id, optuna_trial_id).

    The slots stay ``claimed`` but now belong to ``reaper_id``, which settles the Optuna trial and then calls
    ``finish_slot`` for each: so the dead worker (should it come back) and the reaper can never both close it. A
    preparation the dead worker was reporting ends with it: its progress is cleared (else the study would show
    "preparing, ETA 0" until another worker prepares it); its failure count and build time stay.
    """
    with session_scope(engine, write_lock=True) as session:
        now = now or db_now(session)
        stale = session.scalars(
            select(TrialSlotRow)
            .where(
                TrialSlotRow.state == SlotState.CLAIMED,
                TrialSlotRow.heartbeat_at < now - timedelta(seconds=grace_period_s),
            )
            .with_for_update(skip_locked=True)
        ).all()
        for slot in stale:
            session.execute(
                update(PreparationRow)
                .where(PreparationRow.study_id == slot.study_id, PreparationRow.worker_id == slot.worker_id,
                       PreparationRow.stage.is_not(None))
                .values(stage=None, rate=None, updated_at=now)
            )
            slot.last_error = f"worker {slot.worker_id} stopped heart-beating"
            slot.worker_id = reaper_id
            slot.heartbeat_at = now
        return [(slot.id, slot.study_id, slot.optuna_trial_id) for slot in stale]


def settle_expired_studies(engine: Engine, now: datetime | None = None) -> None:
    """Finish studies whose timeout has passed: pending slots are cancelled, running trials end at an epoch."""
    with session_scope(engine) as session:
        now = now or db_now(session)
        ids = session.scalars(
            select(StudyRow.id).where(StudyRow.status == StudyStatus.RUNNING, StudyRow.deadline_at <= now)
        ).all()
    for study_id in ids:
        with session_scope(engine, write_lock=True) as session:
            _settle(session, _lock_study(session, study_id), now=now)


def slot_counts(session: Session, study_ids: list[int]) -> dict[int, dict[str, int]]:
    rows = session.execute(
        select(TrialSlotRow.study_id, TrialSlotRow.state, func.count())
        .where(TrialSlotRow.study_id.in_(study_ids))
        .group_by(TrialSlotRow.study_id, TrialSlotRow.state)
    ).all()
    counts: dict[int, dict[str, int]] = {sid: {} for sid in study_ids}
    for study_id, state, n in rows:
        counts[study_id][state] = n
    return counts


def upsert_worker(engine: Engine, worker_id: str, *, host: str, pid: int, device: str, status: str,
                  study_id: int | None = None, trial_number: int | None = None) -> None:
    with session_scope(engine, write_lock=True) as session:  # reads, then writes: lock up front (SQLite)
        row = session.get(WorkerRow, worker_id)
        if row is None:
            row = WorkerRow(id=worker_id, host=host, pid=pid, device=device)
            session.add(row)
        row.status = status
        row.current_study_id = study_id
        row.current_trial_number = trial_number
        row.heartbeat_at = db_now(session)


def touch_worker(engine: Engine, worker_id: str) -> None:
    """Refresh a worker's own heartbeat (its heartbeat thread does, while it trains or prepares)."""
    with session_scope(engine) as session:
        session.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(heartbeat_at=db_now(session)))


def prune_workers(engine: Engine, older_than_s: float) -> int:
    """Forget workers gone (no heartbeat) for longer than ``older_than_s``; returns how many."""
    with session_scope(engine) as session:
        cutoff = db_now(session) - timedelta(seconds=older_than_s)
        result = session.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < cutoff))
        return int(cast(CursorResult[Any], result).rowcount or 0)


def worker_status(row: WorkerRow, now: datetime, grace_period_s: float) -> str:
    """A worker's status as recorded, or ``lost`` when it claims to run but stopped heart-beating."""
    if row.status != "stopped" and (now - row.heartbeat_at).total_seconds() > grace_period_s:
        return "lost"
    return row.status


def _lock_study(session: Session, study_id: int) -> StudyRow:
    study = session.get(StudyRow, study_id, with_for_update=True, populate_existing=True)
    if study is None:
        raise LookupError(f"study {study_id} not found")
    return study


def _close_pending(session: Session, study_id: int) -> None:
    session.execute(
        update(TrialSlotRow)
        .where(TrialSlotRow.study_id == study_id, TrialSlotRow.state == SlotState.PENDING)
        .values(state=SlotState.CANCELLED)
        .execution_options(synchronize_session=False)
    )


def _settle(session: Session, study: StudyRow, now: datetime | None = None) -> None:
    """Move an active study to ``finished`` once no slot can run any more (all closed, or the timeout passed)."""
    if study.status not in StudyStatus.ACTIVE:
        return
    now = now or db_now(session)
    if study.deadline_at is not None and study.deadline_at <= now:
        _close_pending(session, study.id)
    session.flush()
    still_open = session.scalar(
        select(func.count()).where(
            and_(TrialSlotRow.study_id == study.id, TrialSlotRow.state.in_(SlotState.OPEN))
        )
    )
    if not still_open:
        study.finished_at = now
        reason = _nothing_done(session, study, timed_out=study.deadline_at is not None and study.deadline_at <= now)
        if reason is None:
            study.status = StudyStatus.FINISHED
            enqueue(session, study, "finished")
        else:  # every trial failed (or none ran): a study with no result is a failure, said as one
            study.status, study.error = StudyStatus.FAILED, reason
            enqueue(session, study, "failed", {"error": reason})


def _nothing_done(session: Session, study: StudyRow, *, timed_out: bool) -> str | None:
    """Why a study whose slots are all closed has no result (no slot ``done``: no trial completed or was pruned),
    e.g. ``no trial completed: 4 failed (last: ValueError: ...)``; None when one has."""
    counts: dict[str, int] = {state: n for state, n in session.execute(
        select(TrialSlotRow.state, func.count()).where(TrialSlotRow.study_id == study.id)
        .group_by(TrialSlotRow.state))}
    if counts.get(SlotState.DONE):
        return None
    last_error = session.scalar(
        select(TrialSlotRow.last_error)
        .where(TrialSlotRow.study_id == study.id, TrialSlotRow.state == SlotState.FAILED,
               TrialSlotRow.last_error.is_not(None))
        .order_by(TrialSlotRow.heartbeat_at.desc().nulls_last(), TrialSlotRow.id.desc()).limit(1))
    parts = [f"{counts[state]} {state}" for state in (SlotState.FAILED, SlotState.CANCELLED) if counts.get(state)]
    return (f"no trial completed{' before the timeout' if timed_out else ''}: {', '.join(parts) or 'none ran'}"
            + (f" (last: {last_error})" if last_error else ""))

"""The webhook outbox: events written in the same transaction as the change they announce, delivered later.

Contract: ``enqueue`` adds a notification only when the study's spec asks for that event. ``claim_notification``
hands the oldest due notification to one deliverer (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), never one whose study has an older notification still pending, for a lease of ``lease_s`` seconds; a
deliverer that dies lets the lease run out and another takes it. ``settle_notification`` records the outcome:
delivered, retried after a backoff, or failed for good after ``max_attempts``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, or_, select
from sqlalchemy.orm import Session, aliased

from kdsearch.retry import backoff_delay
from storage._db import db_now, session_scope
from storage._models import NotificationRow, StudyRow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# The longest a failed delivery waits before the next try (the delay doubles from the retry delay up to this).
MAX_RETRY_DELAY_S = 600.0


def enqueue(session: Session, study: StudyRow, event: str, payload: dict[str, Any] | None = None) -> None:
    """Add ``event`` for ``study`` to the outbox, in the caller's transaction, if the study asked for it."""
    notify = (study.spec or {}).get("notify") or {}
    if not notify.get("webhook") or event not in notify.get("events", []):
        return
    session.add(NotificationRow(study_id=study.id, event=event, url=notify["webhook"], payload=payload or {},
                                state=PENDING, attempts=0, next_attempt_at=db_now(session)))


def enqueue_event(engine: Engine, study_id: int, event: str, payload: dict[str, Any] | None = None) -> None:
    with session_scope(engine) as session:
        study = session.get(StudyRow, study_id)
        if study is not None:
            enqueue(session, study, event, payload)


def claim_notification(engine: Engine, deliverer: str, lease_s: float,
                       now: datetime | None = None) -> NotificationRow | None:
    earlier = aliased(NotificationRow)
    with session_scope(engine, write_lock=True) as session:
        now = now or db_now(session)
        row = session.scalars(
            select(NotificationRow)
            .where(
                NotificationRow.state == PENDING,
                NotificationRow.next_attempt_at <= now,
                or_(NotificationRow.claimed_until.is_(None), NotificationRow.claimed_until <= now),
                ~exists().where(and_(earlier.study_id == NotificationRow.study_id, earlier.id < NotificationRow.id,
                                     earlier.state == PENDING)),
            )
            .order_by(NotificationRow.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=NotificationRow)
        ).first()
        if row is None:
            return None
        row.claimed_by, row.claimed_until = deliverer, now + timedelta(seconds=lease_s)
        row.attempts += 1
        session.flush()
        session.expunge(row)
        return row


def settle_notification(engine: Engine, notification_id: int, deliverer: str, *, error: str | None,
                        max_attempts: int, retry_delay_s: float, now: datetime | None = None) -> str:
    """Record a delivery attempt; returns the notification's state afterwards."""
    with session_scope(engine, write_lock=True) as session:
        now = now or db_now(session)
        row = session.get(NotificationRow, notification_id, with_for_update=True)
        if row is None or row.claimed_by != deliverer or row.state != PENDING:
            return row.state if row is not None else FAILED
        row.claimed_by = row.claimed_until = None
        if error is None:
            row.state, row.delivered_at, row.last_error = DELIVERED, now, None
        else:
            row.last_error = error
            if row.attempts >= max_attempts:
                row.state = FAILED
            else:
                delay_s = backoff_delay(retry_delay_s, row.attempts, MAX_RETRY_DELAY_S)
                row.next_attempt_at = now + timedelta(seconds=delay_s)
        return row.state


def notifications(session: Session, study_id: int) -> list[NotificationRow]:
    return list(session.scalars(select(NotificationRow).where(NotificationRow.study_id == study_id)
                                .order_by(NotificationRow.id)).all())

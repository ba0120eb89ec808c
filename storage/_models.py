"""kdsearch's own tables, beside Optuna's schema in the same database (prefixed ``kd_`` so they never clash).

A study owns exactly ``n_trials`` slot rows; a worker claims one slot per trial. That makes the budget exact by
construction whatever the number of workers: a slot ends ``done`` (one COMPLETE or PRUNED Optuna trial), goes back
to ``pending`` for a retry after a failure, or ends ``failed``/``cancelled``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class StudyStatus:
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    ACTIVE = (QUEUED, RUNNING)
    ALL = (QUEUED, RUNNING, FINISHED, CANCELLED, FAILED)


class SlotState:
    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    OPEN = (PENDING, CLAIMED)


class StudyRow(Base):
    __tablename__ = "kd_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.QUEUED, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    n_trials: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[float | None] = mapped_column(default=None)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class TrialSlotRow(Base):
    __tablename__ = "kd_trial_slots"
    __table_args__ = (
        UniqueConstraint("study_id", "slot_no"),
        Index("ix_kd_trial_slots_state_study", "state", "study_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("kd_studies.id", ondelete="CASCADE"))
    slot_no: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=SlotState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


class WorkerRow(Base):
    __tablename__ = "kd_workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="idle")
    current_study_id: Mapped[int | None] = mapped_column(Integer, default=None)
    current_trial_number: Mapped[int | None] = mapped_column(Integer, default=None)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SeedRunRow(Base):
    """One retraining of a study's chosen configuration with a fresh seed (``export-best --seeds N``).

    Kept per seed as each finishes, so an interrupted export resumes where it stopped and the API can report the
    configuration's mean and spread, not only the luckiest trial.
    """

    __tablename__ = "kd_seed_runs"
    __table_args__ = (UniqueConstraint("study_id", "trial_number", "seed"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("kd_studies.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    best_score: Mapped[float] = mapped_column()  # the study's metric at the best epoch (``eval_accuracy`` before 0003)
    best_epoch: Mapped[int] = mapped_column(Integer)
    checkpoint_artifact_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PreparationRow(Base):
    """A study's preparation (teacher-logit cache, transfer set): live progress and consecutive failures.

    Progress (``stage``, ``done`` of ``total`` rows, ``rate``) is written by the preparing worker a few times a
    minute; ``stage`` is None when no preparation is under way. A preparation that fails for a reason that is not the
    data's or the spec's (out of memory, network, disk, database) counts in ``attempts`` and holds the study's slots
    back until ``retry_at``; a success resets both.
    """

    __tablename__ = "kd_preparations"

    study_id: Mapped[int] = mapped_column(ForeignKey("kd_studies.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    rate: Mapped[float | None] = mapped_column(default=None)  # rows per second so far
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    build_seconds: Mapped[float | None] = mapped_column(default=None)  # the last build this study's workers ran
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # consecutive failed preparations
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class NotificationRow(Base):
    """A webhook call to make (an outbox): written with the event, delivered in the background, retried.

    A study's notifications are delivered in the order they were written: a later one waits while an earlier one
    is still being retried.
    """

    __tablename__ = "kd_notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("kd_studies.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(200), default=None)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

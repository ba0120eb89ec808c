"""Reads for the operator's views: every study, every worker, and what a Prometheus scrape counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from storage._best import METRIC_ATTRS, study_metric
from storage._models import PreparationRow, SlotState, StudyRow, StudyStatus, TrialSlotRow, WorkerRow
from storage._optuna import study_user_attrs
from storage._trials import _state, _studies, _trials, duration_seconds


def ping(engine: Engine) -> None:
    """One round trip to the database; raises SQLAlchemy's error when it does not answer."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def all_studies(session: Session) -> list[StudyRow]:
    """Every study, in queue order: highest priority first, then oldest."""
    return list(session.scalars(select(StudyRow).order_by(StudyRow.priority.desc(), StudyRow.id)).all())


def workers_with_studies(session: Session) -> list[tuple[WorkerRow, str | None]]:
    """Every worker row with the name of the study it is on (None when idle), latest heartbeat first."""
    rows = session.execute(select(WorkerRow, StudyRow.name)
                           .outerjoin(StudyRow, StudyRow.id == WorkerRow.current_study_id)
                           .order_by(WorkerRow.heartbeat_at.desc())).all()
    return [(worker, name) for worker, name in rows]


@dataclass(frozen=True)
class StudyBrief:
    id: int
    name: str
    status: str


@dataclass(frozen=True)
class StoreCensus:
    """What one Prometheus scrape reads, in a handful of aggregate queries."""

    studies: list[StudyBrief]
    metrics: dict[str, str | None]  # running study's name → its metric (``study_metric``)
    pending_slots: dict[int, int]  # study id → slots waiting for a worker (studies with none are absent)
    workers: list[WorkerRow]
    trial_durations: list[float]  # seconds, every finished (COMPLETE or PRUNED) Optuna trial
    build_seconds: list[float]  # every recorded preparation build
    n_optuna_studies: int  # studies in Optuna's schema (kdsearch's and others')


def store_census(session: Session) -> StoreCensus:
    studies = [StudyBrief(r.id, r.name, r.status)
               for r in session.execute(select(StudyRow.id, StudyRow.name, StudyRow.status))]
    specs: dict[str, dict[str, Any]] = dict(session.execute(
        select(StudyRow.name, StudyRow.spec).where(StudyRow.status == StudyStatus.RUNNING)).tuples().all())
    attrs = study_user_attrs(session, list(specs), list(METRIC_ATTRS))
    metrics = {name: study_metric(spec, attrs[name]) for name, spec in specs.items()}
    pending = {study_id: n for study_id, n in session.execute(
        select(TrialSlotRow.study_id, func.count()).where(TrialSlotRow.state == SlotState.PENDING)
        .group_by(TrialSlotRow.study_id))}
    workers = list(session.scalars(select(WorkerRow)).all())
    durations = session.scalars(
        select(duration_seconds(session.get_bind().dialect.name))
        .where(_state.in_(["COMPLETE", "PRUNED"]), _trials.c.datetime_complete.is_not(None))
    ).all()
    builds = session.scalars(select(PreparationRow.build_seconds)
                             .where(PreparationRow.build_seconds.is_not(None))).all()
    n_optuna = session.scalar(select(func.count()).select_from(_studies)) or 0
    return StoreCensus(studies=studies, metrics=metrics, pending_slots=pending, workers=workers,
                       trial_durations=[max(0.0, float(d)) for d in durations if d is not None],
                       build_seconds=[float(b) for b in builds if b is not None], n_optuna_studies=int(n_optuna))

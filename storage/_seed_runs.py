"""Seed retrainings of a chosen configuration: recorded one by one, read back as a spread."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from storage._db import session_scope
from storage._models import SeedRunRow


@dataclass(frozen=True)
class SeedSpread:
    trial_number: int
    seeds: list[int]
    values: list[float]  # the study's metric of each seed's best epoch

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation; None for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def best_seed(self) -> int:
        return self.seeds[max(range(len(self.seeds)), key=self.values.__getitem__)]


def record_seed_run(engine: Engine, *, study_id: int, trial_number: int, seed: int, best_score: float,
                    best_epoch: int, checkpoint_artifact_id: str) -> SeedRunRow:
    """Record one finished retraining (``best_score``: the study's metric at its best epoch), committed; a second
    record of the same seed keeps the first (idempotent)."""
    with session_scope(engine) as session:
        existing = session.scalar(select(SeedRunRow).where(
            SeedRunRow.study_id == study_id, SeedRunRow.trial_number == trial_number, SeedRunRow.seed == seed))
        if existing is not None:
            return existing
        row = SeedRunRow(study_id=study_id, trial_number=trial_number, seed=seed, best_score=best_score,
                         best_epoch=best_epoch, checkpoint_artifact_id=checkpoint_artifact_id)
        session.add(row)
        return row


def seed_runs(session: Session, study_id: int, trial_number: int) -> dict[int, SeedRunRow]:
    rows = session.scalars(select(SeedRunRow).where(
        SeedRunRow.study_id == study_id, SeedRunRow.trial_number == trial_number)).all()
    return {row.seed: row for row in rows}


def latest_seed_spread(session: Session, study_id: int) -> SeedSpread | None:
    """The spread of the most recently retrained configuration of a study, or None if none was retrained."""
    trial_number = session.scalar(
        select(SeedRunRow.trial_number).where(SeedRunRow.study_id == study_id)
        .order_by(SeedRunRow.created_at.desc(), SeedRunRow.id.desc()).limit(1))
    if trial_number is None:
        return None
    rows = session.execute(
        select(SeedRunRow.seed, SeedRunRow.best_score)
        .where(SeedRunRow.study_id == study_id, SeedRunRow.trial_number == trial_number)
        .order_by(SeedRunRow.seed)).all()
    return SeedSpread(trial_number, [r.seed for r in rows], [r.best_score for r in rows])


def count_seed_runs(session: Session, study_id: int) -> int:
    """How many retrainings a study has (part of the study page's ETag)."""
    return int(session.scalar(select(func.count()).where(SeedRunRow.study_id == study_id)) or 0)

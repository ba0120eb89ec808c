"""A study's end of life: deleted (rows, Optuna study, checkpoints), or its failed trials queued again.

Deleting is refused while the study is active or any of its trials still runs: a worker would otherwise write to a
study that no longer exists. Every step is idempotent, so a delete interrupted halfway (a database or a bucket
fault) completes when it is asked again. Data caches (tokenized splits, teacher logits) are content-addressed and
shared by every study with the same teacher and data: they are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, cast

import optuna
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage
from sqlalchemy import CursorResult, Engine, delete, func, select, update
from sqlalchemy.orm import Session

from kdsearch.errors import Fault, KdsearchError
from storage._artifacts import ArtifactLayout
from storage._db import db_now, retry_operational, session_scope
from storage._models import (
    NotificationRow,
    PreparationRow,
    SeedRunRow,
    SlotState,
    StudyRow,
    StudyStatus,
    TrialSlotRow,
)
from storage._optuna import optuna_study_exists


class StudyBusyError(KdsearchError, RuntimeError):
    """The study is queued or running, or a trial of it has not stopped yet: it cannot be deleted now.

    ``Fault.USER``: the request comes at the wrong time (cancel the study first); refused with the reason (the
    API's 409), nothing is retried. A ``RuntimeError`` still, for callers that catch that."""

    fault = Fault.USER


class NothingToRetryError(KdsearchError, RuntimeError):
    """The study has no failed trial to queue again.

    ``Fault.USER``: the request asks for something the study does not have; refused with the reason (the API's
    409). A ``RuntimeError`` still, for callers that catch that."""

    fault = Fault.USER


@dataclasses.dataclass(frozen=True)
class DeletedStudy:
    """What a delete removed (for the audit line)."""

    study_id: int
    name: str
    status: str
    slots: int
    artifacts: int


def _claimed_slots(session: Session, study_id: int) -> int:
    return int(session.scalar(select(func.count()).where(TrialSlotRow.study_id == study_id,
                                                           TrialSlotRow.state == SlotState.CLAIMED)) or 0)


def _check_deletable(session: Session, study: StudyRow) -> None:
    if study.status in StudyStatus.ACTIVE:
        raise StudyBusyError(f"study {study.name!r} is {study.status}: cancel it first (kdsearch cancel "
                             f"{study.name}, POST /api/studies/{study.name}/cancel), then delete it")
    running = _claimed_slots(session, study.id)
    if running:
        raise StudyBusyError(f"study {study.name!r} is {study.status} but {running} of its trials are still stopping "
                             "(they stop at their next epoch boundary): delete it once they have")


def _checkpoint_ids(storage: RDBStorage, name: str, seed_artifacts: list[str]) -> set[str]:
    """Every checkpoint the study's trials and seed retrainings uploaded (Optuna's artifact records, and the ids
    the trials and seed runs recorded, in case a record is missing)."""
    if not optuna_study_exists(storage, name):
        return set(seed_artifacts)
    study = optuna.load_study(study_name=name, storage=storage)
    ids = {meta.artifact_id for meta in get_all_artifact_meta(study, storage=storage)}
    for trial in study.get_trials(deepcopy=False):
        ids.update(meta.artifact_id for meta in get_all_artifact_meta(trial, storage=storage))
        if "checkpoint_artifact_id" in trial.user_attrs:
            ids.add(str(trial.user_attrs["checkpoint_artifact_id"]))
    return ids | set(seed_artifacts)


def delete_study(engine: Engine, storage: RDBStorage, layout: ArtifactLayout, study_id: int) -> DeletedStudy:
    """Remove a study that is not running: its checkpoints, its Optuna study, then its rows (slots, preparation,
    seed runs, notifications) and the study itself. Raises ``StudyBusyError`` while it is active or a trial runs."""
    with session_scope(engine) as session:
        study = session.get(StudyRow, study_id)
        if study is None:
            raise LookupError(f"study {study_id} not found")
        _check_deletable(session, study)
        name, status = study.name, study.status
        seed_artifacts = list(session.scalars(select(SeedRunRow.checkpoint_artifact_id)
                                              .where(SeedRunRow.study_id == study_id)).all())
    artifact_ids = retry_operational(lambda: _checkpoint_ids(storage, name, seed_artifacts))
    for artifact_id in sorted(artifact_ids):
        with contextlib.suppress(ArtifactNotFound):  # removed by an earlier, interrupted delete
            layout.checkpoints.remove(artifact_id)
    if optuna_study_exists(storage, name):
        retry_operational(lambda: optuna.delete_study(study_name=name, storage=storage))
    with session_scope(engine, write_lock=True) as session:
        study = session.get(StudyRow, study_id, with_for_update=True, populate_existing=True)
        if study is None:
            raise LookupError(f"study {study_id} not found")
        _check_deletable(session, study)  # a retry may have queued it again meanwhile
        slots = int(session.scalar(select(func.count()).where(TrialSlotRow.study_id == study_id)) or 0)
        for table in (TrialSlotRow, PreparationRow, SeedRunRow, NotificationRow):
            session.execute(delete(table).where(table.study_id == study_id))
        session.delete(study)
    return DeletedStudy(study_id, name, status, slots, len(artifact_ids))


def retry_study(engine: Engine, study_id: int) -> int:
    """Queue the study's failed trials again: each failed slot (and, for a study that failed as a whole, each slot
    its failure closed before it ran) is pending again with its attempts reset; the study is active again and its
    preparation failures are forgotten. The trials that failed stay in Optuna's history. Returns how many slots
    were queued; ``NothingToRetryError`` when none."""
    with session_scope(engine, write_lock=True) as session:
        study = session.get(StudyRow, study_id, with_for_update=True, populate_existing=True)
        if study is None:
            raise LookupError(f"study {study_id} not found")
        states = [SlotState.FAILED, SlotState.CANCELLED] if study.status == StudyStatus.FAILED else [SlotState.FAILED]
        result = session.execute(
            update(TrialSlotRow).where(TrialSlotRow.study_id == study_id, TrialSlotRow.state.in_(states))
            .values(state=SlotState.PENDING, attempts=0, worker_id=None, claimed_at=None, heartbeat_at=None,
                    optuna_trial_id=None)
            .execution_options(synchronize_session=False))
        again = int(cast(CursorResult[Any], result).rowcount or 0)
        if not again:
            raise NothingToRetryError(f"study {study.name!r} has no failed trials to retry")
        session.execute(update(PreparationRow).where(PreparationRow.study_id == study_id)
                        .values(attempts=0, retry_at=None, last_error=None))
        if study.status not in StudyStatus.ACTIVE:
            study.status = StudyStatus.QUEUED  # the next claim starts it again, with a fresh deadline
            study.error = None
            study.finished_at = None
            study.deadline_at = None
        study.updated_at = db_now(session)
        return again

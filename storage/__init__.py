"""Where kdsearch state lives: SQL tables, Optuna's study store, checkpoints and caches.

This module is storage's whole interface: nothing outside ``storage/`` imports one of its underscore modules or
names, and no SQL is written outside it.

**Engine or Session.** A function takes the ``Engine`` when it is a unit of work of its own: it writes (and then
commits or rolls back everything it did), or it is a check a process makes on its own between other work (a
worker's stop check, a heartbeat's holder, the schema revision, a ping). It opens and closes its own session, so a
caller can retry it whole with ``retry_operational`` and never holds half of it. A function takes a ``Session`` when
it only reads on behalf of a caller that reads more: it never writes and never commits, and everything an API
request reads through such functions comes from the one snapshot of the request's session (``session_scope``, or
the API's session dependency). Optuna's own writes go through its ``RDBStorage`` (``make_optuna_storage``).

**The study's metric and its best trial** are decided in one place each: ``study_metric`` and ``best_trial`` /
``best_trials`` (``storage._best``'s docstring gives both rules).
"""

from sqlalchemy import Engine

from storage._artifacts import (
    ENTRY_META,
    ENTRY_TENSORS,
    ArtifactLayout,
    AtomicFileSystemArtifactStore,
    pack_directory,
    unpack_directory,
)
from storage._best import METRIC_ATTRS, BestTrial, best_trial, best_trials, study_metric
from storage._census import StoreCensus, StudyBrief, all_studies, ping, store_census, workers_with_studies
from storage._db import (
    TRANSIENT_ERRORS,
    StoreError,
    db_now,
    engine_kwargs,
    is_sqlite,
    is_transient,
    make_engine,
    missing_sqlite_file,
    retry_operational,
    session_scope,
)
from storage._lifecycle import DeletedStudy, NothingToRetryError, StudyBusyError, delete_study, retry_study
from storage._models import (
    Base,
    NotificationRow,
    PreparationRow,
    SeedRunRow,
    SlotState,
    StudyRow,
    StudyStatus,
    TrialSlotRow,
    WorkerRow,
    utcnow,
)
from storage._notifications import claim_notification, enqueue_event, notifications, settle_notification
from storage._object_store import ManifestRefused, ObjectStoreLayout, default_local_cache, make_layout
from storage._optuna import (
    ensure_optuna_study,
    make_optuna_storage,
    optuna_study_exists,
    study_user_attrs,
    trial_summaries,
)
from storage._preparation import (
    Preparing,
    preparation_failed,
    preparation_succeeded,
    preparations,
    preparing,
    release_slot,
    report_progress,
)
from storage._queue import (
    Claim,
    StudyExistsError,
    cancel_study,
    claim_slot,
    claim_slots,
    create_study,
    fail_study,
    finish_slot,
    get_study,
    heartbeat_slot,
    prune_workers,
    reap_stale_slots,
    record_slot_trial,
    settle_expired_studies,
    slot_counts,
    slot_holder,
    study_should_stop,
    touch_worker,
    upsert_worker,
    worker_status,
)
from storage._schema import (
    VERSION_TABLE,
    SchemaMismatch,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    upgrade_schema,
)
from storage._seed_runs import SeedSpread, count_seed_runs, latest_seed_spread, record_seed_run, seed_runs
from storage._trials import (
    OPTUNA_TRIALS,
    complete_trials,
    duration_seconds,
    learning_curves,
    optuna_study_id,
    page_trial_ids,
    study_fingerprint,
    trial_points,
)


def init_db(engine: Engine) -> None:
    """Create or upgrade kdsearch's tables to this release's schema (``upgrade_schema``; Optuna creates its own
    through RDBStorage). What ``kdsearch serve`` and ``kdsearch db upgrade`` run; workers only check."""
    upgrade_schema(engine)


__all__ = [
    "ENTRY_META",
    "ENTRY_TENSORS",
    "METRIC_ATTRS",
    "OPTUNA_TRIALS",
    "TRANSIENT_ERRORS",
    "VERSION_TABLE",
    "ArtifactLayout",
    "AtomicFileSystemArtifactStore",
    "Base",
    "BestTrial",
    "Claim",
    "DeletedStudy",
    "ManifestRefused",
    "NothingToRetryError",
    "NotificationRow",
    "ObjectStoreLayout",
    "PreparationRow",
    "Preparing",
    "SchemaMismatch",
    "SeedRunRow",
    "SeedSpread",
    "SlotState",
    "StoreCensus",
    "StoreError",
    "StudyBrief",
    "StudyBusyError",
    "StudyExistsError",
    "StudyRow",
    "StudyStatus",
    "TrialSlotRow",
    "WorkerRow",
    "alembic_config",
    "all_studies",
    "best_trial",
    "best_trials",
    "cancel_study",
    "check_schema",
    "claim_notification",
    "claim_slot",
    "claim_slots",
    "complete_trials",
    "count_seed_runs",
    "create_study",
    "current_revision",
    "db_now",
    "default_local_cache",
    "delete_study",
    "duration_seconds",
    "engine_kwargs",
    "enqueue_event",
    "ensure_optuna_study",
    "fail_study",
    "finish_slot",
    "get_study",
    "head_revision",
    "heartbeat_slot",
    "init_db",
    "is_sqlite",
    "is_transient",
    "latest_seed_spread",
    "learning_curves",
    "make_engine",
    "make_layout",
    "make_optuna_storage",
    "missing_sqlite_file",
    "notifications",
    "optuna_study_exists",
    "optuna_study_id",
    "pack_directory",
    "page_trial_ids",
    "ping",
    "preparation_failed",
    "preparation_succeeded",
    "preparations",
    "preparing",
    "prune_workers",
    "reap_stale_slots",
    "record_seed_run",
    "record_slot_trial",
    "release_slot",
    "report_progress",
    "retry_operational",
    "retry_study",
    "seed_runs",
    "session_scope",
    "settle_expired_studies",
    "settle_notification",
    "slot_counts",
    "slot_holder",
    "store_census",
    "study_fingerprint",
    "study_metric",
    "study_should_stop",
    "study_user_attrs",
    "touch_worker",
    "trial_points",
    "trial_summaries",
    "unpack_directory",
    "upgrade_schema",
    "upsert_worker",
    "utcnow",
    "worker_status",
    "workers_with_studies",
]

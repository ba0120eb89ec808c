"""Where kdsearch state lives: SQL tables, Optuna's study store, checkpoints and caches."""

from sqlalchemy import Engine

from storage._artifacts import ArtifactLayout, AtomicFileSystemArtifactStore, pack_directory, unpack_directory
from storage._db import (
    TRANSIENT_ERRORS,
    StoreError,
    db_now,
    engine_kwargs,
    is_sqlite,
    is_transient,
    make_engine,
    retry_operational,
    session_scope,
)
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
from storage._object_store import ObjectStoreLayout, default_local_cache, make_layout
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
    study_should_stop,
    touch_worker,
    upsert_worker,
    worker_status,
)
from storage._schema import SchemaMismatch, check_schema, current_revision, head_revision, upgrade_schema
from storage._seed_runs import SeedSpread, count_seed_runs, latest_seed_spread, record_seed_run, seed_runs


def init_db(engine: Engine) -> None:
    """Create or upgrade kdsearch's tables to this release's schema (``upgrade_schema``; Optuna creates its own
    through RDBStorage). What ``kdsearch serve`` and ``kdsearch db upgrade`` run; workers only check."""
    upgrade_schema(engine)


__all__ = [
    "TRANSIENT_ERRORS",
    "ArtifactLayout",
    "AtomicFileSystemArtifactStore",
    "Base",
    "Claim",
    "NotificationRow",
    "ObjectStoreLayout",
    "PreparationRow",
    "Preparing",
    "SchemaMismatch",
    "SeedRunRow",
    "SeedSpread",
    "SlotState",
    "StoreError",
    "StudyExistsError",
    "StudyRow",
    "StudyStatus",
    "TrialSlotRow",
    "WorkerRow",
    "cancel_study",
    "check_schema",
    "claim_notification",
    "claim_slot",
    "count_seed_runs",
    "create_study",
    "current_revision",
    "db_now",
    "default_local_cache",
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
    "make_engine",
    "make_layout",
    "make_optuna_storage",
    "notifications",
    "optuna_study_exists",
    "pack_directory",
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
    "seed_runs",
    "session_scope",
    "settle_expired_studies",
    "settle_notification",
    "slot_counts",
    "study_should_stop",
    "study_user_attrs",
    "touch_worker",
    "trial_summaries",
    "unpack_directory",
    "upgrade_schema",
    "upsert_worker",
    "utcnow",
    "worker_status",
]

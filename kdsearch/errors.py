"""One error hierarchy, and who is at fault.

Every error kdsearch raises on purpose is a ``KdsearchError``, and says whose fault it is (``Fault``):

- ``Fault.USER``: the user's data or spec (a missing column, a metric that does not fit the task, a teacher that
  will not load). Retrying cannot help: the study fails, with the message as its reason.
- ``Fault.INFRASTRUCTURE``: the host or a service under it (a full or failing disk, the artifact store, a database
  outage). Retried, and never charged to a trial: the trial waits to run again untried.
- ``Fault.TRIAL``: this trial failed (its loss diverged, it ran out of memory) or kdsearch has a bug. The trial is
  marked FAIL with the reason (a bug's traceback goes to the log) and its slot is retried while attempts remain.

``fault_of(exc)`` sorts any exception, kdsearch's or a library's, into one of the three; the worker acts on that
alone. ``TrialStopped`` is not a fault: a trial stopped on purpose (the worker shutting down, its claim taken over
by another worker).
"""

from __future__ import annotations

import enum
import errno
import os
from typing import ClassVar

from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError


class Fault(enum.Enum):
    USER = "user"  # the study fails with the reason
    INFRASTRUCTURE = "infrastructure"  # retried; never spends a trial
    TRIAL = "trial"  # the trial fails (its slot retried while attempts remain)


class KdsearchError(Exception):
    """The root of kdsearch's errors. ``fault`` says whose fault it is (``Fault``)."""

    fault: ClassVar[Fault] = Fault.TRIAL


class UserError(KdsearchError, ValueError):
    """The user's data or spec is wrong: the study fails with this message (it names the field, never a value)."""

    fault = Fault.USER


class InfrastructureError(KdsearchError):
    """The disk, the artifact store or the database failed under kdsearch: retried, never charged to a trial."""

    fault = Fault.INFRASTRUCTURE


class TrialError(KdsearchError):
    """One trial failed on its own (its loss diverged, say): that trial is FAIL, the study goes on."""

    fault = Fault.TRIAL


class TrialStopped(KdsearchError):
    """A trial stopped on purpose before it finished: the worker is shutting down, or another worker took its slot
    over after a missed heartbeat. ``reason`` is one of the constants below."""

    SHUTDOWN: ClassVar[str] = "worker shutting down"
    LOST_CLAIM: ClassVar[str] = "slot taken over after a missed heartbeat"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# What a full, failing or read-only disk (or quota) raises: the host's fault, never the trial's.
INFRASTRUCTURE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS})
# The same faults where a library reports them as text (safetensors and torch wrap the OSError in their own error),
# and SQLite's full disk.
_INFRASTRUCTURE_TEXTS = (*(os.strerror(code) for code in INFRASTRUCTURE_ERRNOS), "database or disk is full")
# SQLite reports missing tables and columns as OperationalError too: only these messages are outages there.
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o", "interrupted")


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is an outage (retry it) rather than a bug or a schema mismatch (surface it)."""
    if isinstance(exc, StorageInternalError):  # Optuna's wrapper: judge what it wraps
        cause = exc.__cause__ or exc.__context__
        return cause is None or is_transient(cause)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        dialect_sqlite = type(exc.orig).__module__.startswith("sqlite3")
        return not dialect_sqlite or any(word in str(exc.orig).lower() for word in _SQLITE_TRANSIENT)
    return False


def _object_store_errors() -> tuple[type[BaseException], ...]:
    """The artifact store's errors (an S3 bucket: botocore's and boto3's), where boto3 is installed."""
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 comes with the s3 extra
        return ()
    return (BotoCoreError, ClientError, Boto3Error)


def _infrastructure(exc: BaseException, object_store: tuple[type[BaseException], ...]) -> bool:
    if isinstance(exc, KdsearchError):
        return exc.fault is Fault.INFRASTRUCTURE
    if isinstance(exc, OSError) and exc.errno in INFRASTRUCTURE_ERRNOS:
        return True
    if isinstance(exc, DBAPIError | StorageInternalError) and is_transient(exc):
        return True
    return isinstance(exc, object_store) or any(text in str(exc) for text in _INFRASTRUCTURE_TEXTS)


def fault_of(exc: BaseException) -> Fault:
    """Whose fault an error is.

    The infrastructure's when it, or an error it was raised from or while handling, is one (a full disk under
    safetensors, a database outage under Optuna); the user's for a ``UserError`` or a spec that does not validate
    (pydantic's ``ValidationError``); else the trial's (a ``TrialError``, or any other exception: a bug)."""
    from pydantic import ValidationError

    object_store = _object_store_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _infrastructure(current, object_store):
            return Fault.INFRASTRUCTURE
        current = current.__cause__ or current.__context__
    if isinstance(exc, KdsearchError):
        return exc.fault
    if isinstance(exc, ValidationError):
        return Fault.USER
    return Fault.TRIAL

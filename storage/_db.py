"""Engines and the one transaction helper every kdsearch process uses.

SQLite is the embedded default: WAL journal (readers never block the writer) and a busy timeout so the API and
several worker processes can share one file. Transactions that must take the write lock up front (claiming work)
ask for ``BEGIN IMMEDIATE``; everything else begins deferred. PostgreSQL gets a pre-pinged pool sized from settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import tenacity
from optuna.exceptions import StorageInternalError
from sqlalchemy import Connection, Engine, create_engine, event, func, make_url, select
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from kdsearch.errors import Fault, KdsearchError, is_transient
from kdsearch.retry import exponential_wait

T = TypeVar("T")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def missing_sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names, resolved, when it does not exist (connecting would create it empty); None for
    an existing file, an in-memory database or another backend. What read-only commands check before connecting."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database).expanduser().resolve()
    return None if path.exists() else path


def engine_kwargs(url: str, *, pool_size: int = 5, max_overflow: int = 5, busy_timeout_s: float = 60.0) -> dict:
    """Keyword arguments for ``create_engine``, shared with Optuna's RDBStorage so both behave alike."""
    if is_sqlite(url):
        # check_same_thread=False: the worker's heartbeat thread uses the pool too. isolation_level=None: SQLAlchemy,
        # not pysqlite, emits BEGIN (see configure_sqlite), so a transaction can take the write lock up front.
        return {"connect_args": {"timeout": busy_timeout_s, "check_same_thread": False, "isolation_level": None}}
    return {"pool_pre_ping": True, "pool_size": pool_size, "max_overflow": max_overflow}


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, busy_timeout_s: float = 60.0) -> Engine:
    engine = create_engine(
        url, **engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow, busy_timeout_s=busy_timeout_s)
    )
    if is_sqlite(url):
        configure_sqlite(engine)
    return engine


def configure_sqlite(engine: Engine, default_begin: str = "DEFERRED") -> None:
    """WAL journal and explicit BEGINs on an SQLite engine.

    In WAL mode a deferred transaction that reads and then writes fails at once with "database is locked" when
    another process committed in between (its snapshot is stale; the busy timeout does not apply). Transactions
    that may write therefore begin IMMEDIATE: ``default_begin`` for the whole engine (Optuna's, whose storage
    reads before it writes), or ``session_scope(write_lock=True)`` for one transaction.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", default_begin)
        conn.exec_driver_sql(f"BEGIN {mode}")


def db_now(session: Session) -> datetime:
    """The database's clock, for stamps and staleness checks that hosts compare with each other.

    PostgreSQL: ``now()`` (the transaction's start, the same value every statement of the transaction sees), so no
    host's clock is ever compared with another's. SQLite is one host by construction: its clock is the database's.
    """
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.now()))
        assert isinstance(value, datetime)
        return value.astimezone(timezone.utc)
    return datetime.now(timezone.utc)


@contextmanager
def session_scope(engine: Engine, *, write_lock: bool = False) -> Iterator[Session]:
    """Open a session, commit on success, roll back on error, always close.

    ``write_lock=True`` takes SQLite's write lock at BEGIN so a read-then-update cannot race another process;
    on PostgreSQL row locks (``FOR UPDATE SKIP LOCKED``) do that job and the flag changes nothing.
    """
    bind = engine.execution_options(sqlite_begin="IMMEDIATE") if write_lock else engine
    session = sessionmaker(bind=bind, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# What a dropped connection or a briefly locked database looks like, from SQLAlchemy and through Optuna. Only these
# are retried as outages (``is_transient``, from ``kdsearch.errors``, judges each one); anything else (an integrity or
# programming error, a missing column) is a bug or a schema mismatch, and retrying it would only hide it.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, StorageInternalError)
# retry_operational's backoff: 0.2 s after the first failure, doubling, never more than this (about 40 s in all).
MAX_RETRY_DELAY_S = 10.0


class StoreError(KdsearchError, RuntimeError):
    """A database error that is not an outage, with what the statement was for.

    ``Fault.TRIAL``: an integrity or programming error, or a column the code expects and the database lacks, is a
    bug (kdsearch's, or a schema out of step); retrying cannot help and would hide it, so the trial fails with the
    traceback in the log. (A schema at another revision is ``SchemaMismatch``, raised before any work.)"""

    fault = Fault.TRIAL

    def __init__(self, purpose: str, exc: BaseException) -> None:
        orig = getattr(exc, "orig", None) or exc.__cause__ or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        super().__init__(f"{purpose}: {type(orig).__name__}: {first}")
        self.purpose = purpose


def _pause(seconds: float) -> None:
    """``time.sleep`` by another name: a timed wait on an event (the same wait; this one also keeps working in the
    multi-host tests, whose libfaketime makes ``time.sleep`` fail while it shifts the wall clock)."""
    threading.Event().wait(seconds)


def retry_operational(fn: Callable[[], T], *, attempts: int = 8, first_delay_s: float = 0.2,
                      purpose: str | None = None) -> T:
    """Run ``fn`` again with exponential backoff (about 40 s in all) while the database is down or locked.

    Any other database error is raised at once, as a ``StoreError`` naming ``purpose`` when one is given. The last
    transient error is raised as itself once ``attempts`` calls have failed."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient), stop=tenacity.stop_after_attempt(attempts),
        wait=exponential_wait(first_delay_s, MAX_RETRY_DELAY_S),
        sleep=lambda seconds: _pause(seconds),  # looked up per wait: tests replace _pause
        reraise=True)  # the last outage itself, not tenacity's RetryError
    try:
        return retrying(fn)
    except (DBAPIError, StorageInternalError) as exc:
        if purpose is not None and not is_transient(exc):
            raise StoreError(purpose, exc) from exc
        raise

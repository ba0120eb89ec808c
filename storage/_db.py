"""Engines and the one transaction helper every kdsearch process uses.

SQLite is the embedded default: WAL journal (readers never block the writer) and a busy timeout so the API and
several worker processes can share one file. Transactions that must take the write lock up front (claiming work)
ask for ``BEGIN IMMEDIATE``; everything else begins deferred. PostgreSQL gets a pre-pinged pool sized from settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from optuna.exceptions import StorageInternalError
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

T = TypeVar("T")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


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


# What a dropped connection or a briefly locked database looks like, from SQLAlchemy and through Optuna.
TRANSIENT_ERRORS = (DBAPIError, StorageInternalError)


def retry_operational(fn: Callable[[], T], *, attempts: int = 8, first_delay_s: float = 0.2) -> T:
    """Run ``fn`` again with exponential backoff (about 40 s in all) when the database drops or is locked."""
    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return fn()
        except TRANSIENT_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")

"""Schema versions of kdsearch's own tables, owned by Alembic (``storage/migrations``).

- ``upgrade_schema`` (``kdsearch db upgrade``, and ``kdsearch serve`` at start-up; never a worker) brings a database
  to this release's revision: a new database is created, one made before migrations existed (``kd_studies`` but no
  version) is stamped at the baseline first, then every revision runs in place, under ``schema_lock`` so two
  servers starting at once do not race.
- ``schema_lock`` is the one lock every schema change takes: kdsearch's migrations and Optuna's own tables (created
  by ``RDBStorage`` when a server or a worker opens the study store, ``storage.make_optuna_storage``). Without it
  two processes starting at once both created Optuna's tables (PostgreSQL: ``UniqueViolation`` on ``CREATE TYPE
  studydirection``; SQLite: "table already exists") and, on SQLite, the upgrade's deferred transaction failed with
  "database is locked" (it reads the version, then writes). On SQLite the upgrade also begins ``IMMEDIATE`` and is
  retried while the database is locked.
- ``check_schema`` (every worker and CLI command that uses the store) refuses a database at another revision, older
  or newer, with a one-line message naming both: an old worker must never spin on a table it does not understand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from filelock import FileLock
from sqlalchemy import Engine, inspect, text

from kdsearch.errors import Fault, KdsearchError
from storage._db import retry_operational

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "kd_alembic_version"
BASELINE = "0001"
_SCHEMA_LOCK = 748_201_517  # pg_advisory_lock key: one schema change at a time on a server


class SchemaMismatch(KdsearchError, RuntimeError):
    """The database's schema revision is not this release's.

    ``Fault.INFRASTRUCTURE``: the deployment is out of step (the database not upgraded yet, or upgraded by a newer
    release); neither the user's spec nor a trial is to blame, and no trial may be spent on it. The process says so
    and stops (``kdsearch db upgrade`` or a matching release is the way out)."""

    fault = Fault.INFRASTRUCTURE


def alembic_config() -> Config:
    """Alembic's configuration for kdsearch's migrations (hand it a connection in ``attributes["connection"]``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's schema lock: one process at a time creates or upgrades tables (kdsearch's and Optuna's).

    PostgreSQL: a session advisory lock on a connection of its own (so the schema work may use any connection; the
    server releases it if this process dies). SQLite, one host by construction: a file lock beside the database
    file. An in-memory SQLite database belongs to one process: nothing to take."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or engine.url.query.get("mode") == "memory":
        yield
        return
    with FileLock(f"{database}-schema-lock"):
        yield


def upgrade_schema(engine: Engine) -> str:
    """Bring the database to this release's revision under ``schema_lock``; returns it. Refuses a database newer
    than this release."""
    with schema_lock(engine):
        return retry_operational(lambda: _upgrade(engine))


def _upgrade(engine: Engine) -> str:
    head = head_revision()
    config = alembic_config()
    # IMMEDIATE (SQLite): the upgrade reads the version and then writes; a deferred transaction would fail at once
    # with "database is locked" when another process wrote in between.
    with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
        config.attributes["connection"] = conn
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        known = {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}
        if current is not None and current not in known:
            raise SchemaMismatch(f"the database's kdsearch schema is at revision {current}, newer than this "
                                 f"kdsearch's {head}: upgrade kdsearch on this host")
        if current is None and inspect(conn).has_table("kd_studies"):
            command.stamp(config, BASELINE)  # made by the release before migrations: that release is the baseline
        command.upgrade(config, "head")
    return head


def check_schema(engine: Engine) -> str:
    """This release's revision, if the database is at it; else ``SchemaMismatch`` naming both revisions."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return head
    if current is None:
        with engine.connect() as conn:
            legacy = inspect(conn).has_table("kd_studies")
        what = "predates schema versions" if legacy else "has no kdsearch schema yet"
        raise SchemaMismatch(f"the database {what} (this kdsearch needs revision {head}): run `kdsearch db "
                             "upgrade` or start `kdsearch serve`")
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current in known:
        raise SchemaMismatch(f"the database's kdsearch schema is at revision {current}, this kdsearch needs {head}: "
                             "run `kdsearch db upgrade` (or start `kdsearch serve`)")
    raise SchemaMismatch(f"the database's kdsearch schema is at revision {current}, newer than this kdsearch's "
                         f"{head}: upgrade kdsearch on this host")

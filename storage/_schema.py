"""Schema versions of kdsearch's own tables, owned by Alembic (``storage/migrations``).

- ``upgrade_schema`` (``kdsearch db upgrade``, and ``kdsearch serve`` at start-up; never a worker) brings a database
  to this release's revision: a new database is created, one made before migrations existed (``kd_studies`` but no
  version) is stamped at the baseline first, then every revision runs in place, under a database-wide lock so two
  servers starting at once do not race.
- ``check_schema`` (every worker and CLI command that uses the store) refuses a database at another revision, older
  or newer, with a one-line message naming both: an old worker must never spin on a table it does not understand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "kd_alembic_version"
BASELINE = "0001"
_UPGRADE_LOCK = 748_201_517  # pg_advisory_xact_lock key: one schema upgrade at a time on a server


class SchemaMismatch(RuntimeError):
    """The database's schema revision is not this release's."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade_schema(engine: Engine) -> str:
    """Bring the database to this release's revision; returns it. Refuses a database newer than this release."""
    head = head_revision()
    config = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
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
    known = {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}
    if current in known:
        raise SchemaMismatch(f"the database's kdsearch schema is at revision {current}, this kdsearch needs {head}: "
                             "run `kdsearch db upgrade` (or start `kdsearch serve`)")
    raise SchemaMismatch(f"the database's kdsearch schema is at revision {current}, newer than this kdsearch's "
                         f"{head}: upgrade kdsearch on this host")

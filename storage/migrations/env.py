"""Alembic environment for kdsearch's own tables (``kd_*``); Optuna migrates its schema itself.

Run through ``storage.upgrade_schema`` (``kdsearch db upgrade``, ``kdsearch serve``), which hands over an open
connection; the version lives in ``kd_alembic_version``, apart from Optuna's ``alembic_version``.
"""

from __future__ import annotations

from alembic import context

from storage._models import Base

VERSION_TABLE = "kd_alembic_version"


def _only_kd_tables(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Compare only kdsearch's tables: Optuna's share the database and migrate themselves."""
    return type_ != "table" or str(name).startswith("kd_")


connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                  include_object=_only_kd_tables, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

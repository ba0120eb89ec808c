"""Optuna's own RDB schema is the study store, so ``optuna`` and ``optuna-dashboard`` open the same database."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from sqlalchemy.orm import Session

from storage._db import configure_sqlite, engine_kwargs, is_sqlite, make_engine, retry_operational
from storage._schema import schema_lock
from storage._trials import _state, _studies, _study_attrs, _trials, _values  # Optuna's schema, read directly


def make_optuna_storage(url: str, *, pool_size: int = 5, max_overflow: int = 5,
                        busy_timeout_s: float = 60.0) -> RDBStorage:
    """Optuna's study store on ``url``. Opening it creates Optuna's tables when missing (and stamps their version):
    that happens under ``schema_lock``, as kdsearch's migrations do, so servers and workers starting together do not
    race to create them."""
    lock_engine = make_engine(url, pool_size=1, max_overflow=0, busy_timeout_s=busy_timeout_s)
    try:
        with schema_lock(lock_engine):
            if is_sqlite(url):
                # WAL is a property of the database file: set it once through our engine before Optuna connects.
                with lock_engine.connect():
                    pass
            storage = retry_operational(lambda: RDBStorage(
                url,
                engine_kwargs=engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow,
                                            busy_timeout_s=busy_timeout_s),
            ))
    finally:
        lock_engine.dispose()
    if is_sqlite(url):
        configure_sqlite(storage.engine, default_begin="IMMEDIATE")
        storage.engine.dispose()  # connections opened during set-up predate the listeners
    return storage


def ensure_optuna_study(storage: RDBStorage, name: str, user_attrs: dict | None = None,
                        directions: Sequence[Literal["maximize", "minimize"]] | None = None) -> optuna.Study:
    """Create the study's Optuna twin or load it if another process already did. ``directions``: the spec's (the
    metric maximised, then a cost minimised); default one objective, the metric maximised."""
    study = optuna.create_study(study_name=name, storage=storage, directions=directions or ["maximize"],
                                load_if_exists=True)
    for key, value in (user_attrs or {}).items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study


def optuna_study_exists(storage: RDBStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True




def trial_summaries(session: Session, study_names: list[str]) -> dict[str, tuple[dict[str, int], float | None]]:
    """Per study name: (trial counts by Optuna state, the highest metric of its COMPLETE trials): for one objective,
    the value of ``best_trial`` (kdsearch never completes an infeasible trial: it is PRUNED untrained)."""
    result: dict[str, tuple[dict[str, int], float | None]] = {name: ({}, None) for name in study_names}
    if not study_names:
        return result
    counts = session.execute(
        sa.select(_studies.c.study_name, _state, sa.func.count())
        .join(_trials, _trials.c.study_id == _studies.c.study_id)
        .where(_studies.c.study_name.in_(study_names))
        .group_by(_studies.c.study_name, _state)
    ).all()
    for name, state, n in counts:
        result[name][0][str(getattr(state, "name", state))] = n
    best = session.execute(
        sa.select(_studies.c.study_name, sa.func.max(_values.c.value))
        .join(_trials, _trials.c.study_id == _studies.c.study_id)
        .join(_values, _values.c.trial_id == _trials.c.trial_id)
        .where(_studies.c.study_name.in_(study_names), _state == "COMPLETE", _values.c.objective == 0)
        .group_by(_studies.c.study_name)
    ).all()
    for name, value in best:
        result[name] = (result[name][0], None if value is None else float(value))
    return result


def study_user_attrs(session: Session, study_names: list[str], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per study name, the Optuna study user attributes named in ``keys`` (one query for any number of studies)."""
    result: dict[str, dict[str, Any]] = {name: {} for name in study_names}
    if not study_names:
        return result
    rows = session.execute(
        sa.select(_studies.c.study_name, _study_attrs.c.key, _study_attrs.c.value_json)
        .join(_study_attrs, _study_attrs.c.study_id == _studies.c.study_id)
        .where(_studies.c.study_name.in_(study_names), _study_attrs.c.key.in_(keys))
    ).all()
    for name, key, value in rows:
        result[name][key] = json.loads(value)
    return result

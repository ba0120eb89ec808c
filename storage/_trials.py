"""Fast reads over Optuna's schema for the dashboard: aggregates and pages in SQL, so a study of thousands of
trials answers in milliseconds instead of loading every FrozenTrial."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from optuna.distributions import json_to_distribution
from sqlalchemy.orm import Session

_studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
_trials = sa.table("trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"), sa.column("state"),
                   sa.column("datetime_start"), sa.column("datetime_complete"))
_values = sa.table("trial_values", sa.column("trial_id"), sa.column("objective"), sa.column("value"))
_params = sa.table("trial_params", sa.column("trial_id"), sa.column("param_name"), sa.column("param_value"),
                   sa.column("distribution_json"))
_steps = sa.table("trial_intermediate_values", sa.column("trial_id"), sa.column("step"),
                  sa.column("intermediate_value"))
_trial_attrs = sa.table("trial_user_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json"))
_study_attrs = sa.table("study_user_attributes", sa.column("study_id"), sa.column("key"), sa.column("value_json"))
_system_attrs = sa.table("trial_system_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json"))
_directions = sa.table("study_directions", sa.column("study_id"), sa.column("objective"), sa.column("direction"))
_state = sa.cast(_trials.c.state, sa.String)  # an ENUM type on PostgreSQL, text on SQLite

# Optuna's trials table (only the columns kdsearch reads), for tests and tools that must reach under Optuna.
OPTUNA_TRIALS = _trials

SORTABLE = {"number": _trials.c.number, "value": _values.c.value, "state": _state,
            "started": _trials.c.datetime_start}


def duration_seconds(dialect: str) -> sa.ColumnElement:
    """A finished trial's duration in seconds, in SQL (NULL while it runs)."""
    if dialect == "sqlite":
        # SQLite's date functions keep milliseconds only, so two trials 0.6 ms apart would sort as equal or
        # swapped. SQLAlchemy stores 'YYYY-MM-DD HH:MM:SS.ffffff': whole seconds from julianday (exact once
        # rounded), microseconds from the text.
        def whole(column: sa.ColumnElement) -> sa.ColumnElement:
            return sa.func.julianday(sa.func.substr(column, 1, 19))

        def micros(column: sa.ColumnElement) -> sa.ColumnElement:
            return sa.cast(sa.func.substr(column, 21, 6), sa.Integer)

        complete, start = _trials.c.datetime_complete, _trials.c.datetime_start
        return (sa.func.round((whole(complete) - whole(start)) * 86400)
                + (micros(complete) - micros(start)) / 1e6)
    return sa.extract("epoch", _trials.c.datetime_complete - _trials.c.datetime_start)


@lru_cache(maxsize=256)
def _external(distribution_json: str, internal: float) -> Any:
    return json_to_distribution(distribution_json).to_external_repr(internal)


def optuna_study_id(session: Session, name: str) -> int | None:
    return session.scalar(sa.select(_studies.c.study_id).where(_studies.c.study_name == name))


def _with_value(study_id: int) -> sa.Select:
    return (
        sa.select(_trials.c.trial_id, _trials.c.number, _state.label("state"), _values.c.value,
                  _trials.c.datetime_start, _trials.c.datetime_complete)
        .outerjoin(_values, sa.and_(_values.c.trial_id == _trials.c.trial_id, _values.c.objective == 0))
        .where(_trials.c.study_id == study_id)
    )


def _trial_attr(session: Session, study_id: int, key: str) -> dict[int, Any]:
    """Trial id → one user attribute (parsed), over every trial of a study that has it: one query."""
    rows = session.execute(
        sa.select(_trial_attrs.c.trial_id, _trial_attrs.c.value_json)
        .join(_trials, _trials.c.trial_id == _trial_attrs.c.trial_id)
        .where(_trials.c.study_id == study_id, _trial_attrs.c.key == key)
    )
    return {trial_id: json.loads(value) for trial_id, value in rows}


def trial_points(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Every trial: number, state, value, start/complete times, searched params (external values), the
    student's profile (shape, size, FLOPs, latency) where recorded and the worker that ran it."""
    rows = session.execute(_with_value(study_id).order_by(_trials.c.number)).all()
    params: dict[int, dict[str, Any]] = {}
    for trial_id, name, internal, dist in session.execute(
        sa.select(_params.c.trial_id, _params.c.param_name, _params.c.param_value, _params.c.distribution_json)
        .join(_trials, _trials.c.trial_id == _params.c.trial_id)
        .where(_trials.c.study_id == study_id)
    ):
        params.setdefault(trial_id, {})[name] = _external(dist, internal)
    profiles = _trial_attr(session, study_id, "profile")
    workers = _trial_attr(session, study_id, "worker")
    return [{"number": r.number, "state": r.state, "value": r.value, "params": params.get(r.trial_id, {}),
             "started_at": r.datetime_start, "completed_at": r.datetime_complete,
             "profile": profiles.get(r.trial_id), "worker": workers.get(r.trial_id)} for r in rows]


def learning_curves(session: Session, study_id: int, from_epochs: bool = False) -> dict[int, list[tuple[int, float]]]:
    """Per trial number, its reported (epoch, score) pairs. ``from_epochs``: read the ``epochs`` attribute instead,
    for studies with several objectives (Optuna keeps no intermediate values for them)."""
    curves: dict[int, list[tuple[int, float]]] = {}
    if from_epochs:
        numbers = {trial_id: number for trial_id, number in session.execute(
            sa.select(_trials.c.trial_id, _trials.c.number).where(_trials.c.study_id == study_id))}
        for trial_id, epochs in sorted(_trial_attr(session, study_id, "epochs").items(),
                                       key=lambda item: numbers[item[0]]):
            curves[numbers[trial_id]] = [(int(e["epoch"]), float(e["score"])) for e in epochs if "score" in e]
        return curves
    for number, step, value in session.execute(
        sa.select(_trials.c.number, _steps.c.step, _steps.c.intermediate_value)
        .join(_trials, _trials.c.trial_id == _steps.c.trial_id)
        .where(_trials.c.study_id == study_id)
        .order_by(_trials.c.number, _steps.c.step)
    ):
        curves.setdefault(number, []).append((int(step), float(value)))
    return curves


def complete_trials(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Every COMPLETE trial's number, metric (objective 0), and its ``profile``, ``params`` and ``metrics``
    attributes as stored (JSON text, parsed by whoever needs them): four queries whatever the trial count."""
    rows = session.execute(_with_value(study_id).where(_state == "COMPLETE", _values.c.value.is_not(None))).all()
    attrs = {key: {trial_id: value for trial_id, value in session.execute(
        sa.select(_trial_attrs.c.trial_id, _trial_attrs.c.value_json)
        .join(_trials, _trials.c.trial_id == _trial_attrs.c.trial_id)
        .where(_trials.c.study_id == study_id, _state == "COMPLETE", _trial_attrs.c.key == key))}
        for key in ("profile", "params", "metrics")}
    return [{"number": r.number, "value": float(r.value), **{key: attrs[key].get(r.trial_id) for key in attrs}}
            for r in rows]


def page_trial_ids(session: Session, study_id: int, *, offset: int, limit: int, sort: str = "number",
                   descending: bool = False, state: str | None = None,
                   changed_since: datetime | None = None) -> tuple[int, list[int]]:
    """(total matching, trial ids of one page), sorted and filtered in SQL."""
    query = _with_value(study_id)
    if state:
        query = query.where(_state == state)
    if changed_since is not None:
        # Running trials change every epoch; finished ones only once.
        query = query.where(sa.or_(_state == "RUNNING", _trials.c.datetime_complete >= changed_since,
                                   _trials.c.datetime_start >= changed_since))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    key = duration_seconds(session.get_bind().dialect.name) if sort == "duration" else SORTABLE[sort]
    order = key.desc() if descending else key.asc()
    nulls_last = sa.case((key.is_(None), 1), else_=0)
    ids = session.scalars(
        query.with_only_columns(_trials.c.trial_id).order_by(nulls_last, order, _trials.c.number)
        .offset(offset).limit(limit)
    ).all()
    return total, list(ids)



def study_fingerprint(session: Session, study_id: int, from_epochs: bool = False) -> str:
    """Changes whenever a trial starts, reports an epoch or finishes: an ETag for conditional polling.
    ``from_epochs``: epochs are counted by the size of the ``epochs`` attributes (a study with several objectives
    keeps no intermediate values)."""
    n_trials, n_finished, last_complete = session.execute(
        sa.select(sa.func.count(), sa.func.count(_trials.c.datetime_complete), sa.func.max(_trials.c.datetime_complete))
        .where(_trials.c.study_id == study_id)
    ).one()
    if from_epochs:
        n_steps = session.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(_trial_attrs.c.value_json)), 0))
            .join(_trials, _trials.c.trial_id == _trial_attrs.c.trial_id)
            .where(_trials.c.study_id == study_id, _trial_attrs.c.key == "epochs")
        )
    else:
        n_steps = session.scalar(
            sa.select(sa.func.count()).select_from(_steps).join(_trials, _trials.c.trial_id == _steps.c.trial_id)
            .where(_trials.c.study_id == study_id)
        )
    return f"{n_trials}.{n_finished}.{n_steps}.{last_complete}"

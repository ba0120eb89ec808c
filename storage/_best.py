"""A study's metric and its best trial: the one definition of each, for the API, the dashboard, the notifier, the
Prometheus collector, ``export-best`` and the worker.

- **The metric** a study maximises (``study_metric``): the task's, as resolved against the teacher (by the API at
  launch for a local teacher, by the first worker for a hub one: the study's ``task`` user attribute); for a study
  run before task metrics (``teacher_accuracy`` recorded, no ``task``), accuracy, which every such study scored;
  else the spec's ``metric`` as given; else unknown (None: a hub teacher's study no worker has prepared yet).
- **The best trial** of a study with one objective: among its COMPLETE trials that are feasible (every constraint
  at 0 or below, Optuna's rule), the one with the highest metric; the earliest (lowest number) among equals. A
  study with several objectives has no one best trial: its best trials are its Pareto front (Optuna's
  ``best_trials``), listed by ascending cost, then number. ``best_trial`` reads it in SQL for the pages
  (a study of thousands of trials is never loaded); ``best_trials`` finds it on an ``optuna.Study`` already loaded
  (the worker, ``export-best``). Both follow the rule above, and ``tests/test_storage_boundary.py`` checks they agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from storage._trials import (
    _directions,
    _external,
    _params,
    _state,
    _studies,
    _system_attrs,
    _trial_attrs,
    _trials,
    _values,
)

# The Optuna study user attributes ``study_metric`` reads (pass them to ``study_user_attrs``).
METRIC_ATTRS = ("task", "teacher_accuracy")
_CONSTRAINTS = "constraints"  # Optuna's system attribute: "constraints" (a list, before 5) or "constraints:NAME"


def study_metric(spec: Mapping[str, Any] | None, user_attrs: Mapping[str, Any]) -> str | None:
    """The metric a study maximises (module docstring): from its Optuna user attributes (at least those named in
    ``METRIC_ATTRS``) and its spec (``kd_studies.spec``, or the ``kdsearch_spec`` attribute). None when unknown."""
    task = user_attrs.get("task")
    if task:
        return str(task["metric"])
    if "teacher_accuracy" in user_attrs:  # a study run before task metrics: every one of them scored accuracy
        return "accuracy"
    metric = (spec or {}).get("metric")
    return None if metric is None else str(metric)


@dataclass(frozen=True)
class BestTrial:
    """A study's best trial (module docstring) as the pages show it."""

    number: int
    value: float  # its metric (objective 0)
    params: dict[str, Any]  # the configuration it ran (its ``params`` attribute, else Optuna's searched params)
    epoch: int | None = None  # its best epoch
    metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task at that epoch
    precision: str | None = None
    degenerate: str | None = None  # why its best epoch's outputs are degenerate (its ``degenerate`` attribute)


def _feasible(constraints: Mapping[str, Any]) -> bool:
    return all(float(v) <= 0.0 for v in constraints.values())


def best_trial(session: Session, study_name: str) -> BestTrial | None:
    """The best trial of a study with one objective, read in SQL; None while no COMPLETE feasible trial has a
    value, for a study with several objectives (no one best trial) and for a study Optuna does not know."""
    study_id = session.scalar(sa.select(_studies.c.study_id).where(_studies.c.study_name == study_name))
    if study_id is None:
        return None
    n_objectives = session.scalar(sa.select(sa.func.count()).select_from(_directions)
                                  .where(_directions.c.study_id == study_id)) or 0
    if n_objectives > 1:
        return None
    complete = sa.select(_trials.c.trial_id).where(_trials.c.study_id == study_id, _state == "COMPLETE")
    by_trial: dict[int, dict[str, Any]] = {}
    for trial_id, key, value in session.execute(
        sa.select(_system_attrs.c.trial_id, _system_attrs.c.key, _system_attrs.c.value_json)
        .where(_system_attrs.c.trial_id.in_(complete),
               sa.or_(_system_attrs.c.key == _CONSTRAINTS, _system_attrs.c.key.like(f"{_CONSTRAINTS}:%")))
    ):
        parsed = json.loads(value)
        constraints = by_trial.setdefault(trial_id, {})
        if key == _CONSTRAINTS:
            constraints.update({str(i): c for i, c in enumerate(parsed or [])})
        else:
            constraints[key.split(":", 1)[1]] = parsed
    infeasible = {trial_id for trial_id, constraints in by_trial.items() if not _feasible(constraints)}
    query = (
        sa.select(_trials.c.trial_id, _trials.c.number, _values.c.value)
        .join(_values, sa.and_(_values.c.trial_id == _trials.c.trial_id, _values.c.objective == 0))
        .where(_trials.c.study_id == study_id, _state == "COMPLETE", _values.c.value.is_not(None))
        .order_by(_values.c.value.desc(), _trials.c.number)
    )
    if infeasible:
        query = query.where(_trials.c.trial_id.not_in(infeasible))
    row = session.execute(query.limit(1)).first()
    if row is None:
        return None
    attrs = {key: json.loads(value) for key, value in session.execute(
        sa.select(_trial_attrs.c.key, _trial_attrs.c.value_json)
        .where(_trial_attrs.c.trial_id == row.trial_id,
               _trial_attrs.c.key.in_(["params", "best_epoch", "metrics", "precision", "degenerate"])))}
    params = attrs.get("params")
    if params is None:  # a trial recorded without kdsearch's attribute: Optuna's searched params
        params = {name: _external(dist, internal) for name, internal, dist in session.execute(
            sa.select(_params.c.param_name, _params.c.param_value, _params.c.distribution_json)
            .where(_params.c.trial_id == row.trial_id))}
    return BestTrial(number=row.number, value=float(row.value), params=params, epoch=attrs.get("best_epoch"),
                     metrics=attrs.get("metrics") or {}, precision=attrs.get("precision"),
                     degenerate=attrs.get("degenerate"))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trials of a loaded Optuna study (module docstring): one objective, the best trial alone (an empty
    list while there is none); several objectives, the Pareto front by ascending cost (objective 1), then number."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: (cast(list[float], t.values)[1], t.number))
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and _feasible(t.constraints)]
    if not feasible:
        return []
    return [max(feasible, key=lambda t: (cast(list[float], t.values)[0], -t.number))]

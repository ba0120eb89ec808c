"""The objectives a study can optimise and the costs a student is measured on: one registry, and what reads it.

``OBJECTIVES`` is the one list of objectives: the task ``metric`` (maximised) and every cost of a student
(minimised). Every trial records its student's profile (``distill.profile``), a dict holding each cost under its
name; a study's second objective, its constraints (``max_<cost>``), the ``export-best`` selectors
(``--max-<cost>``), the API (the spec's schema, the front's cost axis, the profile it returns, ``GET
/api/objectives``), the dashboard, the CLI's tables and the model card are all derived from it.

A new cost is its entry in ``COSTS`` below and its measurement in ``distill.profile.profile_model`` (the profile
key named as the entry).
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from search_space.schema import Constraints


@dataclass(frozen=True)
class ObjectiveInfo:
    """One objective: the task metric, or a cost of the student read from its profile."""

    name: str  # as a spec's ``objectives`` names it; for a cost, also its key in a trial's profile
    title: str  # in prose: "the study optimised accuracy (higher) and {title} (lower)"
    direction: Literal["maximize", "minimize"]
    column: str = ""  # a table's column (the model card's, the dashboard's axis): "FLOPs / sequence"
    short: str = ""  # a terse table column (the CLI's) and the noun after an abbreviated count: "FLOPs"
    unit: str = ""  # the unit after a measured value ("ms"); empty for a count
    decimals: int = 0  # 0: a count (an integer, its limits integers too); else a measure shown with these decimals
    log_axis: bool = True  # the dashboard plots it on a log axis (counts spanning orders of magnitude)
    limit_help: str = ""  # after "at most N": what a limit of it means (constraints, the CLI's --max-<name>)
    # How the card says it was measured: a template over the profile's keys, e.g. "... of {flops_seq_len} tokens".
    measured: str = ""
    extra_columns: tuple[tuple[str, str], ...] = ()  # (column, profile key): figures the card shows beside it

    @property
    def is_count(self) -> bool:
        return self.decimals == 0

    @property
    def flag(self) -> str:
        """Its constraint (``constraints: {"max_params": ...}``) and ``export-best`` keyword: ``max_params``."""
        return f"max_{self.name}"

    @property
    def option(self) -> str:
        """Its ``export-best`` option: ``--max-params``."""
        return "--" + self.flag.replace("_", "-")

    def read(self, profile: Mapping[str, Any]) -> float:
        """Its value in a trial's (or the teacher's) profile."""
        return float(profile[self.name])

    def format(self, value: float) -> str:
        """``4,400,000`` for a count, ``1.50`` for a measure."""
        return f"{int(value):,}" if self.is_count else f"{value:,.{self.decimals}f}"

    def shown(self, value: float) -> str:
        """The value with its unit, where it has one: ``4,400,000``, ``1.50 ms``."""
        return f"{self.format(value)} {self.unit}" if self.unit else self.format(value)

    def as_json(self) -> dict[str, Any]:
        """What the API serves (``GET /api/objectives``) for the dashboard to draw and format it."""
        if self.direction == "maximize":  # the metric: its name and title are all there is
            return {"name": self.name, "title": self.title, "direction": self.direction}
        return {**asdict(self), "extra_columns": [list(c) for c in self.extra_columns], "is_count": self.is_count,
                "flag": self.flag, "option": self.option}


METRIC = ObjectiveInfo(name="metric", title="the task metric", direction="maximize")

# The costs of a student, in the order tables list them. Each is measured by distill.profile.profile_model.
COSTS: tuple[ObjectiveInfo, ...] = (
    ObjectiveInfo(
        name="params", title="parameters", direction="minimize", column="parameters", short="params",
        limit_help="parameters", extra_columns=(("without embeddings", "params_no_embeddings"),)),
    ObjectiveInfo(
        name="flops", title="FLOPs per sequence", direction="minimize", column="FLOPs / sequence", short="FLOPs",
        limit_help="forward FLOPs per sequence",
        measured="forward FLOPs of one sequence of {flops_seq_len} tokens (the evaluation split's median tokenized "
                 "length; every matrix product, 2 FLOPs per multiply-add)"),
    ObjectiveInfo(
        name="latency_ms", title="CPU latency", direction="minimize", column="CPU ms / sequence",
        short="latency ms", unit="ms", decimals=2, log_axis=False,
        limit_help="ms CPU latency per sequence (batch 1)",
        measured="CPU latency per sequence at batch 1 with {latency_threads} thread, median of {latency_passes} "
                 "passes over {latency_rows} evaluation sentences, tokenization excluded"),
)
OBJECTIVES: dict[str, ObjectiveInfo] = {o.name: o for o in (METRIC, *COSTS)}
COST_BY_NAME: dict[str, ObjectiveInfo] = {c.name: c for c in COSTS}
COST_BY_FLAG: dict[str, ObjectiveInfo] = {c.flag: c for c in COSTS}
COST_OBJECTIVES: tuple[str, ...] = tuple(COST_BY_NAME)
# The front, the constraints ("at most") and the selectors all take a cost to be minimised.
assert all(c.direction == "minimize" for c in COSTS) and len(OBJECTIVES) == 1 + len(COSTS), "see COSTS"

# Derived views (kept for their readers): profile key → prose title, and → constraint flag.
COST_TITLES = {c.name: c.title for c in COSTS}
CONSTRAINT_FLAGS = {c.name: c.flag for c in COSTS}


def registry_json() -> dict[str, Any]:
    """The registry as ``GET /api/objectives`` serves it: the metric objective and the costs, in order."""
    return {"metric": METRIC.as_json(), "costs": [c.as_json() for c in COSTS]}


# Same-shape pruning: a trial is only compared once this many finished trials of its shape reached the same epoch.
SAME_SHAPE_MIN_TRIALS = 3

Key = TypeVar("Key", bound=Hashable)


def constraint_violations(constraints: Constraints, profile: Mapping[str, Any]) -> dict[str, float]:
    """Per constraint (``max_params``...), how far the student is past its limit, relative to the limit: above 0 is
    infeasible. Relative, so that parameters (millions) and milliseconds weigh alike where a sampler adds them up."""
    return {COST_BY_NAME[key].flag: (COST_BY_NAME[key].read(profile) - limit) / limit
            for key, limit in constraints.limits().items()}


def infeasible_reason(constraints: Constraints | None, profile: Mapping[str, Any]) -> str | None:
    """A sentence naming each broken constraint, or None when the student meets them all."""
    if constraints is None:
        return None
    broken = [f"{cost.shown(cost.read(profile))} {cost.title} > {cost.flag} {cost.shown(limit)}"
              for key, limit in constraints.limits().items() if (cost := COST_BY_NAME[key]).read(profile) > limit]
    return "infeasible: " + "; ".join(broken) if broken else None


def pareto_front(points: Iterable[tuple[Key, float, float]]) -> list[Key]:
    """The keys of the non-dominated points of ``(key, metric, cost)``: the metric maximised, the cost minimised.

    A point is dominated when another is at least as good on both and better on one (Optuna's definition, so equal
    points are all kept). One sort and one sweep: O(n log n) for any number of trials.
    """
    ordered = sorted(points, key=lambda p: (-p[1], p[2]))
    front: list[Key] = []
    lowest_cost_above = float("inf")  # the lowest cost among points of a strictly higher metric
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][1] == ordered[i][1]:
            j += 1
        group_cost = ordered[i][2]  # the lowest cost of this metric value (sorted ascending within it)
        if group_cost < lowest_cost_above:
            front += [key for key, _, cost in ordered[i:j] if cost == group_cost]
            lowest_cost_above = group_cost
        i = j
    return front


def epoch_scores(trial: FrozenTrial) -> dict[int, float]:
    """Epoch → the study's metric, as the worker records every epoch (``epochs``, a user attribute)."""
    return {int(e["epoch"]): float(e["score"]) for e in trial.user_attrs.get("epochs", []) if "score" in e}


def same_shape_should_prune(trials: Sequence[FrozenTrial], shape: Mapping[str, Any], epoch: int, score: float,
                            min_trials: int = SAME_SHAPE_MIN_TRIALS) -> bool:
    """The pruning rule of a multi-objective study: stop a trial whose score at ``epoch`` is below the median, at
    that epoch, of the COMPLETE trials of the same student shape (once ``min_trials`` of them reached it).

    Trials of one shape share their cost (parameters and FLOPs exactly, latency up to noise), so among them the
    metric alone decides who can reach the front: the median rule is as sound there as for one objective. Trials
    of other shapes are never compared: a small student's lower score says nothing about whether it belongs on
    the front.
    """
    peers = [scores[epoch] for t in trials
             if t.state == TrialState.COMPLETE and (t.user_attrs.get("profile") or {}).get("shape") == dict(shape)
             and epoch in (scores := epoch_scores(t))]
    return len(peers) >= min_trials and score < statistics.median(peers)

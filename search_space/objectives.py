"""Several objectives and constraints: feasibility of a student, the Pareto front, and pruning on several objectives.

Every trial records its student's profile (``distill.profile``): each cost of the registry (``kdsearch.objectives``:
``params``, ``flops``, ``latency_ms``...) and the shape. A study's second objective, and its constraints, read them.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from optuna.trial import FrozenTrial, TrialState

from kdsearch.objectives import COST_BY_NAME
from search_space.schema import Constraints

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

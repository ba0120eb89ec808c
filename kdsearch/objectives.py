"""The one registry of what a study can optimise: the task metric (maximised) and the costs of a student
(minimised), each with its title, unit, formatting, direction, constraint flag and how a trial's profile holds it.

Every reader derives from ``OBJECTIVES``/``COSTS``: the spec's schema (``objectives``, ``constraints: {"max_<cost>":
...}``, ``search_space.schema``), feasibility (``search_space.objectives``), the API (the profile it returns, the
pareto endpoint's ``?cost=``, ``GET /api/objectives``, which the dashboard draws from), ``export-best``'s selectors
(``--max-<cost>``, ``service.export_best`` and ``service.cli``), the CLI's tables and the model card
(``distill.hub_model``).

A new cost is two files: its entry in ``COSTS`` below, and its measurement in ``distill.profile.profile_model``
(which records it in the profile under the entry's name). Dependency-free (the standard library only), so the
command line can build its options without importing Optuna or pydantic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal


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

# The costs of a student, in the order tables list them (the first: the default cost axis of a front). Each is
# measured by distill.profile.profile_model.
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

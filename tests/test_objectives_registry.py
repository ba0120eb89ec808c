"""The registry of objectives and costs (``kdsearch.objectives``) is the one source: the spec's schema, its
constraints, the API (its objectives endpoint, the profile it returns, the front's cost axis), ``export-best``'s
selectors and options, the CLI's tables, the model card and the dashboard all list exactly its entries."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from distill.hub_model import front_lines, size_lines
from kdsearch.objectives import COST_OBJECTIVES, COSTS, METRIC, OBJECTIVES, registry_json
from search_space import Constraints, StudySpec
from search_space.objectives import constraint_violations, infeasible_reason
from service.api.main import create_app
from service.api.schemas import StudentProfileOut
from service.cli import build_parser, print_front
from service.export_best import LIMIT_FLAGS, cost_limits
from service.settings import Settings

STATIC = Path(__file__).parents[1] / "service" / "dashboard" / "static"
NAMES = [cost.name for cost in COSTS]
FLAGS = [cost.flag for cost in COSTS]


def _profile(scale: float = 1.0) -> dict[str, Any]:
    """A profile holding every cost of the registry (and what the API's profile needs beside them)."""
    return {"shape": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128},
            "params_no_embeddings": 10, "flops_seq_len": 8, "latency_rows": 4, "latency_passes": 5,
            "latency_threads": 1, "machine": "cpu", "load_1min": 0.5,
            **{cost.name: (int(1000 * (i + 1) * scale) if cost.is_count else 1.25 * (i + 1) * scale)
               for i, cost in enumerate(COSTS)}}


def test_the_registry_is_consistent() -> None:
    assert list(OBJECTIVES) == [METRIC.name, *NAMES] and tuple(NAMES) == COST_OBJECTIVES
    assert METRIC.direction == "maximize" and all(cost.direction == "minimize" for cost in COSTS)
    assert len(set(FLAGS)) == len(FLAGS) == len({cost.option for cost in COSTS})
    assert {"params", "flops", "latency_ms"} <= set(NAMES)  # the costs every stored study may name


def test_the_spec_schema_and_constraints_come_from_it() -> None:
    schema = StudySpec.model_json_schema()
    assert schema["properties"]["objectives"]["items"]["enum"] == list(OBJECTIVES)
    assert list(schema["$defs"]["Constraints"]["properties"]) == FLAGS
    shape = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
    base = {"name": "s", "teacher": "t", "student": {"config": shape}, "dataset": {"path": "d"}}
    for cost in COSTS:
        spec = StudySpec.model_validate({**base, "objectives": ["metric", cost.name]})
        assert spec.cost_objective == cost.name and spec.directions == ["maximize", "minimize"]
        limited = StudySpec.model_validate({**base, "constraints": {cost.flag: 3}})
        assert limited.constraints is not None and limited.constraints.limits() == {cost.name: 3.0}
        # Relative violations and the infeasibility sentence, for each cost the same way.
        profile = _profile()
        assert constraint_violations(limited.constraints, profile) == {
            cost.flag: pytest.approx((cost.read(profile) - 3) / 3)}
        reason = infeasible_reason(limited.constraints, profile)
        assert reason is not None and f"{cost.title} > {cost.flag} {cost.shown(3)}" in reason
    with pytest.raises(ValidationError, match="the second objective must be one of " + ", ".join(NAMES)):
        StudySpec.model_validate({**base, "objectives": ["metric", "metric"]})
    with pytest.raises(ValidationError, match="give at least one of " + ", ".join(FLAGS)):
        Constraints.model_validate({})


def test_the_api_serves_it(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a"))) as c:
        served = c.get("/api/objectives").json()
        openapi = c.get("/openapi.json").json()
    assert served == registry_json()
    assert [cost["name"] for cost in served["costs"]] == NAMES and served["metric"]["name"] == "metric"
    assert [cost["option"] for cost in served["costs"]] == [cost.option for cost in COSTS]
    pareto_cost = next(p for p in openapi["paths"]["/api/studies/{id_or_name}/pareto"]["get"]["parameters"]
                       if p["name"] == "cost")
    assert pareto_cost["schema"]["anyOf"][0]["enum"] == NAMES
    profile = StudentProfileOut.model_validate(_profile()).model_dump()
    assert all(profile[name] == _profile()[name] for name in NAMES)


def test_export_best_and_the_cli_come_from_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(LIMIT_FLAGS) == FLAGS and list(LIMIT_FLAGS.values()) == NAMES
    assert cost_limits({flag: 2 for flag in FLAGS}) == {flag: 2.0 for flag in FLAGS}
    with pytest.raises(TypeError, match="no cost limit max_bogus"):
        cost_limits({"max_bogus": 1})
    parser = build_parser()
    export = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["export-best"]
    options = {option: action.dest for action in export._actions for option in action.option_strings}
    assert all(options[cost.option] == cost.flag for cost in COSTS)
    args = export.parse_args(["s", "--out", "o", *(x for cost in COSTS for x in (cost.option, "7"))])
    assert all(getattr(args, cost.flag) == 7 for cost in COSTS)
    print_front(__import__("rich.console").console.Console(width=400), {
        "metric": "accuracy", "cost": NAMES[0], "n_complete": 1, "teacher_profile": _profile(10),
        "teacher_metric": 0.9, "front": [{"number": 0, "value": 0.8, "profile": _profile(), "params": {}}]},
        ["learning_rate", "alpha"])
    out = capsys.readouterr().out
    assert all(cost.short in out and cost.format(cost.read(_profile())) in out for cost in COSTS)


def test_the_card_and_the_dashboard_come_from_it() -> None:
    card = "\n".join(size_lines(_profile(), _profile(10)) + front_lines(
        [{"number": 1, "value": 0.8, "profile": _profile()}], 1, "accuracy", NAMES[-1], "chosen"))
    for cost in COSTS:
        assert cost.column in card and cost.format(cost.read(_profile())) in card and f"of its {cost.title}" in card
    assert f"and {COSTS[-1].title} (lower)" in card
    # The front end names no cost itself: it draws from GET /api/objectives.
    app, study = (STATIC / "app.js").read_text(), (STATIC / "study.html").read_text()
    assert "/api/objectives" in app
    for cost in COSTS:
        assert cost.option not in app and f'"{cost.name}"' not in app and f'value="{cost.name}"' not in study

"""Specs that would tie up or crash the service (issue 26): non-finite numbers, operator caps, model folders whose
files reach outside the allowed roots. Each is a 422 naming the field, and nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.conftest import tiny_spec


def client_for(db_url: str, tmp_path: Path, **settings) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(Settings(database_url=db_url, artifacts=tmp_path / "artifacts", **settings)))


def refused_fields(response) -> list[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.text
    return [".".join(str(p) for p in e["loc"][1:]) for e in response.json()["detail"]]


def post_text(client: TestClient, body: str):  # type: ignore[no-untyped-def]
    return client.post("/api/studies", content=body, headers={"Content-Type": "application/json"})


# -- Infinity and NaN ---------------------------------------------------------------------------------------------

# (where in the spec, the literal's JSON path as the 422 names it): Python's JSON parser reads NaN, Infinity and
# -Infinity, and a number too large for a float (1e999) as Infinity.
NON_FINITE_PLACES = [
    ({"search_space": {"learning_rate": {"low": 1e-4, "high": "@"}}}, "search_space.learning_rate.range.high"),
    ({"search_space": {"alpha": "@"}}, "search_space.alpha.value"),
    ({"search_space": {"temperature": {"choices": [2.0, "@"]}}}, "search_space.temperature.choices.choices.1"),
    ({"n_trials": "@"}, "n_trials"),
    ({"priority": "@"}, "priority"),
    ({"timeout_s": "@"}, "timeout_s"),
    ({"constraints": {"max_latency_ms": "@"}}, "constraints.max_latency_ms"),
    ({"augment": {"copies": 1, "p_mask": "@"}}, "augment.p_mask"),
]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_a_422_naming_the_field(db_url: str, tmp_path: Path, tiny_assets,  # type: ignore[no-untyped-def]
                                                        literal: str) -> None:
    with client_for(db_url, tmp_path) as client:
        for i, (override, field) in enumerate(NON_FINITE_PLACES):
            spec = {**tiny_spec(tiny_assets, name=f"nonfinite-{i}"), **override}
            body = json.dumps(spec).replace('"@"', literal)
            response = post_text(client, body)
            assert refused_fields(response) == [field], (literal, field, response.text)
        # A string where a number belongs, and an unknown field, still say what they were given.
        response = post_text(client, json.dumps({**tiny_spec(tiny_assets), "name": "@", "extra": "@"}).replace(
            '"@"', literal))
        assert sorted(refused_fields(response)) == ["extra", "name"]
        assert client.get("/api/studies").json() == [], "nothing of a refused spec is stored"
        assert post_text(client, json.dumps(tiny_spec(tiny_assets))).status_code == 201

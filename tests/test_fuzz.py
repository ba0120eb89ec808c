"""Schemathesis against /openapi.json: every endpoint, with no token configured, and with one configured both
missing and given. No 5xx, no response outside the schema. Bounded example count (it runs in `make test`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api import create_app
from service.settings import Settings

TOKEN = "fuzz-token"
MODES = {"no-token-configured": (None, None), "token-missing": (TOKEN, None), "token-given": (TOKEN, TOKEN)}
HEADERS: dict[str, str] = {}


@pytest.fixture(params=list(MODES), scope="module")
def api_schema(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    configured, sent = MODES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    app = create_app(Settings(database_url=f"sqlite:///{root / 'kd.db'}", artifacts=root / "artifacts",
                              api_token=configured, allowed_roots=[Path(root)]))
    HEADERS.clear()
    if sent:
        HEADERS["Authorization"] = f"Bearer {sent}"
    with TestClient(app):  # runs the lifespan: engines and stores on app.state
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_errors_and_keeps_its_schema(case) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(headers=dict(HEADERS), checks=[not_a_server_error, status_code_conformance,
                                                          content_type_conformance, response_schema_conformance])

"""The REST API through the real app: launch, validation (422 naming the field), conflicts, auth, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kdsearch.testing import tiny_spec
from service.api import create_app
from service.settings import Settings


def make_client(db_url: str, tmp_path: Path, token: str | None = None) -> TestClient:
    return TestClient(create_app(Settings(database_url=db_url, artifacts=tmp_path / "artifacts", api_token=token)))


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(db_url, tmp_path) as c:
        yield c


class Fields(list):
    """Error locations; ``in`` matches a field or anything below it (``a.b`` matches ``a.b.range``)."""

    def __contains__(self, field: object) -> bool:
        return any(loc == field or loc.startswith(f"{field}.") for loc in self)


def field_of(response) -> Fields:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.text
    return Fields(".".join(str(p) for p in e["loc"][1:]) for e in response.json()["detail"])


def test_launch_list_detail_cancel(client: TestClient, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/studies", json=tiny_spec(tiny_assets, name="first", priority=3))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "first" and body["status"] == "queued" and body["n_trials"] == 4
    assert body["spec"]["teacher"] == str(Path(tiny_assets["teacher"]).resolve())
    assert body["counts"] == {"complete": 0, "pruned": 0, "running": 0, "waiting": 4, "failed": 0}

    listed = client.get("/api/studies").json()
    assert [s["name"] for s in listed] == ["first"]
    assert {"id", "name", "status", "priority", "n_trials", "counts", "best_value", "created_at", "updated_at"} <= set(
        listed[0])
    assert listed[0]["created_at"].endswith(("+00:00", "Z"))
    by_id = client.get(f"/api/studies/{body['id']}").json()
    assert by_id["name"] == "first" and by_id["best_trial"] is None
    assert client.get("/api/studies/first/trials").json() == {"total": 0, "offset": 0, "limit": 50, "trials": []}
    assert client.get("/api/studies/nope").status_code == 404

    cancelled = client.post("/api/studies/first/cancel", json={})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"]["waiting"] == 0
    assert client.get("/api/health").json()["status"] == "ok"


def test_duplicate_name_is_409(client: TestClient, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/api/studies", json=tiny_spec(tiny_assets, name="dup")).status_code == 201
    again = client.post("/api/studies", json=tiny_spec(tiny_assets, name="dup"))
    assert again.status_code == 409 and "dup" in again.json()["detail"]


def test_invalid_bodies_name_the_field(client: TestClient, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    post = lambda **kw: client.post("/api/studies", json=tiny_spec(tiny_assets, **kw))  # noqa: E731
    assert "search_space.learning_rate" in field_of(post(search_space={"learning_rate": {"low": 1e-3, "high": 1e-4}}))
    assert "search_space.alpha" in field_of(post(search_space={"alpha": 2}))
    assert "search_space.temperature" in field_of(post(search_space={"temperature": 0}))
    assert "search_space.num_train_epochs" in field_of(post(search_space={"num_train_epochs": 0}))
    assert "search_space.batch_size" in field_of(post(search_space={"batch_size": 0}))
    assert "n_trials" in field_of(post(n_trials=0))
    assert "name" in field_of(post(name="no spaces"))
    assert "surprise" in field_of(post(surprise=True))
    assert "teacher" in field_of(post(teacher=str(tmp_path / "missing-teacher")))
    assert "teacher" in field_of(post(teacher=str(tmp_path)))  # a directory without config.json
    assert "dataset.path" in field_of(post(dataset={"path": str(tmp_path / "nothing")}))
    assert "dataset.eval_split" in field_of(post(dataset={"path": str(tiny_assets["data"]), "eval_split": "test"}))
    mismatch = post(student={"model": str(tiny_assets["other_vocab_student"])})
    assert "student.model" in field_of(mismatch)
    assert "tokenizers differ" in mismatch.json()["detail"][0]["msg"]
    assert client.get("/api/studies").json() == [], "nothing was queued"


def test_compatible_pretrained_student_is_accepted(client: TestClient, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/studies", json=tiny_spec(tiny_assets, student={"model": str(tiny_assets["student"])}))
    assert response.status_code == 201, response.text


def test_token_guards_mutations(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with make_client(sqlite_url, tmp_path, token="s3cret") as client:
        spec = tiny_spec(tiny_assets, name="guarded")
        assert client.post("/api/studies", json=spec).status_code == 401
        assert client.post("/api/studies", json=spec, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.post("/api/studies", json=spec, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201
        assert client.post("/api/studies/guarded/cancel").status_code == 401
        assert client.get("/api/studies").status_code == 401, "reads need it too (KDSEARCH_PUBLIC_READ opens them)"


def test_openapi_and_dashboard_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/studies", "/api/studies/{id_or_name}", "/api/studies/{id_or_name}/trials",
            "/api/studies/{id_or_name}/cancel", "/api/health"} <= set(paths)
    assert "kdsearch" in client.get("/").text
    assert client.get("/studies/anything").status_code == 200
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert client.get("/static/app.js").status_code == 200


def test_all_digit_names_are_refused_and_ids_never_collide(tmp_path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from kdsearch.testing import tiny_spec
    from service.api import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a"))) as c:
        assert c.post("/api/studies", json=tiny_spec(tiny_assets, name="first")).status_code == 201
        refused = c.post("/api/studies", json=tiny_spec(tiny_assets, name="1"))
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "name"]
        assert c.post("/api/studies", json=tiny_spec(tiny_assets, name="1a")).status_code == 201
        assert c.get("/api/studies/1").json()["name"] == "first"  # digits are an id
        assert c.get("/api/studies/\u00b9").status_code == 404  # not an ASCII digit: a (missing) name, no crash

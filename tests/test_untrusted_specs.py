"""Specs that would tie up or crash the service (issue 26): non-finite numbers, operator caps, model folders whose
files reach outside the allowed roots. Each is a 422 naming the field, and nothing is stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kdsearch.testing import tiny_spec, write_dataset, write_tiny_model
from service.api import create_app
from service.settings import Settings


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


# -- operator caps ------------------------------------------------------------------------------------------------

HUGE_STUDENT = {"config": {"num_hidden_layers": 48, "hidden_size": 8192, "num_attention_heads": 64,
                           "intermediate_size": 32768}}


def test_default_caps_refuse_what_would_tie_up_the_workers(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with client_for(sqlite_url, tmp_path) as client:
        post = lambda **kw: client.post("/api/studies", json=tiny_spec(tiny_assets, **kw))  # noqa: E731
        epochs = post(search_space={"num_train_epochs": 100_000})
        assert refused_fields(epochs) == ["search_space.num_train_epochs"]
        assert "at most 100 " in epochs.json()["detail"][0]["msg"]
        huge = post(student=HUGE_STUDENT)  # about 39 billion parameters
        assert refused_fields(huge) == ["student.config"]
        assert "38,659,817,472 encoder parameters: at most 1,000,000,000" in huge.json()["detail"][0]["msg"]
        # A searched shape is judged by the largest student it can sample.
        searched = {"config": {**HUGE_STUDENT["config"], "num_hidden_layers": {"low": 1, "high": 48}}}
        assert refused_fields(post(student=searched)) == ["student.config"]
        priority = post(priority=1000)
        assert refused_fields(priority) == ["priority"]
        assert "within -10..10" in priority.json()["detail"][0]["msg"]
        assert refused_fields(post(n_trials=10_001)) == ["n_trials"]
        assert refused_fields(post(dataset={"path": str(tiny_assets["data"]), "max_seq_length": 513})) == [
            "dataset.max_seq_length"]
        assert refused_fields(post(augment={"copies": 21})) == ["augment.copies"]
        assert client.get("/api/studies").json() == []
        ok = post(search_space={"num_train_epochs": {"low": 1, "high": 100}}, priority=10, n_trials=10_000,
                  student={"config": {"num_hidden_layers": {"low": 1, "high": 12}, "hidden_size": 768,
                                      "num_attention_heads": 12, "intermediate_size": 3072}})
        assert ok.status_code == 201, ok.text


def test_changed_caps_are_honoured(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    # tiny_spec's student: 1 layer, hidden 16, intermediate 32: 4(16² + 16) + 2·16·32 + 32 + 16 + 4·16 = 2,224.
    with client_for(sqlite_url, tmp_path, max_epochs=1000, max_student_params=2_224, min_priority=-500,
                    max_priority=500, max_n_trials=3) as client:
        post = lambda **kw: client.post("/api/studies", json=tiny_spec(tiny_assets, **{"n_trials": 3, **kw}))  # noqa: E731
        assert post(name="long", search_space={"num_train_epochs": {"choices": [1, 1000]}}).status_code == 201
        assert refused_fields(post(search_space={"num_train_epochs": 1001})) == ["search_space.num_train_epochs"]
        assert post(name="urgent", priority=500).status_code == 201
        assert post(name="background", priority=-500).status_code == 201
        assert refused_fields(post(priority=501)) == ["priority"]
        assert refused_fields(post(priority=-501)) == ["priority"]
        wider = {"config": {"num_hidden_layers": 1, "hidden_size": {"choices": [8, 16, 24]}, "num_attention_heads": 2,
                            "intermediate_size": 32}}
        refused = post(student=wider)
        assert refused_fields(refused) == ["student.config"]
        assert "(num_hidden_layers 1, hidden_size 24, intermediate_size 32)" in refused.json()["detail"][0]["msg"]
        assert refused_fields(post(n_trials=4)) == ["n_trials"]


def test_encoder_parameters_count_what_transformers_builds() -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from search_space import encoder_parameters

    shape = {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 4, "intermediate_size": 40}
    model = AutoModelForSequenceClassification.from_config(BertConfig(vocab_size=50, **shape))
    assert encoder_parameters(shape) == sum(p.numel() for p in model.bert.encoder.parameters())


# -- files inside a model directory -------------------------------------------------------------------------------


def test_model_folder_files_linking_outside_the_roots_are_refused(sqlite_url: str, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_dataset(root / "data")
    write_tiny_model(outside / "teacher")
    assets = {"teacher": write_tiny_model(root / "teacher"), "data": root / "data"}
    with client_for(sqlite_url, tmp_path, allowed_roots=[root]) as client:
        for name in ("model.safetensors", "config.json", "tokenizer_config.json", "tokenizer.json"):
            linked = root / f"linked-{name}"
            shutil.copytree(root / "teacher", linked, symlinks=True)
            (linked / name).unlink()
            (linked / name).symlink_to(outside / "teacher" / name)
            for spec in (tiny_spec(assets, name="t", teacher=str(linked)),
                         tiny_spec(assets, name="s", student={"model": str(linked)})):
                response = client.post("/api/studies", json=spec)
                field = "teacher" if spec["name"] == "t" else "student.model"
                assert refused_fields(response) == [field], (name, response.text)
                msg = response.json()["detail"][0]["msg"]
                assert f"holds {name!r}" in msg and "outside the allowed roots" in msg
        # A link that stays inside the roots is fine.
        inside = root / "inside"
        shutil.copytree(root / "teacher", inside)
        (inside / "model.safetensors").unlink()
        (inside / "model.safetensors").symlink_to(root / "teacher" / "model.safetensors")
        assert client.post("/api/studies", json=tiny_spec(assets, teacher=str(inside))).status_code == 201
        assert [s["name"] for s in client.get("/api/studies").json()] == ["tiny"]


def test_a_worker_rechecks_model_folders_before_reading_them(sqlite_url: str, tmp_path: Path) -> None:
    from service.testing import SleepEngine
    from service.worker import Worker

    root, outside = tmp_path / "root", tmp_path / "outside"
    write_dataset(root / "data")
    write_tiny_model(outside / "teacher")
    assets = {"teacher": write_tiny_model(root / "teacher"), "data": root / "data"}
    swapped = write_tiny_model(root / "swapped")
    settings = Settings(database_url=sqlite_url, artifacts=tmp_path / "artifacts", allowed_roots=[root])
    with TestClient(create_app(settings)) as client:
        for name, teacher in (("swapped", swapped), ("healthy", assets["teacher"])):
            spec = tiny_spec(assets, name=name, teacher=str(teacher), n_trials=2,
                             search_space={"num_train_epochs": 1})
            assert client.post("/api/studies", json=spec).status_code == 201
        # After the API checked it, the folder's weights become a link out of the roots.
        (swapped / "model.safetensors").unlink()
        (swapped / "model.safetensors").symlink_to(outside / "teacher" / "model.safetensors")
        Worker(settings, device="cpu", trial_engine=SleepEngine(), exit_when_idle=True).run()
        failed, healthy = (client.get(f"/api/studies/{name}").json() for name in ("swapped", "healthy"))
    assert failed["status"] == "failed", failed
    assert "teacher:" in failed["error"] and "holds 'model.safetensors'" in failed["error"]
    assert "outside the allowed roots" in failed["error"]
    assert failed["counts"]["complete"] == 0
    assert healthy["status"] == "finished" and healthy["counts"]["complete"] == 2, healthy


def test_submit_of_a_spec_file_with_nan_names_the_field(sqlite_url: str, tmp_path: Path, tiny_assets,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    from service.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(tiny_spec(tiny_assets, name="nan-file", search_space={"alpha": "@"})).replace(
        '"@"', "NaN"))
    with client_for(sqlite_url, tmp_path) as client:
        def through_app(method: str, url: str, *, timeout: float, **kwargs):  # type: ignore[no-untyped-def]
            return client.request(method, url, **kwargs)  # `kdsearch submit` talks to this app

        monkeypatch.setattr(httpx, "request", through_app)
        with pytest.raises(SystemExit) as exited:
            main(["submit", str(path), "--url", "http://testserver"])
        assert exited.value.code == 1
        assert "422: search_space.alpha.value: Input should be a finite number" in capsys.readouterr().err
        assert client.get("/api/studies").json() == []

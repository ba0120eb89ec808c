"""Untrusted input, one test per rule, through the real API; bad data found by a worker; start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kdsearch.testing import KDSEARCH, Stack, free_port, tiny_spec, write_dataset, write_tiny_model
from service.api import create_app
from service.settings import Settings
from tests.conftest import queue_unchecked


def client_for(tmp_path: Path, **settings) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'kd.db'}",
                                          artifacts=tmp_path / "artifacts", **settings)))


def fields(response) -> list[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.text
    return [".".join(str(p) for p in e["loc"][1:]) for e in response.json()["detail"]]


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    with client_for(tmp_path) as c:
        yield c


# -- access -----------------------------------------------------------------------------------------------------


def test_reads_need_the_token_unless_public(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    bearer = {"Authorization": "Bearer t0ken"}
    with client_for(tmp_path, api_token="t0ken") as c:
        assert c.get("/api/studies").status_code == 401
        assert c.get("/api/workers").status_code == 401
        assert c.get("/api/studies", headers=bearer).status_code == 200
        assert c.get("/api/health").status_code == 200, "liveness stays open"
    with client_for(tmp_path, api_token="t0ken", public_read=True) as c:
        assert c.get("/api/studies").status_code == 200
        assert c.post("/api/studies", json=tiny_spec(tiny_assets)).status_code == 401, "writes still need it"
        assert c.post("/api/studies", json=tiny_spec(tiny_assets), headers=bearer).status_code == 201


def test_serve_without_token_binds_loopback_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "KDSEARCH_DATABASE_URL": f"sqlite:///{tmp_path / 'kd.db'}"}
    env.pop("KDSEARCH_API_TOKEN", None)
    # Beyond loopback without a token: refused, unless asked for by name.
    refused = subprocess.run([*KDSEARCH, "serve", "--port", str(free_port()), "--host", "0.0.0.0"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs KDSEARCH_API_TOKEN" in refused.stderr, refused.stderr
    for host_args, expected in (([], "loopback only"), (["--host", "::1"], "loopback only"),
                                (["--host", "0.0.0.0", "--allow-no-token"], "anyone who reaches it")):
        proc = subprocess.Popen([*KDSEARCH, "serve", "--port", str(free_port()), *host_args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = ""
            while "serving" not in line:
                line = proc.stdout.readline()
                assert line, "server exited"
                if expected in line:
                    break
            else:
                pytest.fail(f"no notice {expected!r}")
        finally:
            proc.terminate()
            proc.wait(timeout=20)


# -- untrusted paths and ids ------------------------------------------------------------------------------------


def test_paths_outside_allowed_roots_are_refused(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    teacher = write_tiny_model(root / "teacher")
    write_dataset(root / "data")
    write_tiny_model(outside / "teacher")
    write_dataset(outside / "data")
    (root / "link-teacher").symlink_to(outside / "teacher")
    (root / "data-link").mkdir()
    (root / "data-link" / "train.tsv").symlink_to(outside / "data" / "train.tsv")
    (root / "data-link" / "validation.tsv").symlink_to(outside / "data" / "validation.tsv")
    with client_for(tmp_path, allowed_roots=[root]) as c:
        ok = tiny_spec({"teacher": teacher, "data": root / "data"})
        assert c.post("/api/studies", json=ok).status_code == 201
        post = lambda **kw: c.post("/api/studies", json={**ok, "name": "x", **kw})  # noqa: E731
        assert "teacher" in fields(post(teacher=str(root / ".." / "outside" / "teacher")))  # .. escape
        assert "teacher" in fields(post(teacher=str(root / "link-teacher")))  # symlink out of the roots
        assert "teacher" in fields(post(teacher="/etc"))  # absolute path elsewhere
        assert "dataset.path" in fields(post(dataset={"path": str(outside / "data")}))
        assert "dataset.train_split" in fields(post(dataset={"path": str(root / "data-link")}))
        assert "outside the allowed roots" in post(teacher="/etc").json()["detail"][0]["msg"]


@pytest.mark.parametrize("ref", ["not a hub id", "owner/name/extra", "owner/", "-bad/name", "owner/name@", "a" * 2000])
def test_malformed_hub_ids_are_refused(client: TestClient, tiny_assets, ref: str) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/studies", json=tiny_spec(tiny_assets, teacher=ref))
    assert "teacher" in fields(response)


def test_hub_ids_with_revision_are_queued_unchecked(client: TestClient, tiny_assets,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # a server online (offline: 422)
    spec = tiny_spec(tiny_assets, teacher="textattack/bert-base-uncased-SST-2@main",
                     student={"model": "google/bert_uncased_L-2_H-128_A-2"})
    response = client.post("/api/studies", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["teacher"] == "textattack/bert-base-uncased-SST-2@main"


# -- limits -----------------------------------------------------------------------------------------------------


def test_caps_from_settings(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with client_for(tmp_path, max_n_trials=50, max_timeout_s=3600, max_seq_length=64, max_batch_size=256) as c:
        post = lambda **kw: c.post("/api/studies", json=tiny_spec(tiny_assets, **kw))  # noqa: E731
        assert "n_trials" in fields(post(n_trials=51))
        assert "timeout_s" in fields(post(timeout_s=7200))
        assert "dataset.max_seq_length" in fields(post(dataset={"path": str(tiny_assets["data"]),
                                                                "max_seq_length": 128}))
        assert "search_space.batch_size" in fields(post(search_space={"batch_size": {"choices": [64, 512]}}))
        # Pre-distillation's own length cap applies when it runs (its default, 128, is no fault of a study without).
        assert "predistill.max_seq_length" in fields(post(search_space={"predistilled": 1}))
        assert post(name="pd", search_space={"predistilled": 1}, predistill={"max_seq_length": 64}).status_code == 201
        assert post(n_trials=50, timeout_s=3600).status_code == 201
    # Each cap is defined once, in the settings: raising one there is all it takes.
    (tmp_path / "more").mkdir()
    with client_for(tmp_path / "more", max_n_trials=20_000, max_augment_copies=200) as c:
        post = lambda **kw: c.post("/api/studies", json=tiny_spec(tiny_assets, **kw))  # noqa: E731
        assert post(name="many", n_trials=20_000, augment={"copies": 150}).status_code == 201
        assert "augment.copies" in fields(post(name="more", augment={"copies": 201}))


def test_body_size_limit(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with client_for(tmp_path, max_body_bytes=4096) as c:
        big = tiny_spec(tiny_assets, name="big")
        big["search_space"]["alpha"] = {"choices": [0.5] * 2000}
        assert c.post("/api/studies", json=big).status_code == 413
        # Streamed (chunked, no Content-Length): still 413, and nothing of it stored.
        body = json.dumps({**big, "name": "streamed"}).encode()
        chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
        streamed = c.post("/api/studies", content=chunks, headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and "over 4096 bytes" in streamed.json()["detail"]
        assert c.get("/api/studies").json() == []
        small = json.dumps(tiny_spec(tiny_assets)).encode()
        ok = c.post("/api/studies", content=(small[i : i + 100] for i in range(0, len(small), 100)),
                    headers={"Content-Type": "application/json"})
        assert ok.status_code == 201, ok.text


def test_export_refuses_to_overwrite_a_file(tmp_path: Path) -> None:
    from distill.hub_model import ExportError, write_export

    target = tmp_path / "model"
    target.write_text("not a directory")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ExportError, match="not a directory"):
        write_export(tmp_path / "ckpt", target, "card")
    assert target.read_text() == "not a directory"


# -- bad data found by a worker -----------------------------------------------------------------------------------


def test_worker_marks_bad_studies_failed_and_keeps_serving(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    labels = write_dataset(tmp_path / "labels")
    (labels / "train.tsv").write_text((labels / "train.tsv").read_text() + "a good film\t7\n")
    empty = write_dataset(tmp_path / "empty")
    (empty / "train.tsv").write_text("sentence\tlabel\n")
    broken = {
        "labels": (tiny_spec(tiny_assets, name="labels", dataset={"path": str(labels)}),
                   "row 161 of split 'train', column 'label': a class id outside the teacher's 0..1"),
        "empty": (tiny_spec(tiny_assets, name="empty", dataset={"path": str(empty)}), "is empty"),
        "not-classifier": (tiny_spec(tiny_assets, name="not-classifier",
                                     teacher=str(write_tiny_model(tmp_path / "base", classifier=False))),
                           "not a sequence classifier"),
        "label-count": (tiny_spec(tiny_assets, name="label-count",
                                  student={"model": str(write_tiny_model(tmp_path / "three", num_labels=3))}),
                        "label counts differ"),
    }
    stack = Stack(sqlite_url, tmp_path)
    try:
        stack.start_api()
        for spec, _ in broken.values():  # as if changed after submit: the API refuses bad data (test_submit_checks)
            queue_unchecked(stack.env["KDSEARCH_DATABASE_URL"], {**spec, "priority": 5})
        stack.submit(tiny_spec(tiny_assets, name="healthy", n_trials=2))
        stack.start_worker()
        for name, (_, reason) in broken.items():
            study = stack.wait_status(name)
            assert study["status"] == "failed" and reason in study["error"], study
        assert stack.wait_status("healthy")["status"] == "finished"
        assert stack.workers[0].poll() is None
    finally:
        stack.stop()


# -- start-up ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["not-a-url", "postgresql+psycopg://nobody@127.0.0.1:1/none", "nosuchdb://x"])
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker", "--device", "cpu"]])
def test_bad_database_is_one_line_at_startup(url: str, command: list[str]) -> None:
    result = subprocess.run([*KDSEARCH, *command], env={**os.environ, "KDSEARCH_DATABASE_URL": url},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "database" in result.stderr



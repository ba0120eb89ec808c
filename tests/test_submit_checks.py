"""Mistakes caught at submit, where the user makes them: columns, split files and labels (a 422 naming the field,
never quoting a cell), relative paths, a hub teacher on an offline server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.conftest import pair_spec, tiny_spec


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=db_url, artifacts=tmp_path / "artifacts"))) as c:
        yield c


def refused(response) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The field a 422 names and its message."""
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    return ".".join(str(p) for p in error["loc"][1:]), error["msg"]


def _copy_data(source: Path, target: Path, **replace_line: str) -> Path:
    """A copy of a dataset directory; ``replace_line`` maps ``split:line_no`` (1: the header) to a new line."""
    shutil.copytree(source, target)
    for where, line in replace_line.items():
        split, number = where.split(":")
        path = target / f"{split}.tsv"
        lines = path.read_text().splitlines()
        lines[int(number) - 1] = line
        path.write_text("\n".join(lines) + "\n")
    return target


def test_data_mistakes_are_422_naming_the_field(client: TestClient, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tiny_assets["data"]

    def post(dataset: dict, name: str = "checked") -> tuple[str, str]:  # type: ignore[type-arg]
        return refused(client.post("/api/studies", json=tiny_spec(tiny_assets, name=name, dataset=dataset)))

    field, message = post({"path": str(data), "text_column": "sentense"})
    assert field == "dataset.text_column" and "train.tsv has no column 'sentense'" in message
    # A near-spelling is offered; the file's columns are not listed (a headerless file's first row is data).
    assert "did you mean 'sentence'?" in message and "label" not in message
    field, _ = post({"path": str(data), "text_pair_column": "sentence2"})
    assert field == "dataset.text_pair_column"
    field, _ = post({"path": str(data), "label_column": "labels"})
    assert field == "dataset.label_column"

    no_eval_label = _copy_data(data, tmp_path / "renamed", **{"validation:1": "sentence\tgold"})
    field, message = post({"path": str(no_eval_label)})
    assert field == "dataset.label_column" and "validation.tsv has no column 'label'" in message

    empty = _copy_data(data, tmp_path / "empty")
    (empty / "train.tsv").write_text("sentence\tlabel\n")
    field, message = post({"path": str(empty)})
    assert field == "dataset.train_split" and "train.tsv has no rows" in message

    ragged = _copy_data(data, tmp_path / "ragged", **{"train:3": "a good film\t1\textra"})
    field, message = post({"path": str(ragged)})
    assert field == "dataset.train_split" and "cannot read train.tsv" in message and "extra" not in message

    for line, kind in (("a good film\tposit1ve", "not one of the teacher's 2 classes (negative, positive) by name"),
                       ("a good film\t0.75", "a fraction"),
                       ("a good film\t7", "outside 0..1"),
                       ("a good film\t", "empty")):
        bad = _copy_data(data, tmp_path / f"bad-{len(list(tmp_path.iterdir()))}", **{"validation:5": line})
        field, message = post({"path": str(bad)})
        assert field == "dataset.label_column", message
        assert "row 4 of validation.tsv, column 'label'" in message and kind in message, message
        assert "posit1ve" not in message and "0.75" not in message and "good film" not in message, \
            "no cell value is quoted"

    assert client.get("/api/studies").json() == [], "nothing was queued"
    named = _copy_data(data, tmp_path / "named", **{"train:2": "a good film\tPositive"})  # a name, any case
    assert client.post("/api/studies", json=tiny_spec(tiny_assets, dataset={"path": str(named)})).status_code == 201


def test_pair_and_regression_labels_are_checked(client: TestClient, pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/api/studies", json=pair_spec(pair_assets, "nli", name="nli")).status_code == 201
    assert client.post("/api/studies", json=pair_spec(pair_assets, "sts", name="sts")).status_code == 201

    field, message = refused(client.post("/api/studies", json=pair_spec(
        pair_assets, "nli", name="nli-typo", dataset={"path": str(pair_assets["nli_data"]), "text_column": "sentence1",
                                                        "text_pair_column": "sentence_2"})))
    assert field == "dataset.text_pair_column" and "no column 'sentence_2'" in message

    # NLI data (label names) under the regression teacher: not numbers.
    wrong_teacher = pair_spec(pair_assets, "nli", name="wrong", teacher=str(pair_assets["sts_teacher"]))
    field, message = refused(client.post("/api/studies", json=wrong_teacher))
    assert field == "dataset.label_column" and "row 1 of train.tsv" in message
    assert "not a number, and the teacher is a regression model" in message
    assert not any(label in message for label in ("entailment", "contradiction")), "no cell value is quoted"


def test_hub_teacher_on_an_offline_server_is_422(client: TestClient, tiny_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    field, message = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, teacher="owner/teacher@v1")))
    assert field == "teacher" and "this host is offline (HF_HUB_OFFLINE=1)" in message
    assert "hf download owner/teacher" in message
    field, _ = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, student={"model": "owner/student"})))
    assert field == "student.model"

    # A hub model already in the server's cache loads offline: queued.
    snapshot = tmp_path / "hub" / "models--owner--teacher" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "v1").write_text("a" * 40)
    cached = client.post("/api/studies", json=tiny_spec(tiny_assets, teacher="owner/teacher@v1"))
    assert cached.status_code == 201, cached.text

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # online: left to the workers
    online = client.post("/api/studies", json=tiny_spec(tiny_assets, name="online", teacher="owner/other"))
    assert online.status_code == 201, online.text


def test_a_path_not_found_names_the_directory_it_was_resolved_from(client: TestClient, tiny_assets,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    cwd = Path.cwd()
    field, message = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, teacher="../shared/no-teacher")))
    assert field == "teacher" and f"resolved from the server's working directory {cwd}" in message
    assert "outside the allowed roots" in message
    missing = os.path.relpath(tmp_path / "no-teacher", cwd)  # relative, inside the allowed roots
    field, message = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, teacher=missing)))
    assert field == "teacher" and f"no directory at {tmp_path / 'no-teacher'}" in message
    assert f"resolved from the server's working directory {cwd}" in message
    missing = os.path.relpath(tmp_path / "no-data", cwd)
    field, message = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, dataset={"path": missing})))
    assert field == "dataset.path" and f"server's working directory {cwd}" in message
    _, message = refused(client.post("/api/studies", json=tiny_spec(tiny_assets, teacher=str(tmp_path / "none"))))
    assert "working directory" not in message, "an absolute path needs no explanation"


def test_a_worker_fails_an_offline_hub_teacher_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on an offline host (the API may be online) gets a study fault, which fails the study at once,
    instead of an OSError, which it retries as a preparation fault for minutes."""
    from distill.models import load_config
    from kdsearch.errors import Fault, fault_of
    from search_space import SpecError

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SpecError, match="this host is offline") as raised:
        load_config("owner/teacher")
    assert fault_of(raised.value) is Fault.USER and raised.value.field == "teacher"

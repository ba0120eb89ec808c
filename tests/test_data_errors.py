"""Errors about a study's data say where a bad value is (row, split, column) and what kind of problem it is, never
the value itself: they reach the API, the dashboard and webhooks, readable without a token under public read, and
a file under the allowed roots may hold anything (issue 26, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from kdsearch.testing import tiny_spec
from service.api import create_app
from service.notifier import Notifier
from service.settings import Settings
from service.worker import Worker
from storage import NotificationRow, session_scope
from tests.conftest import queue_unchecked

SECRET = "hunter2-Zq9xSECRET"


def _split_files(directory: Path, ext: str, lines: list[str]) -> Path:
    directory.mkdir(parents=True)
    for split in ("train", "validation"):
        (directory / f"{split}.{ext}").write_text("".join(line + "\n" for line in lines))
    return directory


def test_a_secret_in_a_data_file_never_reaches_the_study_error_or_the_webhook(sqlite_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                              tiny_assets) -> None:
    cases = {
        # A column of secrets named as the label column: a value the teacher does not know, on the third data row.
        "password-labels": (
            _split_files(tmp_path / "passwords", "csv",
                         ["sentence,password", "a fine film,1", "a dull film,0", f"a film,{SECRET}"]),
            {"label_column": "password"},
            "row 3 of split 'train', column 'password': not one of the teacher's labels (negative, positive), "
            "nor a class id"),
        # Regression-style numbers in a classification study, secret digits in one of them.
        "float-label": (
            _split_files(tmp_path / "floats", "tsv", ["sentence\tlabel", "a fine film\t1", "a film\t0.4471123"]),
            {}, "row 2 of split 'train', column 'label': a float label in a classification study"),
        # A headerless file: its first row's cells become the column names, so they are not listed either.
        "headerless": (
            _split_files(tmp_path / "headerless", "tsv", [f"a fine film\t{SECRET}", "a dull film\t0"]),
            {}, "split 'train' has no column 'sentence' (it has 2 columns"),
    }
    settings = Settings(database_url=sqlite_url, artifacts=tmp_path / "artifacts",
                        webhook_allowed_hosts=["http://127.0.0.1:9"])
    with TestClient(create_app(settings)) as client:
        for name, (directory, dataset, _) in cases.items():
            spec = tiny_spec(tiny_assets, name=name, dataset={"path": str(directory), "max_seq_length": 16, **dataset},
                             notify={"webhook": "http://127.0.0.1:9/hook", "events": ["failed"]})
            # Caught at submit (the server samples the files): a 422 naming the field, and no cell value in it.
            refused = client.post("/api/studies", json=spec)
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][1] == "dataset", refused.text
            assert SECRET not in refused.text and "4471123" not in refused.text, refused.text
            # Past the submit check (the files changed after it): the worker's own check fails the study.
            queue_unchecked(sqlite_url, spec)
        Worker(settings, device="cpu", exit_when_idle=True).run()
        studies = {name: client.get(f"/api/studies/{name}").json() for name in cases}
        listed = client.get("/api/studies").text
    notifier = Notifier(client.app.state.db, settings)  # type: ignore[attr-defined]
    with session_scope(notifier.db) as session:
        rows = list(session.scalars(select(NotificationRow)).all())
        payloads = {payload["study"]: payload for payload in (notifier.payload(row) for row in rows)}
    for name, (_, _, reason) in cases.items():
        study = studies[name]
        assert study["status"] == "failed" and reason in study["error"], study
        assert payloads[name]["event"] == "failed" and reason in payloads[name]["error"]
    everything = json.dumps([studies, payloads]) + listed
    assert SECRET not in everything and "4471123" not in everything


def test_a_file_that_does_not_parse_is_named_by_kind_and_place(tmp_path: Path) -> None:
    from distill.data import DataError, load_split
    from search_space import DatasetSpec

    directory = _split_files(tmp_path / "ragged", "csv", ["sentence,label", "a fine film,1", f"a film,0,{SECRET}"])
    with pytest.raises(DataError) as raised:
        load_split(DatasetSpec(path=str(directory)), "train")
    assert str(raised.value) == ("cannot read split 'train': the file does not parse (ParserError; the parser stopped "
                                 "at its line 3)")

"""Schema versions: Alembic owns the kd_* tables; upgrades keep data; mismatched processes refuse to start; database
errors that are not outages surface instead of looping."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from kdsearch.testing import KDSEARCH, ROOT, Stack
from storage import (
    Base,
    SchemaMismatch,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    is_transient,
    latest_seed_spread,
    make_engine,
    session_scope,
    upgrade_schema,
)

RELEASE_DB = Path(__file__).parent / "fixtures" / "release-16cf43f.sqlite"
RELEASE_0002_DB = Path(__file__).parent / "fixtures" / "release-ed3f745.sqlite"  # the last release at 0002
SLEEP = {"KDSEARCH_ENGINE": "service.testing:SleepEngine", "KDSEARCH_TEST_EPOCH_S": "0.02",
         "KDSEARCH_POLL_INTERVAL": "0.1"}


def test_migrations_build_the_models_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(SchemaMismatch, match="has no kdsearch schema yet"):
            check_schema(engine)
        assert upgrade_schema(engine) == head_revision() == check_schema(engine)
        assert upgrade_schema(engine) == head_revision()  # idempotent
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diff if "kd_alembic_version" not in str(d)] == []
    finally:
        engine.dispose()


def test_a_release_database_upgrades_in_place(tmp_path: Path) -> None:
    """A database file built by the release before migrations (tests/fixtures/make_release_db.py): every row
    kept, readable through the API, and its queued study still runs."""
    db_file = tmp_path / "release.sqlite"
    shutil.copy(RELEASE_DB, db_file)
    url = f"sqlite:///{db_file}"
    stack = Stack(url, tmp_path, **SLEEP)
    current = subprocess.run([*KDSEARCH, "db", "current"], env=stack.env, capture_output=True, text=True, cwd=ROOT)
    assert current.returncode == 1 and f"this kdsearch: {head_revision()}" in current.stdout
    refused = subprocess.run([*KDSEARCH, "worker", "--device", "cpu", "--exit-when-idle"], env=stack.env,
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"kdsearch: error: worker not started: the database predates schema versions (this kdsearch needs revision "
        f"{head_revision()}): run `kdsearch db upgrade` or start `kdsearch serve`")
    try:
        stack.start_api()  # serve upgrades at start-up
        engine = make_engine(url)
        assert current_revision(engine) == head_revision()
        engine.dispose()
        studies = {s["name"]: s for s in httpx.get(f"{stack.url}/api/studies").json()}
        assert studies["legacy"]["status"] == "finished" and studies["legacy"]["counts"]["complete"] == 3
        assert studies["legacy-queued"]["status"] == "queued" and studies["legacy-queued"]["counts"]["waiting"] == 2
        detail = httpx.get(f"{stack.url}/api/studies/legacy").json()
        assert detail["seed_retrain"]["values"] == [0.75] and detail["best_trial"]["value"] > 0
        assert detail["teacher_metric"] == detail["teacher_metrics"]["accuracy"] == 0.9  # recorded as accuracy
        trials = httpx.get(f"{stack.url}/api/studies/legacy/trials").json()["trials"]
        assert len(trials) == 3 and all(t["epochs"][0]["metrics"]["accuracy"] == t["epochs"][0]["score"]
                                        for t in trials)
        stack.start_worker("--exit-when-idle")
        finished = stack.wait_status("legacy-queued")
        assert finished["status"] == "finished" and finished["counts"]["complete"] == 2
    finally:
        stack.stop()


@pytest.mark.postgres
def test_upgrade_from_the_baseline_keeps_rows(postgres_url: str) -> None:
    from alembic import command

    from storage import VERSION_TABLE
    from storage import alembic_config as _config

    engine = make_engine(postgres_url)
    try:
        config = _config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
            conn.execute(sa.text("INSERT INTO kd_studies (name, status, priority, n_trials, spec, created_at, "
                                 "updated_at) VALUES ('old', 'queued', 0, 1, '{}', now(), now())"))
            conn.execute(sa.text("INSERT INTO kd_trial_slots (study_id, slot_no, state, attempts) SELECT id, 0, "
                                 "'pending', 0 FROM kd_studies"))
        assert current_revision(engine) == "0001"
        with pytest.raises(SchemaMismatch, match=f"at revision 0001, this kdsearch needs {head_revision()}"):
            check_schema(engine)
        upgrade_schema(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM kd_studies")).scalars().all() == ["old"]
            assert conn.execute(sa.text("SELECT count(*) FROM kd_trial_slots")).scalar() == 1
            assert conn.execute(sa.text("SELECT count(*) FROM kd_preparations")).scalar() == 0
            assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == head_revision()
    finally:
        engine.dispose()


def test_a_0002_release_database_keeps_its_seed_scores(tmp_path: Path) -> None:
    """A database file built by the last release at revision 0002 (tests/fixtures/make_release_db.py): the upgrade
    renames kd_seed_runs.eval_accuracy to best_score (0003) in place, and the API still shows every value."""
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    db_file = tmp_path / "release.sqlite"
    shutil.copy(RELEASE_0002_DB, db_file)
    url = f"sqlite:///{db_file}"
    engine = make_engine(url)
    try:
        assert current_revision(engine) == "0002"
        with pytest.raises(SchemaMismatch, match=f"at revision 0002, this kdsearch needs {head_revision()}"):
            check_schema(engine)
        with TestClient(create_app(Settings(database_url=url, artifacts=tmp_path / "artifacts"))) as client:
            assert current_revision(engine) == head_revision()  # the API upgraded it at start-up
            detail = client.get("/api/studies/legacy").json()
            assert detail["status"] == "finished" and detail["counts"]["complete"] == 3
            assert detail["seed_retrain"]["values"] == [0.75] and detail["seed_retrain"]["metric"] == "accuracy"
            assert detail["best_trial"]["value"] == detail["best_value"] > 0
            assert client.get("/api/studies/legacy-queued").json()["counts"]["waiting"] == 2
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("kd_seed_runs")}
            assert "best_score" in columns and "eval_accuracy" not in columns
            assert conn.execute(sa.text("SELECT seed, best_score, best_epoch FROM kd_seed_runs")).all() == [
                (34, 0.75, 2)]
    finally:
        engine.dispose()


def test_upgrade_to_0003_keeps_seed_scores(db_url: str) -> None:
    """A database at 0002 with seed runs: 0003 renames the column in place on either backend, every value kept,
    and the schema is then exactly the models'."""
    from alembic import command

    engine = make_engine(db_url)
    try:
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0002")
            conn.execute(sa.text("INSERT INTO kd_studies (name, status, priority, n_trials, spec, created_at, "
                                 "updated_at) VALUES ('old', 'finished', 0, 1, '{}', CURRENT_TIMESTAMP, "
                                 "CURRENT_TIMESTAMP)"))
            for seed, score in ((1, 0.5), (2, 0.625), (3, 0.875)):
                conn.execute(sa.text("INSERT INTO kd_seed_runs (study_id, trial_number, seed, eval_accuracy, "
                                     "best_epoch, checkpoint_artifact_id, created_at) SELECT id, 4, :seed, :score, "
                                     "2, 'ckpt', CURRENT_TIMESTAMP FROM kd_studies"), {"seed": seed, "score": score})
        assert current_revision(engine) == "0002"
        assert upgrade_schema(engine) == head_revision() == check_schema(engine)
        with session_scope(engine) as session:
            study_id = session.scalar(sa.text("SELECT id FROM kd_studies"))
            spread = latest_seed_spread(session, study_id)
        assert spread is not None and spread.trial_number == 4
        assert spread.seeds == [1, 2, 3] and spread.values == [0.5, 0.625, 0.875]
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert [d for d in diff if "kd_alembic_version" not in str(d)] == []
            with pytest.raises(IntegrityError):  # the unique (study, trial, seed) constraint came through
                conn.execute(sa.text("INSERT INTO kd_seed_runs (study_id, trial_number, seed, best_score, "
                                     "best_epoch, checkpoint_artifact_id, created_at) SELECT id, 4, 1, 0.1, 1, 'x', "
                                     "CURRENT_TIMESTAMP FROM kd_studies"))
    finally:
        engine.dispose()


def test_newer_schemas_are_refused(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE kd_alembic_version SET version_num = '9999'"))
    engine.dispose()
    stack = Stack(db_url, tmp_path, **SLEEP)
    message = f"the database's kdsearch schema is at revision 9999, newer than this kdsearch's {head_revision()}"
    for command in (["worker", "--device", "cpu"], ["serve", "--port", "1"], ["db", "upgrade"]):
        done = subprocess.run([*KDSEARCH, *command], env=stack.env, capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert message in done.stderr.strip().splitlines()[-1], (command, done.stderr)


def test_a_non_transient_database_error_surfaces(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A schema the worker does not understand (a renamed column) stops it loudly, naming what it was doing."""
    from kdsearch.testing import tiny_spec

    stack = Stack(db_url, tmp_path, **SLEEP)
    try:
        stack.start_api()
        stack.submit(tiny_spec(tiny_assets, name="doomed"))
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE kd_trial_slots RENAME COLUMN attempts TO attempts_renamed"))
        engine.dispose()
        started = time.monotonic()
        worker = stack.start_worker()
        assert worker.wait(timeout=120) == 1
        assert time.monotonic() - started < 60  # stopped, not retried with backoff
        log = stack.worker_logs()
        assert "claiming a trial slot:" in log and "attempts" in log
        assert "retrying in" not in log
    finally:
        stack.stop()


def test_only_connection_errors_are_outages() -> None:
    import sqlite3

    import psycopg
    from optuna.exceptions import StorageInternalError

    locked = OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
    missing = OperationalError("SELECT", {}, sqlite3.OperationalError("no such column: attempts"))
    dropped = OperationalError("SELECT", {}, psycopg.OperationalError("server closed the connection"))
    assert is_transient(locked) and is_transient(dropped) and not is_transient(missing)
    assert is_transient(InterfaceError("SELECT", {}, psycopg.InterfaceError("connection already closed")))
    assert not is_transient(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))
    wrapped = StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = missing
    assert not is_transient(wrapped)
    wrapped.__cause__ = dropped
    assert is_transient(wrapped)

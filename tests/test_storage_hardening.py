"""Storage hardening (issue 26): poisoned S3 manifests, two processes initialising one database at once, and the
progress row of a worker killed while preparing."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from storage import ENTRY_META, ENTRY_TENSORS, ObjectStoreLayout

REPO = Path(__file__).resolve().parents[1]
BUCKET = "kdsearch-hardening"
KEY = "teacher-logits-0123abcd"


@pytest.fixture
def s3_client() -> Iterator[Any]:
    """An in-process moto S3 with the test bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _layout(client: Any, local_cache: Path, signing_key: str | None = None) -> ObjectStoreLayout:
    return ObjectStoreLayout(f"s3://{BUCKET}/team", local_cache, client=client,
                             signing_key=SecretStr(signing_key) if signing_key else None)


def _object_key(name: str) -> str:
    return f"team/cache/{KEY}/{name}"


def _put_entry(client: Any, files: dict[str, bytes], manifest_extra: dict[str, Any] | None = None) -> None:
    """Write an entry into the bucket as someone with write access to it would: the files under whatever names,
    and a manifest whose checksums match them."""
    for name, body in files.items():
        client.put_object(Bucket=BUCKET, Key=_object_key(name), Body=body)
    manifest = {"key": KEY, "files": {name: {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                                      for name, body in files.items()}, **(manifest_extra or {})}
    client.put_object(Bucket=BUCKET, Key=_object_key("manifest.json"), Body=json.dumps(manifest).encode())


def _manifest_in_bucket(client: Any) -> bool:
    return "Contents" in client.list_objects_v2(Bucket=BUCKET, Prefix=_object_key("manifest.json"))


def _built_entry(layout: ObjectStoreLayout, tensors: bytes = b"tensors", meta: bytes = b'{"rows": 3}') -> Path:
    built = layout.scratch_dir(KEY)  # where distill.cache.build_once builds an entry
    (built / ENTRY_TENSORS).write_bytes(tensors)
    (built / ENTRY_META).write_bytes(meta)
    return built


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "unexpected"])
def test_a_poisoned_manifest_writes_nothing_outside_and_is_dropped(s3_client: Any, tmp_path: Path, escape: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    local_cache = tmp_path / "cache"
    outside = tmp_path / "site-packages"
    outside.mkdir()
    layout = _layout(s3_client, local_cache)
    download_dir = layout.cache_dir(KEY).parent
    payload = b"import os; os.system('touch /tmp/pwned')\n"
    if escape == "absolute":
        name, landing = str(outside / "sitecustomize.py"), outside / "sitecustomize.py"
    elif escape == "dotdot":
        depth = len(download_dir.relative_to(tmp_path).parts) + 1  # up from the temporary download folder
        name, landing = "../" * depth + "site-packages/evil.pth", outside / "evil.pth"
    else:  # a plain name, but not one a cache entry ever holds
        name, landing = "sitecustomize.py", None
    _put_entry(s3_client, {ENTRY_TENSORS: b"tensors", ENTRY_META: b"{}", name: payload})

    with caplog.at_level(logging.WARNING, logger="kdsearch.artifacts"):
        assert layout.fetch_entry(KEY) is None

    if landing is not None:
        assert not landing.exists()
    assert sorted(p.name for p in outside.iterdir()) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == payload]
    assert written == []
    assert not layout.cache_dir(KEY).exists()
    # Treated as a corrupt entry: the manifest is gone from the bucket (so it is rebuilt), and the refusal logged.
    assert not _manifest_in_bucket(s3_client)
    assert any(KEY in r.getMessage() and "refusing its manifest" in r.getMessage() for r in caplog.records)


def test_a_poisoned_local_copy_is_not_trusted(s3_client: Any, tmp_path: Path) -> None:
    """The local read-through copy's manifest is checked like the bucket's: one naming a file outside its folder
    does not make the entry complete."""
    layout = _layout(s3_client, tmp_path / "cache")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 7)
    directory = layout.cache_dir(KEY)
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps(
        {"key": KEY, "files": {"../../../../outside.bin": {"size": 7, "sha256": "0" * 64}}}))
    assert layout.fetch_entry(KEY) is None


def test_an_entry_round_trips_between_hosts(s3_client: Any, tmp_path: Path) -> None:
    writer = _layout(s3_client, tmp_path / "host-a")
    writer.publish_entry(KEY, _built_entry(writer))
    reader = _layout(s3_client, tmp_path / "host-b")
    directory = reader.fetch_entry(KEY)
    assert directory is not None
    assert (directory / ENTRY_TENSORS).read_bytes() == b"tensors"
    assert reader.fetch_entry(KEY) == directory  # the local copy is complete now


def test_a_signed_store_accepts_its_own_manifests_and_refuses_others(s3_client: Any, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    writer = _layout(s3_client, tmp_path / "host-a", signing_key="s3cret")
    writer.publish_entry(KEY, _built_entry(writer))
    signed = json.loads(s3_client.get_object(Bucket=BUCKET, Key=_object_key("manifest.json"))["Body"].read())
    assert isinstance(signed["signature"], str)

    # Another host holding the key reads it.
    directory = _layout(s3_client, tmp_path / "host-b", signing_key="s3cret").fetch_entry(KEY)
    assert directory is not None
    assert (directory / ENTRY_TENSORS).read_bytes() == b"tensors"

    # A bucket writer without the key: replaced tensors with matching checksums, unsigned, is refused.
    _put_entry(s3_client, {ENTRY_TENSORS: b"poisoned", ENTRY_META: b"{}"})
    with caplog.at_level(logging.WARNING, logger="kdsearch.artifacts"):
        assert _layout(s3_client, tmp_path / "host-c", signing_key="s3cret").fetch_entry(KEY) is None
    assert any("not signed" in r.getMessage() for r in caplog.records)
    assert not _manifest_in_bucket(s3_client)

    # ... and so is the same with the old signature kept (it signs other checksums), or one made with another key.
    _put_entry(s3_client, {ENTRY_TENSORS: b"poisoned", ENTRY_META: b"{}"}, {"signature": signed["signature"]})
    assert _layout(s3_client, tmp_path / "host-d", signing_key="s3cret").fetch_entry(KEY) is None
    other_writer = _layout(s3_client, tmp_path / "host-e", signing_key="other key")
    other_writer.publish_entry(KEY, _built_entry(other_writer, tensors=b"poisoned"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdsearch.artifacts"):
        assert _layout(s3_client, tmp_path / "host-f", signing_key="s3cret").fetch_entry(KEY) is None
    assert any("signature does not match" in r.getMessage() for r in caplog.records)

    # A signed manifest copied to another key is refused too (the key is part of what is signed).
    writer.publish_entry(KEY, _built_entry(writer))
    other = "teacher-logits-ffff0000"
    for name in (ENTRY_TENSORS, ENTRY_META, "manifest.json"):
        s3_client.copy_object(Bucket=BUCKET, Key=f"team/cache/{other}/{name}",
                              CopySource={"Bucket": BUCKET, "Key": _object_key(name)})
    assert _layout(s3_client, tmp_path / "host-h", signing_key="s3cret").fetch_entry(other) is None
    # Host b's local copy, signed with the key, is still good.
    assert _layout(s3_client, tmp_path / "host-b", signing_key="s3cret").fetch_entry(KEY) == directory


def test_a_reaped_workers_preparation_no_longer_shows(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A worker killed while preparing leaves its progress row behind; once its slot is reaped, the API no longer
    shows the study as preparing (it showed "preparing, ETA 0" forever). Another worker's progress stays."""
    from fastapi.testclient import TestClient

    from kdsearch.testing import tiny_spec
    from search_space import StudySpec
    from service.api import create_app
    from service.settings import Settings
    from storage import claim_slot, create_study, make_engine, reap_stale_slots, report_progress, utcnow

    with TestClient(create_app(Settings(database_url=db_url, artifacts=str(tmp_path / "artifacts")))) as client:
        db = make_engine(db_url)
        try:
            def spec(name: str) -> dict[str, Any]:  # a real study's spec: the study detail reads it
                return StudySpec.model_validate(tiny_spec(tiny_assets, name=name)).model_dump(mode="json")

            killed = create_study(db, name="killed-while-preparing", spec=spec("killed-while-preparing"),
                                  n_trials=1, priority=0, timeout_s=None)
            alive = create_study(db, name="still-preparing", spec=spec("still-preparing"), n_trials=1,
                                 priority=0, timeout_s=None)
            an_hour_ago = utcnow() - timedelta(hours=1)
            claim = claim_slot(db, "dead-worker", now=an_hour_ago)
            assert claim is not None and claim.study_id == killed.id
            report_progress(db, killed.id, "dead-worker", "teacher_logits", 100, 4000, 50.0, now=an_hour_ago)
            other = claim_slot(db, "live-worker")
            assert other is not None and other.study_id == alive.id
            report_progress(db, alive.id, "live-worker", "teacher_logits", 10, 4000, 5.0)

            before = client.get(f"/api/studies/{killed.id}").json()
            # The dead worker's last report, an hour old (its rows and ETA as of then).
            assert before["preparing"] is not None and before["preparing"]["age_s"] >= 3600

            reaped = reap_stale_slots(db, grace_period_s=60, reaper_id="reaper")
            assert [slot_id for slot_id, _, _ in reaped] == [claim.slot_id]

            assert client.get(f"/api/studies/{killed.id}").json()["preparing"] is None
            listed = {study["id"]: study for study in client.get("/api/studies").json()}
            assert listed[killed.id]["preparing"] is None
            assert listed[alive.id]["preparing"]["done"] == 10
        finally:
            db.dispose()


# One process starting against a fresh database: a server (``kdsearch serve``: upgrade, then open Optuna's store) or
# a worker started beside it (waits for the server's schema, as a restarted worker would, then opens Optuna's store).
# Every process signals it is ready and waits for "go", so all of them initialise at the same moment.
_START_TOGETHER = """
import sys, time
from pathlib import Path
from storage import SchemaMismatch, check_schema, init_db, make_engine, make_optuna_storage

url, role, barrier, me = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
(barrier / f"ready-{me}").touch()
while not (barrier / "go").exists():
    time.sleep(0.005)
engine = make_engine(url)
if role == "serve":
    init_db(engine)
else:
    while True:
        try:
            check_schema(engine)
            break
        except SchemaMismatch:
            time.sleep(0.01)
make_optuna_storage(url).engine.dispose()
engine.dispose()
print(role, "initialised")
"""


def test_servers_and_a_worker_starting_at_once_all_initialise(db_url: str, tmp_path: Path) -> None:
    """Three servers and a worker on one fresh database, at once: all start (on PostgreSQL two servers raced to
    CREATE TYPE studydirection, on SQLite the upgrade failed with "database is locked"), and each schema is at its
    head exactly once."""
    import sqlalchemy as sa

    from storage import current_revision, head_revision, make_engine

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    roles = ["serve", "serve", "serve", "worker"]
    procs = [subprocess.Popen([sys.executable, "-c", _START_TOGETHER, db_url, role, str(barrier), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, role in enumerate(roles)]
    try:
        while len(list(barrier.glob("ready-*"))) < len(roles) and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        (barrier / "go").touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for role, proc, output in zip(roles, procs, outputs, strict=True):
        assert proc.returncode == 0, f"a {role} failed to start:\n{output[-3000:]}"

    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM kd_alembic_version")) == 1
            assert conn.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1  # Optuna's own
            assert conn.scalar(sa.text("SELECT count(*) FROM version_info")) == 1
    finally:
        engine.dispose()

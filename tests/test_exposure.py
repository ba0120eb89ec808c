"""What the server shows and whom it answers: no secret in the API, the logs or CLI errors; no request from another
site or for another host name; user text printed as text, never as markup."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import make_url

from kdsearch.testing import KDSEARCH, ROOT, Stack, tiny_spec
from service.api import create_app
from service.api.main import trusted_host_names
from service.cli import main
from service.notifier import Notifier
from service.redaction import mask_database_url, redact_webhook_url, scrub_database_error
from service.settings import Settings
from storage import (
    create_study,
    enqueue_event,
    fail_study,
    get_study,
    init_db,
    make_engine,
    make_optuna_storage,
    notifications,
    session_scope,
)
from tests.test_notify import Receiver

TOKEN_HOOK = "https://alice:hunter2@hooks.example.com/kd/hook?token=s3cret&x=1#frag"
SECRETS = ("hunter2", "s3cret", "frag")


def test_redaction_helpers() -> None:
    assert redact_webhook_url(TOKEN_HOOK) == "https://***@hooks.example.com/kd/hook?***#***"
    assert redact_webhook_url("http://127.0.0.1:8080/h") == "http://127.0.0.1:8080/h"
    assert redact_webhook_url("http://[::1]:9/h?k=v") == "http://[::1]:9/h?***"
    assert redact_webhook_url("http://host:notaport/x?k=v") == "***"
    pg = "postgresql+psycopg://kd:p%40ss-w0rd@db.internal:5432/kd"
    assert mask_database_url(pg) == "postgresql+psycopg://kd:***@db.internal:5432/kd"
    text = ("connection to 'postgresql://kd:p%40ss-w0rd@db.internal/kd' failed (host=db password=p@ss-w0rd); "
            "raw p@ss-w0rd")
    scrubbed = scrub_database_error(text, pg)
    assert "p@ss" not in scrubbed and "p%40ss" not in scrubbed and "w0rd" not in scrubbed
    assert "postgresql://kd:***@db.internal/kd" in scrubbed and "host=db" in scrubbed
    # Without the configured URL, URL and keyword forms are still masked.
    assert scrub_database_error("x postgres://u:pw@h/d password='a b' y") == "x postgres://u:***@h/d password=*** y"


def test_api_never_shows_a_webhook_token(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(database_url=db_url, artifacts=tmp_path / "a", webhook_allowed_hosts=["hooks.example.com"])
    with TestClient(create_app(settings)) as client:
        launched = client.post("/api/studies", json=tiny_spec(tiny_assets, name="hooked",
                                                               notify={"webhook": TOKEN_HOOK, "events": ["failed"]}))
        assert launched.status_code == 201, launched.text
        answers = [launched, client.get("/api/studies/hooked"), client.get(f"/api/studies/{launched.json()['id']}"),
                   client.get("/api/studies"), client.get("/api/studies/hooked/summary")]
        for answer in answers:
            assert answer.is_success, answer.text
            assert not any(secret in answer.text for secret in SECRETS), answer.text
        assert answers[1].json()["spec"]["notify"]["webhook"] == "https://***@hooks.example.com/kd/hook?***#***"
        cancelled = client.post("/api/studies/hooked/cancel", json={})
        assert cancelled.status_code == 200 and "hunter2" not in cancelled.text
    db = make_engine(db_url)
    try:
        with session_scope(db) as session:  # stored as given: the notifier delivers to the real URL
            row = get_study(session, "hooked")
            assert row is not None and row.spec["notify"]["webhook"] == TOKEN_HOOK
    finally:
        db.dispose()


def test_notifier_logs_no_webhook_token(tmp_path: Path, tiny_assets, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver([(500, {})])
    url = f"sqlite:///{tmp_path / 'db'}"
    db = make_engine(url)
    try:
        init_db(db)
        make_optuna_storage(url).engine.dispose()
        hook = f"http://alice:hunter2@127.0.0.1:{receiver.port}/h?token=s3cret"
        ids = {}
        for name, webhook in (("delivered", hook), ("not-allowed", "https://alice:hunter2@other.example/h?t=s3cret")):
            spec = tiny_spec(tiny_assets, name=name, notify={"webhook": webhook, "events": ["failed"]})
            ids[name] = create_study(db, name=name, spec=spec, n_trials=1, priority=0, timeout_s=None).id
            enqueue_event(db, ids[name], "failed", {"error": "test"})
        settings = Settings(database_url=url, artifacts=tmp_path / "a", webhook_max_attempts=2,
                            webhook_allowed_hosts=[f"http://127.0.0.1:{receiver.port}"], webhook_retry_delay=0.01)
        notifier = Notifier(db, settings)

        def settled() -> bool:
            with session_scope(db) as session:
                return all(n.state != "pending" for i in ids.values() for n in notifications(session, i))

        with caplog.at_level(logging.DEBUG):
            for _ in range(100):
                notifier.deliver_due()
                if settled():
                    break
                time.sleep(0.05)
        assert [r["answered"] for r in receiver.received] == [500, 200]
        assert receiver.received[0]["path"] == "/h?token=s3cret"  # delivered to the real URL
        with session_scope(db) as session:
            refused, = notifications(session, ids["not-allowed"])
            assert refused.state == "failed" and "s3cret" not in refused.last_error
            assert "https://***@other.example/h?***" in refused.last_error
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert f"HTTP Request: POST http://***@127.0.0.1:{receiver.port}/h?***" in logged  # httpx's own line
        assert "notified http://***@127.0.0.1" in logged and "webhook https://***@other.example/h?***" in logged
        assert not any(secret in logged for secret in SECRETS), logged
    finally:
        receiver.close()
        db.dispose()


def _export_best(database_url: str, study: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KDSEARCH_DATABASE_URL": database_url, "KDSEARCH_ARTIFACTS": str(out.parent / "a")}
    return subprocess.run([*KDSEARCH, "export-best", study, "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_export_best_never_prints_the_database_password(postgres_url: str, tmp_path: Path) -> None:
    password = "Sup3r-Secret-Pw"
    unreachable = f"postgresql+psycopg://kd:{password}@127.0.0.1:9/kd"  # nothing listens on port 9
    down = _export_best(unreachable, "any", tmp_path / "out1")
    assert down.returncode != 0 and "kd:***@127.0.0.1:9" in down.stderr, down.stderr
    assert password not in down.stdout + down.stderr, down.stderr
    # The real server (trust authentication accepts any password) with kdsearch's schema, and no such study.
    with_password = make_url(postgres_url).set(password=password).render_as_string(hide_password=False)
    db = make_engine(postgres_url)
    try:
        init_db(db)
    finally:
        db.dispose()
    missing = _export_best(with_password, "no-such-study", tmp_path / "out2")
    assert missing.returncode != 0 and "no study 'no-such-study'" in missing.stderr, missing.stderr
    assert password not in missing.stdout + missing.stderr, missing.stderr


# ------------------------------------------------------------------------------------------ cross-site requests
def test_unknown_host_names_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDSEARCH_TRUSTED_HOSTS")  # the defaults alone
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a",
                        public_url="https://kd.example.org")
    with TestClient(create_app(settings, bind_host="10.1.2.3"), base_url="http://127.0.0.1:8000") as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "kd.example.org", "10.1.2.3:8000"):
            assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example:8000", "testserver", "kd.example.org.attacker.example", "10.1.2.4"):
            refused = client.get("/api/health", headers={"Host": host})
            assert refused.status_code == 400 and refused.text == "Invalid host header", host
            assert client.post("/api/studies", json={}, headers={"Host": host}).status_code == 400
    named = trusted_host_names(Settings(trusted_hosts="testserver, *.corp.example,fd00::1"))  # type: ignore[arg-type]
    assert {"testserver", "*.corp.example", "[fd00::1]"} <= set(named)
    for bad in ("host:8000", "http://host", "*host", "a.*.example"):
        with pytest.raises(ValidationError, match="trusted host"):
            Settings(trusted_hosts=bad)  # type: ignore[arg-type]
    wildcard = trusted_host_names(Settings(), bind_host="0.0.0.0")  # every name and address of this machine
    assert {"localhost", "127.0.0.1", "[::1]", socket.gethostname().lower()} <= set(wildcard)


def test_state_changes_need_json_or_the_token(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(Settings(database_url=db_url, artifacts=tmp_path / "a"))) as client:
        assert client.post("/api/studies", json=tiny_spec(tiny_assets, name="target")).status_code == 201
        # What a page on another site can make a browser send without a CORS preflight:
        for headers, content in (({"Content-Type": "application/x-www-form-urlencoded"}, b"x=1"),
                                 ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b--"),
                                 ({"Content-Type": "text/plain"}, b"{}"), ({}, b"")):
            refused = client.post("/api/studies/target/cancel", headers=headers, content=content)
            assert refused.status_code == 415 and "application/json" in refused.json()["detail"], headers
            assert client.get("/api/studies/target").json()["status"] == "queued"
        launched = client.post("/api/studies", content=b'{"name": "x"}', headers={"Content-Type": "text/plain"})
        assert launched.status_code == 415
        cancelled = client.post("/api/studies/target/cancel", headers={"Content-Type": "application/json"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    token_settings = Settings(database_url=db_url, artifacts=tmp_path / "a", api_token="tok")
    with TestClient(create_app(token_settings)) as client:  # with a token configured, the token is the check
        auth = {"Authorization": "Bearer tok"}
        assert client.post("/api/studies", json=tiny_spec(tiny_assets, name="t2"), headers=auth).status_code == 201
        assert client.post("/api/studies/t2/cancel", content=b"").status_code == 401
        assert client.post("/api/studies/t2/cancel", headers=auth).json()["status"] == "cancelled"


# -------------------------------------------------------------------------------------------------- the CLI
def test_status_prints_a_markup_like_error_as_text(tmp_path: Path, tiny_assets,  # type: ignore[no-untyped-def]
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    stack = Stack(url, tmp_path)
    error = "DataError: column [/] in row 3, see [bold]notes[/bold] and [link=http://x]y[/link]"
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at the terminal's width: one line, to compare
    try:
        stack.start_api()
        study = stack.submit(tiny_spec(tiny_assets, name="broken"))
        db = make_engine(url)
        try:
            fail_study(db, study["id"], error)
        finally:
            db.dispose()
        assert main(["status", "broken", "--url", stack.url]) == 0
        shown = capsys.readouterr().out
        assert error in shown, shown
        assert main(["status", "--url", stack.url]) == 0
        assert "broken" in capsys.readouterr().out
    finally:
        stack.stop()

"""Webhook notifications: received by loopback HTTP servers started here, from a real API and worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kdsearch.testing import Stack, tiny_spec
from service.notifier import Notifier
from service.settings import Settings
from storage import (
    create_study,
    enqueue_event,
    init_db,
    make_engine,
    make_optuna_storage,
    notifications,
    session_scope,
)


class Receiver:
    """A loopback HTTP server that records every POST and answers from a script (default 200)."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers = list(answers or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                receiver.received.append({"path": self.path, "body": body, "answered": status})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, study: str) -> list[tuple[str, int]]:
        return [(r["body"]["event"], r["answered"]) for r in self.received if r["body"]["study"] == study]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_events_arrive_in_order_with_a_retry(db_url: str, tmp_path: Path, tiny_assets, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.answers = [(500, {})]  # the first call fails: it must be retried, and nothing after it overtakes it
    stack = Stack(db_url, tmp_path, KDSEARCH_ENGINE="service.testing:FlakyEngine", KDSEARCH_TEST_EPOCH_S="0.05",
                  KDSEARCH_POLL_INTERVAL="0.1", KDSEARCH_WEBHOOK_ALLOWED_HOSTS=f"http://127.0.0.1:{receiver.port}",
                  KDSEARCH_WEBHOOK_RETRY_DELAY="0.5", KDSEARCH_PUBLIC_URL="http://kdsearch.example:8000")
    hook = f"http://127.0.0.1:{receiver.port}/hooks/kd"
    try:
        stack.start_api()
        stack.submit(tiny_spec(tiny_assets, name="hooked", n_trials=4, seed=5,
                               search_space={"num_train_epochs": 2, "learning_rate": {"low": 1e-4, "high": 1e-2}},
                               notify={"webhook": hook, "events": ["new_best", "finished"]}))
        stack.submit(tiny_spec(tiny_assets, name="data-doomed", notify={"webhook": hook, "events": ["failed"]}))
        stack.submit(tiny_spec(tiny_assets, name="quiet", n_trials=1))  # asked for nothing: never calls
        stack.start_worker()
        for name in ("hooked", "data-doomed", "quiet"):
            stack.wait_status(name)
        stack.wait_for(lambda: ("finished", 200) in receiver.events("hooked")
                       and ("failed", 200) in receiver.events("data-doomed"), 60, "the webhooks")
        study = stack.study("hooked")
    finally:
        stack.stop()

    events = receiver.events("hooked")
    assert events[0] == ("new_best", 500) and events[1] == ("new_best", 200)  # retried after the 500
    assert events[-1] == ("finished", 200) and {e for e, _ in events[:-1]} == {"new_best"}
    finished = next(r["body"] for r in receiver.received if r["body"]["event"] == "finished")
    assert finished["status"] == "finished" and finished["metric"] == "accuracy"
    assert finished["best_trial"]["number"] == study["best_trial"]["number"]
    assert finished["best_trial"]["value"] == pytest.approx(study["best_trial"]["value"])
    assert finished["dashboard_url"] == "http://kdsearch.example:8000/studies/hooked"
    bests = [r["body"]["value"] for r in receiver.received if r["body"]["event"] == "new_best" and r["answered"] == 200]
    assert bests == sorted(bests) and bests[-1] == pytest.approx(study["best_trial"]["value"])
    failed = next(r["body"] for r in receiver.received if r["body"]["event"] == "failed")
    assert failed["study"] == "data-doomed" and "DataError" in failed["error"]
    assert receiver.events("quiet") == [] and {r["path"] for r in receiver.received} == {"/hooks/kd"}


def test_only_allowed_hosts(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from service.api import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a",
                        webhook_allowed_hosts=["hooks.example.com"])
    with TestClient(create_app(settings)) as client:
        for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/x", "ftp://hooks.example.com/"):
            refused = client.post("/api/studies", json=tiny_spec(tiny_assets, notify={"webhook": url}))
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][:3] == [
                "body", "notify", "webhook"], refused.text
        ok = client.post("/api/studies", json=tiny_spec(tiny_assets, notify={"webhook": "https://hooks.example.com/k"}))
        assert ok.status_code == 201 and ok.json()["spec"]["notify"]["events"] == ["finished", "failed"]


def test_redirects_stay_on_the_same_host(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    elsewhere = Receiver()
    same = Receiver()
    try:
        same.answers = [(307, {"Location": "/moved"})]
        away = Receiver([(302, {"Location": f"http://localhost:{elsewhere.port}/steal"})] * 5)
        url = f"sqlite:///{tmp_path / 'db'}"
        db = make_engine(url)
        init_db(db)
        make_optuna_storage(url).engine.dispose()  # Optuna's schema, as the API creates it
        settings = Settings(database_url=url, artifacts=tmp_path / "a",
                            webhook_allowed_hosts=[f"http://127.0.0.1:{same.port}", f"http://127.0.0.1:{away.port}",
                                                   f"http://localhost:{elsewhere.port}"],
                            webhook_max_attempts=2, webhook_retry_delay=0.01)
        ids = {}
        for name, port in (("same", same.port), ("away", away.port)):
            spec = tiny_spec(tiny_assets, name=name, notify={"webhook": f"http://127.0.0.1:{port}/h",
                                                            "events": ["failed"]})
            ids[name] = create_study(db, name=name, spec=spec, n_trials=1, priority=0, timeout_s=None).id
            enqueue_event(db, ids[name], "failed", {"error": "test"})
        notifier = Notifier(db, settings)
        for _ in range(20):
            notifier.deliver_due()
        with session_scope(db) as session:
            same_row, = notifications(session, ids["same"])
            away_row, = notifications(session, ids["away"])
            assert same_row.state == "delivered" and [r["path"] for r in same.received] == ["/h", "/moved"]
            assert away_row.state == "failed" and away_row.attempts == 2
            assert away_row.last_error.startswith("redirect to another host refused (localhost:")
        assert elsewhere.received == []  # never followed
        away.close()
        db.dispose()
    finally:
        elsewhere.close()
        same.close()


def test_allow_list_is_by_scheme_host_and_port(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient
    from pydantic import ValidationError

    from service.api import create_app
    from service.notifier import host_allowed

    origins = ["https://hooks.example.com", "http://localhost:8080", "http://[::1]:9000"]
    for url in ("https://hooks.example.com/k", "https://HOOKS.example.com:443/k?x=1", "http://localhost:8080/h",
                "HTTP://localhost:8080", "http://[::1]:9000/h"):
        assert host_allowed(url, origins), url
    for url in ("http://localhost:6379/", "http://localhost/h", "https://localhost:8080/h", "http://hooks.example.com/k",
                "https://hooks.example.com:8443/k", "http://[::1]:9001/h", "http://localhost:notaport/",
                "ftp://hooks.example.com/", "https://hooks.example.com.evil.example/k"):
        assert not host_allowed(url, origins), url
    # A plain host name: the default ports of http and https, and no other.
    assert host_allowed("http://localhost/h", ["localhost"]) and host_allowed("https://localhost:443/", ["localhost"])
    assert not host_allowed("http://localhost:6379/", ["localhost"])
    assert not host_allowed("https://localhost:8080/", ["localhost"])

    settings = Settings(webhook_allowed_hosts=" https://Hooks.example.com , http://localhost:8080,")  # type: ignore[arg-type]
    assert settings.webhook_allowed_hosts == ["https://hooks.example.com", "http://localhost:8080"]
    for bad in ("localhost:8080", "ftp://hooks.example.com", "https://hooks.example.com/path",
                "https://user:pw@hooks.example.com", "http://localhost:99999", "https://"):
        with pytest.raises(ValidationError, match="webhook allowed host"):
            Settings(webhook_allowed_hosts=bad)  # type: ignore[arg-type]

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a",
                        webhook_allowed_hosts=["http://localhost:8080"])
    with TestClient(create_app(settings)) as client:
        refused = client.post("/api/studies", json=tiny_spec(tiny_assets, notify={"webhook": "http://localhost:6379/"}))
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][:3] == ["body", "notify", "webhook"]
        ok = client.post("/api/studies", json=tiny_spec(tiny_assets, notify={"webhook": "http://localhost:8080/k"}))
        assert ok.status_code == 201, ok.text


class SlowDrip:
    """A loopback receiver that answers 200 with a 60-byte body sent one byte every 0.5 s (30 s in all): each read
    gets data well within any per-read timeout."""

    def __init__(self) -> None:
        self.requests = 0
        self.finished = threading.Event()  # a whole answer went out: a delivery was held that long
        drip = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                drip.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "60")
                self.end_headers()
                try:
                    for _ in range(60):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:  # the client hung up: cut
                    return
                drip.finished.set()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_slow_drip_receiver_is_cut_at_the_deadline(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    drip = SlowDrip()
    url = f"sqlite:///{tmp_path / 'db'}"
    db = make_engine(url)
    try:
        init_db(db)
        make_optuna_storage(url).engine.dispose()
        spec = tiny_spec(tiny_assets, name="dripped", notify={"webhook": f"http://127.0.0.1:{drip.port}/h",
                                                            "events": ["failed"]})
        study_id = create_study(db, name="dripped", spec=spec, n_trials=1, priority=0, timeout_s=None).id
        enqueue_event(db, study_id, "failed", {"error": "test"})
        settings = Settings(database_url=url, artifacts=tmp_path / "a", webhook_timeout_s=1.0,
                            webhook_allowed_hosts=[f"http://127.0.0.1:{drip.port}"], webhook_max_attempts=2,
                            webhook_retry_delay=0.01)
        # Both attempts are cut at the deadline while the receiver is still dripping, and the first is given back
        # for a retry (due at once: the retry delay is tiny) rather than held for 30 s under its claim.
        notifier = Notifier(db, settings)
        for _ in range(100):
            notifier.deliver_due()
            with session_scope(db) as session:
                row, = notifications(session, study_id)
            if row.state != "pending":
                break
            time.sleep(0.05)
        assert drip.requests == 2 and not drip.finished.is_set()
        assert row.state == "failed" and row.attempts == 2 and row.claimed_by is None
        assert row.last_error == "no complete answer within 1 s"
        db.dispose()
    finally:
        drip.close()

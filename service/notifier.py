"""Webhook delivery: the outbox (``storage``) emptied in the background by every API and worker process.

A notification is a JSON POST (study, event, status, best trial, dashboard URL) with a timeout; a failure (a
timeout, a refused connection, a non-2xx answer) is retried with backoff up to ``KDSEARCH_WEBHOOK_MAX_ATTEMPTS``.
Only hosts in ``KDSEARCH_WEBHOOK_ALLOWED_HOSTS`` are called, and a redirect is only followed to the same scheme,
host and port: a webhook must never become a way to make this server call somewhere else.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from service.settings import Settings
from storage import (
    NotificationRow,
    StudyRow,
    claim_notification,
    retry_operational,
    session_scope,
    settle_notification,
    study_user_attrs,
    utcnow,
)
from storage._trials import best_trial, optuna_study_id

log = logging.getLogger("kdsearch.notify")
MAX_REDIRECTS = 3


def host_allowed(url: str, allowed: list[str]) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return bool(host) and host in allowed


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> str | None:
    """POST ``body``; None when the receiver answered 2xx, else why not. Redirects are followed only within the
    same origin."""
    target = httpx.URL(url)
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                response = client.post(target, json=body)
                if response.is_redirect:
                    next_url = target.join(response.headers.get("location", ""))
                    if _origin(next_url) != _origin(target):
                        return f"redirect to another host refused ({next_url.host}:{next_url.port})"
                    target = next_url
                    continue
                if response.is_success:
                    return None
                return f"HTTP {response.status_code}"
            return "too many redirects"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


class Notifier:
    """Delivers due notifications until stopped; safe to run in any number of processes at once."""

    def __init__(self, db: Engine, settings: Settings, name: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:notifier"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self, row: NotificationRow) -> dict[str, Any]:
        with session_scope(self.db) as session:
            study = session.get(StudyRow, row.study_id)
            assert study is not None
            optuna_id = optuna_study_id(session, study.name)
            best = best_trial(session, optuna_id) if optuna_id is not None else None
            task = study_user_attrs(session, [study.name], ["task"])[study.name].get("task") or {}
            return {"study": study.name, "study_id": study.id, "event": row.event, "status": study.status,
                    "metric": task.get("metric") or (study.spec or {}).get("metric"), "best_trial": best,
                    "dashboard_url": f"{self.settings.public_url.rstrip('/')}/studies/{study.name}",
                    "sent_at": utcnow().isoformat(), **(row.payload or {})}

    def deliver_due(self) -> int:
        """Deliver (or retry) every notification that is due now; returns how many were attempted."""
        attempted = 0
        while not self._stop.is_set():
            row = retry_operational(lambda: claim_notification(
                self.db, self.name, lease_s=3 * self.settings.webhook_timeout_s + 30), attempts=3)
            if row is None:
                return attempted
            attempted += 1
            if not host_allowed(row.url, self.settings.webhook_allowed_hosts):
                error: str | None = f"host of {row.url} is not in KDSEARCH_WEBHOOK_ALLOWED_HOSTS"
            else:
                error = post_json(row.url, self.payload(row), self.settings.webhook_timeout_s)

            def settle(row: NotificationRow = row, error: str | None = error) -> str:
                return settle_notification(
                    self.db, row.id, self.name, error=error, max_attempts=self.settings.webhook_max_attempts,
                    retry_delay_s=self.settings.webhook_retry_delay)

            state = retry_operational(settle, attempts=3)
            if error is None:
                log.info("notified %s of %s for study %d", row.url, row.event, row.study_id)
            else:
                log.warning("webhook %s (%s, study %d) attempt %d: %s; %s", row.url, row.event, row.study_id,
                            row.attempts, error, "giving up" if state == "failed" else "will retry")
        return attempted

    def _loop(self, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # a database outage: the next round tries again
                log.warning("notification delivery failed", exc_info=True)
            self._stop.wait(interval_s)

    def start(self, interval_s: float = 1.0) -> Notifier:
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="kdsearch-notifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_s + 5)

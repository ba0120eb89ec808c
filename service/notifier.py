"""Webhook delivery: the outbox (``storage``) emptied in the background by every API and worker process.

A notification is a JSON POST (study, event, status, best trial, dashboard URL); a failure (a timeout, a refused
connection, a non-2xx answer) is retried with backoff up to ``KDSEARCH_WEBHOOK_MAX_ATTEMPTS``. Each delivery has
one overall deadline, ``KDSEARCH_WEBHOOK_TIMEOUT_S``, for everything (connecting, redirects, the answer's last
byte), well inside the claim lease: a receiver that answers a byte at a time cannot hold a delivery until the lease
runs out and another deliverer sends it again.

Only origins (scheme, host and port) in ``KDSEARCH_WEBHOOK_ALLOWED_HOSTS`` are called, and a redirect is only
followed to the same origin: a webhook must never become a way to make this server call somewhere else.

A webhook URL may hold a token (userinfo, query string): it is shown and logged only as ``redact_webhook_url``
gives it, httpx's own request log included.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import anyio
import httpx
from sqlalchemy import Engine

from service.redaction import redact_webhook_url
from service.settings import Settings, webhook_origin, webhook_origins
from storage import (
    METRIC_ATTRS,
    NotificationRow,
    best_trial,
    claim_notification,
    get_study,
    retry_operational,
    session_scope,
    settle_notification,
    study_metric,
    study_user_attrs,
    utcnow,
)

log = logging.getLogger("kdsearch.notify")
MAX_REDIRECTS = 3


class RedactRequestUrls(logging.Filter):
    """httpx logs every request's URL at INFO: log it redacted (a webhook's token must not reach the logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_webhook_url(str(arg)) if isinstance(arg, httpx.URL) else arg
                                for arg in record.args)
        return True


logging.getLogger("httpx").addFilter(RedactRequestUrls())


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether ``url``'s origin (scheme, host, port) is one the allow-list entries name."""
    origin = webhook_origin(url)
    return origin is not None and any(origin in webhook_origins(entry) for entry in allowed)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> str | None:
    """POST ``body``; None when the receiver answered 2xx within ``timeout_s`` overall, else why not. Redirects
    are followed only within the same origin."""
    try:
        return anyio.run(_post_within, url, body, timeout_s)
    except TimeoutError:
        return f"no complete answer within {timeout_s:g} s"


async def _post_within(url: str, body: dict[str, Any], deadline_s: float) -> str | None:
    with anyio.fail_after(deadline_s):  # the whole delivery, not each read
        return await _post(url, body, deadline_s)


async def _post(url: str, body: dict[str, Any], timeout_s: float) -> str | None:
    target = httpx.URL(url)
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                response = await client.post(target, json=body)
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
        return f"{type(exc).__name__}: {str(exc).replace(url, redact_webhook_url(url))}"


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
            study = get_study(session, row.study_id)
            assert study is not None
            best = best_trial(session, study.name)
            attrs = study_user_attrs(session, [study.name], list(METRIC_ATTRS))[study.name]
            return {"study": study.name, "study_id": study.id, "event": row.event, "status": study.status,
                    "metric": study_metric(study.spec, attrs),
                    "best_trial": None if best is None else {"number": best.number, "value": best.value,
                                                             "params": best.params},
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
                error: str | None = (f"the origin of {redact_webhook_url(row.url)} is not in "
                                     "KDSEARCH_WEBHOOK_ALLOWED_HOSTS")
            else:
                error = post_json(row.url, self.payload(row), self.settings.webhook_timeout_s)

            def settle(row: NotificationRow = row, error: str | None = error) -> str:
                return settle_notification(
                    self.db, row.id, self.name, error=error, max_attempts=self.settings.webhook_max_attempts,
                    retry_delay_s=self.settings.webhook_retry_delay)

            state = retry_operational(settle, attempts=3)
            shown_url = redact_webhook_url(row.url)
            if error is None:
                log.info("notified %s of %s for study %d", shown_url, row.event, row.study_id)
            else:
                log.warning("webhook %s (%s, study %d) attempt %d: %s; %s", shown_url, row.event, row.study_id,
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

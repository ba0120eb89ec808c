"""The FastAPI application: REST API under /api, dashboard at /."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import psutil
from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdsearch.errors import KdsearchError
from service.api.errors import kdsearch_error, request_validation_error
from service.api.routes import health, hyperparameters, objectives, prometheus, studies, trials, workers
from service.dashboard import mount_dashboard
from service.notifier import Notifier
from service.prometheus import StoreCollector
from service.settings import Settings, get_settings
from storage import init_db, make_engine, make_optuna_storage


def open_state(app: FastAPI, settings: Settings) -> None:
    """Engines and stores on ``app.state`` (what the lifespan does at start-up)."""
    app.state.settings = settings
    app.state.db = make_engine(settings.database_url, pool_size=settings.pool_size,
                               max_overflow=settings.max_overflow, busy_timeout_s=settings.sqlite_busy_timeout_s)
    init_db(app.state.db)
    app.state.optuna_storage = make_optuna_storage(
        settings.database_url, pool_size=settings.pool_size, max_overflow=settings.max_overflow,
        busy_timeout_s=settings.sqlite_busy_timeout_s)
    # Webhooks are delivered in the background by the API as well as by workers (a cancelled or failed study
    # announces itself even when no worker runs).
    app.state.notifier = Notifier(app.state.db, settings).start()
    if getattr(app.state, "store_collector", None) is not None:  # state opened before: its engine is replaced
        app.state.metrics_registry.unregister(app.state.store_collector)
    app.state.store_collector = StoreCollector(app.state.db, settings.grace_period)
    app.state.metrics_registry.register(app.state.store_collector)
    # Launch validation reads teacher configs and tokenizers, and samples the data with the workers' reader: import
    # transformers, datasets and distill.data now, not in the first request.
    import datasets  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import distill.data  # noqa: F401


def close_state(app: FastAPI) -> None:
    if app.state.store_collector is not None:  # closed once already (a test may close what a lifespan closed)
        app.state.metrics_registry.unregister(app.state.store_collector)
        app.state.store_collector = None
    app.state.notifier.stop()
    app.state.db.dispose()
    app.state.optuna_storage.engine.dispose()


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def trusted_host_names(settings: Settings, bind_host: str | None = None) -> list[str]:
    """The names a request's Host header may give: loopback, the host of ``public_url``, the bound address (for a
    wildcard bind: this machine's names and every local address) and ``KDSEARCH_TRUSTED_HOSTS``; IPv6 literals
    in brackets, as ``TrustedHostMiddleware`` compares them."""
    names = [*LOOPBACK_NAMES, *settings.trusted_hosts, urlsplit(settings.public_url).hostname or "localhost"]
    if bind_host is not None and bind_host.strip("[]") in WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
        names += [address.address.split("%", 1)[0] for addresses in psutil.net_if_addrs().values()
                  for address in addresses if address.family in (socket.AF_INET, socket.AF_INET6)]
    elif bind_host is not None:
        names.append(bind_host.strip("[]"))
    return sorted({f"[{name}]" if ":" in name else name.lower() for name in names if name})


def create_app(settings: Settings | None = None, bind_host: str | None = None) -> FastAPI:
    """The app; ``bind_host``: the address ``kdsearch serve`` listens on (a name requests may give as Host)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        open_state(app, settings)
        try:
            yield
        finally:
            close_state(app)

    app = FastAPI(title="kdsearch", summary="Hyperparameter search for knowledge distillation",
                  version="0.1.0", lifespan=lifespan)
    api = APIRouter(prefix="/api")
    api.include_router(health.router)
    api.include_router(objectives.router)
    api.include_router(hyperparameters.router)
    api.include_router(studies.router)
    api.include_router(trials.router)
    api.include_router(workers.router)
    app.include_router(api)
    app.include_router(prometheus.router)
    app.state.metrics_registry = prometheus.metrics_registry(app)
    mount_dashboard(app)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(KdsearchError, kdsearch_error)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost: a request for a host this server is not known by is refused before anything reads it.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_host_names(settings, bind_host),
                       www_redirect=False)
    return app


class BodySizeLimit:
    """413 for request bodies over the limit, whether declared (Content-Length) or streamed (chunked).

    A body is read in full, up to the limit, before the application sees any of it: an oversize one is refused
    before a route runs, so nothing of it is ever stored. (Bodies are small JSON specs: buffering costs nothing.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away; the application sees the disconnect
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)

        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        await response(scope, no_body, send)

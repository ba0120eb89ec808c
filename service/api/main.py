"""The FastAPI application: REST API under /api, dashboard at /."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from service.api.routes import health, studies, workers
from service.dashboard import mount_dashboard
from service.settings import Settings, get_settings
from storage import init_db, make_engine, make_optuna_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.db = make_engine(settings.database_url, pool_size=settings.pool_size,
                                   max_overflow=settings.max_overflow,
                                   busy_timeout_s=settings.sqlite_busy_timeout_s)
        init_db(app.state.db)
        app.state.optuna_storage = make_optuna_storage(
            settings.database_url, pool_size=settings.pool_size, max_overflow=settings.max_overflow,
            busy_timeout_s=settings.sqlite_busy_timeout_s,
        )
        try:
            yield
        finally:
            app.state.db.dispose()
            app.state.optuna_storage.engine.dispose()

    app = FastAPI(title="kdsearch", summary="Hyperparameter search for knowledge distillation",
                  version="0.1.0", lifespan=lifespan)
    api = APIRouter(prefix="/api")
    api.include_router(health.router)
    api.include_router(studies.router)
    api.include_router(workers.router)
    app.include_router(api)
    mount_dashboard(app)
    return app

"""Prometheus metrics at ``GET /metrics`` (text format), under the same access rule as the other reads."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_fastapi_instrumentator import Instrumentator

from service.api.deps import require_read_access
from service.api.schemas import ErrorOut

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


def metrics_registry(app: FastAPI) -> CollectorRegistry:
    """The app's own registry (one per app, never prometheus_client's global one, so several apps share a process):
    this API process's metrics (process_*, python_*) and its HTTP requests, from prometheus-fastapi-instrumentator
    (``http_requests_total``, ``http_request_duration_seconds``...). The store's collector joins it at start-up
    (``StoreCollector``, registered by ``service.api.main.open_state``, once the database engine exists)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app)
    return registry


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Studies by status, queue depth, workers by status, trial and cache-build duration histograms, trials by
    state and best value per running study (all computed from the database now), this API process's own metrics
    and its HTTP requests (docs/metrics.md lists every series)."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)

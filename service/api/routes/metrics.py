"""Prometheus metrics at ``GET /metrics`` (text format), under the same access rule as the other reads."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.api.deps import require_read_access
from service.api.schemas import ErrorOut
from service.metrics import StoreCollector

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


def registry_for(request: Request) -> CollectorRegistry:
    """One registry per app, holding only the store collector (no process metrics of this one API process)."""
    state = request.app.state
    if getattr(state, "metrics_registry", None) is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector(state.db, state.settings.grace_period))
        state.metrics_registry = registry
    return state.metrics_registry


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Studies by status, trials by state, queue depth, workers by status, trial and cache-build duration
    histograms, best value per running study: all computed from the database now."""
    return Response(generate_latest(registry_for(request)), media_type=CONTENT_TYPE_LATEST)

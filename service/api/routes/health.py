"""Liveness and database reachability."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter

from service.api.deps import DbDep
from service.api.schemas import Health
from storage import ping

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(db: DbDep) -> Health:
    ping(db)
    return Health(status="ok", database="ok", version=version("kdsearch"))

"""The registry of objectives and costs (``search_space.objectives``), for the dashboard and other clients."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from kdsearch.objectives import registry_json
from service.api.deps import require_read_access
from service.api.schemas import ErrorOut, ObjectivesOut

router = APIRouter(tags=["objectives"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


@router.get("/objectives", response_model=ObjectivesOut)
def objectives() -> ObjectivesOut:
    """What a study can optimise: the task metric (maximised, always first) and the costs of a student
    (minimised), each with its title, unit, formatting, constraint (``max_<cost>``) and ``export-best`` option.
    A spec's ``objectives`` is ``["metric"]`` or ``["metric", COST]``; a trial's profile holds every cost."""
    return ObjectivesOut.model_validate(registry_json())

"""The hyperparameters a trial's row shows (the training ones and every distillation term's), for the dashboard."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends

from search_space.schema import shown_hyperparameters
from service.api.deps import require_read_access
from service.api.schemas import ErrorOut, HyperparameterOut

router = APIRouter(tags=["hyperparameters"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


@router.get("/hyperparameters", response_model=list[HyperparameterOut])
def hyperparameters() -> list[HyperparameterOut]:
    """The hyperparameters a trial's ``params`` shows, in the search space's order, with their short names: the
    learning rate, the distillation terms' (``kdsearch.terms``: temperature, alpha...), the epochs and the batch
    size. ``classification_only`` ones mean nothing to a regression study, which neither samples nor shows them."""
    return [HyperparameterOut(**dataclasses.asdict(h)) for h in shown_hyperparameters()]

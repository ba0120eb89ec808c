"""One trial: what the dashboard's trial page shows (parameters, epochs, the worker's lines, artifacts, export)."""

from __future__ import annotations

import shlex
from typing import Annotated

import optuna
from fastapi import APIRouter, Depends, HTTPException, Path, status

from service.api.deps import OptunaStorageDep, SessionDep, require_read_access
from service.api.routes.studies import _load, _trial_out
from service.api.schemas import ArtifactOut, ErrorOut, ExportOut, TrialDetailOut, TrialLogLineOut
from service.trial_log import TRIAL_LOG_ATTR
from storage import METRIC_ATTRS, optuna_study_id, study_metric, study_user_attrs

router = APIRouter(prefix="/studies", tags=["studies"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


@router.get("/{id_or_name}/trials/{number}", response_model=TrialDetailOut,
            responses={404: {"model": ErrorOut, "description": "No such study, or no such trial in it"}})
def read_trial(id_or_name: str, number: Annotated[int, Path(ge=0, le=10_000_000)], session: SessionDep,
               optuna_storage: OptunaStorageDep) -> TrialDetailOut:
    """A trial by its number: parameters, every epoch's metrics, the lines its worker logged about it, the files
    stored with it, its exports and the ``export-best`` command that exports it."""
    row = _load(session, id_or_name)
    study_id = optuna_study_id(session, row.name)
    try:
        if study_id is None:
            raise KeyError(number)
        trial_id = optuna_storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {row.name!r} has no trial {number}") from None
    trial = optuna_storage.get_trial(trial_id)
    attrs = study_user_attrs(session, [row.name], [*METRIC_ATTRS, "exports"])[row.name]
    checkpoint_id = trial.user_attrs.get("checkpoint_artifact_id")
    artifacts = [ArtifactOut(artifact_id=meta.artifact_id, filename=meta.filename, mimetype=meta.mimetype,
                             kind="checkpoint" if meta.artifact_id == checkpoint_id else "other")
                 for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=optuna_storage)]
    command = None
    if checkpoint_id is not None:
        name = shlex.quote(row.name)
        command = f"kdsearch export-best {name} --trial {number} --out {shlex.quote(f'./{row.name}-trial-{number}')}"
    return TrialDetailOut(
        **_trial_out(trial).model_dump(), study=row.name, metric=study_metric(row.spec, attrs),
        log=[TrialLogLineOut.model_validate(line) for line in trial.user_attrs.get(TRIAL_LOG_ATTR, [])],
        artifacts=artifacts,
        exports=[ExportOut.model_validate(e) for e in attrs.get("exports", []) if e.get("trial_number") == number],
        export_command=command)


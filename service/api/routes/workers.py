"""Workers: who is connected, on which device, running what."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import SessionDep, SettingsDep, require_read_access
from service.api.schemas import ErrorOut, WorkerOut
from storage import db_now, worker_status, workers_with_studies

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})


@router.get("", response_model=list[WorkerOut])
def list_workers(session: SessionDep, settings: SettingsDep) -> list[WorkerOut]:
    """Every worker seen; ``lost`` for one that claims to run but stopped heart-beating (a crashed host)."""
    now = db_now(session)  # heartbeats are stamped on the database's clock
    rows = workers_with_studies(session)
    return [
        WorkerOut(id=r.id, host=r.host, pid=r.pid, device=r.device, status=worker_status(r, now, settings.grace_period),
                  current_study_id=r.current_study_id, current_study_name=study_name,
                  current_trial_number=r.current_trial_number,
                  heartbeat_at=r.heartbeat_at, heartbeat_age_s=round((now - r.heartbeat_at).total_seconds(), 1))
        for r, study_name in rows
    ]

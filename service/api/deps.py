"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from optuna.storages import RDBStorage
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.settings import Settings
from storage import session_scope


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Engine:
    return request.app.state.db


def get_optuna_storage(request: Request) -> RDBStorage:
    return request.app.state.optuna_storage


def get_session(db: Annotated[Engine, Depends(get_db)]) -> Iterator[Session]:
    with session_scope(db) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Engine, Depends(get_db)]
SessionDep = Annotated[Session, Depends(get_session)]
OptunaStorageDep = Annotated[RDBStorage, Depends(get_optuna_storage)]

_bearer = HTTPBearer(auto_error=False)


def _check_token(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    if not settings.api_token:
        return
    given = credentials.credentials if credentials is not None else ""
    # Constant-time comparison: response time must not reveal how much of the token was right.
    if not secrets.compare_digest(given.encode(), settings.api_token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def require_token(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """When ``KDSEARCH_API_TOKEN`` is set, mutating endpoints need ``Authorization: Bearer <token>``."""
    _check_token(settings, credentials)


def require_read_access(settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Reads need the token as well, unless ``KDSEARCH_PUBLIC_READ=true`` opens them (a read-only dashboard)."""
    if not settings.public_read:
        _check_token(settings, credentials)


TokenDep = Annotated[None, Depends(require_token)]
ReadDep = Annotated[None, Depends(require_read_access)]

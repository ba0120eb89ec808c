"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from optuna.storages import RDBStorage
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.api.schemas import ErrorOut
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


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def require_token(request: Request, settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """When ``KDSEARCH_API_TOKEN`` is set, mutating endpoints need ``Authorization: Bearer <token>``.

    Without a token they need ``Content-Type: application/json``: a page on another site can make a browser send
    a form or a plain fetch here (cancelling a study needs no body), but not a JSON one, which needs a CORS
    preflight this server never grants."""
    if settings.api_token:
        _check_token(settings, credentials)
    elif not _is_json(request.headers.get("content-type")):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            "a request that changes something needs Content-Type: application/json (or the API "
                            "token, when the server has one)")


def require_read_access(settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Reads need the token as well, unless ``KDSEARCH_PUBLIC_READ=true`` opens them (a read-only dashboard)."""
    if not settings.public_read:
        _check_token(settings, credentials)


TokenDep = Annotated[None, Depends(require_token)]
# What TokenDep may answer (documented on each route that uses it).
TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {"model": ErrorOut, "description": "No token configured and the request is not Content-Type: "
                                            "application/json (a cross-site form or fetch)"}}
ReadDep = Annotated[None, Depends(require_read_access)]

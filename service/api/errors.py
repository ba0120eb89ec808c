"""The API's answers to errors: a request body that fails validation, and a kdsearch error that escapes a route.

A body that fails validation gets FastAPI's 422, with non-finite numbers made printable: Python's JSON parser reads
``NaN`` and ``Infinity`` literals; the error FastAPI builds echoes the offending input, and a JSON response cannot
hold a non-finite number (starlette refuses to render one: a 500 in place of the 422).

A ``KdsearchError`` a route did not answer itself is sorted by ``fault_of``: the user's fault is a 4xx with the
reason (a 422 naming the field, shaped like FastAPI's own, where the error has one; a 409 for a study whose state
refuses the request); any other fault (a bug, an outage) stays the server error it was.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kdsearch.errors import Fault, KdsearchError, fault_of
from storage import NothingToRetryError, StudyBusyError, StudyExistsError

# The user's errors that refuse a request because of a study's state (its name taken, still running, nothing failed).
CONFLICTS = (StudyExistsError, StudyBusyError, NothingToRetryError)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by the literal it was written as (``NaN``, ``Infinity``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


async def request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = finite_json(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def field_detail(field: str, message: str) -> list[dict[str, Any]]:
    """A 422's detail naming ``field`` (a dotted spec path), in FastAPI's shape (never the value itself)."""
    return [{"type": "value_error", "loc": ["body", *field.split(".")], "msg": message, "input": None}]


async def kdsearch_error(request: Request, exc: Exception) -> JSONResponse:
    """A ``KdsearchError`` no route answered: the user's fault is a 4xx with the reason; any other is raised on (a
    500, with its traceback in the server's log, as before)."""
    assert isinstance(exc, KdsearchError)
    if fault_of(exc) is not Fault.USER:
        raise exc
    if isinstance(exc, CONFLICTS):
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)
    field = getattr(exc, "field", None)
    if isinstance(field, str) and field:
        message = getattr(exc, "message", None)
        detail: Any = field_detail(field, message if isinstance(message, str) else str(exc))
    else:
        detail = str(exc)
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

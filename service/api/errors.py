"""The API's answer to a request body that fails validation: FastAPI's 422, with non-finite numbers made printable.

Python's JSON parser reads ``NaN`` and ``Infinity`` literals; the error FastAPI builds echoes the offending input,
and a JSON response cannot hold a non-finite number (starlette refuses to render one: a 500 in place of the 422).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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

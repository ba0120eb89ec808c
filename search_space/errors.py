"""The error a spec that cannot run raises: a 422 at the API, naming the field."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that cannot run; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

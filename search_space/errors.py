"""The error a spec that cannot run raises: a 422 at the API, naming the field."""

from __future__ import annotations

from kdsearch.errors import UserError


class SpecError(UserError):
    """A spec that cannot run; ``field`` is the dotted path of the offending field.

    ``Fault.USER``: the user's spec; the submit is refused (or the study fails) naming ``field``. A ``ValueError``
    still (through ``UserError``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

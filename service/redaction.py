"""Secrets kept out of everything kdsearch shows or logs: one helper per kind of secret.

- A webhook URL may carry a token in its userinfo or query string (``https://user:token@host/hook?key=...``):
  ``redact_webhook_url`` is the form that is shown (the API, logs, delivery errors); delivery uses the real one.
- A database URL may carry a password: ``mask_database_url`` is the form that is shown, and
  ``scrub_database_error`` cleans the text of an exception (SQLAlchemy's and psycopg's may quote the DSN) before
  it reaches a user.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

REDACTED = "***"

# scheme://user:password@ anywhere in a text (a DSN quoted in an error message)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^\s/?#@:]*):[^\s/?#@]*@", re.IGNORECASE)
# libpq keyword form: password=secret or password='se cret'
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s,;)]+)", re.IGNORECASE)


def redact_webhook_url(url: str) -> str:
    """``url`` with its userinfo, query string and fragment replaced by ``***``: scheme, host, port and path stay
    (what an operator needs to tell hooks apart). A URL that does not parse is shown as ``***`` alone."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return REDACTED
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    if "@" in parts.netloc:
        netloc = f"{REDACTED}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "",
                       REDACTED if parts.fragment else ""))


def mask_database_url(url: str) -> str:
    """A database URL as it may be shown: its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: clean it as text
        return scrub_database_error(url)


def scrub_database_error(text: str, database_url: str | None = None) -> str:
    """An error text fit to show: any ``scheme://user:password@`` and ``password=...`` masked, and the password of
    ``database_url`` (the configured database) wherever it appears, as given or percent-encoded."""
    password = _password_of(database_url) if database_url else None
    if password:
        for form in {password, quote(password, safe=""), unquote(password)}:
            text = text.replace(form, REDACTED)
    text = _URL_PASSWORD.sub(rf"\g<head>:{REDACTED}@", text)
    return _KEYWORD_PASSWORD.sub(rf"\g<head>{REDACTED}", text)


def _password_of(database_url: str) -> str | None:
    try:
        return make_url(database_url).password or None
    except (ArgumentError, ValueError):
        return None

"""One settings object for every kdsearch process (API, workers, CLI), read from ``KDSEARCH_*`` variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from storage import default_local_cache


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDSEARCH_", env_file=".env", extra="ignore")

    database_url: str = Field("sqlite:///./kdsearch.db", description="The study store: a SQLAlchemy URL "
                              "(SQLite, or PostgreSQL as postgresql+psycopg://user:pass@host:5432/db).")
    artifacts: str = Field("./artifacts", description="Checkpoints and data caches: a directory (shared between "
                           "hosts: NFS, a mounted volume), or an S3-compatible bucket, s3://bucket/prefix (endpoint "
                           "and credentials from the standard AWS environment variables).")
    local_cache: Path = Field(default_factory=lambda: default_local_cache(),
                              description="With an s3:// store: this host's verified read-through copy of cache "
                                          "entries (downloaded once per host).",
                              json_schema_extra={"default_shown": "`$XDG_CACHE_HOME/kdsearch` (`~/.cache/kdsearch`)"})
    artifact_key: SecretStr | None = Field(
        None, description="With an s3:// store: a secret kept outside the bucket. Writers sign each cache entry's "
                          "manifest with it and readers refuse an entry not signed with it (the bucket's own "
                          "checksums prove nothing against a bucket writer).")

    @field_validator("artifacts", mode="before")
    @classmethod
    def _artifacts_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value
    api_token: str | None = Field(None, description="When set, every endpoint but /api/health needs "
                                  "`Authorization: Bearer <token>`; `kdsearch serve --host` beyond loopback needs it "
                                  "(or --allow-no-token). The CLI sends it too.")
    public_read: bool = Field(False, description="With a token set, let GET requests (dashboard) in without it.")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd(), Path("../shared")],
        description="Local model and data paths a study may name (symlinks followed). Environment: paths "
                    "separated by ':'.",
        json_schema_extra={"default_shown": "the working directory and `../shared`"})

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(part) for part in value.split(os.pathsep) if part.strip()]
        return value

    # Limits on what one request may ask for
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body, in bytes (413 beyond it, "
                                "declared or streamed).")
    max_n_trials: int = Field(10_000, ge=1, description="Largest `n_trials` a study may ask for.")
    max_timeout_s: float = Field(30 * 24 * 3600.0, gt=0, description="Largest `timeout_s` a study may ask for, in "
                                 "seconds (the default is 30 days).")
    max_seq_length: int = Field(512, ge=8, description="Largest `dataset.max_seq_length` a study may ask for.")
    max_batch_size: int = Field(4096, ge=1, description="Largest batch size a study may ask for.")
    max_augment_copies: int = Field(20, ge=0, description="Largest `augment.copies` a study may ask for: the "
                                    "transfer set is held in memory on every worker (copies x train rows token "
                                    "rows).")

    # Notifications
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins a notification webhook may be sent to (webhooks are requests this server makes for a "
                    "user). Environment: entries separated by ','; an entry is scheme://host[:port] (that scheme, "
                    "host and port exactly; the port defaults to the scheme's) or a plain host name (http on port 80 "
                    "and https on 443 only). Empty: no webhooks.",
        json_schema_extra={"default_shown": "(empty)"})
    webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds one webhook delivery may take in all: every "
                                                             "redirect and the last byte of the answer.")
    webhook_max_attempts: int = Field(6, ge=1, description="Deliveries of one notification before it is given up.")
    webhook_retry_delay: float = Field(5.0, gt=0, description="Seconds before a failed delivery is retried; doubles.")
    public_url: str = Field("http://127.0.0.1:8000", description="The address people open the dashboard at "
                            "(links in notifications).")

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        entries = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if not isinstance(entries, list):
            return value
        for entry in entries:
            webhook_origins(str(entry))  # a malformed entry stops the process at start-up, naming it
        return [str(entry).strip().lower() for entry in entries if str(entry).strip()]

    # Workers
    poll_interval: float = Field(1.0, gt=0, description="Seconds an idle worker waits before asking again.")
    heartbeat_interval: float = Field(10.0, gt=0, description="Seconds between a busy worker's heartbeats.")
    grace_period: float = Field(60.0, gt=0, description="Seconds: a claimed trial whose heartbeat "
                                "is older is stale (taken over and retried).")
    max_trial_attempts: int = Field(3, ge=1, description="Runs of one trial slot before it counts as failed.")
    max_prepare_attempts: int = Field(5, ge=1, description="Consecutive failed preparations (not the data's fault: "
                                                           "out of memory, network, disk) before a study fails.")
    prepare_retry_delay: float = Field(10.0, gt=0, description="Seconds before a failed preparation is tried again; "
                                                               "doubles with each consecutive failure, up to 300.")
    progress_interval: float = Field(15.0, ge=0, description="Seconds between a preparing worker's progress writes.")
    worker_retention: float = Field(86400.0, gt=0, description="Rows of workers gone this long are pruned.")
    engine: str | None = Field(None, description="Trial engine as module:Class; default the distillation engine.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="The student's forward pass: bf16 autocast, fp32, or auto (bf16 where the device "
                            "computes it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX; fp32 elsewhere).")
    threads: int = Field(0, ge=0, description="Torch threads per worker process; 0 leaves torch's default.")
    pack: str = Field("auto", description="Trials a worker claims (of one study) and trains together: a whole number, "
                                         "1 or more, or auto (1 wherever the bench does not show packing faster).")

    pack_step: Literal["auto", "loop", "stacked"] = Field(
        "auto", description="How a pack's members train together: stacked (one vectorised model, one step for all; "
                            "dropout masks from one stream), loop (one by one, each exactly its solo run), or auto "
                            "(stacked on CUDA, loop on CPU).")

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_setting(cls, value: object) -> object:
        # As distill.packed.parse_pack, which this module does not import (the API never loads torch).
        text = str(value).strip().lower()
        if text != "auto" and not (text.isascii() and text.isdigit() and int(text) >= 1):
            raise ValueError(f"pack must be 'auto' or a whole number of trials, 1 or more, not {value!r}")
        return text if text == "auto" else str(int(text))

    # Database connections (per process)
    pool_size: int = Field(5, ge=1, description="API connections per engine.")
    max_overflow: int = Field(5, ge=0, description="API connections per engine beyond the pool, when busy.")
    worker_pool_size: int = Field(2, ge=1, description="Worker connections per process: its loop and its heartbeat "
                                  "thread (16 workers stay far below PostgreSQL's default max_connections of 100).")
    worker_max_overflow: int = Field(1, ge=0, description="Worker connections per process beyond the pool.")
    sqlite_busy_timeout_s: float = Field(60.0, gt=0, description="Seconds a SQLite statement waits for a lock "
                                         "held by another process.")

    # The CLI's side: the API that `kdsearch submit`, `status`, `trials`, `cancel`, `retry` and `delete` talk to
    # (their --url default); they send KDSEARCH_API_TOKEN as the bearer token.
    url: str = Field("http://127.0.0.1:8000", description="The kdsearch API the CLI's client commands talk to.")

    # A worker whose claims keep hitting infrastructure faults (a full disk, the artifact store, the database) while
    # their trials train or are stored gives each slot back untried and backs off (prepare_retry_delay, doubling);
    # after this many such claims in a row it exits, saying why.
    max_infra_faults: int = Field(5, ge=1, description="Claims in a row hit by infrastructure faults before a worker "
                                                        "stops.")

    # More limits on what one study may ask for (with max_n_trials, max_seq_length and max_augment_copies above)
    max_epochs: int = Field(100, ge=1, description="The most epochs search_space.num_train_epochs may reach.")
    max_student_params: int = Field(
        1_000_000_000, ge=1, description="The most parameters a fresh student's encoder layers may have, at the "
                                         "largest shape its config can sample (embeddings, pooler and head aside).")
    min_priority: int = Field(-10, ge=-1000, le=1000, description="The lowest priority a submitter may give.")
    max_priority: int = Field(10, ge=-1000, le=1000, description="The highest priority a submitter may give.")

    # Host names the API answers to: a request whose Host header names another is refused (400), which defeats DNS
    # rebinding (a site whose name resolves to this server). The server is always known by localhost, 127.0.0.1,
    # ::1, the host of public_url and the address `kdsearch serve --host` binds (every local address for 0.0.0.0 or
    # ::); this adds names (a proxy's, a DNS name). Environment: names separated by ','; '*.example.com' for a
    # domain's hosts, '*' for any host (no check).
    trusted_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the API answers to beyond localhost, 127.0.0.1, ::1, the host of public_url and the "
                    "address serve --host binds (a request naming another host is refused: DNS rebinding). "
                    "Environment: names separated by ','; '*.example.com' for a domain's hosts, '*' for any.",
        json_schema_extra={"default_shown": "(empty)"})

    @field_validator("trusted_hosts", mode="before")
    @classmethod
    def _split_trusted_hosts(cls, value: object) -> object:
        names = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value
        for name in map(str, names):
            wildcard_ok = name == "*" or (name.startswith("*.") and "*" not in name[1:]) or "*" not in name
            if not wildcard_ok or any(c in name for c in "/@[] ") or name.count(":") == 1:
                raise ValueError(f"trusted host {name!r}: a host name or address without scheme or port, "
                                 "'*.example.com' for a domain's hosts, or '*' for any")
        return [str(name).strip().lower() for name in names if str(name).strip()]


WEBHOOK_DEFAULT_PORTS = {"http": 80, "https": 443}


def webhook_origins(entry: str) -> set[tuple[str, str, int]]:
    """The (scheme, host, port) origins a ``KDSEARCH_WEBHOOK_ALLOWED_HOSTS`` entry allows: ``scheme://host[:port]``
    exactly that one (the port defaults to the scheme's), a plain host name http on 80 and https on 443."""
    text = entry.strip().lower()
    if not text:
        return set()
    if "://" not in text:
        if any(c in text for c in "/?#@[]") or (text.count(":") == 1):
            raise ValueError(f"webhook allowed host {entry!r}: a plain host name, or scheme://host[:port] to allow "
                             "another port")
        return {(scheme, text, port) for scheme, port in WEBHOOK_DEFAULT_PORTS.items()}
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"webhook allowed host {entry!r}: {exc}") from None
    if parts.scheme not in WEBHOOK_DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query \
            or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"webhook allowed host {entry!r}: expected http(s)://host[:port] and nothing more")
    return {(parts.scheme, host, port if port is not None else WEBHOOK_DEFAULT_PORTS[parts.scheme])}


def webhook_origin(url: str) -> tuple[str, str, int] | None:
    """A webhook URL's (scheme, host, port), the port defaulting to the scheme's; None for one that is not
    http(s) with a host and a valid port."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in WEBHOOK_DEFAULT_PORTS or not host:
        return None
    return scheme, host.lower(), port if port is not None else WEBHOOK_DEFAULT_PORTS[scheme]


@lru_cache
def get_settings() -> Settings:
    return Settings()


def _shown_default(field: FieldInfo) -> str:
    """A field's default as the environment variable would be written (``default_shown`` where it is computed)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "default_shown" in extra:
        return str(extra["default_shown"])
    default = field.get_default(call_default_factory=False)
    if default is None:
        return "(unset)"
    text = str(default).lower() if isinstance(default, bool) else str(default)
    return f"`{text}`"


def settings_table() -> str:
    """Every setting as a markdown table (variable, default, meaning): the README's table is this function's output
    (``python -m service.settings``), so a new setting without a row fails tests/test_docs.py."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        default = _shown_default(field)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {default} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())

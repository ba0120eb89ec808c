"""One settings object for every kdsearch process (API, workers, CLI), read from ``KDSEARCH_*`` variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

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
        description="Hosts a notification webhook may be sent to (webhooks are requests this server makes for a "
                    "user). Environment: host names separated by ','. Empty: no webhooks.",
        json_schema_extra={"default_shown": "(empty)"})
    webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds one webhook delivery may take.")
    webhook_max_attempts: int = Field(6, ge=1, description="Deliveries of one notification before it is given up.")
    webhook_retry_delay: float = Field(5.0, gt=0, description="Seconds before a failed delivery is retried; doubles.")
    public_url: str = Field("http://127.0.0.1:8000", description="The address people open the dashboard at "
                            "(links in notifications).")

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

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

"""One settings object for every kdsearch process (API, workers, CLI), read from ``KDSEARCH_*`` variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from storage import default_local_cache


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDSEARCH_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./kdsearch.db"
    # Checkpoints and data caches: a directory (shared between hosts: NFS, a mounted volume), or an S3-compatible
    # bucket, s3://bucket/prefix (endpoint and credentials from the standard AWS environment variables).
    artifacts: str = "./artifacts"
    # With an s3:// store: this host's verified read-through copy of cache entries (downloaded once per host).
    local_cache: Path = Field(default_factory=lambda: default_local_cache())
    # With an s3:// store: a secret kept outside the bucket. Writers sign each cache entry's manifest with it and
    # readers refuse an entry not signed with it (the bucket's own checksums prove nothing against a bucket writer).
    artifact_key: SecretStr | None = None

    @field_validator("artifacts", mode="before")
    @classmethod
    def _artifacts_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value
    api_token: str | None = None
    public_read: bool = Field(False, description="With a token set, let GET requests (dashboard) in without it.")
    # Local model and data paths a study may name (symlinks followed). Environment: paths separated by ':'.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path.cwd(), Path("../shared")])

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(part) for part in value.split(os.pathsep) if part.strip()]
        return value

    # Limits on what one request may ask for
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_n_trials: int = Field(10_000, ge=1)
    max_timeout_s: float = Field(30 * 24 * 3600.0, gt=0)
    max_seq_length: int = Field(512, ge=8)
    max_batch_size: int = Field(4096, ge=1)
    # The transfer set is held in memory on every worker: copies x train rows token rows.
    max_augment_copies: int = Field(20, ge=0)

    # Notifications: webhooks are requests this server makes for a user, so only these hosts may receive them.
    # Environment: host names separated by ','. Empty: no webhooks.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(6, ge=1)
    webhook_retry_delay: float = Field(5.0, gt=0, description="Seconds before a failed delivery is retried; doubles.")
    # The address people open the dashboard at (links in notifications).
    public_url: str = "http://127.0.0.1:8000"

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    # Workers
    poll_interval: float = Field(1.0, gt=0, description="Seconds an idle worker waits before asking again.")
    heartbeat_interval: float = Field(10.0, gt=0, description="Seconds between a busy worker's heartbeats.")
    grace_period: float = Field(60.0, gt=0, description="A claimed trial whose heartbeat is older is stale.")
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
    max_overflow: int = Field(5, ge=0)
    # A worker needs two connections (its loop and its heartbeat thread): 16 workers stay far below
    # PostgreSQL's default max_connections of 100.
    worker_pool_size: int = Field(2, ge=1)
    worker_max_overflow: int = Field(1, ge=0)
    sqlite_busy_timeout_s: float = Field(60.0, gt=0)

    # A worker whose claims keep hitting infrastructure faults (a full disk, the artifact store, the database) while
    # their trials train or are stored gives each slot back untried and backs off (prepare_retry_delay, doubling);
    # after this many such claims in a row it exits, saying why.
    max_infra_faults: int = Field(5, ge=1, description="Claims in a row hit by infrastructure faults before a worker "
                                                        "stops.")


@lru_cache
def get_settings() -> Settings:
    return Settings()

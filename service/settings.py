"""One settings object for every kdsearch process (API, workers, CLI), read from ``KDSEARCH_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDSEARCH_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./kdsearch.db"
    artifacts: Path = Path("./artifacts")
    api_token: str | None = None

    # Workers
    poll_interval: float = Field(1.0, gt=0, description="Seconds an idle worker waits before asking again.")
    heartbeat_interval: float = Field(10.0, gt=0, description="Seconds between a busy worker's heartbeats.")
    grace_period: float = Field(60.0, gt=0, description="A claimed trial whose heartbeat is older is stale.")
    max_trial_attempts: int = Field(3, ge=1, description="Runs of one trial slot before it counts as failed.")
    engine: str | None = Field(None, description="Trial engine as module:Class; default the distillation engine.")

    # Database connections (per process)
    pool_size: int = Field(5, ge=1)
    max_overflow: int = Field(5, ge=0)
    sqlite_busy_timeout_s: float = Field(60.0, gt=0)


@lru_cache
def get_settings() -> Settings:
    return Settings()

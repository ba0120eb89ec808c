"""How a worker tells people about a long preparation (the teacher labelling 67k sentences, a 20-copy transfer set).

The engine reports every batch; this reporter turns that into a database row a few times a minute (the API and
dashboard read it: stage, rows done of total, rate, ETA), a plain log line about every 10% when the worker's output
is not a terminal, and a rich progress bar when it is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Engine

from storage import report_progress, retry_operational

log = logging.getLogger("kdsearch.worker")


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = round(seconds)
    if whole < 90:
        return f"{whole} s"
    if whole < 5400:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole / 3600:.1f} h"


class PreparationReporter:
    """``progress(stage, done, total)`` for ``TrialEngine.prepare``: throttled to the database, readable in logs."""

    def __init__(self, db: Engine, study_id: int, study_name: str, worker_id: str, *, interval_s: float,
                 tty: bool) -> None:
        self.db, self.study_id, self.study_name, self.worker_id = db, study_id, study_name, worker_id
        self.interval_s = interval_s
        self.tty = tty
        self.stage: str | None = None
        # A stage's clock starts when the work before its first report began: at the reporter's creation (the
        # preparation's start), then at the previous stage's last report.
        self.started = self.last_call = time.monotonic()
        self.last_write = 0.0
        self.last_decile = -1
        self.stages_seen: list[str] = []
        self._bar: Any = None
        self._task: Any = None

    @property
    def built(self) -> bool:
        """Whether anything was built (not only loaded from the cache)."""
        return bool(self.stages_seen)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self._start(stage, total, self.last_call)
        self.last_call = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 and done else None
        eta = (total - done) / rate if rate else None
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        else:
            decile = 10 * done // max(total, 1)
            if decile > self.last_decile:
                self.last_decile = decile
                log.info("study %s: %s %s / %s rows (%d%%), %s rows/s, ETA %s", self.study_name, stage,
                         f"{done:,}", f"{total:,}", 100 * done // max(total, 1),
                         f"{rate:,.0f}" if rate else "?", eta_text(eta))
        if now - self.last_write >= self.interval_s or done >= total:
            self.last_write = now
            try:  # a progress report must never break the preparation it reports on
                retry_operational(lambda: report_progress(self.db, self.study_id, self.worker_id, stage, done, total,
                                                          rate), attempts=3)
            except Exception:
                log.warning("could not record preparation progress", exc_info=True)

    def _start(self, stage: str, total: int, began: float) -> None:
        self.close()
        self.stage, self.started, self.last_write, self.last_decile = stage, began, 0.0, -1
        self.stages_seen.append(stage)
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"{self.study_name}: {stage}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("rows"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

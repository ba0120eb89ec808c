"""A trial's own log lines: what the worker says about one trial, kept on the trial for the dashboard's trial page.

The worker logs each line as before (its own output is unchanged) and keeps it in the trial's ``log`` user
attribute: the start with its parameters, each epoch's scores, the stored checkpoint, how it ended (complete,
pruned and why, not trained as infeasible, failed with the reason). The attribute is rewritten with every line
(a few per trial, beside the ``epochs`` write each epoch), so a running trial's lines show as they happen; a
finished trial's attributes are frozen by Optuna, so the last line is saved before the trial is told.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import optuna

from storage import retry_operational

TRIAL_LOG_ATTR = "log"  # the user attribute: a list of {"at": ISO 8601 UTC, "level": "INFO", "message": ...}

log = logging.getLogger("kdsearch.worker")


class TrialLog:
    """The lines about one trial: each is logged by the worker's logger and kept for ``save``."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.lines: list[dict[str, Any]] = []

    def add(self, level: int, message: str, *args: Any) -> None:
        log.log(level, message, *args)
        self.lines.append({"at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                           "level": logging.getLevelName(level), "message": message % args if args else message})

    def save(self) -> None:
        """Write the lines so far to the trial (retried while the database is down: a line never costs a trial)."""
        lines = list(self.lines)
        retry_operational(lambda: self.trial.set_user_attr(TRIAL_LOG_ATTR, lines))

    def say(self, level: int, message: str, *args: Any) -> None:
        """``add`` and ``save``."""
        self.add(level, message, *args)
        self.save()

"""A test-only trial engine: sleeps per epoch instead of training, so concurrency tests run real workers fast.

Select it with ``KDSEARCH_ENGINE=tests.sleep_engine:SleepEngine``; ``KDSEARCH_TEST_EPOCH_S`` sets the sleep.
Accuracy is a smooth function of the parameters, so samplers and pruners behave as on a real objective.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from distill.engine import TRIAL_RECORD, TrialEngine, TrialOutcome
from distill.progress import Progress
from distill.train import EpochCallback, EpochResult
from search_space import StudySpec, TaskInfo


class SleepEngine(TrialEngine):
    def __init__(self, artifacts: Any = None, device: str = "cpu", **_: Any) -> None:
        self.epoch_s = float(os.environ.get("KDSEARCH_TEST_EPOCH_S", "0.05"))

    def prepare(self, spec: StudySpec, progress: Progress | None = None) -> StudySpec:
        return spec

    def task(self, prepared: StudySpec) -> TaskInfo:
        return TaskInfo("classification", 2, prepared.metric or "accuracy", ("negative", "positive"))

    def teacher_metrics(self, prepared: StudySpec) -> dict[str, float]:
        return {"accuracy": 0.9}

    def run_trial(self, prepared: StudySpec, params: dict[str, Any], seed: int, on_epoch_end: EpochCallback | None,
                  checkpoint_dir: Path) -> TrialOutcome:
        lr_fit = -abs(math.log10(float(params["learning_rate"])) + 3.5)
        history: list[EpochResult] = []
        stopped = None
        for epoch in range(1, int(params["num_train_epochs"]) + 1):
            threading.Event().wait(self.epoch_s)  # time.sleep fails under the tests' libfaketime
            accuracy = 0.5 + 0.3 * (1 - math.exp(-epoch / 2)) + 0.05 * lr_fit + 0.02 * float(params["alpha"])
            history.append(EpochResult(epoch, epoch * 10, 1.0 / epoch, 1.0 / epoch, {"accuracy": accuracy}, accuracy,
                                       self.epoch_s))
            if on_epoch_end is not None and (stopped := on_epoch_end(history[-1])):
                break
        best = max(history, key=lambda h: h.score)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / TRIAL_RECORD).write_text(json.dumps({"params": params, "pid": os.getpid()}))
        return TrialOutcome(history, best.epoch, best.score, stopped)

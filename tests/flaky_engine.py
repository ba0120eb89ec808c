"""A test-only engine for faults and progress: the sleep engine, with behaviour picked by the study's name.

- ``oserror-once-*``: the first preparation raises OSError (a disk hiccup), later ones work.
- ``oserror-always-*``: every preparation raises OSError.
- ``data-*``: the preparation raises DataError (the data's fault).
- ``oom-once-*``: the first trial raises CUDA's out-of-memory error, later ones train.
- ``diverge-once-*``: in the first pack, the first member's loss turns NaN (``MemberDiverged``); the rest train.
- ``diverge-always-*``: every trial's loss turns NaN (``TrainingDiverged``): the trial's own fault, every time.
- ``enospc-*``: writing a trial's checkpoint fails with ENOSPC (a full disk), for the first
  ``KDSEARCH_TEST_DISK_FULL_WRITES`` trials (default 2) across workers; ``enospc-always-*``: every time.
- ``slow-*``: the preparation reports ``KDSEARCH_TEST_PREP_STEPS`` batches of progress, ``KDSEARCH_TEST_PREP_S``
  seconds apart, like a teacher labelling rows.

Counts live in files under the artifacts directory, so they hold across worker processes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import torch

from distill import DataError
from distill.engine import MemberDone, PackedTrial, TrialOutcome
from distill.packed import MemberDiverged
from distill.progress import TEACHER_STAGE, Progress
from distill.train import EpochCallback, TrainingDiverged
from search_space import StudySpec
from tests.sleep_engine import SleepEngine


class FlakyEngine(SleepEngine):
    def __init__(self, artifacts: Any = None, device: str = "cpu", **kwargs: Any) -> None:
        super().__init__(artifacts, device, **kwargs)
        self.root = Path(str(getattr(artifacts, "root", artifacts) or "."))

    def _bump(self, name: str) -> int:
        """How many times ``name`` happened before, across processes (and count this one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"flaky-{name}", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            before = len(f.read())
            f.write("x")
            return before

    def prepare(self, spec: StudySpec, progress: Progress | None = None) -> StudySpec:
        if spec.name.startswith("data-"):
            raise DataError("column 'label' holds 'maybe', a label the teacher does not know")
        if spec.name.startswith("oserror-always-"):
            self._bump(spec.name)
            raise OSError("No space left on device")
        if spec.name.startswith("oserror-once-") and self._bump(spec.name) == 0:
            raise OSError("Connection reset by peer")
        if spec.name.startswith("slow-") and self._bump(spec.name) == 0 and progress is not None:
            steps, pause = int(os.environ.get("KDSEARCH_TEST_PREP_STEPS", "20")), float(
                os.environ.get("KDSEARCH_TEST_PREP_S", "0.2"))
            for step in range(1, steps + 1):
                threading.Event().wait(pause)
                progress(TEACHER_STAGE, step * 100, steps * 100)
        return spec

    def run_trial(self, prepared: StudySpec, params: dict[str, Any], seed: int, on_epoch_end: EpochCallback | None,
                  checkpoint_dir: Path) -> TrialOutcome:
        if prepared.name.startswith("oom-once-") and self._bump(prepared.name) == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if prepared.name.startswith("diverge-always-"):
            raise TrainingDiverged(float("nan"), 1, 3)
        outcome = super().run_trial(prepared, params, seed, on_epoch_end, checkpoint_dir)
        if prepared.name.startswith("enospc-") and (
                prepared.name.startswith("enospc-always-")
                or self._bump(prepared.name) < int(os.environ.get("KDSEARCH_TEST_DISK_FULL_WRITES", "2"))):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint_dir / "model.safetensors"))
        return outcome

    def run_pack(self, prepared: StudySpec, members: list[PackedTrial], batch_seed: int,
                 on_member_done: MemberDone | None = None) -> list[TrialOutcome | Exception]:
        diverge = prepared.name.startswith("diverge-once-") and self._bump(prepared.name) == 0

        def done(index: int, result: TrialOutcome | Exception) -> None:
            if diverge and index == 0:  # the pack's first member diverges, the first time only
                result = MemberDiverged(float("nan"), 1, 3)
            if on_member_done is not None:
                on_member_done(index, result)

        results = super().run_pack(prepared, members, batch_seed, done)
        if diverge:
            results[0] = MemberDiverged(float("nan"), 1, 3)
        return results

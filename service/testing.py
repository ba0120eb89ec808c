"""Test doubles that need the rooms, for tests and benches alike (the room-free helpers are ``kdsearch.testing``):
trial engines a worker loads by dotted path, and a study seeded in bulk.

``SleepEngine`` (``KDSEARCH_ENGINE=service.testing:SleepEngine``) sleeps per epoch instead of training, so
concurrency tests run real workers fast; ``KDSEARCH_TEST_EPOCH_S`` sets the sleep. Accuracy is a smooth function of
the parameters, so samplers and pruners behave as on a real objective.

``FlakyEngine`` (``KDSEARCH_ENGINE=service.testing:FlakyEngine``) is the sleep engine for faults and progress, with
behaviour picked by the study's name:

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

``OneClassEngine`` (``KDSEARCH_ENGINE=service.testing:OneClassEngine``) is the real distillation engine whose every
student is made to predict one class (``KDSEARCH_TEST_ONE_CLASS``, default 1) for every row: a degenerate student
(``distill.task_metrics.degenerate_reason``), trained, stored and exported like any other.

``seed_study`` writes a study of thousands of finished trials straight into the store (the dashboard at scale).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy as sa
import torch
from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json

from distill import DataError
from distill.engine import (
    TRIAL_RECORD,
    DistillationEngine,
    MemberDone,
    PackedTrial,
    PreparedStudy,
    TrialEngine,
    TrialOutcome,
)
from distill.progress import TEACHER_STAGE, Progress
from distill.train import EpochCallback, EpochResult, MemberDiverged, TrainingDiverged
from search_space import StudySpec, TaskInfo
from storage import create_study, init_db, make_engine, make_optuna_storage

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


class OneClassEngine(DistillationEngine):
    # A classifier bias no training at a searched learning rate can undo: that class wins every row.
    BIAS = 1000.0

    def _student(self, prepared: PreparedStudy, params: dict[str, Any], seed: int) -> PreTrainedModel:
        student = super()._student(prepared, params, seed)
        head = student.classifier  # a BERT sequence classifier's output layer
        assert isinstance(head, torch.nn.Linear)
        with torch.no_grad():
            head.bias[int(os.environ.get("KDSEARCH_TEST_ONE_CLASS", "1"))] = self.BIAS
        return student


def seed_study(db_url: str, name: str, n_trials: int, seed: int = 0) -> None:
    """A kdsearch study whose Optuna twin holds ``n_trials`` finished trials with params, epochs and attributes.

    Rows go into Optuna's schema with bulk inserts (one ``add_trials`` per trial would take minutes); the result is
    what workers would have written, and plain Optuna reads it back.
    """
    spec = StudySpec.model_validate({"name": name, "teacher": "owner/teacher", "student": {"model": "owner/student"},
                                     "dataset": {"hub": "glue", "config": "sst2"}, "n_trials": n_trials})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_optuna_storage(db_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study_id = study._study_id
    db = make_engine(db_url)
    init_db(db)
    create_study(db, name=name, spec=spec.model_dump(mode="json"), n_trials=n_trials, priority=0, timeout_s=None)
    dists = {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True), "temperature": FloatDistribution(2, 30),
             "alpha": FloatDistribution(0, 1), "num_train_epochs": IntDistribution(2, 10)}
    dist_json = {k: distribution_to_json(d) for k, d in dists.items()}
    rng = random.Random(seed)
    start = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=10)
    rows: dict[str, list[dict]] = {"trials": [], "trial_values": [], "trial_params": [],
                                   "trial_intermediate_values": [], "trial_user_attributes": []}
    meta = sa.MetaData()
    meta.reflect(db, only=list(rows))
    with db.begin() as conn:
        first_id = (conn.scalar(sa.select(sa.func.max(meta.tables["trials"].c.trial_id))) or 0) + 1
    for number in range(n_trials):
        trial_id = first_id + number
        lr, temperature, alpha, n_epochs = (10 ** rng.uniform(-5, -3), rng.uniform(2, 30), rng.uniform(0, 1),
                                            rng.randint(2, 10))
        params = {"learning_rate": lr, "temperature": temperature, "alpha": alpha, "num_train_epochs": n_epochs}
        pruned = rng.random() < 0.3
        epochs = rng.randint(1, n_epochs) if pruned else n_epochs
        curve = {e: 0.5 + 0.3 * (1 - math.exp(-e / 3)) + rng.uniform(-0.02, 0.02) for e in range(1, epochs + 1)}
        began = start + timedelta(seconds=7 * number)
        rows["trials"].append({"trial_id": trial_id, "number": number, "study_id": study_id,
                               "state": "PRUNED" if pruned else "COMPLETE", "datetime_start": began,
                               "datetime_complete": began + timedelta(seconds=5 * epochs)})
        rows["trial_values"].append({"trial_id": trial_id, "objective": 0, "value": max(curve.values()),
                                     "value_type": "FINITE"})
        rows["trial_params"] += [{"trial_id": trial_id, "param_name": k, "param_value": float(v),
                                  "distribution_json": dist_json[k]} for k, v in params.items()]
        rows["trial_intermediate_values"] += [{"trial_id": trial_id, "step": e, "intermediate_value": v,
                                               "intermediate_value_type": "FINITE"} for e, v in curve.items()]
        attrs = {"params": {**params, "batch_size": 128}, "worker": f"host:{number % 8}:cpu",
                 "best_epoch": max(curve, key=curve.__getitem__),
                 "epochs": [{"epoch": e, "score": v, "metrics": {"accuracy": v}} for e, v in curve.items()]}
        rows["trial_user_attributes"] += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                          for k, v in attrs.items()]
    with db.begin() as conn:
        for table, values in rows.items():
            conn.execute(meta.tables[table].insert(), values)
    db.dispose()
    storage.engine.dispose()

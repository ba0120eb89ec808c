"""One claim's trials, from claim to finish: the trial lifecycle every worker runs.

A worker claims one slot, or with packing (``kdsearch worker --pack K``, ``KDSEARCH_PACK``) up to K pending slots of
one study in one statement (``storage.claim_slots``: never more than are pending, so the budget stays exact), and
hands them to a ``TrialRunner``. A solo claim is a pack of one; both take the same path:

1. **prepare**: the study is prepared once (``TrialEngine.prepare``: data, teacher cache, task). An error that is
   the user's fault (``kdsearch.errors.fault_of``) fails the study with the reason; anything else gives the slot
   back untried and holds the study back with exponential backoff (``kdsearch.retry``), so any worker tries again;
   ``KDSEARCH_MAX_PREPARE_ATTEMPTS`` failures in a row fail the study.
2. **ask**: each slot asks Optuna for its trial with its own slot's sampler (TPE with ``constant_liar`` sees the
   pack's earlier members running, so the K trials differ), then is profiled and checked against the constraints
   (an infeasible one is recorded, untrained, and leaves).
3. **train**: members are grouped by (student shape, batch size, transfer copies); each group is one
   ``TrialEngine.run_pack`` call (a solo claim: ``run_trial``), groups one after another. A member's initial weights
   and dropout come from the study's seed and its batch order from the pack's ``batch_seed`` (the study's seed too),
   exactly as a solo trial's: a packed trial equals the same trial run alone. Its ``pack`` user attribute says so. At
   every epoch boundary each member's callback reports, prunes and stops it (pruned, study cancelled or expired,
   shutdown, lost claim).
4. **store, tell, finish**: as soon as a member leaves (its epochs done, stopped or diverged), its checkpoint is
   stored and its trial told (COMPLETE or PRUNED: only once the checkpoint is stored), and its slot closed, while
   the others train on. A failure is sorted by ``fault_of``: the infrastructure's (a full disk, the artifact store,
   the database) gives the trial back untried (WAITING, the slot pending, no attempt spent); anything else fails
   that trial alone (FAIL with the reason, its slot retried while attempts remain). A trial stopped on purpose
   (``TrialStopped``: shutdown, a slot taken over) is failed and retried elsewhere.

Every database write before training is retried while the database is down (``storage.retry_operational``): an
outage there costs a pause, never a trial. The ``Worker`` around it supervises: claims, the heartbeat, signals,
idling, backing off after infrastructure faults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from sqlalchemy.engine import Engine

from distill import EpochResult, TrialEngine, TrialOutcome
from distill.engine import PackedTrial
from kdsearch.errors import Fault, TrialStopped, fault_of
from kdsearch.objectives import COST_BY_NAME
from kdsearch.retry import backoff_delay
from search_space import (
    StudentSpace,
    StudySpec,
    TaskInfo,
    confine_local_paths,
    make_pruner,
    make_sampler,
    optuna_distributions,
    trial_params,
)
from search_space.objectives import constraint_violations, infeasible_reason, same_shape_should_prune
from service.heartbeat import SlotHeartbeat
from service.preparation_progress import PreparationReporter
from service.settings import Settings
from service.trial_log import TrialLog
from storage import (
    ArtifactLayout,
    Claim,
    SlotState,
    best_trials,
    enqueue_event,
    ensure_optuna_study,
    fail_study,
    finish_slot,
    optuna_study_exists,
    preparation_failed,
    preparation_succeeded,
    record_slot_trial,
    release_slot,
    retry_operational,
    study_should_stop,
)

log = logging.getLogger("kdsearch.worker")


@dataclasses.dataclass
class WorkerServices:
    """What a ``TrialRunner`` uses of the worker that runs it."""

    settings: Settings
    worker_id: str
    db: Engine  # the kdsearch tables (SQLAlchemy)
    optuna_storage: optuna.storages.RDBStorage
    layout: ArtifactLayout
    trial_engine: TrialEngine
    stopping: threading.Event  # set on SIGTERM / Ctrl-C: running trials stop at their next epoch boundary
    set_status: Callable[[str, int | None, int | None], None]  # (status, study id, trial number)


@dataclasses.dataclass
class ClaimReport:
    """How a claim went, for the worker's backoff: the infrastructure faults it met, and whether it stored a trial."""

    faults: list[str] = dataclasses.field(default_factory=list)
    stored: bool = False


@dataclasses.dataclass
class _Member:
    claim: Claim
    study: optuna.Study  # loaded with this slot's sampler
    lost: threading.Event  # set by the heartbeat when another worker took the slot over
    trial: optuna.Trial | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    profile: dict[str, Any] | None = None


def pack_groups(params: list[dict[str, Any]], shape_names: set[str] | frozenset[str]) -> list[list[int]]:
    """Indices of ``params`` grouped by (searched shape, batch size, transfer copies), in order of first appearance:
    trials that differ in any cannot share a pack (one batch order over one train split)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        key = json.dumps({**{n: p.get(n) for n in sorted(shape_names)}, "batch_size": p.get("batch_size"),
                          "transfer_copies": p.get("transfer_copies")}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class _SlotRecordingSampler(optuna.samplers.BaseSampler):
    """The slot's sampler, telling the slot about its trial the moment Optuna creates it (``before_trial``), before
    any parameter is sampled: a worker killed inside ``ask`` leaves a slot that names its trial (the reaper fails
    it), never a RUNNING trial nobody knows. Everything else is the wrapped sampler's."""

    def __init__(self, inner: optuna.samplers.BaseSampler, on_trial: Callable[[int], None]) -> None:
        self.inner, self.on_trial = inner, on_trial

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.on_trial(trial._trial_id)
        self.inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def describe_error(exc: BaseException) -> str:
    """A failure's reason as the API shows it; ``out of memory`` for any out-of-memory error (CUDA's included), whose
    cached blocks are released so the retry starts clean."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return "out of memory"
    return f"{type(exc).__name__}: {exc}"


class TrialRunner:
    """Runs one claim (one slot, or a pack of one study's slots): see the module's docstring."""

    def __init__(self, services: WorkerServices, claims: list[Claim], heart: SlotHeartbeat,
                 lost: dict[int, threading.Event]) -> None:
        assert claims and len({c.study_id for c in claims}) == 1, "a claim is one study's slots"
        self.services = services
        self.settings = services.settings
        self.db = services.db
        self.trial_engine = services.trial_engine
        self.claims = claims
        self.heart = heart
        self.lost = lost  # slot id -> its event
        self.report = ClaimReport()
        self._trial_logs: dict[int, TrialLog] = {}  # trial id -> its lines, while it runs here

    # -- the lifecycle ---------------------------------------------------------------------------------------

    def run(self) -> ClaimReport:
        spec = StudySpec.model_validate(self.claims[0].spec)
        members = [_Member(claim, self._load_study(claim, spec), self.lost[claim.slot_id]) for claim in self.claims]
        prepared = self._prepare(members[0], spec)
        if prepared is None:  # the first slot is closed (study failed) or given back: the others follow it
            self._give_back(members[1:])
            return self.report
        task = self.trial_engine.task(prepared)
        space = self.trial_engine.student_space(prepared, spec)
        ready: list[_Member] = []
        for member in members:
            if member.lost.is_set():
                log.warning("slot %d was taken over while the study was prepared; leaving it", member.claim.slot_id)
                continue
            if self._ask_and_check(member, spec, prepared, task, space):
                ready.append(member)
        for group in pack_groups([m.params for m in ready], set(space.shape_names)):
            self._train_group([ready[i] for i in group], spec, prepared, task)
        return self.report

    def _give_back(self, members: list[_Member]) -> None:
        reason = retry_operational(lambda: study_should_stop(self.db, members[0].claim.study_id)) if members else None
        for member in members:
            self.heart.release(member.claim.slot_id)
            if reason:  # the study failed while it was prepared: these slots close with it
                finish_slot(self.db, member.claim.slot_id, self.services.worker_id, outcome=SlotState.FAILED,
                            error=reason, max_attempts=0)
            else:
                release_slot(self.db, member.claim.slot_id, self.services.worker_id)

    def _load_study(self, claim: Claim, spec: StudySpec) -> optuna.Study:
        """The slot's Optuna study (retried while the database is down: a claim never breaks off before its trial
        is asked, which would leave the slot to the reaper and spend an attempt on the database's outage)."""
        storage = self.services.optuna_storage

        def load() -> optuna.Study:
            if not optuna_study_exists(storage, claim.study_name):
                # The API crashed between our row and Optuna's: create the twin now.
                ensure_optuna_study(storage, claim.study_name, directions=spec.directions)
            return optuna.load_study(study_name=claim.study_name, storage=storage,
                                     sampler=make_sampler(spec, claim.slot_no), pruner=make_pruner(spec))
        return retry_operational(load)

    # -- prepare ---------------------------------------------------------------------------------------------

    def _prepare(self, member: _Member, spec: StudySpec) -> Any | None:
        """The engine's prepared study (data, teacher cache, task), or None when it could not be prepared.

        Errors are sorted by whose fault they are (``fault_of``): the user's data or spec fail the study with the
        reason; anything else (out of memory, network, disk, database) gives the slot back untried and holds the
        study back with exponential backoff, so any worker tries again; ``max_prepare_attempts`` consecutive
        failures fail the study with the last reason and the count.
        """
        claim, study = member.claim, member.study
        reporter = PreparationReporter(self.db, claim.study_id, claim.study_name, self.services.worker_id,
                                       interval_s=self.settings.progress_interval, tty=sys.stderr.isatty())
        started = time.monotonic()
        try:
            # Paths again, as this host sees them now: a folder can change after the API checked it.
            confine_local_paths(spec, self.settings.allowed_roots)
            prepared = self.trial_engine.prepare(spec, progress=reporter)
            task = self.trial_engine.task(prepared)
        except Exception as exc:  # noqa: BLE001 - sorted by whose fault it is
            if fault_of(exc) is Fault.USER:
                self._study_failed(claim, f"{type(exc).__name__}: {exc}", "failed during setup")
            else:  # nobody's data error: retried, never a lost study
                self._preparation_failed(claim, exc)
            return None
        finally:
            reporter.close()
        retry_operational(lambda: preparation_succeeded(
            self.db, claim.study_id, round(time.monotonic() - started, 2) if reporter.built else None))
        # What the dashboard, the API and the model card read: the task and the teacher's reference scores. Each
        # write is idempotent, so the whole is retried while the database is down (the fault bench's PostgreSQL
        # stop landed here and left the slot to the reaper).
        teacher_metrics = self.trial_engine.teacher_metrics(prepared)

        def record_study_attrs() -> None:
            attrs = study.user_attrs
            if "task" not in attrs:
                study.set_user_attr("task", task.to_json())
            if teacher_metrics is not None and "teacher_metrics" not in attrs:
                study.set_user_attr("teacher_metrics", teacher_metrics)
            if "teacher_profile" not in attrs:  # the Pareto chart's reference point, measured once
                teacher_profile = self.trial_engine.teacher_profile(prepared)
                if teacher_profile is not None:
                    study.set_user_attr("teacher_profile", teacher_profile)
        retry_operational(record_study_attrs)
        return prepared

    def _study_failed(self, claim: Claim, reason: str, what: str) -> None:
        log.error("study %s %s: %s", claim.study_name, what, reason)
        log.debug("%s", traceback.format_exc())
        fail_study(self.db, claim.study_id, reason)
        self.heart.release(claim.slot_id)
        finish_slot(self.db, claim.slot_id, self.services.worker_id, outcome=SlotState.FAILED, error=reason,
                    max_attempts=0)

    def _preparation_failed(self, claim: Claim, exc: Exception) -> None:
        reason = describe_error(exc)
        log.debug("%s", traceback.format_exc())
        attempts = retry_operational(lambda: preparation_failed(
            self.db, claim.study_id, reason, retry_delay_s=self.settings.prepare_retry_delay))
        if attempts >= self.settings.max_prepare_attempts:
            self._study_failed(claim, f"{reason} (preparation failed {attempts} times in a row)", "failed")
            return
        delay = backoff_delay(self.settings.prepare_retry_delay, attempts)
        log.warning("study %s: preparation failed (%s), attempt %d of %d; any worker retries in %.0f s",
                    claim.study_name, reason, attempts, self.settings.max_prepare_attempts, delay)
        self.heart.release(claim.slot_id)
        release_slot(self.db, claim.slot_id, self.services.worker_id)

    # -- ask -------------------------------------------------------------------------------------------------

    def _ask_and_check(self, member: _Member, spec: StudySpec, prepared: Any, task: TaskInfo,
                       space: StudentSpace) -> bool:
        """Ask the member's trial, profile it and check the constraints; False when it is done already (infeasible:
        recorded; failed: recorded and its slot retried)."""
        trial, member.params = self._ask(member.claim, spec, member.study, task, space)
        member.trial = trial
        self.services.set_status("busy", member.claim.study_id, trial.number)
        try:
            member.profile = self._profile(spec, prepared, trial, member.params)
            if (reason := infeasible_reason(spec.constraints, member.profile or {})) is None:
                return True
            # Known before training: the student is never trained, the sampler learns from the violation.
            self._trial_log(trial).add(logging.INFO, "study %s trial %d not trained: %s", member.claim.study_name,
                                       trial.number, reason)
            retry_operational(lambda: self._record_infeasible(member.study, trial, reason))
            self._finish_slot(member, SlotState.DONE, None)
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and retried
            self._trial_broke_off(member, exc)
        return False

    def _ask(self, claim: Claim, spec: StudySpec, study: optuna.Study, task: TaskInfo,
             space: StudentSpace) -> tuple[optuna.Trial, dict[str, Any]]:
        """A new trial over the parameters that mean something for the task and the student's searched shape (valid
        shapes only), recorded on the slot. ``params`` holds the hyperparameters and the shape's searched dimensions
        by name: what ``distill.train.TrainConfig.from_params`` reads, and ``export-best --seeds`` retrains."""
        kd_distributions = optuna_distributions(spec.search_space, task.ignored_params)
        asked: list[int] = []  # the trials this slot's ask created (more than one if an outage cut an ask short)

        def on_trial(trial_id: int) -> None:
            # An ask cut short by an outage left its trial RUNNING: back to WAITING (a later ask runs it), never
            # orphaned. Then the slot names its new trial before anything else happens to it.
            for earlier in asked:
                retry_operational(functools.partial(self._requeue_trial, earlier))
            asked.append(trial_id)
            retry_operational(lambda: record_slot_trial(self.db, claim.slot_id, trial_id))

        study.sampler = _SlotRecordingSampler(study.sampler, on_trial)
        # Retried while the database is down, like every write of this claim before training: an outage here must
        # not leave the slot claimed for the reaper (an attempt spent on the infrastructure's fault).
        trial = retry_operational(lambda: study.ask({**kd_distributions, **space.distributions}))
        retry_operational(lambda: record_slot_trial(self.db, claim.slot_id, trial._trial_id))
        kd_sampled = {k: v for k, v in trial.params.items() if k in kd_distributions}
        params: dict[str, Any] = {**trial_params(spec.search_space, kd_sampled, task.ignored_params),
                                  **space.shape_params(trial.params)}

        def record_trial_attrs() -> None:
            trial.set_user_attr("params", params)
            trial.set_user_attr("worker", self.services.worker_id)
            trial.set_user_attr("slot", claim.slot_no)
            trial.set_user_attr("attempt", claim.attempt)
        retry_operational(record_trial_attrs)
        self._trial_log(trial).say(logging.INFO, "study %s trial %d (slot %d, attempt %d) on worker %s: %s",
                                   claim.study_name, trial.number, claim.slot_no, claim.attempt,
                                   self.services.worker_id, params)
        return trial, params

    def _profile(self, spec: StudySpec, prepared: Any, trial: optuna.Trial,
                 params: dict[str, Any]) -> dict[str, Any] | None:
        """Measure the trial's student before training (``distill.profile``), record it, and record how far it is
        from each constraint (Optuna's ``Trial.set_constraint``: feasible at 0 or below)."""
        profile = self.trial_engine.profile(prepared, params)
        if profile is None:
            if spec.multi_objective or spec.constraints is not None:
                raise RuntimeError("this trial engine measures no student profile, which objectives "
                                   f"{spec.objectives} and constraints need")
            return None
        retry_operational(lambda: trial.set_user_attr("profile", profile))
        if spec.constraints is not None:
            # Optuna 5's successor of constraints_func: stored with the trial, read by the samplers that model
            # feasibility (TPE) and by best_trial / best_trials, whatever sampler the study uses.
            for name, violation in constraint_violations(spec.constraints, profile).items():
                retry_operational(functools.partial(trial.set_constraint, name, violation))
        return profile

    def _record_infeasible(self, study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        """An untrained infeasible trial: PRUNED with its reason and no value, so it is never best, counts towards
        ``n_trials`` and tells the sampler where not to go. Idempotent, like ``_record_outcome``."""
        if not self._still_running(trial):
            return
        trial.set_user_attr("stop_reason", reason)
        self._trial_log(trial).save()
        study.tell(trial, state=TrialState.PRUNED)
        self._trial_logs.pop(trial._trial_id, None)

    # -- train -----------------------------------------------------------------------------------------------

    def _train_group(self, group: list[_Member], spec: StudySpec, prepared: Any, task: TaskInfo) -> None:
        """Train one group (one shape and batch size) and settle each member as soon as it leaves."""
        trials = [m.trial for m in group]
        assert all(t is not None for t in trials)
        numbers = [t.number for t in trials if t is not None]
        self.services.set_status("busy", group[0].claim.study_id, numbers[0])
        packed_claim = len(self.claims) > 1
        batch_seed = spec.seed  # as a solo trial's batch order: a packed trial equals its solo run
        if packed_claim:
            log.info("study %s: training trials %s together (pack of %d)", group[0].claim.study_name,
                     ", ".join(map(str, numbers)), len(group))
        with tempfile.TemporaryDirectory(prefix="kdsearch-trial-") as tmp:
            runs: list[PackedTrial] = []
            for i, member in enumerate(group):
                trial = member.trial
                assert trial is not None
                if packed_claim:
                    info = {"size": len(group), "members": numbers, "batch_seed": batch_seed,
                            "step": self.trial_engine.pack_step}
                    retry_operational(functools.partial(trial.set_user_attr, "pack", info))
                runs.append(PackedTrial(member.params, spec.seed,
                                        self._epoch_reporter(member, spec, task), Path(tmp) / f"checkpoint-{i}"))
            settled: set[int] = set()

            def member_done(index: int, result: TrialOutcome | Exception) -> None:
                """A member left the pack: stored and told now, its slot closed, while the others train on."""
                settled.add(index)
                self._settle(group[index], result, runs[index].checkpoint_dir, spec, task)

            results: list[TrialOutcome | Exception]
            try:
                if packed_claim:
                    results = self.trial_engine.run_pack(prepared, runs, batch_seed, member_done)
                else:  # a solo claim: the engine's own single-trial path
                    (run,) = runs
                    results = [self.trial_engine.run_trial(prepared, run.params, run.seed, run.on_epoch_end,
                                                           run.checkpoint_dir)]
            except Exception as exc:  # noqa: BLE001 - the pack failed: every member not yet done is retried
                results = [exc] * len(group)
            for index, (member, result, trained) in enumerate(zip(group, results, runs, strict=True)):
                if index not in settled:
                    self._settle(member, result, trained.checkpoint_dir, spec, task)

    def _epoch_reporter(self, member: _Member, spec: StudySpec,
                        task: TaskInfo) -> Callable[[EpochResult], str | None]:
        """The callback after each epoch: report the study's metric (the pruner decides), record every metric,
        and say whether to stop (claim lost, shutdown, study cancelled or expired, pruned).

        A study with several objectives reports nothing to Optuna (``Trial.report`` takes one objective; its
        pruners and TPE's ranking of pruned trials need one direction): every epoch stays in the ``epochs``
        attribute, and the pruning rule is ``same_shape_should_prune`` (a trial against trials of its shape)."""
        trial, study, claim, profile = member.trial, member.study, member.claim, member.profile
        assert trial is not None
        epochs: list[dict[str, Any]] = []

        def should_prune(result: EpochResult) -> bool:
            if not spec.multi_objective:
                return bool(retry_operational(trial.should_prune))
            if spec.pruner == "none" or profile is None:
                return False
            peers = retry_operational(lambda: study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            return same_shape_should_prune(peers, profile["shape"], result.epoch, result.score)

        def on_epoch_end(result: EpochResult) -> str | None:
            # Each store call is retried, so a database restart mid-trial costs a pause, not the trial.
            if not spec.multi_objective:
                retry_operational(lambda: trial.report(result.score, result.epoch))
            epochs.append({"epoch": result.epoch, "step": result.step, "train_loss": result.train_loss,
                           "eval_loss": result.eval_loss, "score": result.score, "metrics": result.metrics,
                           "seconds": round(result.seconds, 3), "degenerate": result.degenerate})
            retry_operational(lambda: trial.set_user_attr("epochs", epochs))
            self._trial_log(trial).say(
                logging.INFO, "  trial %d epoch %d: %s", trial.number, result.epoch,
                ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or f"{task.metric} {result.score}")
            if member.lost.is_set():
                return TrialStopped.LOST_CLAIM
            if self.services.stopping.is_set():
                return TrialStopped.SHUTDOWN
            if reason := retry_operational(lambda: study_should_stop(self.db, claim.study_id)):
                return reason
            if should_prune(result):
                return "pruned"
            return None

        return on_epoch_end

    # -- store, tell, finish -----------------------------------------------------------------------------------

    def _settle(self, member: _Member, result: TrialOutcome | Exception, checkpoint: Path, spec: StudySpec,
                task: TaskInfo) -> None:
        """Store and tell one member's result, or fail (or give back) it alone; then close its slot."""
        try:
            if isinstance(result, Exception):
                raise result
            self._store_outcome(member, spec, result, checkpoint, task)
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and retried
            self._trial_broke_off(member, exc)
            return
        self._finish_slot(member, SlotState.DONE, None)

    def _store_outcome(self, member: _Member, spec: StudySpec, outcome: TrialOutcome, checkpoint: Path,
                       task: TaskInfo) -> None:
        """Store a trained trial's checkpoint, then tell Optuna (COMPLETE, or PRUNED with its stop reason): a trial
        is only COMPLETE (or PRUNED) once its checkpoint is stored. A stop for shutdown or a lost claim raises
        ``TrialStopped``: the trial is failed and its slot retried."""
        trial, claim, study = member.trial, member.claim, member.study
        assert trial is not None
        if outcome.stopped in (TrialStopped.SHUTDOWN, TrialStopped.LOST_CLAIM):
            raise TrialStopped(outcome.stopped)
        artifact_id = self.services.layout.store_checkpoint(checkpoint, trial, storage=self.services.optuna_storage)
        values = [outcome.best_score]
        if spec.cost_objective is not None:
            assert member.profile is not None  # _profile refuses a multi-objective study without one
            values.append(COST_BY_NAME[spec.cost_objective].read(member.profile))
        trial_log = self._trial_log(trial)
        trial_log.add(logging.INFO, "study %s trial %d: checkpoint stored as artifact %s", claim.study_name,
                      trial.number, artifact_id)
        trial_log.add(logging.INFO, "study %s trial %d %s: best %s %.4f at epoch %d", claim.study_name, trial.number,
                      outcome.stopped or "complete", task.metric, outcome.best_score, outcome.best_epoch)
        if outcome.degenerate:
            trial_log.add(logging.WARNING, "study %s trial %d is degenerate: %s", claim.study_name, trial.number,
                          outcome.degenerate)
        retry_operational(lambda: self._record_outcome(study, trial, outcome, artifact_id, values))
        self._trial_logs.pop(trial._trial_id, None)
        self.report.stored = True
        retry_operational(lambda: self._announce_best(claim, spec, study, trial, outcome))

    def _still_running(self, trial: optuna.Trial) -> bool:
        """False when an earlier attempt's tell went through before the connection dropped (the trial is finished);
        ``TrialStopped`` when a reaper failed it meanwhile."""
        state = self.services.optuna_storage.get_trial(trial._trial_id).state
        if state in (TrialState.COMPLETE, TrialState.PRUNED):
            return False
        if state != TrialState.RUNNING:
            raise TrialStopped(f"trial is {state.name} (failed by a reaper)")
        return True

    def _record_outcome(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome,
                        artifact_id: str, values: list[float]) -> None:
        """Attributes first, then ``tell``; safe to retry after a dropped connection (idempotent)."""
        if not self._still_running(trial):
            return
        trial.set_user_attr("checkpoint_artifact_id", artifact_id)
        trial.set_user_attr("best_epoch", outcome.best_epoch)
        trial.set_user_attr("metrics", outcome.best_metrics)
        trial.set_user_attr("degenerate", outcome.degenerate)  # why its best epoch is degenerate, else None
        trial.set_user_attr("train_samples_per_second", round(outcome.train_samples_per_second, 1))
        if outcome.precision is not None:
            trial.set_user_attr("precision", outcome.precision)
        self._trial_log(trial).save()  # its last lines (the checkpoint, the outcome): frozen once told
        if outcome.stopped:
            trial.set_user_attr("stop_reason", outcome.stopped)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, values)  # the metric, then the cost of a multi-objective study

    def _announce_best(self, claim: Claim, spec: StudySpec, study: optuna.Study, trial: optuna.Trial,
                       outcome: TrialOutcome) -> None:
        """A ``new_best`` notification when this trial is now the study's best (and the spec asked for it)."""
        if spec.notify is None or "new_best" not in spec.notify.events or outcome.stopped:
            return
        # The one rule of "best" (storage.best_trials): with several objectives, joining the Pareto front.
        if trial.number in {t.number for t in best_trials(study)}:
            enqueue_event(self.db, claim.study_id, "new_best",
                          {"trial_number": trial.number, "value": outcome.best_score})

    def _trial_log(self, trial: optuna.Trial) -> TrialLog:
        """The worker's lines about a trial it runs (``service.trial_log``), kept on the trial."""
        return self._trial_logs.setdefault(trial._trial_id, TrialLog(trial))

    def _trial_broke_off(self, member: _Member, exc: Exception) -> None:
        """A trial that raised: the infrastructure's fault gives it back untried (``_give_back_trial``); anything
        else is the trial's failure (FAIL with the reason, its slot retried while attempts remain)."""
        if fault_of(exc) is Fault.INFRASTRUCTURE:
            self._give_back_trial(member, exc)
        else:
            self._finish_slot(member, SlotState.FAILED, self._fail_trial(member, exc))

    def _give_back_trial(self, member: _Member, exc: Exception) -> None:
        """The infrastructure failed under a trial (a full disk, the artifact store, the database), not the trial:
        no attempt is spent. Its Optuna trial goes back to WAITING, so the study's next ``ask`` runs it again with
        the same parameters (it is never FAIL, and the study's budget stays whole), and its slot goes back to
        pending untried (``release_slot``), as after a failed preparation; the worker then backs off. A trial
        already told (the fault came after) keeps its result and closes its slot."""
        trial, claim = member.trial, member.claim
        assert trial is not None
        reason = describe_error(exc)
        self.report.faults.append(reason)
        trial_log = self._trial_logs.pop(trial._trial_id, None) or TrialLog(trial)
        trial_log.add(logging.WARNING, "study %s trial %d: %s is the infrastructure's fault, not the trial's: slot %d "
                      "goes back untried and the trial waits to run again", claim.study_name, trial.number, reason,
                      claim.slot_id)
        log.debug("%s", "".join(traceback.format_exception(exc)))
        if member.lost.is_set():  # taken over: its new holder settles the trial and the slot
            self.heart.release(claim.slot_id)
            return
        try:
            trial_log.save()
            state = retry_operational(lambda: self._requeue_trial(trial._trial_id))
            if state in (TrialState.COMPLETE, TrialState.PRUNED):
                self._finish_slot(member, SlotState.DONE, None)
                return
            self.heart.release(claim.slot_id)
            retry_operational(lambda: release_slot(self.db, claim.slot_id, self.services.worker_id))
        except Exception:  # the database is down too: the slot is retried once its heartbeat is stale
            log.warning("slot %d could not be given back (the database is unreachable); it is retried once its "
                        "heartbeat is stale", claim.slot_id, exc_info=True)

    def _requeue_trial(self, trial_id: int) -> TrialState:
        """A RUNNING trial back to WAITING (Optuna's queue: the next ``ask`` pops it, parameters kept); returns the
        trial's state after (a finished trial is left as it is)."""
        storage = self.services.optuna_storage
        state = storage.get_trial(trial_id).state
        if state != TrialState.RUNNING:
            return state
        storage.set_trial_state_values(trial_id, TrialState.WAITING)
        return TrialState.WAITING

    def _fail_trial(self, member: _Member, exc: BaseException) -> str:
        """Record a trial's failure (FAIL, with the reason); returns the reason for its slot. A bug's traceback goes
        to the log."""
        trial, claim = member.trial, member.claim
        assert trial is not None
        error = describe_error(exc)
        trial_log = self._trial_logs.pop(trial._trial_id, None) or TrialLog(trial)
        if isinstance(exc, TrialStopped):
            trial_log.add(logging.INFO, "study %s trial %d stopped: %s", claim.study_name, trial.number, error)
        else:
            trial_log.add(logging.ERROR, "study %s trial %d failed: %s", claim.study_name, trial.number, error)
            log.debug("%s", "".join(traceback.format_exception(exc)))
        try:
            trial.set_user_attr("fail_reason", error)
            trial_log.save()
            member.study.tell(trial, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - a reaper may have failed it already
            log.debug("trial %d was already finished", trial.number)
        return error

    def _finish_slot(self, member: _Member, outcome: str, error: str | None) -> None:
        """Close the slot (done, or failed and retried while attempts remain), unless it was taken over."""
        claim = member.claim
        self.heart.release(claim.slot_id)
        if not member.lost.is_set():
            retry_operational(lambda: finish_slot(self.db, claim.slot_id, self.services.worker_id, outcome=outcome,
                                                  error=error, max_attempts=self.settings.max_trial_attempts))

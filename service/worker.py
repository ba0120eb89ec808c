"""A worker: claims trial slots from the shared store, trains, reports to Optuna, stores checkpoints, loops.

    kdsearch worker --device cpu          # one worker process per physical core, one thread each
    kdsearch worker --device cpu --procs 1 --threads-per-proc 2   # one process, two threads
    kdsearch worker --gpus all            # one worker process per visible GPU (service.supervisor)
    kdsearch worker --pack 3              # claim up to 3 slots of a study and train them together

Workers need only the database and the artifacts directory, never the API. A failing trial is marked FAIL and
retried; a study that cannot run at all (bad data, a model that will not load) is marked failed with the reason,
and the worker goes on with other studies. A fault of the infrastructure while a trial trains or is stored (a full
or failing disk, the artifact store, the database: ``infrastructure_fault``) is nobody's trial failing: the trial
waits to be run again, its slot goes back untried, and the worker backs off; ``KDSEARCH_MAX_INFRA_FAULTS`` such
claims in a row and it exits (1), saying why. SIGTERM or Ctrl-C: stop claiming, stop the running trial at its next
epoch boundary (it is marked FAIL and retried elsewhere), exit 0.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError

from distill import STUDY_FAULTS, EpochResult, TrialEngine, TrialOutcome, load_engine
from distill.packed import resolve_pack
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
from service.notifier import Notifier
from service.packing import PackRunner
from service.progress import PreparationReporter
from service.settings import Settings
from service.trial_log import TrialLog
from storage import (
    Claim,
    SlotState,
    StoreError,
    check_schema,
    claim_slot,
    claim_slots,
    enqueue_event,
    ensure_optuna_study,
    fail_study,
    finish_slot,
    is_transient,
    make_engine,
    make_layout,
    make_optuna_storage,
    optuna_study_exists,
    preparation_failed,
    preparation_succeeded,
    prune_workers,
    reap_stale_slots,
    record_slot_trial,
    release_slot,
    retry_operational,
    settle_expired_studies,
    study_should_stop,
    upsert_worker,
)

log = logging.getLogger("kdsearch.worker")

SHUTDOWN = "worker shutting down"
LOST_CLAIM = "slot taken over after a missed heartbeat"


class Worker:
    def __init__(self, settings: Settings, *, device: str = "cpu", engine: TrialEngine | None = None,
                 exit_when_idle: bool = False, max_trials: int | None = None) -> None:
        self.settings = settings
        self.device = device
        self.exit_when_idle = exit_when_idle
        self.max_trials = max_trials
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}:{os.getpid()}:{device}"
        self.db = make_engine(settings.database_url, pool_size=settings.worker_pool_size,
                              max_overflow=settings.worker_max_overflow,
                              busy_timeout_s=settings.sqlite_busy_timeout_s)
        # Workers never migrate: a database at another schema revision stops them here, with both revisions named.
        check_schema(self.db)
        self.optuna_storage = make_optuna_storage(
            settings.database_url, pool_size=settings.worker_pool_size,
            max_overflow=settings.worker_max_overflow, busy_timeout_s=settings.sqlite_busy_timeout_s)
        self.layout = make_layout(settings.artifacts, settings.local_cache, self.db, signing_key=settings.artifact_key)
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        self.engine = engine or load_engine(settings.engine, artifacts=self.layout, device=device, log=log.info,
                                            precision=settings.precision, pack_step=settings.pack_step)
        # Trials trained together per claim (distill.packed): 1 runs each trial alone, as without packing.
        self.pack = resolve_pack(settings.pack, device)
        self._stop = threading.Event()
        self._last_housekeeping = 0.0
        self._heart: SlotHeartbeat | None = None  # while a claim (or a pack) runs
        self._trial_logs: dict[int, TrialLog] = {}  # trial id -> its lines, while it runs here
        # The current claim's infrastructure faults (their reasons), and whether it stored any trial.
        self._claim_faults: list[str] = []
        self._claim_stored = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        if not self._stop.is_set():
            log.info("stop requested: finishing at the next epoch boundary")
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        import torch

        log.info("worker %s started (database %s, %d torch thread(s), precision setting %s)", self.worker_id,
                 self.db.url.render_as_string(), torch.get_num_threads(), self.settings.precision)
        self._status("idle")
        notifier = Notifier(self.db, self.settings, f"{self.worker_id}:notifier").start()
        trials_run = 0
        outage_delay = 0.5
        exit_code = 0
        faulted_claims = 0  # claims in a row that hit an infrastructure fault and stored nothing
        try:
            while not self._stop.is_set():
                try:
                    self._housekeeping()
                    claims = self._claim()
                    outage_delay = 0.5
                except (DBAPIError, StorageInternalError) as exc:
                    if not is_transient(exc):  # a bug or a schema mismatch: say so and stop, never spin on it
                        log.error("%s", StoreError("claiming a trial slot", exc))
                        exit_code = 1
                        break
                    # The database is down or restarting: wait and reconnect (pool_pre_ping replaces dead links).
                    log.warning("database unavailable (%s); retrying in %.1f s",
                                type(getattr(exc, "orig", exc)).__name__, outage_delay)
                    self._stop.wait(outage_delay)
                    outage_delay = min(outage_delay * 2, 15.0)
                    continue
                if not claims:
                    if self.exit_when_idle:
                        break
                    self._stop.wait(self.settings.poll_interval)
                    continue
                slots = ", ".join(str(claim.slot_id) for claim in claims)
                self._claim_faults, self._claim_stored = [], False
                try:
                    if len(claims) == 1:
                        self.run_claim(claims[0])
                    else:
                        PackRunner(self, claims).run()
                except StoreError as exc:
                    log.error("stopping: %s (slot %s is retried once its heartbeat is stale)", exc, slots)
                    exit_code = 1
                    break
                except (DBAPIError, StorageInternalError) as exc:
                    if not is_transient(exc):
                        log.error("stopping: %s (slot %s is retried once its heartbeat is stale)",
                                  StoreError(f"running slot {slots}", exc), slots)
                        exit_code = 1
                        break
                    log.exception("trial on slot %s broke off; it will be retried", slots)
                except Exception:
                    # Left claimed: once its heartbeat is stale a worker takes the slot over and retries it.
                    log.exception("trial on slot %s broke off; it will be retried", slots)
                if self._claim_faults and not self._claim_stored:
                    faulted_claims += 1
                    if faulted_claims >= self.settings.max_infra_faults:
                        log.error("stopping: %d claims in a row hit an infrastructure fault (last: %s); their slots "
                                  "were given back untried and their trials wait to be run again",
                                  faulted_claims, self._claim_faults[-1])
                        exit_code = 1
                        break
                    delay = backoff_delay(self.settings.prepare_retry_delay, faulted_claims)
                    log.warning("infrastructure fault (%s), %d of %d in a row: backing off %.1f s",
                                self._claim_faults[-1], faulted_claims, self.settings.max_infra_faults, delay)
                    self._stop.wait(delay)
                    continue
                faulted_claims = 0 if self._claim_stored else faulted_claims
                trials_run += len(claims)
                if self.max_trials is not None and trials_run >= self.max_trials:
                    break
        finally:
            notifier.stop()
            self._status("stopped")
            self.db.dispose()
            self.optuna_storage.engine.dispose()
        log.info("worker %s stopped after %d trial(s)", self.worker_id, trials_run)
        return exit_code

    def _claim(self) -> list[Claim]:
        """The next work: one slot, or with packing up to ``pack`` slots of one study (``claim_slots``)."""
        if self.pack > 1:
            return claim_slots(self.db, self.worker_id, self.pack)
        claim = claim_slot(self.db, self.worker_id)
        return [] if claim is None else [claim]

    def _status(self, status: str, study_id: int | None = None, trial_number: int | None = None) -> None:
        try:
            retry_operational(lambda: upsert_worker(self.db, self.worker_id, host=self.host, pid=os.getpid(),
                                                    device=self.device, status=status, study_id=study_id,
                                                    trial_number=trial_number), attempts=3)
        except Exception:
            log.warning("could not record worker status", exc_info=True)

    def _housekeeping(self) -> None:
        """Take over stale slots (dead workers) and close studies past their timeout; at most every few s."""
        now = time.monotonic()
        if now - self._last_housekeeping < min(self.settings.heartbeat_interval, 5.0):
            return
        self._last_housekeeping = now
        self._status("idle")
        settle_expired_studies(self.db)
        prune_workers(self.db, older_than_s=self.settings.worker_retention)
        for slot_id, _study_id, trial_id in reap_stale_slots(
            self.db, grace_period_s=self.settings.grace_period, reaper_id=self.worker_id
        ):
            outcome = SlotState.FAILED
            if trial_id is not None:
                try:
                    # The reason first: a finished trial takes no more attributes.
                    self.optuna_storage.set_trial_system_attr(trial_id, "fail_reason", "stale heartbeat")
                    self.optuna_storage.set_trial_state_values(trial_id, TrialState.FAIL)
                except Exception:  # noqa: BLE001 - a status line must never stop a worker
                    if self.optuna_storage.get_trial(trial_id).state in (TrialState.COMPLETE, TrialState.PRUNED):
                        outcome = SlotState.DONE
            log.warning("slot %d: worker stopped heart-beating; trial %s %s", slot_id, trial_id,
                        "kept" if outcome == SlotState.DONE else "failed and retried")
            finish_slot(self.db, slot_id, self.worker_id, outcome=outcome, error="stale heartbeat",
                        max_attempts=self.settings.max_trial_attempts)

    # -- one trial -------------------------------------------------------------------------------------------

    def run_claim(self, claim: Claim) -> None:
        """Run one claimed slot: prepare the study, ask Optuna for a trial, train it with a heartbeat, store the
        checkpoint, tell Optuna, release the slot."""
        # The slot's heartbeat starts with the claim: a preparation (the teacher labelling a 20-copy transfer set)
        # can take far longer than the grace period, and must not look like a dead worker.
        lost = threading.Event()
        with self.heartbeat({claim.slot_id: lost}):
            self._status("busy", claim.study_id)
            self._run_slot(claim, lost)
        self._status("idle")

    @contextmanager
    def heartbeat(self, lost: dict[int, threading.Event]) -> Iterator[SlotHeartbeat]:
        """Beat for these claimed slots (slot id -> its lost event) while the block runs."""
        with SlotHeartbeat(self.db, self.worker_id, lost, interval_s=self.settings.heartbeat_interval,
                           grace_period_s=self.settings.grace_period) as heart:
            self._heart = heart
            try:
                yield heart
            finally:
                self._heart = None

    def _stop_beating(self, claim: Claim) -> None:
        """Before this worker closes or gives back a slot: its heartbeat must not mistake it for one taken over."""
        if self._heart is not None:
            self._heart.release(claim.slot_id)

    def _run_slot(self, claim: Claim, lost: threading.Event) -> None:
        spec = StudySpec.model_validate(claim.spec)
        study = self._load_study(claim, spec)
        prepared = self._prepare(claim, spec, study)
        if prepared is None:
            return
        if lost.is_set():
            log.warning("slot %d was taken over while the study was prepared; leaving it", claim.slot_id)
            return
        task = self.engine.task(prepared)
        trial, params = self._ask(claim, spec, study, task, self.engine.student_space(prepared, spec))
        self._status("busy", claim.study_id, trial.number)
        try:
            profile = self._profile(spec, prepared, trial, params)
            if (reason := infeasible_reason(spec.constraints, profile or {})) is not None:
                # Known before training: the student is never trained, the sampler learns from the violation.
                self._trial_log(trial).add(logging.INFO, "study %s trial %d not trained: %s", claim.study_name,
                                           trial.number, reason)
                retry_operational(lambda: self._record_infeasible(study, trial, reason))
            else:
                self._train_and_store(claim, spec, prepared, study, trial, params, task, lost, profile)
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and retried
            self._trial_broke_off(claim, study, trial, lost, exc)
            return
        self._finish_slot(claim, lost, SlotState.DONE, None)

    def _trial_log(self, trial: optuna.Trial) -> TrialLog:
        """The worker's lines about a trial it runs (``service.trial_log``), kept on the trial."""
        return self._trial_logs.setdefault(trial._trial_id, TrialLog(trial))

    def _trial_broke_off(self, claim: Claim, study: optuna.Study, trial: optuna.Trial, lost: threading.Event,
                         exc: Exception) -> None:
        """A trial that raised: an infrastructure fault gives it back untried (``_give_back_trial``); anything else
        is the trial's failure (FAIL with the reason, its slot retried while attempts remain)."""
        if infrastructure_fault(exc):
            self._give_back_trial(claim, trial, lost, exc)
        else:
            self._finish_slot(claim, lost, SlotState.FAILED, self._fail_trial(claim, study, trial, exc))

    def _give_back_trial(self, claim: Claim, trial: optuna.Trial, lost: threading.Event, exc: Exception) -> None:
        """The infrastructure failed under a trial (a full disk, the artifact store, the database), not the trial:
        no attempt is spent. Its Optuna trial goes back to WAITING, so the study's next ``ask`` runs it again with
        the same parameters (it is never FAIL, and the study's budget stays whole), and its slot goes back to
        pending untried (``release_slot``), as after a failed preparation; the worker then backs off (``run``).
        A trial already told (the fault came after) keeps its result and closes its slot."""
        reason = describe_error(exc)
        self._claim_faults.append(reason)
        trial_log = self._trial_logs.pop(trial._trial_id, None) or TrialLog(trial)
        trial_log.add(logging.WARNING, "study %s trial %d: %s is the infrastructure's fault, not the trial's: slot %d "
                      "goes back untried and the trial waits to run again", claim.study_name, trial.number, reason,
                      claim.slot_id)
        log.debug("%s", "".join(traceback.format_exception(exc)))
        if lost.is_set():  # taken over: its new holder settles the trial and the slot
            self._stop_beating(claim)
            return
        try:
            trial_log.save()
            state = retry_operational(lambda: self._requeue_trial(trial))
            if state in (TrialState.COMPLETE, TrialState.PRUNED):
                self._finish_slot(claim, lost, SlotState.DONE, None)
                return
            self._stop_beating(claim)
            retry_operational(lambda: release_slot(self.db, claim.slot_id, self.worker_id))
        except Exception:  # the database is down too: the slot is retried once its heartbeat is stale
            log.warning("slot %d could not be given back (the database is unreachable); it is retried once its "
                        "heartbeat is stale", claim.slot_id, exc_info=True)

    def _requeue_trial(self, trial: optuna.Trial) -> TrialState:
        """A RUNNING trial back to WAITING (Optuna's queue: the next ``ask`` pops it, parameters kept); returns the
        trial's state after (a finished trial is left as it is)."""
        state = self.optuna_storage.get_trial(trial._trial_id).state
        if state != TrialState.RUNNING:
            return state
        self.optuna_storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
        return TrialState.WAITING

    def _fail_trial(self, claim: Claim, study: optuna.Study, trial: optuna.Trial, exc: BaseException) -> str:
        """Record a trial's failure (FAIL, with the reason); returns the reason for its slot."""
        error = describe_error(exc)
        trial_log = self._trial_logs.pop(trial._trial_id, None) or TrialLog(trial)
        if isinstance(exc, InterruptedError):
            trial_log.add(logging.INFO, "study %s trial %d stopped: %s", claim.study_name, trial.number, error)
        else:
            trial_log.add(logging.ERROR, "study %s trial %d failed: %s", claim.study_name, trial.number, error)
            log.debug("%s", "".join(traceback.format_exception(exc)))
        try:
            trial.set_user_attr("fail_reason", error)
            trial_log.save()
            study.tell(trial, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - a reaper may have failed it already
            log.debug("trial %d was already finished", trial.number)
        return error

    def _finish_slot(self, claim: Claim, lost: threading.Event, outcome: str, error: str | None) -> None:
        """Close the slot (done, or failed and retried while attempts remain), unless it was taken over."""
        self._stop_beating(claim)
        if not lost.is_set():
            retry_operational(lambda: finish_slot(self.db, claim.slot_id, self.worker_id, outcome=outcome,
                                                  error=error, max_attempts=self.settings.max_trial_attempts))

    def _load_study(self, claim: Claim, spec: StudySpec) -> optuna.Study:
        """The slot's Optuna study (retried while the database is down: a claim never breaks off before its trial
        is asked, which would leave the slot to the reaper and spend an attempt on the database's outage)."""
        def load() -> optuna.Study:
            if not optuna_study_exists(self.optuna_storage, claim.study_name):
                # The API crashed between our row and Optuna's: create the twin now.
                ensure_optuna_study(self.optuna_storage, claim.study_name, directions=spec.directions)
            return optuna.load_study(study_name=claim.study_name, storage=self.optuna_storage,
                                     sampler=make_sampler(spec, claim.slot_no), pruner=make_pruner(spec))
        return retry_operational(load)

    def _prepare(self, claim: Claim, spec: StudySpec, study: optuna.Study) -> Any | None:
        """The engine's prepared study (data, teacher cache, task), or None when it could not be prepared.

        Errors are sorted by whose fault they are: the data's or the spec's (``STUDY_FAULTS``) fail the study with
        the reason; anything else (out of memory, network, disk, database) gives the slot back untried and holds
        the study back with exponential backoff, so any worker tries again; ``max_prepare_attempts`` consecutive
        failures fail the study with the last reason and the count.
        """
        reporter = PreparationReporter(self.db, claim.study_id, claim.study_name, self.worker_id,
                                       interval_s=self.settings.progress_interval, tty=sys.stderr.isatty())
        started = time.monotonic()
        try:
            # Paths again, as this host sees them now: a folder can change after the API checked it.
            confine_local_paths(spec, self.settings.allowed_roots)
            prepared = self.engine.prepare(spec, progress=reporter)
            task = self.engine.task(prepared)
        except STUDY_FAULTS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("study %s failed during setup: %s", claim.study_name, reason)
            log.debug("%s", traceback.format_exc())
            fail_study(self.db, claim.study_id, reason)
            self._stop_beating(claim)
            finish_slot(self.db, claim.slot_id, self.worker_id, outcome=SlotState.FAILED, error=reason,
                        max_attempts=0)
            return None
        except Exception as exc:  # noqa: BLE001 - nobody's data error: retried, never a lost study
            self._preparation_failed(claim, exc)
            return None
        finally:
            reporter.close()
        retry_operational(lambda: preparation_succeeded(
            self.db, claim.study_id, round(time.monotonic() - started, 2) if reporter.built else None))
        # What the dashboard, the API and the model card read: the task and the teacher's reference scores. Each
        # write is idempotent, so the whole is retried while the database is down (the fault bench's PostgreSQL
        # stop landed here and left the slot to the reaper).
        teacher_metrics = self.engine.teacher_metrics(prepared)

        def record_study_attrs() -> None:
            attrs = study.user_attrs
            if "task" not in attrs:
                study.set_user_attr("task", task.to_json())
            if teacher_metrics is not None and "teacher_metrics" not in attrs:
                study.set_user_attr("teacher_metrics", teacher_metrics)
            if "teacher_profile" not in attrs:  # the Pareto chart's reference point, measured once
                teacher_profile = self.engine.teacher_profile(prepared)
                if teacher_profile is not None:
                    study.set_user_attr("teacher_profile", teacher_profile)
        retry_operational(record_study_attrs)
        return prepared

    def _preparation_failed(self, claim: Claim, exc: Exception) -> None:
        reason = describe_error(exc)
        log.debug("%s", traceback.format_exc())
        attempts = retry_operational(lambda: preparation_failed(
            self.db, claim.study_id, reason, retry_delay_s=self.settings.prepare_retry_delay))
        if attempts >= self.settings.max_prepare_attempts:
            final = f"{reason} (preparation failed {attempts} times in a row)"
            log.error("study %s failed: %s", claim.study_name, final)
            fail_study(self.db, claim.study_id, final)
            self._stop_beating(claim)
            finish_slot(self.db, claim.slot_id, self.worker_id, outcome=SlotState.FAILED, error=final,
                        max_attempts=0)
            return
        delay = backoff_delay(self.settings.prepare_retry_delay, attempts)
        log.warning("study %s: preparation failed (%s), attempt %d of %d; any worker retries in %.0f s",
                    claim.study_name, reason, attempts, self.settings.max_prepare_attempts, delay)
        self._stop_beating(claim)
        release_slot(self.db, claim.slot_id, self.worker_id)

    def _ask(self, claim: Claim, spec: StudySpec, study: optuna.Study, task: TaskInfo,
             space: StudentSpace) -> tuple[optuna.Trial, dict[str, Any]]:
        """A new trial over the parameters that mean something for the task and the student's searched shape (valid
        shapes only), recorded on the slot. ``params`` holds the KD hyperparameters and the shape's searched
        dimensions by name (what ``run_trial`` and ``export-best --seeds`` train)."""
        kd_distributions = optuna_distributions(spec.search_space, task.ignored_params)
        # Retried while the database is down, like every write of this claim before training: an outage here must
        # not leave the slot claimed for the reaper (an attempt spent on the infrastructure's fault).
        trial = retry_operational(lambda: study.ask({**kd_distributions, **space.distributions}))
        retry_operational(lambda: record_slot_trial(self.db, claim.slot_id, trial._trial_id))
        kd_sampled = {k: v for k, v in trial.params.items() if k in kd_distributions}
        params: dict[str, Any] = {**trial_params(spec.search_space, kd_sampled, task.ignored_params),
                                  **space.shape_params(trial.params)}

        def record_trial_attrs() -> None:
            trial.set_user_attr("params", params)
            trial.set_user_attr("worker", self.worker_id)
            trial.set_user_attr("slot", claim.slot_no)
            trial.set_user_attr("attempt", claim.attempt)
        retry_operational(record_trial_attrs)
        self._trial_log(trial).say(logging.INFO, "study %s trial %d (slot %d, attempt %d) on worker %s: %s",
                                   claim.study_name, trial.number, claim.slot_no, claim.attempt, self.worker_id,
                                   params)
        return trial, params

    def _profile(self, spec: StudySpec, prepared: Any, trial: optuna.Trial,
                 params: dict[str, Any]) -> dict[str, Any] | None:
        """Measure the trial's student before training (``distill.profile``), record it, and record how far it is
        from each constraint (Optuna's ``Trial.set_constraint``: feasible at 0 or below)."""
        profile = self.engine.profile(prepared, params)
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
        state = self.optuna_storage.get_trial(trial._trial_id).state
        if state in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        if state != TrialState.RUNNING:
            raise InterruptedError(f"trial is {state.name} (failed by a reaper)")
        trial.set_user_attr("stop_reason", reason)
        self._trial_log(trial).save()
        study.tell(trial, state=TrialState.PRUNED)
        self._trial_logs.pop(trial._trial_id, None)

    def _epoch_reporter(self, claim: Claim, spec: StudySpec, study: optuna.Study, trial: optuna.Trial,
                        task: TaskInfo, lost: threading.Event,
                        profile: dict[str, Any] | None) -> Callable[[EpochResult], str | None]:
        """The callback after each epoch: report the study's metric (the pruner decides), record every metric,
        and say whether to stop (claim lost, shutdown, study cancelled or expired, pruned).

        A study with several objectives reports nothing to Optuna (``Trial.report`` takes one objective; its
        pruners and TPE's ranking of pruned trials need one direction): every epoch stays in the ``epochs``
        attribute, and the pruning rule is ``same_shape_should_prune`` (a trial against trials of its shape)."""
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
                           "seconds": round(result.seconds, 3)})
            retry_operational(lambda: trial.set_user_attr("epochs", epochs))
            self._trial_log(trial).say(
                logging.INFO, "  trial %d epoch %d: %s", trial.number, result.epoch,
                ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or f"{task.metric} {result.score}")
            if lost.is_set():
                return LOST_CLAIM
            if self._stop.is_set():
                return SHUTDOWN
            if reason := retry_operational(lambda: study_should_stop(self.db, claim.study_id)):
                return reason
            if should_prune(result):
                return "pruned"
            return None

        return on_epoch_end

    def _train_and_store(self, claim: Claim, spec: StudySpec, prepared: Any, study: optuna.Study,
                         trial: optuna.Trial, params: dict[str, Any], task: TaskInfo,
                         lost: threading.Event, profile: dict[str, Any] | None) -> TrialOutcome:
        """Train, then store the checkpoint, then tell Optuna: a trial is only COMPLETE (or PRUNED) once its
        checkpoint is stored. A stop for shutdown or a lost claim raises ``InterruptedError``."""
        on_epoch_end = self._epoch_reporter(claim, spec, study, trial, task, lost, profile)
        with tempfile.TemporaryDirectory(prefix="kdsearch-trial-") as tmp:
            checkpoint = Path(tmp) / "checkpoint"
            outcome = self.engine.run_trial(prepared, params, spec.seed, on_epoch_end, checkpoint)
            self._store_outcome(claim, spec, study, trial, outcome, checkpoint, profile, task)
        return outcome

    def _store_outcome(self, claim: Claim, spec: StudySpec, study: optuna.Study, trial: optuna.Trial,
                       outcome: TrialOutcome, checkpoint: Path, profile: dict[str, Any] | None,
                       task: TaskInfo) -> None:
        """Store a trained trial's checkpoint, then tell Optuna (COMPLETE, or PRUNED with its stop reason). A stop for
        shutdown or a lost claim raises ``InterruptedError``: the trial is failed and its slot retried."""
        if outcome.stopped in (SHUTDOWN, LOST_CLAIM):
            raise InterruptedError(outcome.stopped)
        artifact_id = self.layout.store_checkpoint(checkpoint, trial, storage=self.optuna_storage)
        values = [outcome.best_score]
        if spec.cost_objective is not None:
            assert profile is not None  # _profile refuses a multi-objective study without one
            values.append(float(profile[spec.cost_objective]))
        trial_log = self._trial_log(trial)
        trial_log.add(logging.INFO, "study %s trial %d: checkpoint stored as artifact %s", claim.study_name,
                      trial.number, artifact_id)
        trial_log.add(logging.INFO, "study %s trial %d %s: best %s %.4f at epoch %d", claim.study_name, trial.number,
                      outcome.stopped or "complete", task.metric, outcome.best_score, outcome.best_epoch)
        retry_operational(lambda: self._record_outcome(study, trial, outcome, artifact_id, values))
        self._trial_logs.pop(trial._trial_id, None)
        self._claim_stored = True
        retry_operational(lambda: self._announce_best(claim, spec, study, trial, outcome))

    def _record_outcome(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome,
                        artifact_id: str, values: list[float]) -> None:
        """Attributes first, then ``tell``; safe to retry after a dropped connection (idempotent)."""
        state = self.optuna_storage.get_trial(trial._trial_id).state
        if state in (TrialState.COMPLETE, TrialState.PRUNED):
            return  # an earlier attempt's tell went through before the connection dropped
        if state != TrialState.RUNNING:
            raise InterruptedError(f"trial is {state.name} (failed by a reaper)")
        trial.set_user_attr("checkpoint_artifact_id", artifact_id)
        trial.set_user_attr("best_epoch", outcome.best_epoch)
        trial.set_user_attr("metrics", outcome.best_metrics)
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
        # Several objectives: "best" is joining the Pareto front.
        best = study.best_trials if spec.multi_objective else [study.best_trial]
        if trial.number in {t.number for t in best}:
            enqueue_event(self.db, claim.study_id, "new_best",
                          {"trial_number": trial.number, "value": outcome.best_score})


# What a full, failing or read-only disk (or quota) raises: the host's fault, never the trial's.
INFRASTRUCTURE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS})
# The same faults where a library reports them as text (safetensors and torch wrap the OSError in their own error),
# and SQLite's full disk.
_INFRASTRUCTURE_TEXTS = (*(os.strerror(code) for code in INFRASTRUCTURE_ERRNOS), "database or disk is full")
MAX_BACKOFF_S = 300.0


def backoff_delay(first_delay_s: float, failures: int) -> float:
    """Seconds to hold back after ``failures`` consecutive failures: ``first_delay_s``, doubling, at most 300 s (as
    ``storage.preparation_failed`` holds a study back)."""
    return min(first_delay_s * 2 ** (failures - 1), MAX_BACKOFF_S)


def _object_store_errors() -> tuple[type[BaseException], ...]:
    """The artifact store's errors (an S3 bucket: botocore's and boto3's), where boto3 is installed."""
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 comes with the s3 extra
        return ()
    return (BotoCoreError, ClientError, Boto3Error)


def infrastructure_fault(exc: BaseException) -> bool:
    """Whether an error is the infrastructure's (a full, failing or read-only disk; the artifact store; a database
    outage) rather than the trial's: it, or an error it was raised from or while handling."""
    object_store = _object_store_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in INFRASTRUCTURE_ERRNOS:
            return True
        if isinstance(current, DBAPIError | StorageInternalError) and is_transient(current):
            return True
        if isinstance(current, object_store) or any(text in str(current) for text in _INFRASTRUCTURE_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """A failure's reason as the API shows it; ``out of memory`` for any out-of-memory error (CUDA's included), whose
    cached blocks are released so the retry starts clean."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return "out of memory"
    return f"{type(exc).__name__}: {exc}"


def visible_gpus(gpus: str) -> list[str]:
    if gpus != "all":
        return [g.strip() for g in gpus.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass

"""A worker: claims trial slots from the shared store, trains, reports to Optuna, stores checkpoints, loops.

    kdsearch worker --device cpu          # one worker process per physical core, one thread each
    kdsearch worker --device cpu --procs 1 --threads-per-proc 2   # one process, two threads
    kdsearch worker --gpus all            # one worker process per visible GPU (service.supervisor)
    kdsearch worker --pack 3              # claim up to 3 slots of a study and train them together

Workers need only the database and the artifacts directory, never the API. A failing trial is marked FAIL and
retried; a study that cannot run at all (bad data, a model that will not load) is marked failed with the reason,
and the worker goes on with other studies. A fault of the infrastructure while a trial trains or is stored (a full
or failing disk, the artifact store, the database: ``kdsearch.errors.fault_of``) is nobody's trial failing: the trial
waits to be run again, its slot goes back untried, and the worker backs off; ``KDSEARCH_MAX_INFRA_FAULTS`` such
claims in a row and it exits (1), saying why. SIGTERM or Ctrl-C: stop claiming, stop the running trial at its next
epoch boundary (it is marked FAIL and retried elsewhere), exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError

from distill import TrialEngine, load_trial_engine
from distill.packed import resolve_pack
from kdsearch.errors import is_transient
from kdsearch.retry import backoff_delay
from service.heartbeat import SlotHeartbeat
from service.notifier import Notifier
from service.settings import Settings
from service.trial_runner import ClaimReport, TrialRunner, WorkerServices
from storage import (
    Claim,
    SlotState,
    StoreError,
    check_schema,
    claim_slot,
    claim_slots,
    finish_slot,
    make_engine,
    make_layout,
    make_optuna_storage,
    prune_workers,
    reap_stale_slots,
    retry_operational,
    settle_expired_studies,
    upsert_worker,
)

log = logging.getLogger("kdsearch.worker")


class Worker:
    """Supervises: claims work, keeps its slots' heartbeat, handles signals, idles and backs off; the trials
    themselves run in a ``service.trial_runner.TrialRunner`` per claim."""

    def __init__(self, settings: Settings, *, device: str = "cpu", trial_engine: TrialEngine | None = None,
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
        self.trial_engine = trial_engine or load_trial_engine(
            settings.engine, artifacts=self.layout, device=device, log=log.info, precision=settings.precision,
            pack_step=settings.pack_step)
        # Trials trained together per claim (distill.packed): 1 runs each trial alone, as without packing.
        self.pack = resolve_pack(settings.pack, device)
        self._stop = threading.Event()
        self._last_housekeeping = 0.0
        self.services = WorkerServices(settings, self.worker_id, self.db, self.optuna_storage, self.layout,
                                       self.trial_engine, self._stop, self._status)

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
        outages = 0  # claims in a row that found the database down
        exit_code = 0
        faulted_claims = 0  # claims in a row that hit an infrastructure fault and stored nothing
        try:
            while not self._stop.is_set():
                try:
                    self._housekeeping()
                    claims = self._claim()
                    outages = 0
                except (DBAPIError, StorageInternalError) as exc:
                    if not is_transient(exc):  # a bug or a schema mismatch: say so and stop, never spin on it
                        log.error("%s", StoreError("claiming a trial slot", exc))
                        exit_code = 1
                        break
                    # The database is down or restarting: wait and reconnect (pool_pre_ping replaces dead links).
                    outages += 1
                    delay = backoff_delay(0.5, outages, max_delay_s=15.0)
                    log.warning("database unavailable (%s); retrying in %.1f s",
                                type(getattr(exc, "orig", exc)).__name__, delay)
                    self._stop.wait(delay)
                    continue
                if not claims:
                    if self.exit_when_idle:
                        break
                    self._stop.wait(self.settings.poll_interval)
                    continue
                slots = ", ".join(str(claim.slot_id) for claim in claims)
                report = ClaimReport()
                try:
                    report = self.run_claims(claims)
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
                if report.faults and not report.stored:
                    faulted_claims += 1
                    if faulted_claims >= self.settings.max_infra_faults:
                        log.error("stopping: %d claims in a row hit an infrastructure fault (last: %s); their slots "
                                  "were given back untried and their trials wait to be run again",
                                  faulted_claims, report.faults[-1])
                        exit_code = 1
                        break
                    delay = backoff_delay(self.settings.prepare_retry_delay, faulted_claims)
                    log.warning("infrastructure fault (%s), %d of %d in a row: backing off %.1f s",
                                report.faults[-1], faulted_claims, self.settings.max_infra_faults, delay)
                    self._stop.wait(delay)
                    continue
                faulted_claims = 0 if report.stored else faulted_claims
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

    def run_claims(self, claims: list[Claim]) -> ClaimReport:
        """Run one claim (one slot, or a pack) through its ``TrialRunner``, with a heartbeat for its slots.

        The heartbeat starts with the claim: a preparation (the teacher labelling a 20-copy transfer set) can take
        far longer than the grace period, and must not look like a dead worker. A slot another worker took over
        sets its own event; its trial stops at its next epoch boundary."""
        lost = {claim.slot_id: threading.Event() for claim in claims}
        with SlotHeartbeat(self.db, self.worker_id, lost, interval_s=self.settings.heartbeat_interval,
                           grace_period_s=self.settings.grace_period) as heart:
            self._status("busy", claims[0].study_id)
            report = TrialRunner(self.services, claims, heart, lost).run()
        self._status("idle")
        return report

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

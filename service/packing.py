"""A packed worker's claim: up to K slots of one study, their trials asked apart and trained together.

``kdsearch worker --pack K`` (``KDSEARCH_PACK``) claims up to K pending slots of one study in one statement
(``storage.claim_slots``: never more than are pending, so the budget stays exact) and hands them to a
``PackRunner``, which reuses the worker's per-trial pieces:

- one heartbeat thread beats every slot of the pack; a slot taken over sets that member's ``lost`` event alone
  (its callback then stops it at its next epoch boundary, and its slot is left to whoever took it);
- the study is prepared once; each slot asks Optuna for its trial with its own slot's sampler (TPE with
  ``constant_liar`` sees the pack's earlier members running, so the K trials differ), then is profiled and checked
  against the constraints as a solo trial is (an infeasible one is recorded and leaves);
- members are grouped by (student shape, batch size); each group is one ``TrialEngine.run_pack`` call, groups one
  after another. A member's initial weights and dropout come from the study's seed and its batch order from the
  pack's ``batch_seed`` (the study's seed too), exactly as a solo trial's: a packed trial equals the same trial run
  alone. Its ``pack`` user attribute says so: ``{"size", "members" (trial numbers), "batch_seed"}``;
- per member, at every epoch boundary, the worker's own epoch callback reports, prunes and stops it (pruned, study
  cancelled or expired, shutdown, lost claim); as soon as a member leaves the pack (its epochs done, stopped or
  diverged) its result is stored and told exactly as a solo trial's (checkpoint first, then COMPLETE/PRUNED) or
  failed alone (a diverged loss, a shutdown: FAIL, slot retried), and its slot closed, while the others train on;
  an infrastructure fault (a full disk, the artifact store, the database) gives that member back untried, as a
  solo trial (``Worker._trial_broke_off``).

A SIGKILL loses every slot of the pack: each one's heartbeat goes stale and each is retried, as a solo slot is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from distill.engine import PackedTrial, TrialOutcome
from search_space import StudentSpace, StudySpec, TaskInfo
from search_space.objectives import infeasible_reason
from storage import Claim, SlotState, finish_slot, release_slot, retry_operational, study_should_stop

if TYPE_CHECKING:
    from service.worker import Worker

log = logging.getLogger("kdsearch.worker")


@dataclasses.dataclass
class _Member:
    claim: Claim
    study: optuna.Study  # loaded with this slot's sampler
    lost: threading.Event
    trial: optuna.Trial | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    profile: dict[str, Any] | None = None


def pack_groups(params: list[dict[str, Any]], shape_names: set[str] | frozenset[str]) -> list[list[int]]:
    """Indices of ``params`` grouped by (searched shape, batch size), in order of first appearance: trials that
    differ in either cannot share a pack."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        key = json.dumps({**{n: p.get(n) for n in sorted(shape_names)}, "batch_size": p.get("batch_size")},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class PackRunner:
    def __init__(self, worker: Worker, claims: list[Claim]) -> None:
        assert claims and len({c.study_id for c in claims}) == 1, "a pack is one study's slots"
        self.worker = worker
        self.claims = claims
        self.lost = [threading.Event() for _ in claims]  # per slot: set when another worker took it over

    def run(self) -> None:
        worker = self.worker
        with worker.heartbeat({claim.slot_id: lost for claim, lost in zip(self.claims, self.lost, strict=True)}):
            worker._status("busy", self.claims[0].study_id)
            self._run()
        worker._status("idle")

    def _run(self) -> None:
        worker = self.worker
        spec = StudySpec.model_validate(self.claims[0].spec)
        members = [_Member(claim, worker._load_study(claim, spec), lost)
                   for claim, lost in zip(self.claims, self.lost, strict=True)]
        prepared = worker._prepare(members[0].claim, spec, members[0].study)
        if prepared is None:  # the first slot is closed (study failed) or given back: the others follow it
            self._give_back(members[1:])
            return
        task = worker.engine.task(prepared)
        space = worker.engine.student_space(prepared, spec)
        ready: list[_Member] = []
        for member in members:
            if member.lost.is_set():
                log.warning("slot %d was taken over while the study was prepared; leaving it", member.claim.slot_id)
                continue
            if self._ask_and_check(member, spec, prepared, task, space):
                ready.append(member)
        for group in pack_groups([m.params for m in ready], set(space.shape_names)):
            self._train_group([ready[i] for i in group], spec, prepared, task)

    def _give_back(self, members: list[_Member]) -> None:
        worker = self.worker
        reason = retry_operational(lambda: study_should_stop(worker.db, members[0].claim.study_id)) if members else None
        for member in members:
            worker._stop_beating(member.claim)
            if reason:  # the study failed while it was prepared: these slots close with it
                finish_slot(worker.db, member.claim.slot_id, worker.worker_id, outcome=SlotState.FAILED,
                            error=reason, max_attempts=0)
            else:
                release_slot(worker.db, member.claim.slot_id, worker.worker_id)

    def _ask_and_check(self, member: _Member, spec: StudySpec, prepared: Any, task: TaskInfo,
                       space: StudentSpace) -> bool:
        """Ask the member's trial, profile it and check the constraints, as a solo trial; False when it is done
        already (infeasible: recorded; failed: recorded and its slot retried)."""
        worker = self.worker
        trial, member.params = worker._ask(member.claim, spec, member.study, task, space)
        member.trial = trial
        try:
            member.profile = worker._profile(spec, prepared, trial, member.params)
            if (reason := infeasible_reason(spec.constraints, member.profile or {})) is None:
                return True
            retry_operational(lambda: worker._record_infeasible(member.study, trial, reason))
            log.info("study %s trial %d not trained: %s", member.claim.study_name, trial.number, reason)
            worker._finish_slot(member.claim, member.lost, SlotState.DONE, None)
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and retried
            worker._trial_broke_off(member.claim, member.study, trial, member.lost, exc)
        return False

    def _train_group(self, group: list[_Member], spec: StudySpec, prepared: Any, task: TaskInfo) -> None:
        worker = self.worker
        batch_seed = spec.seed  # as a solo trial's batch order: a packed trial equals its solo run
        trials = [m.trial for m in group]
        assert all(t is not None for t in trials)
        numbers = [t.number for t in trials if t is not None]
        worker._status("busy", group[0].claim.study_id, numbers[0])
        log.info("study %s: training trials %s together (pack of %d)", group[0].claim.study_name,
                 ", ".join(map(str, numbers)), len(group))
        with tempfile.TemporaryDirectory(prefix="kdsearch-pack-") as tmp:
            packed: list[PackedTrial] = []
            for i, member in enumerate(group):
                trial = member.trial
                assert trial is not None
                info = {"size": len(group), "members": numbers, "batch_seed": batch_seed,
                        "step": worker.engine.pack_step}
                retry_operational(functools.partial(trial.set_user_attr, "pack", info))
                packed.append(PackedTrial(member.params, spec.seed,
                                          worker._epoch_reporter(member.claim, spec, member.study, trial, task,
                                                                 member.lost, member.profile),
                                          Path(tmp) / f"checkpoint-{i}"))
            settled: set[int] = set()

            def member_done(index: int, result: TrialOutcome | Exception) -> None:
                """A member left the pack: stored and told now, its slot closed, while the others train on."""
                settled.add(index)
                self._settle(group[index], result, packed[index].checkpoint_dir, spec, task)

            results: list[TrialOutcome | Exception]
            try:
                results = worker.engine.run_pack(prepared, packed, batch_seed, member_done)
            except Exception as exc:  # noqa: BLE001 - the pack failed: every member not yet done is retried
                results = [exc] * len(group)
            for index, (member, result, trained) in enumerate(zip(group, results, packed, strict=True)):
                if index not in settled:
                    self._settle(member, result, trained.checkpoint_dir, spec, task)

    def _settle(self, member: _Member, result: TrialOutcome | Exception, checkpoint: Path, spec: StudySpec,
                task: TaskInfo) -> None:
        """Store and tell one member's result as a solo trial's, or fail (or give back) it alone; then close its
        slot."""
        worker, trial = self.worker, member.trial
        assert trial is not None
        try:
            if isinstance(result, Exception):
                raise result
            worker._store_outcome(member.claim, spec, member.study, trial, result, checkpoint, member.profile)
            worker._log_outcome(member.claim, trial, task, result)
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and retried
            worker._trial_broke_off(member.claim, member.study, trial, member.lost, exc)
            return
        worker._finish_slot(member.claim, member.lost, SlotState.DONE, None)

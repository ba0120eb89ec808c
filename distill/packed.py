"""Packed trials: K students of one shape trained together, one step of all K per batch.

A pack shares the batch order (one generator, ``batch_seed``), the student's shape and the batch size; each member
keeps everything else of its own: initial weights and dropout stream (its ``cfg.seed``), AdamW with Trainer's
groups, learning rate and linear schedule over its own epoch count, temperature, alpha, weight decay, gradient
clipping (its own norm). So a member's numbers equal its solo ``train_student`` run with
``TrainConfig(batch_seed=<the pack's>)``, within float tolerance (with the ``stacked`` step: dropout off).

A pack shares one batch per step (gathered once: indices, ids, mask, teacher logits, labels); how its members
step on it is ``step`` (``KDSEARCH_PACK_STEP``, ``resolve_pack_step``):

- ``loop`` (``LoopStep``): each member in turn runs forward, backward, its own clip and its own fused AdamW, with its
  own CPU/CUDA random state swapped in around them. It does the work of K solo trials, no less, and keeps their
  numbers exactly, dropout on or off.
- ``stacked`` (``distill.stacked.StackedStudents``): the K members as one vectorised model (``torch.func.vmap`` over
  parameters stacked on a member axis), one forward, one backward and one AdamW update of all K per batch: K small
  models become one large one, which is what a GPU needs to be busy. Per-member lr, schedule, weight decay,
  clipping, temperature and alpha as in the loop; equal to the solo runs with dropout off, and in distribution only
  with dropout on (one dropout stream for the pack, seeded from ``batch_seed``).

``auto`` is ``stacked`` on CUDA and ``loop`` on CPU, where ``bench/pack_step.py`` measured stacking no faster
(bench/results/pack-step-cpu.md); ``resolve_pack``'s ``auto`` (K) stays 1 until ``bench/throughput.py`` shows
packing faster on a device.

Per member at every epoch boundary: evaluation, then its ``on_epoch_end`` callback (report, prune, stop); a member
that is stopped, or has run its epochs, leaves and the rest go on. A member whose loss turns NaN or inf fails
alone (``MemberDiverged``, found at the epoch boundary without a per-step host sync): the others' weights and
optimizer states are their own and are never touched.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Literal, Protocol, cast

import torch
from transformers import PreTrainedModel

from distill.data import TokenizedSplit, length_bucketed_batches
from distill.train import (
    EpochCallback,
    EpochResult,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    batch_loss,
    evaluate,
    optimizer_and_schedule,
)
from search_space import TaskInfo

PACK_SETTINGS = "'auto' or a whole number of trials, 1 or more"
PackStepName = Literal["loop", "stacked"]
PACK_STEPS: tuple[str, ...] = ("auto", "loop", "stacked")


def parse_pack(setting: str | int) -> str | int:
    """``auto``, or the pack size as an int (1 or more); ValueError otherwise."""
    text = str(setting).strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"pack must be {PACK_SETTINGS}, not {setting!r}") from None
    if value < 1:
        raise ValueError(f"pack must be {PACK_SETTINGS}, not {setting!r}")
    return value


def resolve_pack(setting: str | int, device: torch.device | str) -> int:
    """How many trials a worker on ``device`` trains together for the ``KDSEARCH_PACK`` setting.

    ``auto`` is 1 on every device today: packing is only worth it where the bench (``bench/throughput.py``) shows
    it faster, and on the CPUs measured so far it is not (see this module's docstring). Change it here, and only
    here, when the bench says otherwise for a device."""
    value = parse_pack(setting)
    if value == "auto":
        return 1
    assert isinstance(value, int)
    return value


def resolve_pack_step(setting: str, device: torch.device | str) -> PackStepName:
    """How a pack on ``device`` takes its steps for the ``KDSEARCH_PACK_STEP`` setting: ``auto`` stacks the members
    on CUDA (one vectorised model fills the device: the point of packing there) and runs them one by one on a CPU,
    where stacking measured no faster (bench/results/pack-step-cpu.md)."""
    if setting not in PACK_STEPS:
        raise ValueError(f"pack step must be one of {', '.join(PACK_STEPS)}, not {setting!r}")
    if setting == "auto":
        return "stacked" if torch.device(device).type == "cuda" else "loop"
    return "stacked" if setting == "stacked" else "loop"


class MemberDiverged(TrainingDiverged):
    """A pack member's training loss turned NaN or inf: that member's trial fails, the others go on."""


@dataclasses.dataclass
class PackMember:
    model: PreTrainedModel
    cfg: TrainConfig  # its batch_size must be the pack's; its batch_seed is ignored (the pack's is used)
    on_epoch_end: EpochCallback | None = None


@dataclasses.dataclass
class _Record:
    """One member's epochs so far."""

    history: list[EpochResult] = dataclasses.field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    train_seconds: float = 0.0
    samples: int = 0


class PackStep(Protocol):
    """How the pack's members take one training step together (``loop`` or ``stacked``)."""

    def step(self, inputs: dict[str, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Train every member still in the pack on the batch; their losses in pack order, detached."""
        ...

    def sync(self, position: int) -> None:
        """Make the member at ``position`` hold its current weights in its own model."""
        ...

    def keep(self, positions: list[int]) -> None:
        """Go on with the members at ``positions`` only."""
        ...


def _get_rng(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


class LoopStep:
    """Each member in turn: forward, backward, its own clip and fused AdamW, with its own random streams swapped in
    around them (so its dropout masks are its solo run's)."""

    def __init__(self, members: list[PackMember], train_rows: int, task: TaskInfo, device: torch.device) -> None:
        self.task, self.device = task, device
        self.members: list[tuple[PackMember, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]] = []
        self.rngs: list[list[torch.Tensor]] = []
        for member in members:
            torch.manual_seed(member.cfg.seed)  # its dropout stream, as train_student seeds it
            self.rngs.append(_get_rng(device))
            self.members.append((member, *optimizer_and_schedule(member.model, member.cfg, train_rows, device)))

    def step(self, inputs: dict[str, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for position, (member, optimizer, scheduler) in enumerate(self.members):
            _set_rng(self.device, self.rngs[position])
            loss = batch_loss(member.model, inputs, teacher, labels, member.cfg, self.task, self.device)
            loss.backward()
            self.rngs[position] = _get_rng(self.device)
            torch.nn.utils.clip_grad_norm_(member.model.parameters(), member.cfg.max_grad_norm)  # its own norm
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return torch.stack(losses)

    def sync(self, position: int) -> None:
        pass  # each member trains in its own model

    def keep(self, positions: list[int]) -> None:
        self.members = [self.members[i] for i in positions]
        self.rngs = [self.rngs[i] for i in positions]


def train_pack(members: list[PackMember], train: TokenizedSplit, train_logits: torch.Tensor,
               eval_split: TokenizedSplit, batch_seed: int, task: TaskInfo,
               step: PackStepName = "loop",
               on_done: Callable[[int, TrainResult | MemberDiverged], None] | None = None,
               ) -> list[TrainResult | MemberDiverged]:
    """Train every member on the same batches (order from ``batch_seed``), ``step`` choosing how one batch's step
    is taken (``loop``: one by one; ``stacked``: ``distill.stacked``); one result per member, in order: its
    ``TrainResult`` (``stopped`` set when its callback stopped it), or ``MemberDiverged``. ``on_done(index,
    result)`` is called as soon as a member leaves, while the others train on (so its trial can be stored and told
    without waiting for the pack)."""
    if not members:
        return []
    batch_sizes = {m.cfg.batch_size for m in members}
    bucket_batches = {m.cfg.bucket_batches for m in members}
    if len(batch_sizes) != 1 or len(bucket_batches) != 1:
        raise ValueError(f"a pack shares one batch size and bucketing, not {sorted(batch_sizes)} / "
                         f"{sorted(bucket_batches)}")
    batch_size, buckets = batch_sizes.pop(), bucket_batches.pop()
    device = train.input_ids.device
    steps_per_epoch = math.ceil(len(train) / batch_size)
    generator = torch.Generator().manual_seed(batch_seed)

    outer_rng = _get_rng(device)
    for member in members:
        cast(torch.nn.Module, member.model).to(device)  # see train_student on this cast
    stepper: PackStep
    if step == "stacked":
        from distill.stacked import StackedStudents

        torch.manual_seed(batch_seed)  # the pack's one dropout stream (vmap's randomness="different" splits it)
        stepper = StackedStudents([m.model for m in members], [m.cfg for m in members], len(train), task, device)
    else:
        stepper = LoopStep(members, len(train), task, device)
    records = [_Record() for _ in members]
    results: list[TrainResult | MemberDiverged | None] = [None] * len(members)
    active = list(range(len(members)))  # member indices, in the stepper's order
    # The first step whose loss was not finite (-1: none) and that loss, per active member, kept on the device.
    bad_step = torch.full((len(active),), -1, dtype=torch.long, device=device)
    bad_value = torch.zeros(len(active), device=device)
    steps, epoch = 0, 0
    while active:
        epoch += 1
        # Drawn every epoch, as a solo run draws it: epoch e's order is the generator's e-th draw for every member.
        batches = length_bucketed_batches(train.lengths, batch_size, generator, buckets)
        started = time.perf_counter()
        loss_sums = torch.zeros(len(active), device=device)
        for i in active:
            members[i].model.train()
        for idx in batches:
            idx = idx.to(device, non_blocking=True)
            losses = stepper.step(train.batch(idx), train_logits[idx], train.labels[idx])
            steps += 1
            loss_sums += losses  # no .item(): that would sync the device every step
            first_bad = (bad_step < 0) & ~torch.isfinite(losses)
            bad_step = torch.where(first_bad, steps, bad_step)
            bad_value = torch.where(first_bad, losses, bad_value)
        train_time = time.perf_counter() - started
        finite = torch.isfinite(loss_sums).tolist()  # the epoch's host sync
        staying: list[int] = []
        for position, i in enumerate(active):
            record, cfg = records[i], members[i].cfg
            eval_started = time.perf_counter()
            if not finite[position]:
                diverged = MemberDiverged(float(bad_value[position].item()), epoch,
                                          int(bad_step[position].item()) - (epoch - 1) * steps_per_epoch)
                results[i] = diverged
                if on_done is not None:
                    on_done(i, diverged)
                continue
            stepper.sync(position)
            # In fp32 whatever the training precision, as a solo trial (train.train_student) evaluates.
            metrics, eval_loss = evaluate(members[i].model, eval_split, cfg.eval_batch_size, task)
            # Each member's epoch took the pack's training time and its own evaluation.
            seconds = train_time + time.perf_counter() - eval_started
            record.train_seconds += seconds
            record.samples += len(train)
            score = metrics[task.metric]
            result = EpochResult(epoch, steps, loss_sums[position].item() / steps_per_epoch, eval_loss, metrics,
                                 score, seconds)
            record.history.append(result)
            if score > record.best_score:
                record.best_score, record.best_epoch = score, epoch
                record.best_state = {k: v.detach().to("cpu", copy=True)
                                     for k, v in members[i].model.state_dict().items()}
            callback = members[i].on_epoch_end
            stopped = callback(result) if callback is not None else None
            if stopped or epoch >= cfg.num_train_epochs:
                trained = TrainResult(record.history, record.best_epoch, record.best_score, record.best_state,
                                      stopped or None, record.train_seconds, record.samples)
                results[i] = trained
                if on_done is not None:
                    on_done(i, trained)
                continue
            staying.append(position)
        if len(staying) < len(active):
            stepper.keep(staying)
            index = torch.tensor(staying, dtype=torch.long, device=device)
            bad_step, bad_value = bad_step[index], bad_value[index]
            active = [active[position] for position in staying]
    _set_rng(device, outer_rng)
    return [r for r in results if r is not None]

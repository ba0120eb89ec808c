"""Packed trials: K students of one shape trained together, one step of all K per batch.

A pack shares the batch order (one generator, ``batch_seed``), the student's shape and the batch size; each member
keeps everything else of its own: initial weights and dropout stream (its ``cfg.seed``), AdamW with Trainer's
groups, learning rate and linear schedule over its own epoch count, temperature, alpha, weight decay, gradient
clipping (its own norm). So a member's numbers equal its solo ``train_student`` run with
``TrainConfig(batch_seed=<the pack's>)``, within float tolerance, dropout on or off.

How the step is fused: one batch is gathered once (indices, ids, mask, teacher logits, labels) and then each
member runs forward, backward, its own clip and its own fused AdamW in turn, with its own CPU/CUDA random state
swapped in around its forward and backward. That is what guarantees the solo numbers, dropout on or off.

The alternative, ``torch.func`` (``stack_module_state`` + ``functional_call`` + ``vmap(grad_and_value)``, one fused
AdamW over the stacked parameters), was probed against this loop on this host's CPU: 2 threads, an L2-H128 BERT
student (30522-word vocabulary), 128x40 batches, ms per step of all K members. The host was shared with a running
benchmark (load average 4 to 5 on 2 cores), and it shows: two runs disagree by up to 4x::

    run 1 (vmap without clipping):        K=1 loop 1994 vmap 2274   K=2 loop 3740 vmap 2235   K=4 loop 6546 vmap 3675
    run 2 (vmap with per-member clipping): K=1 loop 3602 vmap 4169   K=2 loop 2408 vmap 1919   K=4 loop 7033 vmap 13737

Nothing can be concluded from them but that neither path is clearly faster here. This module takes the loop: with
``vmap`` the dropout masks come from one stream (``randomness="different"`` splits it, not as K solo runs would),
and per-member clipping, learning rates, weight decay and schedules over stacked parameters need a hand-written
AdamW to stay equal to solo runs. ``resolve_pack``'s ``auto`` stays 1 until ``bench/throughput.py`` measures
packing on an idle host (and a vmap path, if it is ever worth one, on CUDA).

Per member at every epoch boundary: evaluation, then its ``on_epoch_end`` callback (report, prune, stop); a member
that is stopped, or has run its epochs, leaves and the rest go on. A member whose loss turns NaN or inf fails
alone (``MemberDiverged``, found at the epoch boundary without a per-step host sync): the others' weights and
optimizer states are their own and are never touched.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import cast

import torch
from transformers import PreTrainedModel

from distill.data import TokenizedSplit, length_bucketed_batches
from distill.precision import autocast
from distill.train import (
    EpochCallback,
    EpochResult,
    TrainConfig,
    TrainResult,
    batch_loss,
    evaluate,
    optimizer_and_schedule,
)
from search_space import TaskInfo

PACK_SETTINGS = "'auto' or a whole number of trials, 1 or more"


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


class MemberDiverged(ArithmeticError):
    """A pack member's training loss turned NaN or inf: that member's trial fails, the others go on."""

    def __init__(self, value: float, epoch: int, step: int) -> None:
        self.value, self.epoch, self.step = value, epoch, step
        super().__init__(f"loss diverged ({value}) at epoch {epoch} step {step}")


@dataclasses.dataclass
class PackMember:
    model: PreTrainedModel
    cfg: TrainConfig  # its batch_size must be the pack's; its batch_seed is ignored (the pack's is used)
    on_epoch_end: EpochCallback | None = None


@dataclasses.dataclass
class _State:
    """One member's training state inside the loop."""

    member: PackMember
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: list[torch.Tensor]  # its random streams (CPU, and the CUDA device's), swapped in around its steps
    bad_step: torch.Tensor  # the first step whose loss was not finite (-1: none), kept on the device: no sync
    bad_value: torch.Tensor
    history: list[EpochResult] = dataclasses.field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    step: int = 0
    train_seconds: float = 0.0
    samples: int = 0


def _get_rng(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def train_pack(members: list[PackMember], train: TokenizedSplit, train_logits: torch.Tensor,
               eval_split: TokenizedSplit, batch_seed: int, task: TaskInfo) -> list[TrainResult | MemberDiverged]:
    """Train every member on the same batches (order from ``batch_seed``); one result per member, in order: its
    ``TrainResult`` (``stopped`` set when its callback stopped it), or ``MemberDiverged``."""
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
    states: list[_State] = []
    for member in members:
        cast(torch.nn.Module, member.model).to(device)  # see train_student on this cast
        torch.manual_seed(member.cfg.seed)  # its dropout stream, as train_student seeds it
        rng = _get_rng(device)
        optimizer, scheduler = optimizer_and_schedule(member.model, member.cfg, len(train), device)
        states.append(_State(member, optimizer, scheduler, rng,
                             bad_step=torch.full((), -1, dtype=torch.long, device=device),
                             bad_value=torch.zeros((), device=device)))
    results: list[TrainResult | MemberDiverged | None] = [None] * len(members)
    active = list(range(len(members)))
    epoch = 0
    while active:
        epoch += 1
        # Drawn every epoch, as a solo run draws it: epoch e's order is the generator's e-th draw for every member.
        batches = length_bucketed_batches(train.lengths, batch_size, generator, buckets)
        started = time.perf_counter()
        loss_sums = {i: torch.zeros((), device=device) for i in active}
        for i in active:
            states[i].member.model.train()
        for idx in batches:
            idx = idx.to(device, non_blocking=True)
            inputs, teacher, labels = train.batch(idx), train_logits[idx], train.labels[idx]
            for i in active:
                state, cfg = states[i], states[i].member.cfg
                _set_rng(device, state.rng)
                loss = batch_loss(state.member.model, inputs, teacher, labels, cfg, task, device)
                loss.backward()
                state.rng = _get_rng(device)
                torch.nn.utils.clip_grad_norm_(state.member.model.parameters(), cfg.max_grad_norm)  # its own norm
                state.optimizer.step()
                state.scheduler.step()
                state.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                detached = loss.detach()
                loss_sums[i] += detached
                first_bad = (state.bad_step < 0) & ~torch.isfinite(detached)
                state.bad_step = torch.where(first_bad, state.step, state.bad_step)
                state.bad_value = torch.where(first_bad, detached, state.bad_value)
        train_time = time.perf_counter() - started
        for i in list(active):
            state, cfg = states[i], states[i].member.cfg
            eval_started = time.perf_counter()
            if not torch.isfinite(loss_sums[i]).item():
                results[i] = MemberDiverged(float(state.bad_value.item()), epoch,
                                            int(state.bad_step.item()) - (epoch - 1) * steps_per_epoch)
                active.remove(i)
                continue
            with autocast(device, cfg.precision):
                metrics, eval_loss = evaluate(state.member.model, eval_split, cfg.eval_batch_size, task)
            # Each member's epoch took the pack's training time and its own evaluation.
            seconds = train_time + time.perf_counter() - eval_started
            state.train_seconds += seconds
            state.samples += len(train)
            score = metrics[task.metric]
            result = EpochResult(epoch, state.step, loss_sums[i].item() / steps_per_epoch, eval_loss, metrics, score,
                                 seconds)
            state.history.append(result)
            if score > state.best_score:
                state.best_score, state.best_epoch = score, epoch
                state.best_state = {k: v.detach().to("cpu", copy=True)
                                    for k, v in state.member.model.state_dict().items()}
            callback = state.member.on_epoch_end
            stopped = callback(result) if callback is not None else None
            if stopped or epoch >= cfg.num_train_epochs:
                results[i] = TrainResult(state.history, state.best_epoch, state.best_score, state.best_state,
                                         stopped or None, state.train_seconds, state.samples)
                active.remove(i)
    _set_rng(device, outer_rng)
    return [r for r in results if r is not None]

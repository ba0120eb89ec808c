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

The layer-wise terms (hidden states, attention relations, embeddings) travel in the ``loop`` only: a pack with one
of them on steps in the loop whatever ``step`` says (``carried_step``).

``auto`` is ``stacked`` on CUDA and ``loop`` on CPU, where ``bench/pack_step.py`` measured stacking no faster
(bench/results/pack-step-cpu.md); ``resolve_pack``'s ``auto`` (K) stays 1 until ``bench/throughput.py`` shows
packing faster on a device.

The epoch loop is ``distill.train.train_members``, the same one a solo trial runs (a pack of one): per member at
every epoch boundary, evaluation, then its ``on_epoch_end`` callback (report, prune, stop); a member that is
stopped, or has run its epochs, leaves and the rest go on. A member whose loss turns NaN or inf fails alone
(``MemberDiverged``, found at the epoch boundary without a per-step host sync): the others' weights and optimizer
states are their own and are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from transformers import PreTrainedModel

from distill.data import TokenizedSplit
from distill.train import (
    LoopStep,
    MakeStep,
    MemberDiverged,
    PackMember,
    PackStep,
    TrainResult,
    train_members,
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


def carried_step(step: PackStepName, members: list[PackMember]) -> PackStepName:
    """The step a pack really takes: ``stacked`` cannot carry the layer-wise terms (``distill.stacked.layer_terms``),
    so a pack with one of them on steps in the ``loop``, each member equal to its solo run."""
    if step == "stacked":
        from distill.stacked import layer_terms

        if layer_terms([m.cfg for m in members]):
            return "loop"
    return step


def train_pack(members: list[PackMember], train: TokenizedSplit, train_logits: torch.Tensor,
               eval_split: TokenizedSplit, batch_seed: int, task: TaskInfo,
               step: PackStepName = "loop",
               on_done: Callable[[int, TrainResult | MemberDiverged], None] | None = None,
               teacher: PreTrainedModel | None = None,
               ) -> list[TrainResult | MemberDiverged]:
    """Train every member on the same batches (order from ``batch_seed``) in the one epoch loop
    (``distill.train.train_members``), ``step`` choosing how one batch's step is taken (``loop``: one by one;
    ``stacked``: ``distill.stacked``; a pack with layer-wise terms on steps in the loop, ``carried_step``). One
    result per member, in order: its ``TrainResult``, or ``MemberDiverged``; ``on_done(index, result)`` as soon as a
    member leaves. ``teacher`` runs live for the terms on its internals."""
    make_step: MakeStep = LoopStep
    if carried_step(step, members) == "stacked":
        from distill.stacked import StackedStudents

        def make_step(members: list[PackMember], train_rows: int, task: TaskInfo,
                      device: torch.device) -> PackStep:
            torch.manual_seed(batch_seed)  # the pack's one dropout stream (vmap's randomness="different" splits it)
            return StackedStudents([m.model for m in members], [m.cfg for m in members], train_rows, task, device)
    return train_members(members, train, train_logits, eval_split, batch_seed, task, make_step, on_done, teacher)

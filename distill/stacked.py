"""Stacked students: the K members of a pack trained as one model, one forward, backward and AdamW update per batch.

This is the packing that can fill a GPU (HFTA, MLSys 2021): a 4.4M-parameter student uses a few per cent of one, and
K students of one shape run as one vectorised model instead of K small ones. How:

- The members' parameters live in one ``[K, P]`` tensor (row k: member k's parameters, flattened in the module's
  order by ``parameters_to_vector``), each parameter a ``[K, *shape]`` leaf view into it. ``torch.func.vmap`` runs
  ``functional_call`` of one template module over the K members: every matmul becomes one batched matmul, on the
  same input batch.
- ``losses.sum().backward()``: the rows are disjoint, so row k's gradient is member k's own loss's gradient.
- Each member keeps its own temperature, alpha, gradient-clipping norm, weight decay and learning-rate schedule
  (``[K]`` tensors; the schedules are transformers' own, on a one-number optimizer each). The AdamW update is
  ``torch.optim.AdamW``'s arithmetic (decoupled decay, bias-corrected moments) over the ``[K, P]`` tensors: eight
  element-wise kernels per step for the whole pack.
- A member whose loss turns NaN poisons only its own row (its clipping norm is NaN, not the others').

It does not carry the layer-wise terms (``kdsearch.terms.hidden``, ``attention``, ``embedding``): each member would
need its own learned projections under vmap, and its own two-stage schedule. A pack with one of them on is refused
(``layer_terms``), and ``distill.packed.train_pack`` steps such a pack in the loop instead.

What it cannot do: give each member the dropout masks of its solo run. ``vmap(randomness="different")`` draws one
stream for the pack (seeded from the pack's batch seed: reproducible), so with dropout on a member matches its solo
run in distribution, not number for number; with dropout off it matches within float tolerance. The one-by-one
step (``distill.packed``) keeps the solo numbers exactly; which one runs is ``KDSEARCH_PACK_STEP``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, cast

import torch
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from transformers import PreTrainedModel

from distill.precision import autocast
from distill.train import TrainConfig, linear_schedule, takes_weight_decay
from kdsearch.terms import StudentOutputs, TeacherOutputs, total_loss
from search_space import TaskInfo

# The parameters are [K, *shape] views with a row stride of P: autograd accumulates into their gradient views in
# place as asked, but warns that such strides are not the layout it would have chosen.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which the one-by-one step uses


def layer_terms(cfgs: list[TrainConfig]) -> list[str]:
    """The terms of these trials a stacked pack cannot carry (those on the student's internals that are on: their
    trainable state is per member, and vmap runs one template over the members), by name."""
    return sorted({t.name for cfg in cfgs for t in cfg.terms if t.term.active(t.config)
                   and (t.term.intermediate or t.term.needs_for(t.config).teacher_internals)})


class StackedStudents:
    """K students of one shape as ``[K, P]`` tensors; ``step`` trains all of them on one batch."""

    def __init__(self, models: list[PreTrainedModel], cfgs: list[TrainConfig], train_rows: int, task: TaskInfo,
                 device: torch.device) -> None:
        if layered := layer_terms(cfgs):
            raise ValueError(f"a stacked pack cannot carry the layer-wise distillation terms ({', '.join(layered)}): "
                             "their learned projections, the teacher's live internals and the two-stage schedule "
                             "are per member; train these trials with the loop pack step (KDSEARCH_PACK_STEP=loop)")
        precisions = {cfg.precision for cfg in cfgs}
        if len(precisions) != 1:
            raise ValueError(f"a stacked pack trains in one precision, not {sorted(precisions)}")
        self.models, self.task, self.device, self.precision = list(models), task, device, precisions.pop()
        # A copy of one member, its parameters never read (functional_call swaps each row in), with eager attention:
        # torch has no vmap rule for the CPU's fused SDPA kernel and would loop over the members there.
        self.template = copy.deepcopy(models[0])
        cast(torch.nn.Module, self.template).to(device)  # see train_student on this cast
        self.template.set_attn_implementation("eager")
        named = list(self.template.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [param.shape for _, param in named]
        self.offsets = [0]
        for _, param in named:
            self.offsets.append(self.offsets[-1] + param.numel())
        # Buffers (position and segment id tables) are constants of the shape: one copy serves every member.
        self.buffers = dict(self.template.named_buffers())
        with torch.no_grad():
            rows = [parameters_to_vector(model.parameters()).to(device, torch.float32) for model in models]
        self._views(torch.stack(rows))
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        decays = torch.cat([torch.full((param.numel(),), float(takes_weight_decay(name, param)), device=device)
                            for name, param in named])
        self.decay_mask = decays[None, :]
        # The members' distillation terms: the same terms (the registry's), each member with its own numbers, as
        # one [K] tensor per config field (vmap hands each member its own 0-d slice).
        self.terms = cfgs[0].terms
        if any([t.name for t in cfg.terms] != [t.name for t in self.terms] for cfg in cfgs):
            raise ValueError("a stacked pack's members share their distillation terms")
        self.needs = cfgs[0].needs
        self.term_values = [
            {name: self._column(setting.term.values(cfg.terms[index].config)[name] for cfg in cfgs)[:, 0]
             for name in setting.term.values(setting.config)}
            for index, setting in enumerate(self.terms)]
        self.weight_decay = self._column(cfg.weight_decay for cfg in cfgs)
        self.max_grad_norm = self._column(cfg.max_grad_norm for cfg in cfgs)
        # Every member's learning rate at every step, on the device: transformers' linear schedule (on an optimizer
        # of one number) read as LambdaLR reads it, so the same rates as a solo run, and no host-to-device copy (a
        # sync on CUDA) per step.
        steps = max(math.ceil(train_rows / cfg.batch_size) * cfg.num_train_epochs for cfg in cfgs) + 1
        rates = []
        for cfg in cfgs:
            schedule = linear_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate),
                                       cfg, train_rows).lr_lambdas[0]
            rates.append([cfg.learning_rate * schedule(step) for step in range(steps)])
        self.learning_rates = torch.tensor(rates, device=device)  # [K, steps]
        self.steps = 0

    def _views(self, flat: torch.Tensor) -> None:
        """``flat`` ([K, P]) becomes the pack's storage: each parameter a leaf view ``[K, *shape]`` into it, and each
        gradient a view into one ``[K, P]`` gradient buffer. Slicing one big leaf instead would make every
        parameter's backward write a zero-filled ``[K, P]`` tensor; views make the optimizer's update eight
        kernels over the flat tensors, and backward accumulates straight into the flat gradient."""
        self.flat, self.flat_grad = flat, torch.zeros_like(flat)
        self.params: dict[str, torch.Tensor] = {}
        for name, shape, start, end in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True):
            param = flat[:, start:end].view(len(flat), *shape).requires_grad_()
            param.grad = self.flat_grad[:, start:end].view(len(flat), *shape)
            self.params[name] = param

    def _column(self, values: Any) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], device=self.device)[:, None]

    def _member_loss(self, params: dict[str, torch.Tensor], term_values: list[dict[str, torch.Tensor]],
                     inputs: dict[str, torch.Tensor], teacher: TeacherOutputs, labels: torch.Tensor) -> torch.Tensor:
        """One member's loss on the batch, ``params`` its parameters and ``term_values`` its terms' numbers (called
        under vmap)."""
        kwargs = {**inputs, "output_hidden_states": self.needs.student_hidden_states,
                  "output_attentions": self.needs.student_attentions}
        with autocast(self.device, self.precision):
            out = functional_call(self.template, (params, self.buffers), args=(), kwargs=kwargs)
        configs = [dataclasses.replace(setting.config, **values)
                   for setting, values in zip(self.terms, term_values, strict=True)]
        student = StudentOutputs(out.logits, out.hidden_states, out.attentions)
        return total_loss(self.terms, student, teacher, labels, self.task.is_regression, configs)

    def step(self, inputs: dict[str, torch.Tensor], teacher: TeacherOutputs,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of every member on one batch; their losses and gradient norms, ``[K]`` each, detached
        (no host sync)."""
        self.template.train()
        losses = vmap(self._member_loss, in_dims=(0, 0, None, None, None), randomness="different")(
            self.params, self.term_values, inputs, teacher, labels)  # the costly line: K forwards in one
        losses.sum().backward()  # the other one; rows are disjoint, so each row gets its own loss's gradient
        grad = self.flat_grad
        lr = self.learning_rates[:, self.steps, None]  # [K, 1]
        self.steps += 1
        beta1, beta2 = BETAS
        with torch.no_grad():
            # clip_grad_norm_ per member: scale by max_norm / (norm + 1e-6) where that is below 1.
            norms = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
            grad.mul_((self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0))
            # torch.optim.AdamW: decoupled weight decay, moments, bias correction, update.
            self.flat.mul_(1.0 - lr * self.weight_decay * self.decay_mask)
            self.exp_avg.lerp_(grad, 1.0 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias1, bias2 = 1.0 - beta1**self.steps, 1.0 - beta2**self.steps
            denominator = (self.exp_avg_sq.sqrt() / bias2**0.5).add_(EPS)
            self.flat.sub_(self.exp_avg / denominator * (lr / bias1))
        grad.zero_()  # the parameters' .grad are views into it: backward adds in place
        return losses.detach(), norms[:, 0]

    def sync(self, position: int) -> None:
        """Copy the member at ``position`` into its own model (for evaluation and its checkpoint)."""
        model = self.models[position]
        with torch.no_grad():
            vector_to_parameters(self.flat[position].clone(), model.parameters())

    def keep(self, positions: list[int]) -> None:
        """Go on with the members at ``positions`` only (the others left the pack)."""
        index = torch.tensor(positions, dtype=torch.long, device=self.device)
        self._views(self.flat[index])
        self.exp_avg, self.exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        self.term_values = [{name: column[index] for name, column in values.items()} for values in self.term_values]
        self.weight_decay, self.max_grad_norm = self.weight_decay[index], self.max_grad_norm[index]
        self.learning_rates = self.learning_rates[index]
        self.models = [self.models[i] for i in positions]

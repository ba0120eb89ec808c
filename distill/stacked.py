"""Stacked students: the K members of a pack trained as one model, one forward, backward and AdamW update per batch.

This is the packing that can fill a GPU (HFTA, MLSys 2021): a 4.4M-parameter student uses a few per cent of one, and
K students of one shape run as one vectorised model instead of K small ones. How:

- The members' parameters are one ``[K, P]`` leaf tensor (row k: member k's parameters, flattened in the module's
  order by ``parameters_to_vector``). ``torch.func.vmap`` runs ``functional_call`` of one template module over the
  rows: every matmul becomes one batched matmul over the K members, on the same input batch.
- ``losses.sum().backward()``: the rows are disjoint, so row k's gradient is member k's own loss's gradient.
- Each member keeps its own temperature, alpha, gradient-clipping norm, weight decay and learning-rate schedule
  (``[K]`` tensors; the schedules are transformers' own, on a one-number optimizer each). The AdamW update is
  ``torch.optim.AdamW``'s arithmetic (decoupled decay, bias-corrected moments) over the ``[K, P]`` tensors: eight
  element-wise kernels per step for the whole pack.
- A member whose loss turns NaN poisons only its own row (its clipping norm is NaN, not the others').

What it cannot do: give each member the dropout masks of its solo run. ``vmap(randomness="different")`` draws one
stream for the pack (seeded from the pack's batch seed: reproducible), so with dropout on a member matches its solo
run in distribution, not number for number; with dropout off it matches within float tolerance. The one-by-one
step (``distill.packed``) keeps the solo numbers exactly; which one runs is ``KDSEARCH_PACK_STEP``.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from transformers import PreTrainedModel

from distill.precision import autocast
from distill.train import TrainConfig, linear_schedule, logits_loss, takes_weight_decay
from search_space import TaskInfo

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which the one-by-one step uses


class StackedStudents:
    """K students of one shape as ``[K, P]`` tensors; ``step`` trains all of them on one batch."""

    def __init__(self, models: list[PreTrainedModel], cfgs: list[TrainConfig], train_rows: int, task: TaskInfo,
                 device: torch.device) -> None:
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
        self.flat = torch.stack(rows).requires_grad_()
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        decays = torch.cat([torch.full((param.numel(),), float(takes_weight_decay(name, param)), device=device)
                            for name, param in named])
        self.decay_mask = decays[None, :]
        self.temperature = self._column(cfg.temperature for cfg in cfgs)[:, 0]
        self.alpha = self._column(cfg.alpha for cfg in cfgs)[:, 0]
        self.weight_decay = self._column(cfg.weight_decay for cfg in cfgs)
        self.max_grad_norm = self._column(cfg.max_grad_norm for cfg in cfgs)
        # transformers' linear schedule (on an optimizer of one number), read as LambdaLR reads it at each step:
        # the same learning rates as a solo run.
        self.learning_rates = [cfg.learning_rate for cfg in cfgs]
        self.schedules = [linear_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate),
                                          cfg, train_rows).lr_lambdas[0] for cfg in cfgs]
        self.steps = 0

    def _column(self, values: Any) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], device=self.device)[:, None]

    def _member_loss(self, row: torch.Tensor, temperature: torch.Tensor, alpha: torch.Tensor,
                     inputs: dict[str, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One member's loss on the batch, ``row`` its flattened parameters (called under vmap)."""
        params = {name: row[start:end].view(shape)
                  for name, shape, start, end in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:],
                                                     strict=True)}
        with autocast(self.device, self.precision):
            logits = functional_call(self.template, (params, self.buffers), args=(), kwargs=inputs).logits
        return logits_loss(logits, teacher, labels, alpha, temperature, self.task)

    def step(self, inputs: dict[str, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One training step of every member on one batch; their losses, ``[K]``, detached (no host sync)."""
        self.template.train()
        losses = vmap(self._member_loss, in_dims=(0, 0, 0, None, None, None), randomness="different")(
            self.flat, self.temperature, self.alpha, inputs, teacher, labels)  # the costly line: K forwards in one
        losses.sum().backward()  # the other one; rows are disjoint, so each row gets its own loss's gradient
        grad = self.flat.grad
        assert grad is not None
        lr = self._column(base * schedule(self.steps) for base, schedule in zip(self.learning_rates, self.schedules,
                                                                                strict=True))
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
        self.flat.grad = None
        return losses.detach()

    def sync(self, position: int) -> None:
        """Copy the member at ``position`` into its own model (for evaluation and its checkpoint)."""
        model = self.models[position]
        with torch.no_grad():
            vector_to_parameters(self.flat[position].detach().clone(), model.parameters())

    def keep(self, positions: list[int]) -> None:
        """Go on with the members at ``positions`` only (the others left the pack)."""
        index = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.flat = self.flat.detach()[index].clone().requires_grad_()
        self.exp_avg, self.exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        self.temperature, self.alpha = self.temperature[index], self.alpha[index]
        self.weight_decay, self.max_grad_norm = self.weight_decay[index], self.max_grad_norm[index]
        self.schedules = [self.schedules[i] for i in positions]
        self.learning_rates = [self.learning_rates[i] for i in positions]
        self.models = [self.models[i] for i in positions]

"""One distillation trial: train a student on cached teacher logits, evaluating after every epoch.

Run it directly on a cache entry (what a worker does, minus the queue)::

    from distill import DistillationEngine, TrainConfig
    engine = DistillationEngine(artifacts="./artifacts", device="cpu")
    prepared = engine.prepare(spec)                      # builds or loads the teacher-logit cache
    result = engine.run_trial(prepared, {"learning_rate": 7e-4, "temperature": 4, "alpha": 0.5,
                                         "num_train_epochs": 3, "batch_size": 128}, seed=33)
    result.best_score, result.history[-1].metrics    # the study's metric, and every metric of the task

The loop reads straight down: no Trainer, no DataLoader, one host sync per epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import cast

import torch
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from distill.data import TokenizedSplit, length_bucketed_batches
from distill.loss import distillation_loss, regression_distillation_loss
from distill.metrics import compute_metrics
from distill.precision import Precision, autocast
from search_space import TaskInfo, resolve_task


@dataclasses.dataclass
class TrainConfig:
    learning_rate: float
    alpha: float
    num_train_epochs: int
    temperature: float = 1.0  # classification only: a regression study has no temperature
    batch_size: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 33  # the student's dropout stream (its initialisation: build_student's seed, the same number)
    # The batch order's seed; None: ``seed``. A packed trial (distill.packed) shares its pack's batch order, and runs
    # alone the same with this set to the pack's.
    batch_seed: int | None = None
    max_grad_norm: float = 1.0  # as transformers.Trainer, which the seed used
    eval_batch_size: int = 256
    # Batches come from length-sorted chunks of this many batches; 1 gives plain random batches (more padding).
    bucket_batches: int = 50
    fused_adamw: bool = True  # one kernel for all parameters: -13% trial time on CPU here, same results
    # The student's forward pass in bf16 autocast, or fp32 (distill.precision resolves KDSEARCH_PRECISION's auto).
    precision: Precision = "fp32"


@dataclasses.dataclass
class EpochResult:
    epoch: int
    step: int
    train_loss: float
    eval_loss: float
    metrics: dict[str, float]  # every metric that fits the task, on the eval split
    score: float  # the study's metric: what the trial reports, prunes on and keeps its best epoch by
    seconds: float


@dataclasses.dataclass
class TrainResult:
    history: list[EpochResult]
    best_epoch: int
    best_score: float
    best_state: dict[str, torch.Tensor]
    stopped: str | None  # why training ended early (pruned, cancelled...), None when all epochs ran
    train_seconds: float
    train_samples: int

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / max(self.train_seconds, 1e-9)

    @property
    def best_metrics(self) -> dict[str, float]:
        return next(h.metrics for h in self.history if h.epoch == self.best_epoch)


class TrainingDiverged(ArithmeticError):
    """A trial's training loss (or its weights) turned NaN or infinite: the trial fails at that step, whose epoch and
    step (counted within the epoch) the message names. A packed member's is ``distill.packed.MemberDiverged``."""

    def __init__(self, value: float, epoch: int, step: int, what: str = "loss") -> None:
        self.value, self.epoch, self.step = value, epoch, step
        super().__init__(f"{what} diverged ({value}) at epoch {epoch} step {step}")


# Called after each epoch's evaluation; returns a reason to stop early, or None to go on.
EpochCallback = Callable[[EpochResult], str | None]


# Told after each batch of a long inference how many rows are done (progress of a teacher-logit build).
RowsDone = Callable[[int], None]


@torch.inference_mode()
def predict(model: PreTrainedModel, split: TokenizedSplit, batch_size: int,
            out_device: torch.device | str | None = None, on_rows: RowsDone | None = None) -> torch.Tensor:
    """The model's outputs ([N, num_labels], float32) for every row, in row order, on ``out_device`` (default:
    the split's device). Batches are sorted by length so little is padded.

    Always an fp32 forward pass, also when called inside a bf16 ``autocast``: what a trial records, prunes on and
    is exported by is what the saved fp32 model computes."""
    model.eval()
    device = next(model.parameters()).device
    out_device = split.input_ids.device if out_device is None else out_device
    num_labels = model.config.num_labels
    assert num_labels is not None  # a sequence-classification model's config always has its labels
    out = torch.empty(len(split), num_labels, dtype=torch.float32, device=out_device)
    done = 0
    for idx in length_bucketed_batches(split.lengths, batch_size):
        inputs = {k: v.to(device, non_blocking=True) for k, v in split.batch(idx.to(split.lengths.device)).items()}
        with torch.autocast(device.type, enabled=False):  # fp32, whatever context the caller trains in
            out[idx.to(out_device)] = model(**inputs).logits.float().to(out_device)
        done += len(idx)
        if on_rows is not None:
            on_rows(done)
    return out


def evaluate(model: PreTrainedModel, split: TokenizedSplit, batch_size: int,
             task: TaskInfo) -> tuple[dict[str, float], float]:
    """(every metric of the task, mean loss against the gold labels) on a split."""
    outputs = predict(model, split, batch_size)
    if task.is_regression:
        loss = torch.nn.functional.mse_loss(outputs[:, 0], split.labels.float())
    else:
        loss = torch.nn.functional.cross_entropy(outputs, split.labels)
    # The epoch's one host sync: metrics are computed on the CPU by scikit-learn and SciPy.
    metrics = compute_metrics(task, outputs.cpu().numpy(), split.labels.cpu().numpy())
    return metrics, loss.item()


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Trainer's grouping: weight decay on weight matrices, none on biases and LayerNorm weights."""
    return not (param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower())


def _adamw(model: PreTrainedModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (decay if takes_weight_decay(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=cfg.fused_adamw)


def linear_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    train_rows: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The trial's learning-rate schedule: linear warm-up, then linear decay to 0 over its own epochs."""
    total_steps = math.ceil(train_rows / cfg.batch_size) * cfg.num_train_epochs
    return get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def optimizer_and_schedule(model: PreTrainedModel, cfg: TrainConfig, train_rows: int, device: torch.device,
                           ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The trial's AdamW (Trainer's groups) and its linear schedule (``linear_schedule``)."""
    optimizer = _adamw(model, cfg, device)
    return optimizer, linear_schedule(optimizer, cfg, train_rows)


def logits_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                alpha: float | torch.Tensor, temperature: float | torch.Tensor, task: TaskInfo) -> torch.Tensor:
    """The distillation loss of a student's logits: softmax-KL for classification, MSE for regression, in fp32
    whatever the forward pass's precision."""
    if task.is_regression:
        return regression_distillation_loss(logits.float(), teacher_logits, labels, alpha)
    return distillation_loss(logits.float(), teacher_logits, labels, alpha, temperature)


def batch_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor], teacher_logits: torch.Tensor,
               labels: torch.Tensor, cfg: TrainConfig, task: TaskInfo, device: torch.device) -> torch.Tensor:
    """One batch's distillation loss for ``model`` (its forward pass in ``cfg.precision``)."""
    with autocast(device, cfg.precision):
        logits = model(**inputs).logits  # the costly line: student forward
    return logits_loss(logits, teacher_logits, labels, cfg.alpha, cfg.temperature, task)


def check_finite(model: PreTrainedModel, epoch: int, bad_step: int, bad_value: float, steps_per_epoch: int) -> None:
    """After an epoch: ``TrainingDiverged`` naming the first step whose loss or gradient went non-finite (0: none),
    or the epoch's last step when only the weights did (an infinite update); one host sync."""
    if bad_step:
        raise TrainingDiverged(bad_value, epoch, bad_step, what="loss" if not math.isfinite(bad_value) else "gradient")
    if not bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()):
        raise TrainingDiverged(math.nan, epoch, steps_per_epoch, what="weights")


def train_student(model: PreTrainedModel, train: TokenizedSplit, train_logits: torch.Tensor,
                  eval_split: TokenizedSplit, cfg: TrainConfig, on_epoch_end: EpochCallback | None = None,
                  task: TaskInfo | None = None) -> TrainResult:
    """Train ``model`` on ``train`` against the teacher's ``train_logits``; ``task`` (default: read off the
    model's config, scored by its default metric) picks the loss and the metrics."""
    task = task or resolve_task(model.config, None)
    device = train.input_ids.device
    # PreTrainedModel.to is declared @wraps(Module.to), which type-checks as the unbound function: call it (the
    # same method, transformers' override) through the Module type.
    cast(torch.nn.Module, model).to(device)
    generator = torch.Generator().manual_seed(cfg.seed if cfg.batch_seed is None else cfg.batch_seed)  # batch order
    torch.manual_seed(cfg.seed)  # dropout
    optimizer, scheduler = optimizer_and_schedule(model, cfg, len(train), device)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)

    history: list[EpochResult] = []
    best_score, best_epoch, best_state = -math.inf, 0, {}
    stopped: str | None = None
    step, train_seconds, samples = 0, 0.0, 0
    for epoch in range(1, cfg.num_train_epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        # The epoch's first step whose loss or gradient was not finite (0: none) and its loss, kept on the device.
        bad_step = torch.zeros((), dtype=torch.long, device=device)
        bad_value = torch.zeros((), device=device)
        for epoch_step, idx in enumerate(
                length_bucketed_batches(train.lengths, cfg.batch_size, generator, cfg.bucket_batches), start=1):
            idx = idx.to(device, non_blocking=True)
            loss = batch_loss(model, train.batch(idx), train_logits[idx], train.labels[idx], cfg, task, device)
            loss.backward()  # the other costly line
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            loss_sum += loss  # no .item() here: that would sync the device every step
            # A non-finite gradient makes this step's weights non-finite, whatever its loss was.
            first_bad = (bad_step == 0) & ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            bad_step = torch.where(first_bad, epoch_step, bad_step)
            bad_value = torch.where(first_bad, loss, bad_value)
            step += 1
        check_finite(model, epoch, int(bad_step.item()), float(bad_value.item()), steps_per_epoch)
        # Evaluated in fp32 whatever the training precision: the recorded metric is the exported fp32 model's.
        metrics, eval_loss = evaluate(model, eval_split, cfg.eval_batch_size, task)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        samples += len(train)
        score = metrics[task.metric]
        result = EpochResult(epoch, step, loss_sum.item() / steps_per_epoch, eval_loss, metrics, score, seconds)
        history.append(result)
        if score > best_score:
            # Keep the best epoch's weights, not the last: that is the checkpoint the trial is scored by.
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch_end is not None and (stopped := on_epoch_end(result)):
            break
    return TrainResult(history, best_epoch, best_score, best_state, stopped, train_seconds, samples)

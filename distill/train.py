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

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol, cast

import torch
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from distill.data import TokenizedSplit, length_bucketed_batches
from distill.internals import as_qkv, capture_qkv, teacher_internals
from distill.precision import Precision, autocast
from distill.task_metrics import compute_metrics, degenerate_reason
from kdsearch.errors import TrialError
from kdsearch.terms import Needs, StudentOutputs, TeacherOutputs, TermSetting, needs_of, resolve_terms, total_loss
from kdsearch.terms.layers import align_teacher, resolve_layer_map
from search_space import TaskInfo, resolve_task


def _logit_kd_only() -> tuple[TermSetting, ...]:
    return resolve_terms({}, regression=False)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A run of epochs on one set of terms, with its own AdamW and learning-rate schedule (``TrainConfig.stages``).
    An unreported stage (TinyBERT's intermediate-layer stage) is not evaluated: its head is untrained, so its
    metric must not drive pruning or pick the best epoch."""

    terms: tuple[TermSetting, ...]
    epochs: int
    reported: bool = True

    @functools.cached_property
    def needs(self) -> Needs:
        return needs_of(self.terms)


@dataclasses.dataclass
class TrainConfig:
    """One trial's resolved parameters: the optimizer's and the schedule's, its distillation terms (each with its
    typed config: ``kdsearch.terms``) and its student's searched shape. ``from_params`` builds it from a trial's
    parameters, and is the one place that reads them by name."""

    learning_rate: float
    num_train_epochs: int
    terms: tuple[TermSetting, ...] = dataclasses.field(default_factory=_logit_kd_only)
    batch_size: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    shape: dict[str, int] = dataclasses.field(default_factory=dict)  # the searched dimensions ({}: none searched)
    predistilled: bool = False  # the student starts from its shape's pre-distilled weights (distill.predistill)
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
    # The layer-wise terms' layer mapping (kdsearch.terms.layers), and the epochs of a first stage on the
    # intermediate terms alone (TinyBERT's; 0: one stage, every term together).
    layer_map: str = "uniform"
    intermediate_epochs: int = 0
    # The transfer set's copies (rounds) the trial trains on beside the train rows; None: all built (the engine's).
    transfer_copies: int | None = None

    @functools.cached_property
    def needs(self) -> Needs:
        """What the trial's terms read of the student and the teacher (those that are on: a term whose weight is 0
        needs nothing): worked out once, not at every step."""
        return needs_of(self.terms)

    @functools.cached_property
    def stages(self) -> tuple[Stage, ...]:
        """The trial's stages, in order. One stage of ``num_train_epochs`` on every term that is on; or, with
        ``intermediate_epochs`` > 0 and an intermediate term on (hidden, attention, embedding), first
        ``intermediate_epochs`` on those alone (not evaluated), then ``num_train_epochs`` on the others (the
        logits'), each stage with its own AdamW and linear schedule (warm-up ratio of its own steps, decay to 0),
        as TinyBERT's two distillation runs. With no intermediate term on, ``intermediate_epochs`` is ignored."""
        active = tuple(t for t in self.terms if t.term.active(t.config))
        intermediate = tuple(t for t in active if t.term.intermediate)
        if self.intermediate_epochs > 0 and intermediate:
            prediction = tuple(t for t in active if not t.term.intermediate)
            return (Stage(intermediate, self.intermediate_epochs, reported=False),
                    Stage(prediction, self.num_train_epochs))
        return (Stage(active, self.num_train_epochs),)

    @property
    def unreported_epochs(self) -> int:
        """The epochs before the first evaluated one (the intermediate stage's), 0 for a one-stage trial."""
        return sum(stage.epochs for stage in self.stages if not stage.reported)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, regression: bool, seed: int, batch_seed: int | None = None,
                    shape_names: Collection[str] = (), precision: Precision = "fp32") -> TrainConfig:
        """A trial's config from its parameters by name (the spec's fixed values and the sampled ones, as the worker
        records them in the trial's ``params``): the terms read theirs (``kdsearch.terms.resolve_terms``), the
        dimensions in ``shape_names`` are the student's shape."""
        return cls(
            learning_rate=float(params["learning_rate"]),
            num_train_epochs=int(params["num_train_epochs"]),
            terms=resolve_terms(dict(params), regression),
            batch_size=int(params.get("batch_size", 128)),
            weight_decay=float(params.get("weight_decay", 0.0)),
            warmup_ratio=float(params.get("warmup_ratio", 0.0)),
            shape={name: int(params[name]) for name in shape_names if name in params},
            predistilled=bool(params.get("predistilled", 0)),
            seed=seed,
            batch_seed=batch_seed,
            precision=precision,
            layer_map=str(params.get("layer_map", "uniform")),
            intermediate_epochs=int(params.get("intermediate_epochs", 0)),
            transfer_copies=None if params.get("transfer_copies") is None else int(params["transfer_copies"]),
        )


@dataclasses.dataclass
class EpochResult:
    epoch: int
    step: int
    train_loss: float
    eval_loss: float
    metrics: dict[str, float]  # every metric that fits the task, on the eval split
    score: float  # the study's metric: what the trial reports, prunes on and keeps its best epoch by
    seconds: float
    degenerate: str | None = None  # why the eval outputs are degenerate (distill.task_metrics), None when not


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


class TrainingDiverged(TrialError, ArithmeticError):
    """A trial's training loss (or its weights) turned NaN or infinite: the trial fails at that step, whose epoch and
    step (counted within the epoch) the message names. A packed member's is ``MemberDiverged``."""

    def __init__(self, value: float, epoch: int, step: int, what: str = "loss") -> None:
        self.value, self.epoch, self.step, self.what = value, epoch, step, what
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
             task: TaskInfo) -> tuple[dict[str, float], float, str | None]:
    """(every metric of the task, mean loss against the gold labels, why the outputs are degenerate or None) on a
    split."""
    outputs = predict(model, split, batch_size)
    if task.is_regression:
        loss = torch.nn.functional.mse_loss(outputs[:, 0], split.labels.float())
    else:
        loss = torch.nn.functional.cross_entropy(outputs, split.labels)
    # The epoch's one host sync: metrics are computed on the CPU by scikit-learn and SciPy.
    outputs_np, labels_np = outputs.cpu().numpy(), split.labels.cpu().numpy()
    return compute_metrics(task, outputs_np, labels_np), loss.item(), degenerate_reason(task, outputs_np, labels_np)


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Trainer's grouping: weight decay on weight matrices, none on biases and LayerNorm weights."""
    return not (param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower())


def _adamw(model: PreTrainedModel, cfg: TrainConfig, device: torch.device,
           extra: Iterable[tuple[str, torch.nn.Parameter]] = ()) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in [*model.named_parameters(), *extra]:
        (decay if takes_weight_decay(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=cfg.fused_adamw)


def linear_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, train_rows: int,
                    epochs: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The trial's learning-rate schedule: linear warm-up, then linear decay to 0 over its own epochs (``epochs``:
    one stage's, default ``num_train_epochs``)."""
    total_steps = math.ceil(train_rows / cfg.batch_size) * (cfg.num_train_epochs if epochs is None else epochs)
    return get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def optimizer_and_schedule(model: PreTrainedModel, cfg: TrainConfig, train_rows: int, device: torch.device,
                           stage: Stage | None = None, trainable: torch.nn.ModuleDict | None = None,
                           ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The trial's AdamW (Trainer's groups) and its linear schedule (``linear_schedule``); for one ``stage``, over
    its epochs, its terms' trainable state (``trainable``, by term name) trained with the student."""
    names = {t.name for t in stage.terms} if stage is not None else set()
    extra = [(f"{name}.{param_name}", param) for name, module in (trainable or {}).items() if name in names
             for param_name, param in module.named_parameters()]
    optimizer = _adamw(model, cfg, device, extra)
    return optimizer, linear_schedule(optimizer, cfg, train_rows, None if stage is None else stage.epochs)


class MemberDiverged(TrainingDiverged):
    """A pack member's training loss turned NaN or inf: that member's trial fails, the others go on."""


def batch_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor], teacher: TeacherOutputs,
               labels: torch.Tensor, cfg: TrainConfig, task: TaskInfo, device: torch.device,
               stage: Stage | None = None, trainable: torch.nn.ModuleDict | None = None) -> torch.Tensor:
    """One batch's loss for ``model``: the sum of the stage's distillation terms (``kdsearch.terms``; default: the
    trial's last stage, every term that is on for a one-stage trial), its forward pass in ``cfg.precision`` and
    asked for the internals the terms need, its loss in fp32. ``teacher`` is aligned to the student's layers."""
    stage = cfg.stages[-1] if stage is None else stage
    needs = stage.needs
    with autocast(device, cfg.precision), contextlib.ExitStack() as stack:
        captured = stack.enter_context(capture_qkv(model)) if needs.student_qkv else None
        # The costly line: the student's forward pass.
        out = model(**inputs, output_hidden_states=needs.student_hidden_states,
                    output_attentions=needs.student_attentions)
    student = StudentOutputs(out.logits, out.hidden_states, out.attentions,
                             None if captured is None else as_qkv(captured), inputs.get("attention_mask"),
                             {} if trainable is None else dict(trainable.items()))
    return total_loss(stage.terms, student, teacher, labels, task.is_regression)


def check_finite(model: PreTrainedModel, epoch: int, bad_step: int, bad_value: float, steps_per_epoch: int,
                 diverged: type[TrainingDiverged] = TrainingDiverged, stage: str = "") -> None:
    """After an epoch: ``diverged`` naming the first step whose loss or gradient went non-finite (0: none), or the
    epoch's last step when only the weights did (an infinite update); one host sync. ``stage`` prefixes what
    diverged ("intermediate-stage ": an epoch of the first stage, numbered within it)."""
    if bad_step:
        what = "loss" if not math.isfinite(bad_value) else "gradient"
        raise diverged(bad_value, epoch, bad_step, what=stage + what)
    if not bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()):
        raise diverged(math.nan, epoch, steps_per_epoch, what=stage + "weights")


@dataclasses.dataclass
class PackMember:
    """One student the epoch loop trains: a solo trial is a pack of one."""

    model: PreTrainedModel
    cfg: TrainConfig  # in a pack, its batch_size must be the pack's; its batch_seed is ignored (the pack's is used)
    on_epoch_end: EpochCallback | None = None
    # Set by train_members: its terms' trainable state (kdsearch.terms' learned projections, by term name; never
    # part of the student), and the teacher layer matched with each of its layers (the layer mapping).
    trainable: torch.nn.ModuleDict = dataclasses.field(default_factory=torch.nn.ModuleDict)
    teacher_layers: tuple[int, ...] = ()


class PackStep(Protocol):
    """How the members of a pack take one training step together (``LoopStep``, ``distill.stacked``)."""

    def step(self, inputs: dict[str, torch.Tensor], teacher: TeacherOutputs,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train every member still in the pack on the batch; their losses and gradient norms (before clipping),
        in pack order, detached."""
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


@dataclasses.dataclass
class _LoopMember:
    member: PackMember
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stage: int = 0  # its stage (TrainConfig.stages) and the steps left in it
    steps_left: int = 0


class LoopStep:
    """Each member in turn: forward, backward, its own clip and fused AdamW. With several members, each one's random
    streams are swapped in around its step (so its dropout masks are its solo run's); one member (a solo trial) keeps
    the global stream, which nothing else draws from between its steps.

    Each member goes through its own stages (``TrainConfig.stages``), counted in steps: a fresh AdamW and schedule
    at each, its terms' trainable state trained with the student while its terms are on, and the teacher's
    internals aligned to its own layer mapping."""

    def __init__(self, members: list[PackMember], train_rows: int, task: TaskInfo, device: torch.device) -> None:
        self.task, self.device, self.train_rows = task, device, train_rows
        self.swap_rng = len(members) > 1
        self.members: list[_LoopMember] = []
        self.rngs: list[list[torch.Tensor]] = []
        for member in members:
            torch.manual_seed(member.cfg.seed)  # its dropout stream
            self.rngs.append(_get_rng(device))
            self.members.append(_LoopMember(member, *self._optimizer(member, 0), stage=0,
                                            steps_left=self._stage_steps(member, 0)))

    def _stage_steps(self, member: PackMember, stage: int) -> int:
        return math.ceil(self.train_rows / member.cfg.batch_size) * member.cfg.stages[stage].epochs

    def _optimizer(self, member: PackMember, stage: int,
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        cfg = member.cfg
        if len(cfg.stages) == 1 and not member.trainable:
            return optimizer_and_schedule(member.model, cfg, self.train_rows, self.device)  # as it always was
        return optimizer_and_schedule(member.model, cfg, self.train_rows, self.device, cfg.stages[stage],
                                      member.trainable)

    def step(self, inputs: dict[str, torch.Tensor], teacher: TeacherOutputs,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, norms = [], []
        for position, state in enumerate(self.members):
            member = state.member
            if state.steps_left == 0 and state.stage + 1 < len(member.cfg.stages):  # the next stage starts afresh
                state.stage += 1
                state.optimizer, state.scheduler = self._optimizer(member, state.stage)
                state.steps_left = self._stage_steps(member, state.stage)
            stage = member.cfg.stages[state.stage]
            if self.swap_rng:
                _set_rng(self.device, self.rngs[position])
            aligned = (align_teacher(teacher, member.teacher_layers)
                       if stage.needs.teacher_internals and member.teacher_layers else teacher)
            loss = batch_loss(member.model, inputs, aligned, labels, member.cfg, self.task, self.device, stage,
                              member.trainable)
            loss.backward()  # the other costly line
            if self.swap_rng:
                self.rngs[position] = _get_rng(self.device)
            parameters = [*member.model.parameters(),
                          *(p for t in stage.terms if t.name in member.trainable
                            for p in member.trainable[t.name].parameters())]
            norms.append(torch.nn.utils.clip_grad_norm_(parameters, member.cfg.max_grad_norm))
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.steps_left -= 1
            losses.append(loss.detach())
        return torch.stack(losses), torch.stack(norms)

    def sync(self, position: int) -> None:
        pass  # each member trains in its own model

    def keep(self, positions: list[int]) -> None:
        self.members = [self.members[i] for i in positions]
        self.rngs = [self.rngs[i] for i in positions]


# Builds a pack's stepper once its members are on the device (LoopStep, or distill.stacked.StackedStudents).
MakeStep = Callable[[list[PackMember], int, TaskInfo, torch.device], PackStep]


@dataclasses.dataclass
class _Record:
    """One member's epochs so far."""

    history: list[EpochResult] = dataclasses.field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    train_seconds: float = 0.0
    samples: int = 0


def _width_and_depth(model: Any) -> tuple[int, int]:
    config = model.config
    return int(config.hidden_size), int(config.num_hidden_layers)


def _prepare_layer_terms(member: PackMember, teacher: PreTrainedModel | None, device: torch.device) -> None:
    """The member's terms' trainable state (built from its seed, on ``device``) and its layer mapping, when a term
    of it is on that needs them; ValueError (naming the terms, or ``layer_map``) when it cannot."""
    cfg = member.cfg
    layered = [t for t in cfg.terms if t.term.active(t.config) and t.term.intermediate]
    if not layered and not cfg.needs.teacher_internals:
        return
    names = ", ".join(t.name for t in cfg.terms if t.term.active(t.config))
    if teacher is None:
        raise ValueError("a distillation term needs the teacher's hidden states or attentions, and no teacher model "
                         "was given to run live: " + names)
    student_width, student_depth = _width_and_depth(member.model)
    teacher_width, teacher_depth = _width_and_depth(teacher)
    if cfg.needs.teacher_internals:
        member.teacher_layers = resolve_layer_map(cfg.layer_map, student_depth, teacher_depth)
    trainable = torch.nn.ModuleDict()
    # Built from the member's seed without touching the global stream (its dropout stream is seeded after).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for setting in layered:
            module = setting.term.trainable(setting.config, student_width, teacher_width)
            if module is not None:
                trainable[setting.name] = module
    member.trainable = cast(torch.nn.ModuleDict, cast(torch.nn.Module, trainable).to(device))


def train_members(members: list[PackMember], train: TokenizedSplit, train_logits: torch.Tensor,
                  eval_split: TokenizedSplit, batch_seed: int, task: TaskInfo, make_step: MakeStep = LoopStep,
                  on_done: Callable[[int, TrainResult | MemberDiverged], None] | None = None,
                  teacher: PreTrainedModel | None = None,
                  ) -> list[TrainResult | MemberDiverged]:
    """The epoch loop, for one trial or a pack of them: every member trains on the same batches (their order drawn
    from ``batch_seed``), ``make_step`` choosing how one batch's step is taken. One result per member, in order: its
    ``TrainResult`` (``stopped`` set when its callback stopped it), or ``MemberDiverged``. ``on_done(index,
    result)`` is called as soon as a member leaves, while the others train on (so its trial can be stored and told
    without waiting for the pack).

    Per member at every epoch boundary: a divergence check (loss, gradient, weights), evaluation in fp32, then its
    ``on_epoch_end`` callback (report, prune, stop); a member that is stopped, diverged or has run its epochs
    leaves, and the rest go on.

    A member with a two-stage schedule (``TrainConfig.stages``) first runs its intermediate epochs: checked for
    divergence, but neither evaluated nor reported (its head is untrained); its reported epochs are then numbered
    1..``num_train_epochs`` (``EpochResult.epoch``), their ``step`` counting every step since the start, and its
    ``train_seconds`` covering both stages. Terms on the teacher's internals run ``teacher`` live, once per batch
    for the whole pack, in the first member's precision (its logits stay the cached ones)."""
    if not members:
        return []
    batch_sizes = {m.cfg.batch_size for m in members}
    bucket_batches = {m.cfg.bucket_batches for m in members}
    if len(batch_sizes) != 1 or len(bucket_batches) != 1:
        raise ValueError(f"a pack shares one batch size and bucketing, not {sorted(batch_sizes)} / "
                         f"{sorted(bucket_batches)}")
    batch_size, buckets = batch_sizes.pop(), bucket_batches.pop()
    device = train.input_ids.device
    for member in members:
        _prepare_layer_terms(member, teacher, device)
    if teacher is not None and any(m.cfg.needs.teacher_internals for m in members):
        teacher.eval()
    steps_per_epoch = math.ceil(len(train) / batch_size)
    generator = torch.Generator().manual_seed(batch_seed)  # the batch order
    for member in members:
        # PreTrainedModel.to is declared @wraps(Module.to), which type-checks as the unbound function: call it (the
        # same method, transformers' override) through the Module type.
        cast(torch.nn.Module, member.model).to(device)
    outer_rng = _get_rng(device)  # a pack's members swap their own streams in: the caller's is given back after
    stepper = make_step(members, len(train), task, device)
    records = [_Record() for _ in members]
    results: list[TrainResult | MemberDiverged | None] = [None] * len(members)
    active = list(range(len(members)))  # member indices, in the stepper's order
    steps, epoch = 0, 0
    while active:
        epoch += 1
        started = time.perf_counter()
        for i in active:
            members[i].model.train()
        # What the teacher must compute this epoch: the union of the members' current stages' needs.
        stages = [_stage_at(members[i].cfg, epoch) for i in active]
        teacher_needs = needs_of(t for stage in stages for t in stage.terms)
        loss_sums = torch.zeros(len(active), device=device)
        # Per member, the epoch's first step whose loss or gradient was not finite (0: none) and its loss, kept on
        # the device: no host sync per step.
        bad_step = torch.zeros(len(active), dtype=torch.long, device=device)
        bad_value = torch.zeros(len(active), device=device)
        # Drawn every epoch: epoch e's order is the generator's e-th draw, for every member and for a solo run.
        batches = length_bucketed_batches(train.lengths, batch_size, generator, buckets)
        for epoch_step, idx in enumerate(batches, start=1):
            idx = idx.to(device, non_blocking=True)
            inputs = train.batch(idx)
            teacher_out = (teacher_internals(teacher, inputs, train_logits[idx], teacher_needs,
                                             members[active[0]].cfg.precision)
                           if teacher is not None and teacher_needs.teacher_internals
                           else TeacherOutputs(train_logits[idx]))
            losses, grad_norms = stepper.step(inputs, teacher_out, train.labels[idx])
            steps += 1
            loss_sums += losses  # no .item(): that would sync the device every step
            # A non-finite gradient makes this step's weights non-finite, whatever its loss was.
            first_bad = (bad_step == 0) & ~(torch.isfinite(losses) & torch.isfinite(grad_norms))
            bad_step = torch.where(first_bad, epoch_step, bad_step)
            bad_value = torch.where(first_bad, losses, bad_value)
        train_time = time.perf_counter() - started
        bad_steps, bad_values = bad_step.tolist(), bad_value.tolist()  # the epoch's host sync
        staying: list[int] = []
        for position, i in enumerate(active):
            record, cfg, member = records[i], members[i].cfg, members[i]
            eval_started = time.perf_counter()
            stepper.sync(position)
            skipped = cfg.unreported_epochs
            intermediate = epoch <= skipped
            try:
                check_finite(member.model, epoch if intermediate else epoch - skipped, bad_steps[position],
                             bad_values[position], steps_per_epoch, MemberDiverged,
                             "intermediate-stage " if intermediate else "")
            except MemberDiverged as diverged:
                results[i] = diverged
                if on_done is not None:
                    on_done(i, diverged)
                continue
            if intermediate:  # not evaluated: its head is untrained, so its metric must not drive pruning
                record.train_seconds += train_time
                record.samples += len(train)
                staying.append(position)
                continue
            # Evaluated in fp32 whatever the training precision: the recorded metric is the exported fp32 model's.
            metrics, eval_loss, degenerate = evaluate(member.model, eval_split, cfg.eval_batch_size, task)
            # Each member's epoch took the pack's training time and its own evaluation.
            seconds = train_time + time.perf_counter() - eval_started
            record.train_seconds += seconds
            record.samples += len(train)
            score = metrics[task.metric]
            result = EpochResult(epoch - skipped, steps, loss_sums[position].item() / steps_per_epoch, eval_loss,
                                 metrics, score, seconds, degenerate)
            record.history.append(result)
            if score > record.best_score:
                # Keep the best epoch's weights, not the last: that is the checkpoint the trial is scored by.
                record.best_score, record.best_epoch = score, epoch - skipped
                record.best_state = {k: v.detach().to("cpu", copy=True) for k, v in member.model.state_dict().items()}
            stopped = member.on_epoch_end(result) if member.on_epoch_end is not None else None
            if stopped or epoch - skipped >= cfg.num_train_epochs:
                trained = TrainResult(record.history, record.best_epoch, record.best_score, record.best_state,
                                      stopped or None, record.train_seconds, record.samples)
                results[i] = trained
                if on_done is not None:
                    on_done(i, trained)
                continue
            staying.append(position)
        if len(staying) < len(active):
            stepper.keep(staying)
            active = [active[position] for position in staying]
    if len(members) > 1:
        _set_rng(device, outer_rng)
    return [r for r in results if r is not None]


def _stage_at(cfg: TrainConfig, epoch: int) -> Stage:
    """The stage a member trains in during ``epoch`` (counted from 1 over all its stages)."""
    for stage in cfg.stages:
        if epoch <= stage.epochs:
            return stage
        epoch -= stage.epochs
    return cfg.stages[-1]


def train_student(model: PreTrainedModel, train: TokenizedSplit, train_logits: torch.Tensor,
                  eval_split: TokenizedSplit, cfg: TrainConfig, on_epoch_end: EpochCallback | None = None,
                  task: TaskInfo | None = None, teacher: PreTrainedModel | None = None) -> TrainResult:
    """Train ``model`` on ``train`` against the teacher's ``train_logits``: the epoch loop with one member
    (``train_members``). ``task`` (default: read off the model's config, scored by its default metric) picks the
    metrics; a loss, gradient or weights gone non-finite raise ``TrainingDiverged``. ``teacher`` runs live for terms
    on its internals (needed only then)."""
    task = task or resolve_task(model.config, None)
    torch.manual_seed(cfg.seed)  # dropout (and LoopStep seeds its one member's stream the same way)
    (result,) = train_members([PackMember(model, cfg, on_epoch_end)], train, train_logits, eval_split,
                              cfg.seed if cfg.batch_seed is None else cfg.batch_seed, task, teacher=teacher)
    if isinstance(result, MemberDiverged):
        raise TrainingDiverged(result.value, result.epoch, result.step, what=result.what) from None
    return result

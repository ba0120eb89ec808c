"""The contract of a distillation loss term.

A trial's loss is the sum of its terms' losses (``kdsearch.terms.total_loss``). Each term is one class, one module
(``kdsearch/terms/<name>.py``) and one line in the registry (``kdsearch.terms.TERMS``), and declares everything the
rest of kdsearch needs from it:

- ``config_class``: its typed settings (a frozen dataclass, one field per hyperparameter: a loss weight, a
  temperature...). A trial's ``distill.train.TrainConfig`` holds one per term, resolved from the spec's fixed values
  and the trial's sampled ones by ``TrainConfig.from_params``.
- ``search``: the hyperparameters it exposes to the search space (``SearchParam``: name, default range, rule).
  ``search_space``'s schema fields, their validation and the Optuna distributions are derived from them, so a new
  term needs no edit there. Names are global to the search space (the registry refuses two terms sharing one).
- ``needs``: what it reads from the teacher and the student (``Needs``); the trial computes only what its terms
  need (the student's hidden states cost memory; the teacher's internals cost a live forward or a cache).
- ``loss(student, teacher, labels, config, regression)``: its loss on one batch, a 0-d float32 tensor. It must be
  written so that ``torch.func.vmap`` can run it (a stacked pack, ``distill.stacked``, computes every member's loss
  in one call with the config's numbers as 0-d tensors): no Python branching on tensor values, no ``.item()``, no
  ``F.kl_div`` (it has no vmap rule). The same method serves a solo trial, a looped pack and a stacked pack.
- ``describe(config, regression)``: the sentence the model card gives for it (its formula and its settings).

Optional, for terms on the student's internals (``kdsearch.terms.hidden``, ``attention``, ``embedding``):

- ``active(config)`` / ``needs_for(config)``: a term whose weight is 0 is off, and costs nothing: it is not called,
  and asks for no hidden states and no teacher forward (``needs_for`` is what a trial reads; ``needs`` is what the
  term reads when on). Defaults: always on, ``needs``.
- ``intermediate``: the term matches the student's internals (TinyBERT's intermediate layers), not its predictions.
  With ``intermediate_epochs`` > 0 a trial first trains on its intermediate terms alone, then on the others
  (``distill.train.TrainConfig.stages``).
- ``trainable(config, student_width, teacher_width)``: trainable state the term needs (a learned projection of the
  student's width onto the teacher's), a ``torch.nn.Module`` built once per trial, trained by the trial's optimizer
  with the student, and handed to ``loss`` in ``student.trainable[term.name]``. It is never part of the student:
  its checkpoint, best state and export hold the student's weights alone. Default: None (nothing to train).

The teacher's internals reach ``loss`` already aligned to the student's layers by the trial's layer mapping
(``kdsearch.terms.layers``): ``teacher.hidden_states[i]`` is the teacher layer matched with the student's layer i
(0: the embeddings' output), ``teacher.qkv[i - 1]`` that layer's self-attention queries, keys and values. The batch's
attention mask (1 on real tokens, 0 on padding) is ``student.attention_mask``.

A term may ignore some of its hyperparameters for a task (``SearchParam.classification_only``: the temperature has no
meaning for a regression head); they are then neither searched nor shown.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import torch

NO_LABEL = -100  # a transfer-set row: the teacher's logits are its only target (cross_entropy's ignore_index)
# A regression row without a gold target holds NaN instead (any float could be a real target).


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One hyperparameter a term exposes to the search space.

    ``default`` is the spec's default: a fixed number, or a range / choices as the spec writes them
    (``{"low": 2.0, "high": 30.0}``, ``{"choices": [...]}``). ``valid(x)`` says whether one value is allowed, and
    ``rule`` says so in words (``"> 0"``) for the 422 that names the field."""

    name: str
    default: float | dict[str, Any]
    valid: Callable[[float], bool]
    rule: str
    integer: bool = False
    classification_only: bool = False  # meaningless for a regression head: not searched, not shown
    symbol: str | None = None  # its short name in tables and charts ("T"); None: the name itself


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a term reads, beyond the batch's labels."""

    teacher_logits: bool = False
    student_hidden_states: bool = False
    student_attentions: bool = False
    teacher_hidden_states: bool = False
    teacher_attentions: bool = False
    # Each layer's self-attention queries, keys and values (before the heads are split): MiniLM's relations.
    student_qkv: bool = False
    teacher_qkv: bool = False

    @property
    def teacher_internals(self) -> bool:
        """Whether the teacher must run on the batch (its logits alone are cached)."""
        return self.teacher_hidden_states or self.teacher_attentions or self.teacher_qkv


@dataclasses.dataclass
class StudentOutputs:
    """The student's forward pass on one batch: what the trial's terms need of it."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    qkv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None  # per layer
    attention_mask: torch.Tensor | None = None  # [B, T]: 1 on real tokens
    # The terms' trainable state by term name (``DistillationTerm.trainable``): learned projections.
    trainable: Mapping[str, torch.nn.Module] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TeacherOutputs:
    """The teacher's outputs for one batch's rows (cached logits; internals computed live), its internals aligned to
    the student's layers (see the module's docstring)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    qkv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None  # per (mapped) layer


Config = TypeVar("Config")


class DistillationTerm(ABC, Generic[Config]):
    """One loss term of a trial; see the module's docstring for the contract."""

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]
    search: ClassVar[tuple[SearchParam, ...]] = ()
    needs: ClassVar[Needs] = Needs()
    intermediate: ClassVar[bool] = False  # on the student's internals: the first stage of a two-stage schedule

    @abstractmethod
    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor, config: Config,
             regression: bool) -> torch.Tensor:
        """This term's loss on one batch (a 0-d float32 tensor), vmap-safe; ``config``'s numbers may be 0-d
        tensors (one member of a stacked pack)."""

    @abstractmethod
    def describe(self, config: Config, regression: bool) -> str:
        """The model card's sentence for this term: its formula and its settings."""

    def active(self, config: Config) -> bool:
        """Whether the term contributes at all (a term with weight 0 is off: not called, nothing computed for it)."""
        return True

    def needs_for(self, config: Config) -> Needs:
        """What the term reads with this config: nothing when it is off."""
        return self.needs if self.active(config) else Needs()

    def trainable(self, config: Config, student_width: int, teacher_width: int) -> torch.nn.Module | None:
        """The term's trainable state for one trial (a learned projection), or None; never part of the student."""
        return None

    def config(self, values: dict[str, Any], regression: bool) -> Config:
        """The term's typed config from a trial's parameters (its own names; the rest ignored). A parameter the task
        ignores takes the config's default."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        own = {p.name for p in self.search if not (regression and p.classification_only)}
        return self.config_class(**{k: v for k, v in values.items() if k in fields and k in own})

    def values(self, config: Config) -> dict[str, float]:
        """The config's numbers as the stacked pack stacks them (one column per field)."""
        return {f.name: float(getattr(config, f.name)) for f in dataclasses.fields(config)}  # type: ignore[arg-type]

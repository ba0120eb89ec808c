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

A term may ignore some of its hyperparameters for a task (``SearchParam.classification_only``: the temperature has no
meaning for a regression head); they are then neither searched nor shown.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
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


@dataclasses.dataclass
class StudentOutputs:
    """The student's forward pass on one batch: what the trial's terms need of it."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class TeacherOutputs:
    """The teacher's outputs for one batch's rows (cached, or computed live)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


Config = TypeVar("Config")


class DistillationTerm(ABC, Generic[Config]):
    """One loss term of a trial; see the module's docstring for the contract."""

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]
    search: ClassVar[tuple[SearchParam, ...]] = ()
    needs: ClassVar[Needs] = Needs()

    @abstractmethod
    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor, config: Config,
             regression: bool) -> torch.Tensor:
        """This term's loss on one batch (a 0-d float32 tensor), vmap-safe; ``config``'s numbers may be 0-d
        tensors (one member of a stacked pack)."""

    @abstractmethod
    def describe(self, config: Config, regression: bool) -> str:
        """The model card's sentence for this term: its formula and its settings."""

    def config(self, values: dict[str, Any], regression: bool) -> Config:
        """The term's typed config from a trial's parameters (its own names; the rest ignored). A parameter the task
        ignores takes the config's default."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        own = {p.name for p in self.search if not (regression and p.classification_only)}
        return self.config_class(**{k: v for k, v in values.items() if k in fields and k in own})

    def values(self, config: Config) -> dict[str, float]:
        """The config's numbers as the stacked pack stacks them (one column per field)."""
        return {f.name: float(getattr(config, f.name)) for f in dataclasses.fields(config)}  # type: ignore[arg-type]

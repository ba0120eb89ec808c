"""Distillation loss terms as plug-ins (the contract: ``kdsearch.terms.base``).

Adding a term takes three files: its module here (its config, search parameters, needs, loss and card sentence),
one line in ``TERMS`` below, and its test. The search space, the trial's config, the training step (solo, looped
and stacked packs) and the model card read them from this registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdsearch.terms.attention import AttentionRelations, AttentionRelationsConfig
from kdsearch.terms.base import (
    NO_LABEL,
    DistillationTerm,
    Needs,
    SearchParam,
    StudentOutputs,
    TeacherOutputs,
)
from kdsearch.terms.embedding import EmbeddingConfig, EmbeddingKD
from kdsearch.terms.hidden import HiddenStates, HiddenStatesConfig
from kdsearch.terms.logits import LogitKD, LogitKDConfig, distillation_loss, regression_distillation_loss

# The registry: a term's name -> the term. Every trial runs every registered term (a term is off when its weight is
# 0, which a spec may fix or search).
TERMS: dict[str, DistillationTerm[Any]] = {term.name: term for term in (
    LogitKD(),
    HiddenStates(),
    AttentionRelations(),
    EmbeddingKD(),
)}


def search_params() -> tuple[SearchParam, ...]:
    """Every hyperparameter the registered terms expose to the search space, in registry order."""
    params = tuple(p for term in TERMS.values() for p in term.search)
    names = [p.name for p in params]
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"two distillation terms expose the same search parameter: {sorted(duplicated)}"
    return params


def classification_only_params() -> tuple[str, ...]:
    """The terms' parameters that mean nothing for a regression head (not searched, not shown there)."""
    return tuple(p.name for p in search_params() if p.classification_only)


@dataclass(frozen=True)
class TermSetting:
    """One term of a trial, with its typed config."""

    term: DistillationTerm[Any]
    config: Any

    @property
    def name(self) -> str:
        return self.term.name


def resolve_terms(values: dict[str, Any], regression: bool) -> tuple[TermSetting, ...]:
    """Every registered term, its config read from a trial's parameters (defaults where absent)."""
    return tuple(TermSetting(term, term.config(values, regression)) for term in TERMS.values())


def needs_of(terms: Iterable[TermSetting]) -> Needs:
    """What a set of terms needs together, with their configs (a term that is off needs nothing)."""
    needs = [t.term.needs_for(t.config) for t in terms]
    return Needs(**{field: any(getattr(n, field) for n in needs) for field in Needs.__dataclass_fields__})


def total_loss(terms: Sequence[TermSetting], student: StudentOutputs, teacher: TeacherOutputs,
               labels: torch.Tensor, regression: bool, configs: Sequence[Any] | None = None) -> torch.Tensor:
    """The trial's loss on one batch: the sum of its terms' losses, those that are off (their setting's config:
    weight 0) left out. ``configs`` overrides each term's config (a stacked pack passes its members' numbers as 0-d
    tensors under vmap)."""
    loss: torch.Tensor | None = None
    for index, setting in enumerate(terms):
        if not setting.term.active(setting.config):
            continue
        config = setting.config if configs is None else configs[index]
        term_loss = setting.term.loss(student, teacher, labels, config, regression)
        loss = term_loss if loss is None else loss + term_loss
    assert loss is not None, "a trial has at least one distillation term that is on"
    return loss


__all__ = [
    "NO_LABEL",
    "TERMS",
    "AttentionRelations",
    "AttentionRelationsConfig",
    "DistillationTerm",
    "EmbeddingConfig",
    "EmbeddingKD",
    "HiddenStates",
    "HiddenStatesConfig",
    "LogitKD",
    "LogitKDConfig",
    "Needs",
    "SearchParam",
    "StudentOutputs",
    "TeacherOutputs",
    "TermSetting",
    "classification_only_params",
    "distillation_loss",
    "needs_of",
    "regression_distillation_loss",
    "resolve_terms",
    "search_params",
    "total_loss",
]

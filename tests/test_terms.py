"""Distillation terms as plug-ins (kdsearch.terms): the registry drives the search space, the trial's config, the
training step (solo, looped and stacked packs) and the model card; a new term plugs in without touching them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from distill.packed import PackMember, train_pack
from distill.train import TrainConfig, train_student
from kdsearch import terms as terms_module
from kdsearch.terms import (
    TERMS,
    DistillationTerm,
    LogitKD,
    LogitKDConfig,
    Needs,
    SearchParam,
    StudentOutputs,
    TeacherOutputs,
    resolve_terms,
    search_params,
    total_loss,
)
from search_space import SearchSpace, optuna_distributions
from search_space.tasks import IGNORED_PARAMS
from tests.test_packing import TASK, assert_same, tiny_split, tiny_student


def test_the_search_space_has_a_field_per_term_parameter_with_its_rule() -> None:
    space = SearchSpace()
    for param in search_params():
        assert param.name in SearchSpace.model_fields
        default = getattr(space, param.name)
        expected = param.default if not isinstance(param.default, dict) else param.default.get("low")
        assert (default if isinstance(default, float) else default.low) == expected
    with pytest.raises(ValidationError, match=r"alpha must be within \[0, 1\] \(got 2.0\)"):
        SearchSpace(alpha=2)
    with pytest.raises(ValidationError, match=r"temperature must be > 0 \(got 0.0\)"):
        SearchSpace(temperature={"choices": [2, 0]})
    # Searched: Optuna distributions named after the term's parameters; ignored for regression where it says so.
    assert {"temperature", "alpha"} <= set(optuna_distributions(space))
    assert IGNORED_PARAMS["regression"] == tuple(p.name for p in search_params() if p.classification_only)
    assert "temperature" not in optuna_distributions(space, IGNORED_PARAMS["regression"])


def test_a_trial_config_holds_each_term_typed() -> None:
    params = {"learning_rate": 1e-3, "num_train_epochs": 2, "temperature": 4.0, "alpha": 0.3, "batch_size": 8,
              "num_hidden_layers": 2}
    cfg = TrainConfig.from_params(params, regression=False, seed=5, shape_names=("num_hidden_layers",))
    logits = cfg.terms[0]
    assert [t.name for t in cfg.terms] == list(TERMS)  # every registered term, the layer-wise ones off by default
    assert not any(t.term.active(t.config) for t in cfg.terms[1:])
    assert logits.term is TERMS["logits"] and logits.config == LogitKDConfig(alpha=0.3, temperature=4.0)
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.batch_size, cfg.seed) == (1e-3, 2, 8, 5)
    assert cfg.shape == {"num_hidden_layers": 2}
    # A regression head has no temperature: the term's default, whatever the parameters say.
    regression = TrainConfig.from_params(params, regression=True, seed=5)
    assert regression.terms[0].config == LogitKDConfig(alpha=0.3, temperature=1.0)


def test_logit_kd_by_hand() -> None:
    """One row, two classes, alpha 0.25, T 2: 0.25 * CE + 0.75 * T^2 * KL, written out."""
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p_t = [math.exp(0.0) / (math.exp(0.0) + math.exp(1.0)), math.exp(1.0) / (math.exp(0.0) + math.exp(1.0))]
    p_s = [math.exp(0.5) / (math.exp(0.5) + 1.0), 1.0 / (math.exp(0.5) + 1.0)]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    ce = -math.log(math.exp(1.0) / (math.exp(1.0) + 1.0))  # label 0
    expected = 0.25 * ce + 0.75 * 4 * kl
    got = LogitKD().loss(StudentOutputs(student), TeacherOutputs(teacher), torch.tensor([0]),
                         LogitKDConfig(alpha=0.25, temperature=2.0), regression=False)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert "T 2" in LogitKD().describe(LogitKDConfig(0.25, 2.0), False)
    assert "temperature" not in LogitKD().describe(LogitKDConfig(0.25, 2.0), True).split("no temperature")[0]


@dataclasses.dataclass(frozen=True)
class LogitL2Config:
    logit_l2_weight: float = 0.0


class LogitL2(DistillationTerm[LogitL2Config]):
    """A term a plug-in might add: the squared distance of the student's logits to the teacher's, weighted."""

    name = "logit_l2"
    config_class = LogitL2Config
    search = (SearchParam("logit_l2_weight", 0.0, lambda x: x >= 0, ">= 0"),)
    needs = Needs(teacher_logits=True)

    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor, config: LogitL2Config,
             regression: bool) -> torch.Tensor:
        return config.logit_l2_weight * ((student.logits.float() - teacher.logits) ** 2).sum(-1).mean()

    def describe(self, config: LogitL2Config, regression: bool) -> str:
        return f"logit L2 with weight {config.logit_l2_weight:g}"


@pytest.fixture
def plugged(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The registry with one more term: the one line a new term adds."""
    monkeypatch.setitem(TERMS, LogitL2.name, LogitL2())
    return LogitL2


def test_a_plugged_term_is_summed_into_the_loss(plugged: Any) -> None:
    settings = resolve_terms({"alpha": 0.5, "temperature": 2.0, "logit_l2_weight": 0.5}, regression=False)
    assert [s.name for s in settings] == ["logits", "hidden", "attention", "embedding", "logit_l2"]
    student, teacher, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
    alone = LogitKD().loss(StudentOutputs(student), TeacherOutputs(teacher), labels, settings[0].config, False)
    both = total_loss(settings, StudentOutputs(student), TeacherOutputs(teacher), labels, False)
    assert both.item() == pytest.approx(alone.item() + 0.5 * (1.0 + 4.0))
    assert "logit_l2_weight" in {p.name for p in terms_module.search_params()}


def test_a_plugged_term_trains_the_same_solo_looped_and_stacked(plugged: Any) -> None:

    train, eval_split = tiny_split(48, seed=0), tiny_split(16, seed=2)
    logits = torch.randn(len(train), 2, generator=torch.Generator().manual_seed(1)) * 3
    cfgs = [TrainConfig.from_params({"learning_rate": 3e-3, "alpha": 0.5, "temperature": 2.0, "num_train_epochs": 2,
                                     "batch_size": 16, "logit_l2_weight": weight}, regression=False, seed=seed)
            for seed, weight in ((7, 0.0), (8, 0.7))]
    assert [s.config for s in cfgs[1].terms][-1] == LogitL2Config(0.7)
    alone = [train_student(tiny_student(c.seed, 0.0), train, logits, eval_split, dataclasses.replace(c, batch_seed=3),
                           task=TASK) for c in cfgs]
    for step in ("loop", "stacked"):
        members = [PackMember(tiny_student(c.seed, 0.0), c) for c in cfgs]
        for packed, solo in zip(train_pack(members, train, logits, eval_split, 3, TASK, step=step), alone,
                                strict=True):
            assert_same(packed, solo)
    # The weight matters: the two members' losses differ by more than their seeds' doing.
    assert alone[0].history[-1].train_loss != pytest.approx(alone[1].history[-1].train_loss, rel=1e-3)


def test_tables_and_charts_show_every_term_parameter(tmp_path: Path) -> None:
    """The dashboard and the CLI read the hyperparameters to show from GET /api/hyperparameters, which lists every
    registered term's, with its short name."""
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a")
    with TestClient(create_app(settings)) as client:
        shown = client.get("/api/hyperparameters").json()
    assert [h["name"] for h in shown] == ["learning_rate", "temperature", "alpha", "hidden_weight", "attention_weight",
                                          "embedding_weight", "num_train_epochs", "batch_size"]
    assert {h["name"]: h["symbol"] for h in shown}["temperature"] == "T"
    assert next(h for h in shown if h["name"] == "temperature")["classification_only"] is True


def test_a_term_needing_the_teachers_internals_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher cache holds logits only: a term that reads the teacher's hidden states, trained with no teacher
    model to run live, is refused before any step, naming the terms, rather than failing inside its loss."""

    class HiddenNeeds(LogitL2):
        name = "hidden_needs"
        needs = Needs(teacher_hidden_states=True)

    monkeypatch.setitem(TERMS, HiddenNeeds.name, HiddenNeeds())
    train, eval_split = tiny_split(16, seed=0), tiny_split(8, seed=2)
    cfg = TrainConfig.from_params({"learning_rate": 1e-3, "num_train_epochs": 1, "batch_size": 8}, regression=False,
                                  seed=1)
    with pytest.raises(ValueError, match=r"no teacher model was given to run live: logits, hidden_needs$"):
        train_student(tiny_student(1, 0.0), train, torch.zeros(len(train), 2), eval_split, cfg, task=TASK)

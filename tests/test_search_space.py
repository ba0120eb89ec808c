"""Spec parsing and validation: every rule is an error naming the field."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import ValidationError

from search_space import (
    SearchSpace,
    StudySpec,
    fixed_params,
    make_pruner,
    make_sampler,
    optuna_distributions,
    trial_params,
)

BASE = {
    "name": "ok",
    "teacher": "owner/teacher",
    "student": {"model": "owner/student"},
    "dataset": {"hub": "glue", "config": "sst2"},
}


def error_locs(exc: ValidationError) -> list[tuple]:
    return [tuple(e["loc"]) for e in exc.errors()]


def test_defaults_are_the_seed_search() -> None:
    spec = StudySpec.model_validate(BASE)
    dists = optuna_distributions(spec.search_space)
    assert dists["learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["temperature"] == FloatDistribution(2.0, 30.0)
    assert dists["alpha"] == FloatDistribution(0.0, 1.0)
    assert dists["num_train_epochs"] == IntDistribution(2, 10)
    assert fixed_params(spec.search_space) == {"batch_size": 128, "weight_decay": 0.0, "warmup_ratio": 0.0,
                                               "hidden_weight": 0.0, "attention_weight": 0.0, "embedding_weight": 0.0,
                                               "layer_map": "uniform", "intermediate_epochs": 0, "predistilled": 0}
    assert isinstance(fixed_params(spec.search_space)["batch_size"], int)
    assert (spec.n_trials, spec.sampler, spec.pruner, spec.seed, spec.priority) == (20, "tpe", "median", 33, 0)
    assert spec.dataset.max_seq_length == 128 and spec.dataset.text_column == "sentence"


def test_fixed_choices_and_ranges_map_to_optuna() -> None:
    space = SearchSpace.model_validate({
        "learning_rate": 3e-4,
        "batch_size": {"choices": [32, 64]},
        "temperature": {"low": 1, "high": 9, "step": 2},
    })
    dists = optuna_distributions(space)
    assert "learning_rate" not in dists
    assert dists["batch_size"] == CategoricalDistribution([32, 64])
    assert dists["temperature"] == FloatDistribution(1, 9, step=2)
    params = trial_params(space, {"batch_size": 64, "num_train_epochs": 3})
    assert params["learning_rate"] == 3e-4 and params["batch_size"] == 64 and params["num_train_epochs"] == 3


@pytest.mark.parametrize(
    ("search_space", "field"),
    [
        ({"learning_rate": {"low": 1e-3, "high": 1e-4}}, "learning_rate"),
        ({"learning_rate": {"low": 1e-3, "high": 1e-3}}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "learning_rate"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": {"low": -0.1, "high": 0.5}}, "alpha"),
        ({"alpha": {"choices": [0.5, 2]}}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": {"low": -1, "high": 4}}, "temperature"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"num_train_epochs": {"low": 0, "high": 3}}, "num_train_epochs"),
        ({"num_train_epochs": 2.5}, "num_train_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": {"choices": [0, 32]}}, "batch_size"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_invalid_search_space_names_the_field(search_space: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate({**BASE, "search_space": search_space})
    assert any(loc[:2] == ("search_space", field) for loc in error_locs(info.value)), info.value


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"name": "bad name!"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"n_trials": 0}, "n_trials"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"sampler": "grid"}, "sampler"),
        ({"pruner": "asha"}, "pruner"),
        ({"unknown": 1}, "unknown"),
        ({"student": {}}, "student"),
        ({"student": {"model": "a/b", "truncate_teacher": {"num_layers": 2}}}, "student"),
        ({"student": {"config": {"num_hidden_layers": 2, "hidden_size": 130, "num_attention_heads": 4,
                                 "intermediate_size": 512}}}, "student"),
        ({"student": {"truncate_teacher": {"num_layers": 0}}}, "student"),
        ({"dataset": {"hub": "glue", "path": "/tmp"}}, "dataset"),
        ({"dataset": {"path": "/tmp", "config": "sst2"}}, "dataset"),
        ({"dataset": {"hub": "glue", "max_seq_length": 4}}, "dataset"),
        ({"dataset": {"hub": "glue", "max_train_samples": 0}}, "dataset"),
    ],
)
def test_invalid_spec_names_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate({**BASE, **patch})
    assert any(loc[0] == field for loc in error_locs(info.value)), info.value


def test_samplers_are_seeded_per_slot_and_pruners_built() -> None:
    spec = StudySpec.model_validate({**BASE, "sampler": "random"})
    import optuna

    def first_lr(slot: int) -> float:
        study = optuna.create_study(sampler=make_sampler(spec, slot))
        return study.ask(optuna_distributions(spec.search_space)).params["learning_rate"]

    assert first_lr(0) == first_lr(0)
    assert first_lr(0) != first_lr(1)
    assert isinstance(make_pruner(spec), optuna.pruners.MedianPruner)
    hyper = StudySpec.model_validate({**BASE, "pruner": "hyperband"})
    assert isinstance(make_pruner(hyper), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(StudySpec.model_validate({**BASE, "pruner": "none"})), optuna.pruners.NopPruner)


def test_every_example_spec_is_valid() -> None:
    """The shipped examples parse; the GLUE ones name the right columns and metrics for their task."""
    import json
    from pathlib import Path

    examples = Path(__file__).parent.parent / "examples"
    specs = {p.stem if p.parent.name != "glue" else f"glue/{p.stem}": StudySpec.model_validate(json.loads(
        p.read_text())) for p in [*examples.glob("*.json"), *examples.glob("glue/*.json")]}
    assert {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")} <= set(specs)
    assert specs["glue/cola"].metric == "matthews_correlation" and specs["glue/stsb"].metric == "pearson"
    assert specs["glue/mnli"].dataset.eval_split == "validation_matched"
    assert specs["glue/qqp"].dataset.text_pair_column == "question2"
    assert specs["mrpc"].dataset.text_pair_column == "sentence2" and specs["stsb"].metric == "pearson"

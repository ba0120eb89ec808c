"""From a search space to Optuna: distributions for the searched parameters, samplers and pruners."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from kdsearch.terms import search_params
from search_space.schema import ParamChoices, ParamRange, SearchSpace, StrChoices, StudySpec

# Whole-number parameters: the schedule's, the transfer set's copies, and any distillation term's that says so.
INTEGER_PARAMS = frozenset({"num_train_epochs", "batch_size", "predistilled", "intermediate_epochs", "transfer_copies",
                            *(p.name for p in search_params() if p.integer)})


def _typed(name: str, value: float | str) -> float | int | str:
    if isinstance(value, str):  # a word (layer_map)
        return value
    return int(value) if name in INTEGER_PARAMS else float(value)


def optuna_distributions(space: SearchSpace, ignored: Collection[str] = ()) -> dict[str, BaseDistribution]:
    """Distributions of the parameters that are searched (fixed values are not Optuna params; ``ignored`` ones,
    such as temperature in a regression study, are not searched at all)."""
    dists: dict[str, BaseDistribution] = {}
    for name, spec in space:
        if name in ignored:
            continue
        if isinstance(spec, ParamRange):
            if name in INTEGER_PARAMS:
                dists[name] = IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                              step=int(spec.step or 1))
            else:
                dists[name] = FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        elif isinstance(spec, ParamChoices | StrChoices):
            dists[name] = CategoricalDistribution([_typed(name, c) for c in spec.choices])
    return dists


def fixed_params(space: SearchSpace, ignored: Collection[str] = ()) -> dict[str, float | int | str]:
    return {name: _typed(name, spec) for name, spec in space  # None: unset (transfer_copies: all copies built)
            if spec is not None and not isinstance(spec, ParamRange | ParamChoices | StrChoices)
            and name not in ignored}


def trial_params(space: SearchSpace, sampled: dict[str, Any],
                 ignored: Collection[str] = ()) -> dict[str, float | int | str]:
    """Every hyperparameter of a trial: the fixed ones and the sampled ones (``ignored`` ones left out)."""
    params = fixed_params(space, ignored)
    params.update({k: _typed(k, v) for k, v in sampled.items()})
    return params


def max_epochs(space: SearchSpace) -> int:
    spec = space.num_train_epochs
    if isinstance(spec, ParamRange):
        return int(spec.high)
    if isinstance(spec, ParamChoices):
        return int(max(spec.choices))
    return int(spec)


def make_sampler(spec: StudySpec, slot_no: int) -> optuna.samplers.BaseSampler:
    """A sampler for one trial.

    Each trial's sampler is seeded from (study seed, slot number): reproducible, and parallel workers do not
    propose the same configuration (constant_liar lets TPE account for trials still running elsewhere).
    QMC walks one shared low-discrepancy sequence, so it keeps the study seed.
    """
    trial_seed = (spec.seed * 1_000_003 + slot_no) % (2**32)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=spec.seed, scramble=True, warn_asynchronous_seeding=False)
    return optuna.samplers.TPESampler(seed=trial_seed, constant_liar=True, multivariate=True)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Optuna's pruner for a single-objective study. Optuna's pruners rank trials on one objective only: a study with
    several has none here, and its worker applies ``search_space.objectives.same_shape_should_prune`` itself."""
    if spec.pruner == "none" or spec.multi_objective:
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs(spec.search_space), 2))
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)

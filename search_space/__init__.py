"""What is searched: the study spec schema, its defaults, validation and Optuna distributions."""

from search_space.distributions import (
    INTEGER_PARAMS,
    fixed_params,
    make_pruner,
    make_sampler,
    max_epochs,
    optuna_distributions,
    trial_params,
)
from search_space.schema import (
    AugmentSpec,
    DatasetSpec,
    ParamChoices,
    ParamRange,
    SearchSpace,
    StudentArchitecture,
    StudentSpec,
    StudySpec,
    TruncateTeacher,
    values_of,
)
from search_space.validation import SpecError, looks_local, split_file, tokenizers_compatible, validate_spec

__all__ = [
    "INTEGER_PARAMS",
    "AugmentSpec",
    "DatasetSpec",
    "ParamChoices",
    "ParamRange",
    "SearchSpace",
    "SpecError",
    "StudentArchitecture",
    "StudentSpec",
    "StudySpec",
    "TruncateTeacher",
    "fixed_params",
    "looks_local",
    "make_pruner",
    "make_sampler",
    "max_epochs",
    "optuna_distributions",
    "split_file",
    "tokenizers_compatible",
    "trial_params",
    "validate_spec",
    "values_of",
]

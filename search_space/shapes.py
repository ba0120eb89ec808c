"""The student shapes a study searches: Optuna distributions over valid shapes only, and each trial's shape back.

A searched dimension (``student.config``'s four, or ``truncate_teacher.num_layers``) becomes an Optuna parameter
like a search-space one (a range an ``IntDistribution``, choices a ``CategoricalDistribution``) once every value that
takes part in no valid shape is dropped:

- a hidden size that none of the head counts divides evenly, and a head count that divides none of the hidden sizes;
- with ``embedding_init: teacher_pca``, a hidden size wider than the teacher's;
- with ``truncate_teacher``, more layers than the teacher has.

A dimension left with no value is a ``SpecError`` naming its field: a 422 at the API when the teacher is a local
directory, else the study fails with the reason once a worker has read the teacher's config.

Hidden size and head count are sampled as two parameters when every remaining pair of them is valid (multiples of 64
with 1, 2 or 4 heads, say). Otherwise the valid ``(hidden_size, num_attention_heads)`` pairs are the choices of one
categorical parameter, so that no sampler can ever propose a pair that cannot exist. A truncated student's depth is
the parameter ``num_hidden_layers``, as a fresh student's: both are the student's number of layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from itertools import pairwise
from typing import Any, cast

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from search_space.errors import SpecError
from search_space.schema import (
    ShapeChoices,
    ShapeRange,
    StudentArchitecture,
    StudentSpec,
    TruncateTeacher,
    shape_values,
    valid_attention_pairs,
)

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
JOINT_ATTENTION = "hidden_size/num_attention_heads"  # the one parameter of coupled hidden sizes and head counts
MAX_JOINT_PAIRS = 2000  # more valid pairs than this searched as one categorical would barely be learnt


@dataclasses.dataclass(frozen=True)
class StudentSpace:
    """The searched dimensions of a study's student (Optuna distributions) and the fixed ones."""

    kind: str  # config, truncate_teacher or model
    distributions: dict[str, BaseDistribution]
    fixed: dict[str, int]  # the dimensions that are not searched (a truncated student's: num_hidden_layers)

    @property
    def searched(self) -> bool:
        return bool(self.distributions)

    def shape_params(self, sampled: Mapping[str, Any]) -> dict[str, int]:
        """A trial's searched dimensions as integers, from its Optuna params (a joint pair split in two)."""
        out: dict[str, int] = {}
        for name in self.distributions:
            if name == JOINT_ATTENTION:
                hidden, heads = str(sampled[name]).split("/")
                out["hidden_size"], out["num_attention_heads"] = int(hidden), int(heads)
            else:
                out[name] = int(sampled[name])
        return out

    def example(self) -> dict[str, int]:
        """One valid shape's searched dimensions (the lowest of each): what a preparation builds once to check."""
        sampled: dict[str, Any] = {}
        for name, distribution in self.distributions.items():
            if isinstance(distribution, IntDistribution):
                sampled[name] = distribution.low
            else:
                assert isinstance(distribution, CategoricalDistribution)
                sampled[name] = distribution.choices[0]
        return self.shape_params(sampled)

    def student_for(self, student: StudentSpec, params: Mapping[str, Any]) -> StudentSpec:
        """The student of one trial, every dimension a fixed value: a searched one the trial's (read from
        ``params``), any other the spec's (or the one value left once invalid ones were dropped)."""
        def value(name: str) -> int:
            return int(params[name]) if name in self.shape_names else self.fixed[name]

        if student.config is not None:
            dims = {name: value(name) for name in SHAPE_FIELDS}
            return student.model_copy(update={"config": StudentArchitecture.model_validate(dims)})
        if student.truncate_teacher is not None:
            return student.model_copy(update={"truncate_teacher": TruncateTeacher(
                num_layers=value("num_hidden_layers"))})
        return student

    def largest(self) -> dict[str, int]:
        """The largest value of each dimension any trial can have (searched or fixed): the most parameters a
        student of the study can have, each of them growing with every dimension."""
        largest = dict(self.fixed)
        for name, distribution in self.distributions.items():
            if name == JOINT_ATTENTION:
                assert isinstance(distribution, CategoricalDistribution)
                pairs = [str(choice).split("/") for choice in distribution.choices]
                largest["hidden_size"] = max(int(hidden) for hidden, _ in pairs)
                largest["num_attention_heads"] = max(int(heads) for _, heads in pairs)
            elif isinstance(distribution, IntDistribution):
                largest[name] = distribution.high
            else:
                assert isinstance(distribution, CategoricalDistribution)
                largest[name] = max(cast(int, choice) for choice in distribution.choices)  # integer dimensions only
        return largest

    @property
    def shape_names(self) -> tuple[str, ...]:
        """The dimensions a trial's params hold (the joint pair counted as its two dimensions)."""
        names: list[str] = []
        for name in self.distributions:
            names += ["hidden_size", "num_attention_heads"] if name == JOINT_ATTENTION else [name]
        return tuple(names)


def _distribution(spec: int | ShapeRange | ShapeChoices, values: list[int]) -> BaseDistribution | int:
    """A dimension's distribution over ``values`` (the spec's valid values): a range stays an ``IntDistribution``
    while no value inside it was dropped; one value left is no parameter at all."""
    if len(values) == 1:
        return values[0]
    if isinstance(spec, ShapeRange):
        step = spec.step or 1
        if all(b - a == step for a, b in pairwise(values)):
            return IntDistribution(values[0], values[-1], log=spec.log, step=step)
    return CategoricalDistribution(values)


def _config_space(student: StudentSpec, arch: StudentArchitecture, teacher_hidden: int | None) -> StudentSpace:
    hidden = shape_values(arch.hidden_size)
    capped = student.embedding_init == "teacher_pca" and teacher_hidden is not None
    if capped:
        hidden = [h for h in hidden if teacher_hidden is not None and h <= teacher_hidden]
        if not hidden:
            raise SpecError("student.config.hidden_size", f"embedding_init teacher_pca needs hidden_size <= the "
                                                          f"teacher's ({teacher_hidden}); no value given is")
    heads = shape_values(arch.num_attention_heads)
    # Counted before any pair is built: up to 8,185 hidden sizes times 128 head counts.
    pair_count = sum(1 for h in hidden for a in heads if h % a == 0)
    if not pair_count:
        raise SpecError("student.config.num_attention_heads",
                        f"no value divides a hidden_size value{f' of at most {teacher_hidden}' if capped else ''}: "
                        "no valid shape exists")
    hidden_sizes = [h for h in hidden if any(h % a == 0 for a in heads)]
    head_counts = [a for a in heads if any(h % a == 0 for h in hidden)]
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, int] = {}

    def add(name: str, spec: int | ShapeRange | ShapeChoices, values: list[int]) -> None:
        found = _distribution(spec, values)
        if isinstance(found, int):
            fixed[name] = found
        else:
            distributions[name] = found

    add("num_hidden_layers", arch.num_hidden_layers, shape_values(arch.num_hidden_layers))
    if pair_count == len(hidden_sizes) * len(head_counts):  # every pair valid: two independent parameters
        add("hidden_size", arch.hidden_size, hidden_sizes)
        add("num_attention_heads", arch.num_attention_heads, head_counts)
    elif pair_count > MAX_JOINT_PAIRS:
        raise SpecError("student.config.hidden_size",
                        f"{pair_count} valid (hidden_size, num_attention_heads) pairs are too many to search as one "
                        f"parameter (at most {MAX_JOINT_PAIRS}): give hidden_size a step every head count divides")
    else:
        pairs = valid_attention_pairs(hidden_sizes, head_counts)
        distributions[JOINT_ATTENTION] = CategoricalDistribution([f"{h}/{a}" for h, a in pairs])
    add("intermediate_size", arch.intermediate_size, shape_values(arch.intermediate_size))
    return StudentSpace("config", distributions, fixed)


def student_space(student: StudentSpec, teacher_hidden: int | None = None,
                  teacher_layers: int | None = None) -> StudentSpace:
    """The student shapes a study may sample, given the teacher's width and depth when known (None: not yet read).

    Raises ``SpecError`` naming the field when no valid shape exists.
    """
    if student.config is not None:
        return _config_space(student, student.config, teacher_hidden)
    if student.truncate_teacher is not None:
        spec = student.truncate_teacher.num_layers
        values = shape_values(spec)
        if teacher_layers is not None:
            values = [k for k in values if k <= teacher_layers]
            if not values:
                raise SpecError("student.truncate_teacher.num_layers",
                                f"must be within 1..{teacher_layers} (the teacher's depth)")
        found = _distribution(spec, values)
        if isinstance(found, int):
            return StudentSpace("truncate_teacher", {}, {"num_hidden_layers": found})
        return StudentSpace("truncate_teacher", {"num_hidden_layers": found}, {})
    return StudentSpace("model", {}, {})


def encoder_parameters(shape: Mapping[str, int]) -> int:
    """The parameters of a BERT-style encoder's layers of ``shape``: per layer, the query, key, value and output
    projections (``4h² + 4h``), the feed-forward pair (``2hi + i + h``) and two LayerNorms (``4h``). Embeddings,
    pooler and head are left out: they follow the teacher's vocabulary and labels, unknown here for a hub teacher."""
    hidden, intermediate = shape["hidden_size"], shape["intermediate_size"]
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return shape["num_hidden_layers"] * per_layer


def teacher_dims(config: Any) -> tuple[int | None, int | None]:
    """(hidden size, number of layers) of a teacher's Hugging Face config, None where it does not say."""
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    return (int(hidden) if hidden is not None else None), (int(layers) if layers is not None else None)

"""The study spec a user submits: teacher, student, dataset, search space and budget.

Every rule here is a 422 at the API, naming the field (pydantic puts the field path in ``loc``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from kdsearch.objectives import COST_OBJECTIVES, COSTS, OBJECTIVES, ObjectiveInfo
from kdsearch.terms import SearchParam, search_params
from kdsearch.terms.layers import layer_map_problem
from search_space.tasks import MetricName

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class _Strict(BaseModel):
    # Infinity and NaN (which JSON parsers accept as literals) are never a valid number in a spec: a 422 naming the
    # field, where gt=0 and friends would let Infinity through.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ParamRange(_Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self


class ParamChoices(_Strict):
    choices: list[float] = Field(min_length=1)


class StrChoices(_Strict):
    """Choices of a parameter whose values are words (``layer_map``): an Optuna categorical over strings."""

    choices: list[str] = Field(min_length=1)


def _spec_kind(value: Any) -> str:
    """The tag of a value / range / choices spec (search-space parameters and student dimensions alike), from a raw
    dict or an already-built model."""
    if isinstance(value, dict):
        return "choices" if "choices" in value else "range"
    if isinstance(value, ParamChoices | ShapeChoices | StrChoices):
        return "choices"
    if isinstance(value, ParamRange | ShapeRange):
        return "range"
    return "value"


# A fixed value, a range or a list of choices; dispatched on shape, so an error names one alternative only.
ParamSpec = Annotated[
    Annotated[float, Tag("value")] | Annotated[ParamRange, Tag("range")] | Annotated[ParamChoices, Tag("choices")],
    Discriminator(_spec_kind),
]


# A parameter whose values are words: a fixed one, or choices (no range).
StrParamSpec = Annotated[
    Annotated[str, Tag("value")] | Annotated[StrChoices, Tag("choices")],
    Discriminator(_spec_kind),
]


def values_of(spec: float | ParamRange | ParamChoices) -> list[float]:
    """The extreme values a parameter spec can take (enough to check bounds)."""
    if isinstance(spec, ParamRange):
        return [spec.low, spec.high]
    if isinstance(spec, ParamChoices):
        return list(spec.choices)
    return [spec]


def _check(
    name: str, spec: float | ParamRange | ParamChoices, ok: Callable[[float], bool], rule: str, integer: bool = False
) -> float | ParamRange | ParamChoices:
    for value in values_of(spec):
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be {rule} (got {value})")
        if integer and value != int(value):
            raise ValueError(f"{name} must be an integer (got {value})")
    if integer and isinstance(spec, ParamRange) and spec.step is not None and spec.step != int(spec.step):
        raise ValueError(f"{name} step must be an integer")
    return spec


class _OptimizerSearchSpace(_Strict):
    learning_rate: ParamSpec = ParamRange(low=1e-5, high=1e-3, log=True)

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        return _check("learning_rate", v, lambda x: x > 0, "> 0")


def _term_field(param: SearchParam) -> tuple[Any, Any]:
    default: float | ParamRange | ParamChoices = (
        param.default if not isinstance(param.default, dict)
        else ParamChoices(**param.default) if "choices" in param.default else ParamRange(**param.default))
    return (ParamSpec, default)


def _term_check(param: SearchParam) -> Any:
    def check(cls: type, v: Any) -> Any:
        return _check(param.name, v, param.valid, param.rule, integer=param.integer)
    return field_validator(param.name)(check)


if TYPE_CHECKING:
    _WithTerms = _OptimizerSearchSpace
else:
    # One field per distillation term's search parameter (temperature, alpha...: ``kdsearch.terms``), each validated
    # by its own rule; after the learning rate, in the registry's order (the order Optuna samples them in).
    _WithTerms = create_model(
        "_WithTerms", __base__=_OptimizerSearchSpace,
        __validators__={f"_check_{p.name}": _term_check(p) for p in search_params()},
        **{p.name: _term_field(p) for p in search_params()})


class SearchSpace(_WithTerms):
    """Each parameter is a fixed value, a range ``{low, high, log?, step?}`` or ``{choices: [...]}``.

    The learning rate and the schedule are declared here; the distillation terms' parameters (temperature,
    alpha...) by the terms themselves (``kdsearch.terms``), each a field of this model. Defaults are the seed
    search's (tiny-bert-sst2-distilled).
    """

    num_train_epochs: ParamSpec = ParamRange(low=2, high=10)
    batch_size: ParamSpec = 128
    weight_decay: ParamSpec = 0.0
    warmup_ratio: ParamSpec = 0.0
    # 1: the trial's student starts from its pre-distilled weights (``StudySpec.predistill``), 0: from its own
    # initialisation; {"choices": [0, 1]} lets the search decide.
    predistilled: ParamSpec = 0
    # The layer-wise terms (hidden, attention: ``kdsearch.terms``): which teacher layer each student layer learns
    # from (``kdsearch.terms.layers``), and the epochs of a first stage on those terms alone (TinyBERT's two
    # stages; 0: one stage, every term together). Neither matters while the layer terms' weights are 0.
    layer_map: StrParamSpec = "uniform"
    intermediate_epochs: ParamSpec = 0
    # Teacher-labelled copies of the train set a trial trains on: the first k rounds of the transfer set (``augment``);
    # None: all ``augment.copies``. At most ``augment.copies``.
    transfer_copies: ParamSpec | None = None

    @field_validator("num_train_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        return _check("num_train_epochs", v, lambda x: x >= 1, ">= 1", integer=True)

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return _check("batch_size", v, lambda x: x >= 1, ">= 1", integer=True)

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, v: Any) -> Any:
        return _check("weight_decay", v, lambda x: x >= 0, ">= 0")

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, v: Any) -> Any:
        return _check("warmup_ratio", v, lambda x: 0 <= x < 1, "within [0, 1)")

    @field_validator("predistilled", mode="before")
    @classmethod
    def _predistilled(cls, v: Any) -> Any:
        if isinstance(v, bool):  # true / false read as 1 / 0
            return int(v)
        if isinstance(v, dict) and isinstance(v.get("choices"), list):
            return {**v, "choices": [int(c) if isinstance(c, bool) else c for c in v["choices"]]}
        return v

    @field_validator("predistilled")
    @classmethod
    def _predistilled_flag(cls, v: Any) -> Any:
        return _check("predistilled", v, lambda x: x in (0, 1), "0 or 1 (or true / false)", integer=True)

    @field_validator("intermediate_epochs")
    @classmethod
    def _intermediate_epochs(cls, v: Any) -> Any:
        return _check("intermediate_epochs", v, lambda x: x >= 0, ">= 0", integer=True)

    @field_validator("layer_map")
    @classmethod
    def _layer_map(cls, v: Any) -> Any:
        for text in v.choices if isinstance(v, StrChoices) else [v]:
            if (problem := layer_map_problem(text)) is not None:
                raise ValueError(f"layer_map {problem}")
        return v

    @field_validator("transfer_copies")
    @classmethod
    def _transfer_copies(cls, v: Any) -> Any:
        return v if v is None else _check("transfer_copies", v, lambda x: x >= 0, ">= 0", integer=True)



# The training parameters shown beside the distillation terms' in tables and charts, with their short names.
_SHOWN_TRAINING_PARAMS = {"learning_rate": "lr", "num_train_epochs": "epochs", "batch_size": "batch"}


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter as tables and charts show it: its name in a trial's ``params``, its short name, and whether
    a regression study has it at all."""

    name: str
    symbol: str
    classification_only: bool = False


def shown_hyperparameters() -> list[Hyperparameter]:
    """What a trial's row shows of its parameters, in the search space's order: the learning rate, every
    distillation term's parameters (``kdsearch.terms``), the epochs and the batch size."""
    terms = {p.name: p for p in search_params()}
    shown = []
    for name in SearchSpace.model_fields:
        if name in _SHOWN_TRAINING_PARAMS:
            shown.append(Hyperparameter(name, _SHOWN_TRAINING_PARAMS[name]))
        elif (param := terms.get(name)) is not None:
            shown.append(Hyperparameter(name, param.symbol or name, param.classification_only))
    return shown


class ShapeRange(_Strict):
    """An integer range of a student dimension: ``low..high`` every ``step`` (default 1), or log-uniform."""

    low: int
    high: int
    step: int | None = Field(None, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self


class ShapeChoices(_Strict):
    choices: list[int] = Field(min_length=1)


# A student dimension: a fixed integer, an integer range or a list of choices (dispatched on shape, as ParamSpec).
ShapeSpec = Annotated[
    Annotated[int, Tag("value")] | Annotated[ShapeRange, Tag("range")] | Annotated[ShapeChoices, Tag("choices")],
    Discriminator(_spec_kind),
]


def shape_values(spec: int | ShapeRange | ShapeChoices) -> list[int]:
    """Every value a student dimension can take, ascending (a range enumerated on its step)."""
    if isinstance(spec, ShapeRange):
        return list(range(spec.low, spec.high + 1, spec.step or 1))
    if isinstance(spec, ShapeChoices):
        return sorted(set(spec.choices))
    return [spec]


def _check_shape(name: str, spec: Any, low: int, high: int) -> Any:
    # The bounds of a range, never its values: a range is only enumerated once it is known to be small.
    ends = [spec.low, spec.high] if isinstance(spec, ShapeRange) else shape_values(spec)
    for value in ends:
        if not low <= value <= high:
            raise ValueError(f"{name} must be within {low}..{high} (got {value})")
    return spec


def valid_attention_pairs(hidden_sizes: list[int], heads: list[int]) -> list[tuple[int, int]]:
    """The (hidden_size, num_attention_heads) pairs a BERT-style layer can have: the heads split the width evenly."""
    return [(h, a) for h in hidden_sizes for a in heads if h % a == 0]


def any_attention_pair(hidden_sizes: list[int], heads: list[int]) -> bool:
    """Whether some valid pair exists (stops at the first)."""
    return any(h % a == 0 for h in hidden_sizes for a in heads)


class StudentArchitecture(_Strict):
    """A fresh student's shape; each dimension a fixed value, a range or choices (searched like the search space).

    Only shapes that can exist are ever sampled: a hidden size the head count divides evenly.
    """

    num_hidden_layers: ShapeSpec
    hidden_size: ShapeSpec
    num_attention_heads: ShapeSpec
    intermediate_size: ShapeSpec

    @field_validator("num_hidden_layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _check_shape("num_hidden_layers", v, 1, 48)

    @field_validator("hidden_size")
    @classmethod
    def _hidden(cls, v: Any) -> Any:
        return _check_shape("hidden_size", v, 8, 8192)

    @field_validator("intermediate_size")
    @classmethod
    def _intermediate(cls, v: Any) -> Any:
        return _check_shape("intermediate_size", v, 8, 32768)

    @field_validator("num_attention_heads")
    @classmethod
    def _heads_divide_width(cls, v: Any, info: ValidationInfo) -> Any:
        _check_shape("num_attention_heads", v, 1, 128)
        hidden = info.data.get("hidden_size")
        if hidden is None:  # hidden_size itself was refused: that error names it
            return v
        if isinstance(hidden, int) and isinstance(v, int):
            if hidden % v:
                raise ValueError(f"hidden_size ({hidden}) must be divisible by num_attention_heads ({v})")
        elif not any_attention_pair(shape_values(hidden), shape_values(v)):
            raise ValueError(f"no value divides any hidden_size value: no valid shape exists (hidden_size "
                             f"{_shown(hidden)}, num_attention_heads {_shown(v)})")
        return v

    @property
    def searched(self) -> bool:
        return any(not isinstance(getattr(self, name), int) for name in type(self).model_fields)

    def fixed_shape(self) -> dict[str, int]:
        """The four dimensions of a shape with no searched dimension left (``search_space.shapes`` fixes them)."""
        shape = self.model_dump()
        if self.searched:
            raise ValueError(f"the student's shape is still searched ({shape}): fix it for the trial first")
        return shape


def _shown(spec: Any) -> str:
    values = shape_values(spec)
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]}"


class TruncateTeacher(_Strict):
    num_layers: ShapeSpec  # a fixed count, a range or choices; at most the teacher's depth (checked against it)

    @field_validator("num_layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _check_shape("num_layers", v, 1, 48)


class StudentSpec(_Strict):
    """Exactly one of: a pretrained ``model``, a fresh ``config``, or ``truncate_teacher``.

    A fresh ``config`` student's embeddings start random, or with ``embedding_init: "teacher_pca"`` as the
    teacher's word, position and type embeddings projected onto their top ``hidden_size`` principal directions
    (same vocabulary; no wider than the teacher): a narrow student then starts with the teacher's word geometry.

    ``pair_encoding`` (pair tasks): ``cross`` reads the pair as one sequence (a cross-encoder, like the teacher);
    ``siamese`` encodes each sentence alone and scores the pair from their mean encodings through an affine head
    (``distill.modeling_siamese``; a BERT teacher; exported with its modeling file, loaded with
    ``trust_remote_code=True``). ``pair_head`` (siamese only) is what that head reads: ``cosine`` (one axis of
    similarity: paraphrase, similarity scores), ``interaction`` (the cosine, u, v, |u - v| and u * v: classes
    that are not degrees of similarity, such as entailment), or ``auto``: interaction for more than two classes,
    the cosine otherwise.
    """

    model: str | None = Field(None, min_length=1, max_length=1024)
    config: StudentArchitecture | None = None
    truncate_teacher: TruncateTeacher | None = None
    embedding_init: Literal["random", "teacher_pca"] = "random"
    pair_encoding: Literal["cross", "siamese"] = "cross"
    pair_head: Literal["auto", "cosine", "interaction"] = "auto"

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        given = [k for k in ("model", "config", "truncate_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, config, truncate_teacher (got {given or 'none'})")
        if self.embedding_init != "random" and self.config is None:
            raise ValueError("embedding_init applies to a fresh config student only")
        if self.pair_encoding != "cross" and self.model is not None:
            raise ValueError("pair_encoding siamese applies to a config or truncate_teacher student only")
        if self.pair_head != "auto" and self.pair_encoding != "siamese":
            raise ValueError("pair_head applies to a siamese student only (pair_encoding siamese)")
        return self

    def pair_features(self, num_labels: int) -> str:
        """What a siamese student's head reads for a task of ``num_labels`` outputs (1: regression): the spec's
        ``pair_head``, ``auto`` resolved (interaction for more than two classes, the cosine otherwise)."""
        if self.pair_head != "auto":
            return self.pair_head
        return "interaction" if num_labels > 2 else "cosine"

    @property
    def searched(self) -> bool:
        """Whether the student's shape is searched (a range or choices in ``config`` or ``truncate_teacher``)."""
        if self.config is not None:
            return self.config.searched
        return self.truncate_teacher is not None and not isinstance(self.truncate_teacher.num_layers, int)

    @property
    def needs_teacher_weights(self) -> bool:
        return self.truncate_teacher is not None or self.embedding_init == "teacher_pca"

    @property
    def kind(self) -> str:
        return next(k for k in ("model", "config", "truncate_teacher") if getattr(self, k) is not None)


class DatasetSpec(_Strict):
    """``{"hub": "glue", "config": "sst2"}`` or ``{"path": DIR}`` holding ``<split>.tsv|.csv|.jsonl|.json|.parquet``.

    ``text_pair_column`` (optional) makes a sentence-pair task: rows are encoded as the tokenizer's pair encoding.
    """

    hub: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
    config: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str | None = Field(None, min_length=1, max_length=1024)
    text_column: str = Field("sentence", min_length=1, max_length=128)
    text_pair_column: str | None = Field(None, min_length=1, max_length=128)
    label_column: str = Field("label", min_length=1, max_length=128)
    train_split: str = Field("train", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    eval_split: str = Field("validation", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_train_samples: int | None = Field(None, ge=1)
    max_seq_length: int = Field(128, ge=8)  # capped by KDSEARCH_MAX_SEQ_LENGTH

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.hub is None) == (self.path is None):
            raise ValueError("give exactly one of hub, path")
        if self.config is not None and self.hub is None:
            raise ValueError("config is only for hub datasets")
        columns = [self.text_column, self.text_pair_column, self.label_column]
        if len({c for c in columns if c is not None}) != len([c for c in columns if c is not None]):
            raise ValueError("text_column, text_pair_column and label_column must be different columns")
        return self


class PairAugmentSpec(_Strict):
    """How a sentence-pair transfer set teaches the relation, not only each side (``distill.pair_corpus``; only for a
    dataset with ``text_pair_column``: set on a single-text dataset, the spec is refused).

    Each transfer row is drawn, per train pair, by one strategy: ``hard_negatives`` the pair's first sentence with a
    lexically close sentence of another pair (TF-IDF cosine, one of its ``hard_negative_pool`` nearest, never its
    own partner); ``random_pairs`` with a random sentence of the corpus; ``perturbed`` a perturbed copy of the pair
    (each word replaced with ``p_neighbour`` by one of its ``neighbours`` nearest whole words in the teacher's
    input-embedding space, else deleted with ``p_delete``; each word swapped with another of its sentence with
    ``p_swap``; the two sentences swapped with ``p_order``); the rest (1 minus the three) today's per-side
    augmentation (``p_mask``, ``p_replace``, ``p_ngram``). The defaults (all 0) keep per-side augmentation alone.
    """

    hard_negatives: float = Field(0.0, ge=0, le=1)
    random_pairs: float = Field(0.0, ge=0, le=1)
    perturbed: float = Field(0.0, ge=0, le=1)
    p_neighbour: float = Field(0.15, ge=0, le=1)
    p_delete: float = Field(0.1, ge=0, le=1)
    p_swap: float = Field(0.1, ge=0, le=1)
    p_order: float = Field(0.5, ge=0, le=1)
    neighbours: int = Field(10, ge=1, le=100)
    hard_negative_pool: int = Field(5, ge=1, le=100)

    @model_validator(mode="after")
    def _shares(self) -> PairAugmentSpec:
        if self.hard_negatives + self.random_pairs + self.perturbed > 1:
            raise ValueError("hard_negatives + random_pairs + perturbed must be <= 1 (got "
                             f"{self.hard_negatives + self.random_pairs + self.perturbed:g}); per-side augmentation "
                             "takes the rest")
        if self.p_neighbour + self.p_delete > 1:
            raise ValueError(f"p_neighbour + p_delete must be <= 1 (got {self.p_neighbour + self.p_delete:g})")
        if self.perturbed and not (self.p_neighbour or self.p_delete or self.p_swap or self.p_order):
            raise ValueError("perturbed > 0 needs at least one of p_neighbour, p_delete, p_swap, p_order above 0")
        return self

    @property
    def side_share(self) -> float:
        """The share of rows augmented side by side (what the pair strategies leave)."""
        return max(0.0, 1.0 - (self.hard_negatives + self.random_pairs + self.perturbed))

    @property
    def active(self) -> bool:
        """Whether any pair strategy is used (else the transfer set is per-side augmentation alone)."""
        return bool(self.hard_negatives or self.random_pairs or self.perturbed)


class AugmentSpec(_Strict):
    """A teacher-labelled transfer set built from the training texts (Tang et al., 2019, without extra models).

    Each of ``copies`` variants of a training sentence applies, word by word, masking (``p_mask``: the tokenizer's
    mask token) or replacement (``p_replace``: a word seen between the same neighbours in the training texts, else a
    random frequent word), then with ``p_ngram`` keeps only a random n-gram (n in 1..``max_ngram``). Variants carry
    no gold label: the teacher's logits are their only target. ``copies`` 0 turns augmentation off. Sentence pairs
    may mix in recombined and perturbed pairs (``pairs``). The set is built in rounds of one row per train row: its
    first k rounds are the k-copy set (what ``search_space.transfer_copies`` trains on).
    """

    copies: int = Field(0, ge=0)  # capped by KDSEARCH_MAX_AUGMENT_COPIES
    p_mask: float = Field(0.1, ge=0, le=1)
    p_replace: float = Field(0.1, ge=0, le=1)
    p_ngram: float = Field(0.25, ge=0, le=1)
    max_ngram: int = Field(5, ge=1, le=64)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    pairs: PairAugmentSpec = PairAugmentSpec()
    # Classification only: after the teacher labels the set, each round keeps a seeded sample of its rows whose
    # teacher-predicted class mix is the train split's gold mix (every row of the class scarcest for its share).
    # Recombined pairs are mostly "not equivalent" to a teacher: without it the student's prior follows them.
    match_label_mix: bool = False

    @model_validator(mode="after")
    def _probabilities(self) -> AugmentSpec:
        if self.p_mask + self.p_replace > 1:
            raise ValueError(f"p_mask + p_replace must be <= 1 (got {self.p_mask + self.p_replace})")
        if self.copies and self.pairs.side_share > 0 and not (self.p_mask or self.p_replace or self.p_ngram):
            raise ValueError("copies > 0 needs at least one of p_mask, p_replace, p_ngram above 0")
        return self


SplitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class CorpusSource(_Strict):
    """More unlabelled text for pre-distillation: a local directory of split files (``path``) or a hub dataset
    (``hub``, ``config``), the splits and text columns read. Labels are never read."""

    hub: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
    config: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str | None = Field(None, min_length=1, max_length=1024)
    splits: list[SplitName] = Field(default_factory=lambda: ["train"], min_length=1, max_length=16)
    text_columns: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["sentence"], min_length=1, max_length=8)
    max_rows: int | None = Field(None, ge=1)  # per split

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSource:
        if (self.hub is None) == (self.path is None):
            raise ValueError("give exactly one of hub, path")
        if self.config is not None and self.hub is None:
            raise ValueError("config is only for hub datasets")
        return self


class PredistillSpec(_Strict):
    """How a pre-distilled student is made (``distill.predistill``), when the search space's ``predistilled`` is
    1 (or among its choices): the teacher's self-attention relations (MiniLMv2: query, key and value relations of
    ``teacher_layer``, split into ``relation_heads``), and with ``hidden_weight`` the last hidden states through a
    learned projection (TinyBERT), distilled into the student's last layer on unlabelled text,
    for ``epochs`` passes. The corpus is the task's texts (``task_splits``, by default the train and eval splits;
    both sides of a pair; labels never read) when ``task_texts``, plus ``corpus``'s sources; with ``task_pairs`` a
    pair task's own pairs (its train split's unless ``task_pair_splits`` says otherwise) are examples too.
    Built once per (teacher, student shape, corpus, recipe) and shared by every study and trial with that key."""

    task_texts: bool = True
    corpus: list[CorpusSource] = Field(default_factory=list, max_length=16)
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(5e-4, gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=4096)
    max_seq_length: int = Field(128, ge=8)  # capped by KDSEARCH_MAX_SEQ_LENGTH
    relation_heads: int = Field(8, ge=1, le=256)  # must divide both hidden sizes
    # TinyBERT's hidden-state MSE on the last layer (through a learned projection) beside the relations; 0: off.
    hidden_weight: float = Field(1.0, ge=0, le=100)
    teacher_layer: int | None = Field(None, ge=-64, le=64)  # a teacher layer index (negative: from the top); None: last
    pair_share: float = Field(0.5, ge=0, le=1)  # examples made of two sentences in the pair encoding
    # How those examples find their second sentence: "random", or "lexical": one of its 5 nearest corpus sentences
    # by TF-IDF cosine (related pairs, on which the teacher's attention across the two sentences says something);
    # two texts of the eval split are never paired (their neighbours are often their own, scored, pairs).
    pair_partners: Literal["random", "lexical"] = "random"
    # A pair task's own pairs (``task_pair_splits``; labels never read), each this many times more examples as they
    # come: the teacher's internals on related sentences, which random partners (pair_share) seldom are. 0: none.
    task_pairs: int = Field(0, ge=0, le=16)
    # Which of the task's splits pre-distillation reads texts from; None: the train and the eval split.
    # ["train"] keeps every text the study is scored on out of it.
    task_splits: list[SplitName] | None = Field(None, min_length=1, max_length=16)
    # Which of the task's splits ``task_pairs`` come from; None: the train split alone. Naming the eval split is
    # transductive: the student is then fitted to the teacher's internals on the very pairs it is scored on, and
    # the study metric says nothing of unseen pairs (bench/results/tasks.md: STS-B 0.64 on such pairs, 0.23 held
    # out). For when the inputs the student will serve are all known in advance.
    task_pair_splits: list[SplitName] | None = Field(None, min_length=1, max_length=16)
    max_sentences: int | None = Field(None, ge=1)  # a fixed random subset of the corpus
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _has_text(self) -> PredistillSpec:
        if not self.task_texts and not self.corpus:
            raise ValueError("a pre-distillation corpus needs task_texts or at least one corpus source")
        if self.task_pair_splits is not None and not self.task_pairs:
            raise ValueError("task_pair_splits names where task_pairs come from: set task_pairs too")
        return self


NotifyEvent = Literal["finished", "failed", "new_best"]


def _default_events() -> list[NotifyEvent]:
    return ["finished", "failed"]


class NotifySpec(_Strict):
    """Webhook notifications: a JSON POST to ``webhook`` for each of ``events`` (the study finished, failed, or
    has a new best trial). The server only calls hosts its operator allows (``KDSEARCH_WEBHOOK_ALLOWED_HOSTS``)."""

    webhook: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")
    events: list[NotifyEvent] = Field(default_factory=_default_events, min_length=1)


class CardSpec(_Strict):
    """What the exported model card declares beyond what kdsearch knows: by default the teacher's own card's
    license and language (a student inherits its teacher's terms), which these replace."""

    license: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9.+-]*$")
    language: list[str] | None = Field(None, min_length=1, max_length=20)


# What a study optimises: the task metric (maximised) first, optionally one cost of the student (minimised); the
# names, and the constraints below, come from the registry (search_space.objectives.OBJECTIVES).
if TYPE_CHECKING:
    Objective = str
    CostName = str
else:
    Objective = Literal[tuple(OBJECTIVES)]  # "metric", "params", "flops", "latency_ms"
    CostName = Literal[COST_OBJECTIVES]  # "params", "flops", "latency_ms"


def _default_objectives() -> list[Objective]:
    return ["metric"]


class _ConstraintLimits(_Strict):
    """Limits on the student of a single-objective study: a trial whose student breaks one is infeasible (never
    "best"); its shape is measured before training, so it is not trained at all. One optional field per cost of
    the registry, ``max_<cost>`` (``max_params``, ``max_flops``, ``max_latency_ms``)."""

    @model_validator(mode="after")
    def _some(self) -> _ConstraintLimits:
        if all(getattr(self, cost.flag) is None for cost in COSTS):
            raise ValueError(f"give at least one of {', '.join(cost.flag for cost in COSTS)}")
        return self

    def limits(self) -> dict[str, float]:
        """Profile key → limit, for the constraints given (``params``, ``flops``, ``latency_ms``)."""
        return {cost.name: float(limit) for cost in COSTS if (limit := getattr(self, cost.flag)) is not None}


def _limit_field(cost: ObjectiveInfo) -> tuple[Any, Any]:
    """A cost's constraint: an integer for a count (parameters), a number for a measure (milliseconds), above 0."""
    kind: Any = int if cost.is_count else float
    return kind | None, Field(None, gt=0, description=f"at most this many {cost.limit_help}")


if TYPE_CHECKING:
    Constraints = _ConstraintLimits
else:
    Constraints = create_model("Constraints", __base__=_ConstraintLimits, __module__=__name__,
                               __doc__=_ConstraintLimits.__doc__,
                               **{cost.flag: _limit_field(cost) for cost in COSTS})


class StudySpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    teacher: str = Field(min_length=1, max_length=1024)
    student: StudentSpec
    dataset: DatasetSpec
    augment: AugmentSpec = AugmentSpec()
    predistill: PredistillSpec = PredistillSpec()
    notify: NotifySpec | None = None
    card: CardSpec | None = None  # the exported model card's license and language (default: the teacher's)
    search_space: SearchSpace = SearchSpace()
    # The score a study maximises; None: the task's default (accuracy for classification, pearson for regression).
    metric: MetricName | None = None
    # ["metric"]: maximise the metric; ["metric", <a cost of COSTS>]: a Pareto front of the metric (maximised)
    # against the student's cost (minimised).
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1, max_length=2)
    constraints: Constraints | None = None
    n_trials: int = Field(20, ge=1)  # capped by KDSEARCH_MAX_N_TRIALS
    timeout_s: float | None = Field(None, gt=0)
    sampler: Literal["tpe", "random", "qmc"] = "tpe"
    # Several objectives: "median" compares a trial with trials of the same student shape only, "hyperband" is refused.
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = Field(33, ge=0, le=2**31 - 1)
    priority: int = Field(0, ge=-1000, le=1000)

    @field_validator("dataset")
    @classmethod
    def _siamese_needs_pairs(cls, v: DatasetSpec, info: ValidationInfo) -> DatasetSpec:
        student = info.data.get("student")
        if student is not None and student.pair_encoding == "siamese" and v.text_pair_column is None:
            raise ValueError("student.pair_encoding siamese needs a sentence-pair dataset (dataset.text_pair_column)")
        return v

    @field_validator("augment")
    @classmethod
    def _pairs_need_pairs(cls, v: AugmentSpec, info: ValidationInfo) -> AugmentSpec:
        dataset = info.data.get("dataset")
        if v.pairs.active and dataset is not None and dataset.text_pair_column is None:
            raise ValueError("pairs.hard_negatives, pairs.random_pairs and pairs.perturbed need sentence pairs "
                             "(dataset.text_pair_column); set them to 0 for a single-text dataset")
        return v

    @field_validator("predistill")
    @classmethod
    def _task_pairs_need_pairs(cls, v: PredistillSpec, info: ValidationInfo) -> PredistillSpec:
        dataset = info.data.get("dataset")
        if v.task_pairs and dataset is not None and dataset.text_pair_column is None:
            raise ValueError("task_pairs needs a sentence-pair dataset (dataset.text_pair_column); set it to 0")
        return v

    @field_validator("search_space")
    @classmethod
    def _transfer_copies_built(cls, v: SearchSpace, info: ValidationInfo) -> SearchSpace:
        augment = info.data.get("augment")
        if v.transfer_copies is not None and augment is not None:
            most = max(values_of(v.transfer_copies))
            if most > augment.copies:
                raise ValueError(f"transfer_copies must be <= augment.copies ({augment.copies}), the copies built "
                                 f"(got {most:g})")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if v[0] != "metric":
            raise ValueError(f"the first objective is the task metric: [\"metric\"] or [\"metric\", X] with X one of "
                             f"{', '.join(COST_OBJECTIVES)} (got {v})")
        if len(v) == 2 and v[1] not in COST_OBJECTIVES:
            raise ValueError(f"the second objective must be one of {', '.join(COST_OBJECTIVES)} (got {v[1]!r})")
        return v

    @field_validator("constraints")
    @classmethod
    def _single_objective(cls, v: Constraints | None, info: ValidationInfo) -> Constraints | None:
        if v is not None and len(info.data.get("objectives") or []) > 1:
            raise ValueError("constraints apply to a single-objective study; a multi-objective study keeps every "
                             "trade-off on its Pareto front (pick within a limit with export-best --max-params etc.)")
        return v

    @field_validator("pruner")
    @classmethod
    def _pruner_fits(cls, v: str, info: ValidationInfo) -> str:
        if v == "hyperband" and len(info.data.get("objectives") or []) > 1:
            raise ValueError("hyperband cannot rank trials on several objectives; use \"median\" (a trial is "
                             "compared with trials of the same student shape) or \"none\"")
        return v

    @model_validator(mode="after")
    def _predistillable(self) -> StudySpec:
        if self.student.model is not None and 1 in values_of(self.search_space.predistilled):
            raise ValueError("search_space.predistilled: a pretrained student (student.model) is not pre-distilled; "
                             "pre-distillation makes a student of a config or truncate_teacher shape")
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def cost_objective(self) -> str | None:
        """The second objective (a cost of ``COSTS``: ``params``...), or None for a single-objective study."""
        return self.objectives[1] if self.multi_objective else None

    @property
    def directions(self) -> list[Literal["maximize", "minimize"]]:
        """Optuna's study directions: the metric is maximised, a cost minimised (the registry's directions)."""
        return [OBJECTIVES[name].direction for name in self.objectives]

    @field_validator("name")
    @classmethod
    def _not_an_id(cls, v: str) -> str:
        if v.isdigit():
            raise ValueError("a study name cannot be all digits: studies are looked up by id or name")
        return v

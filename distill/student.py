"""Build the student: pretrained, freshly initialised in the teacher's family, or cut from the teacher."""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from distill.data import DataError, TokenizedSplit
from distill.modeling_siamese import MODEL_TYPE, SiameseBertConfig, SiameseBertForSequenceClassification
from distill.models import split_revision
from search_space import StudentSpec, task_type_of

# In this process a siamese student's config and model load by their model_type (an exported one elsewhere with
# trust_remote_code=True, from the modeling file save_pretrained copies beside it).
AutoConfig.register(MODEL_TYPE, SiameseBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(SiameseBertConfig, SiameseBertForSequenceClassification, exist_ok=True)

_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers)\.)(\d+)(\..*)$")


def truncated_layer_indices(teacher_layers: int, keep: int) -> list[int]:
    """K evenly spaced teacher layers, DistilBERT-style: 12→6 keeps 0,2,4,6,8,10; 6→3 keeps 0,2,4."""
    if not 1 <= keep <= teacher_layers:
        raise DataError(f"truncate_teacher.num_layers must be within 1..{teacher_layers} (the teacher's depth)")
    return [i * teacher_layers // keep for i in range(keep)]


def _label_kwargs(teacher_config: PretrainedConfig) -> dict[str, Any]:
    """The teacher's head: labels, and for a regression teacher ``problem_type: regression`` (even where the
    teacher only said ``num_labels: 1``), so a pipeline over the student returns the raw score."""
    id2label, label2id = teacher_config.id2label, teacher_config.label2id
    assert id2label is not None and label2id is not None  # a sequence-classification teacher's config has both
    kwargs: dict[str, Any] = {
        "num_labels": teacher_config.num_labels,
        "id2label": dict(id2label),
        "label2id": dict(label2id),
    }
    if task_type_of(teacher_config) == "regression":
        kwargs["problem_type"] = "regression"
    elif teacher_config.problem_type is not None:
        kwargs["problem_type"] = teacher_config.problem_type
    return kwargs


_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


@torch.no_grad()
def _project_teacher_embeddings(model: PreTrainedModel, teacher_state: dict[str, torch.Tensor]) -> None:
    """Copy the teacher's embedding tables into a narrower student through one PCA basis of the word embeddings.

    One basis for all three tables keeps their sum (what the embedding LayerNorm sees) consistent; the teacher's
    scale is kept, since that LayerNorm makes the sum's scale irrelevant to the layers above.
    """
    student_state = model.state_dict()
    keys = {name: next((k for k in teacher_state if k.endswith(f"embeddings.{name}.weight")), None)
            for name in _EMBEDDINGS}
    word_key = keys["word_embeddings"]
    student_word_key = next((k for k in student_state if k.endswith("embeddings.word_embeddings.weight")), None)
    if word_key is None or student_word_key is None:
        raise DataError("embedding_init teacher_pca needs BERT-style embeddings in teacher and student")
    words = teacher_state[word_key].float()
    width = student_state[student_word_key].shape[1]
    if words.shape[0] != student_state[student_word_key].shape[0]:
        raise DataError(f"embedding_init teacher_pca needs the teacher's vocabulary size ({words.shape[0]}), "
                        f"the student has {student_state[student_word_key].shape[0]}")
    if width > words.shape[1]:
        raise DataError(f"embedding_init teacher_pca needs hidden_size <= the teacher's ({words.shape[1]})")
    mean = words.mean(0, keepdim=True)
    # Top principal directions of the word embeddings (the costly line: an SVD of vocab x teacher width, ~1 s).
    _, _, v = torch.linalg.svd(words - mean, full_matrices=False)
    basis = v[:width].T  # [teacher width, student width]
    for name, teacher_key in keys.items():
        student_key = student_word_key.replace("word_embeddings", name)
        if teacher_key is None or student_key not in student_state:
            continue
        table = teacher_state[teacher_key].float()
        if name == "word_embeddings":
            table = table - mean
        rows = min(table.shape[0], student_state[student_key].shape[0])
        student_state[student_key][:rows] = (table[:rows] @ basis).to(student_state[student_key].dtype)
    model.load_state_dict(student_state)


def student_config(spec: StudentSpec, teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The config of the student ``spec`` describes (every dimension fixed), with the teacher's labels: what
    ``build_student`` builds, and what ``distill.profile`` measures."""
    labels = _label_kwargs(teacher_config)
    if spec.model is not None:
        name, revision = split_revision(spec.model)
        return AutoConfig.from_pretrained(name, revision=revision, **labels)
    config = copy.deepcopy(teacher_config)
    config.update({k: v for k, v in labels.items() if k == "problem_type"})
    if spec.config is not None:
        config.update(spec.config.fixed_shape())
    else:
        assert spec.truncate_teacher is not None
        if not isinstance(spec.truncate_teacher.num_layers, int):
            raise ValueError("truncate_teacher.num_layers is still searched: fix it for the trial first")
        config.num_hidden_layers = len(truncated_layer_indices(teacher_config.num_hidden_layers,
                                                               spec.truncate_teacher.num_layers))
    if spec.pair_encoding == "siamese":
        if config.model_type != "bert":
            raise DataError(f"student.pair_encoding siamese needs a BERT teacher, this one is {config.model_type!r}")
        dropped = ("model_type", "architectures", "auto_map", "pair_features")
        fields = {k: v for k, v in config.to_dict().items() if k not in dropped}
        config = SiameseBertConfig(pair_features=spec.pair_features(config.num_labels or 1), **fields)
    return config


def build_student(spec: StudentSpec, teacher_config: PretrainedConfig, seed: int,
                  teacher_state: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A sequence classifier with the teacher's labels; initial weights depend only on ``seed``. Every dimension
    of ``spec`` must be fixed (``search_space.StudentSpace.student_for`` fixes a trial's)."""
    torch.manual_seed(seed)
    labels = _label_kwargs(teacher_config)
    if spec.model is not None:
        name, revision = split_revision(spec.model)
        pretrained = AutoConfig.from_pretrained(name, revision=revision)
        has_head = any(a.endswith("ForSequenceClassification") for a in pretrained.architectures or [])
        if has_head and pretrained.num_labels != teacher_config.num_labels:
            # A fine-tuned classifier with other labels would silently lose its head: refuse instead.
            raise DataError(f"teacher and student label counts differ (teacher {teacher_config.num_labels}, "
                            f"student {pretrained.num_labels})")
        # A base model (no classification head) gets a fresh head with the teacher's labels.
        return AutoModelForSequenceClassification.from_pretrained(
            name, revision=revision, ignore_mismatched_sizes=True, **labels
        )
    if spec.config is not None:
        model = AutoModelForSequenceClassification.from_config(student_config(spec, teacher_config))
        if spec.embedding_init == "teacher_pca":
            assert teacher_state is not None
            _project_teacher_embeddings(model, teacher_state)
        return model
    assert spec.truncate_teacher is not None and teacher_state is not None
    assert isinstance(spec.truncate_teacher.num_layers, int)
    keep = truncated_layer_indices(teacher_config.num_hidden_layers, spec.truncate_teacher.num_layers)
    model = AutoModelForSequenceClassification.from_config(student_config(spec, teacher_config))
    new_index = {old: new for new, old in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher_state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value  # embeddings, pooler, classifier
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    if spec.pair_encoding == "siamese":  # no pooler, and its own head (fitted at the trial's start)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "bert.pooler."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k and not k.startswith("pair_head.")]:
        raise DataError(f"cannot truncate this teacher: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


@torch.no_grad()
def fit_pair_head(model: PreTrainedModel, train: TokenizedSplit, teacher_logits: torch.Tensor,
                  rows: int = 1024, batch_size: int = 128) -> None:
    """A siamese student's ``pair_head`` set to the best affine map of its starting pair features to the teacher's
    outputs on the first ``rows`` train rows (scikit-learn): least squares for a regression teacher, a logistic
    regression on the teacher's classes otherwise. The cosine of a narrow student's mean encodings spans a sliver
    (about 0.97 ± 0.02 on STS-B), so a default head would start every pair on one class, or a regression head far
    from the teacher's scale, and spend its first epochs (or, at lr 3e-4, all of them) getting there.

    The cosine alone is fitted almost unpenalised (its slopes are large). The interaction features (1 + 4 x hidden
    of them, from about a thousand rows) are standardised and fitted with the default L2 penalty, and the scaling
    folded back into the head's weights."""
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    assert isinstance(model, SiameseBertForSequenceClassification)
    n = min(rows, len(train))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [train.batch(torch.arange(start, min(start + batch_size, n), device=train.input_ids.device))
               for start in range(0, n, batch_size)]
    features = torch.cat([model.pair_features(**{k: v.to(device) for k, v in batch.items()})[0]
                          for batch in batches]).float().cpu().numpy()
    model.train(was_training)
    cosine_only = model.config.pair_features == "cosine"
    scaler = StandardScaler(with_mean=not cosine_only, with_std=not cosine_only).fit(features)
    scaled = scaler.transform(features)
    targets = teacher_logits[:n].float().cpu().numpy()
    present: list[int] = []  # the classes the teacher gives on these rows
    if model.num_labels == 1:
        regression = (LinearRegression() if cosine_only else Ridge(alpha=1.0)).fit(scaled, targets[:, 0])
        coef, intercept = regression.coef_.reshape(1, -1), np.asarray(regression.intercept_).reshape(1)
    else:
        classes = targets.argmax(1)
        present = sorted(set(classes.tolist()))
        if len(present) < 2:
            return  # the teacher gives one class on these rows: nothing to fit, the default head stays
        fitted = LogisticRegression(C=1e4 if cosine_only else 1.0, max_iter=1000).fit(scaled, classes)
        if len(present) == 2:  # one slope for the second class against the first: split it between their logits
            fitted_coef = np.concatenate([-fitted.coef_, fitted.coef_]) / 2
            fitted_intercept = np.concatenate([-fitted.intercept_, fitted.intercept_]) / 2
        else:
            fitted_coef, fitted_intercept = fitted.coef_, fitted.intercept_
        coef, intercept = np.zeros((model.num_labels, features.shape[1])), np.zeros(model.num_labels)
        coef[present], intercept[present] = fitted_coef, fitted_intercept
    # Undo the standardisation: W (x - mean) / scale + b = (W / scale) x + (b - W (mean / scale)).
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(features.shape[1])
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(features.shape[1])
    weight = coef / scale
    bias = intercept - weight @ mean
    absent = [c for c in range(model.num_labels) if present and c not in present]
    if absent:
        # A class the teacher never gave on these rows starts unlikely: 10 below every other logit on them.
        bias[absent] = (features @ weight[present].T + bias[present]).min() - 10.0
    head = model.pair_head
    head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
    head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))

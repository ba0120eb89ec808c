"""Build the student: pretrained, freshly initialised in the teacher's family, or cut from the teacher."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from distill.data import DataError
from distill.teacher import split_revision
from search_space import StudentSpec

_LAYER_KEY = re.compile(r"^(.*\.(?:layer|layers)\.)(\d+)(\..*)$")


def truncated_layer_indices(teacher_layers: int, keep: int) -> list[int]:
    """K evenly spaced teacher layers, DistilBERT-style: 12→6 keeps 0,2,4,6,8,10; 6→3 keeps 0,2,4."""
    if not 1 <= keep <= teacher_layers:
        raise DataError(f"truncate_teacher.num_layers must be within 1..{teacher_layers} (the teacher's depth)")
    return [i * teacher_layers // keep for i in range(keep)]


def _label_kwargs(teacher_config: PretrainedConfig) -> dict[str, Any]:
    return {
        "num_labels": teacher_config.num_labels,
        "id2label": dict(teacher_config.id2label),
        "label2id": dict(teacher_config.label2id),
    }


def build_student(spec: StudentSpec, teacher_config: PretrainedConfig, seed: int,
                  teacher_state: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A sequence classifier with the teacher's labels; initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    labels = _label_kwargs(teacher_config)
    if spec.model is not None:
        name, revision = split_revision(spec.model)
        student_config = AutoConfig.from_pretrained(name, revision=revision)
        has_head = any(a.endswith("ForSequenceClassification") for a in student_config.architectures or [])
        if has_head and student_config.num_labels != teacher_config.num_labels:
            # A fine-tuned classifier with other labels would silently lose its head: refuse instead.
            raise DataError(f"teacher and student label counts differ (teacher {teacher_config.num_labels}, "
                            f"student {student_config.num_labels})")
        # A base model (no classification head) gets a fresh head with the teacher's labels.
        return AutoModelForSequenceClassification.from_pretrained(
            name, revision=revision, ignore_mismatched_sizes=True, **labels
        )
    config = copy.deepcopy(teacher_config)
    if spec.config is not None:
        config.update(spec.config.model_dump())
        return AutoModelForSequenceClassification.from_config(config)
    assert spec.truncate_teacher is not None and teacher_state is not None
    keep = truncated_layer_indices(teacher_config.num_hidden_layers, spec.truncate_teacher.num_layers)
    config.num_hidden_layers = len(keep)
    model = AutoModelForSequenceClassification.from_config(config)
    new_index = {old: new for new, old in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher_state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value  # embeddings, pooler, classifier
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise DataError(f"cannot truncate this teacher: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model

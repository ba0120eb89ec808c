"""Which teacher layer each student layer learns from (the layer mapping of the layer-wise terms).

A trial's ``layer_map`` is one of:

- ``uniform``: student layer i (1..M) learns from teacher layer ``ceil(i * N / M)`` of N, every ``N / M``-th layer
  (TinyBERT's ``g(m) = m * N / M``): 2 of 6 -> 3, 6;
- ``top``: the teacher's last M layers (2 of 6 -> 5, 6);
- ``bottom``: its first M layers (2 of 6 -> 1, 2);
- an explicit list of teacher layers, one per student layer, numbered from 1 (``"2,5"``; layer 0, the embeddings'
  output, is the embedding term's).

Layers are numbered as ``hidden_states`` indexes them: 0 is the embeddings' output, i the output of layer i.
"""

from __future__ import annotations

import math
import re

import torch

from kdsearch.terms.base import TeacherOutputs

NAMED_MAPPINGS = ("uniform", "top", "bottom")
_EXPLICIT = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*$")


def layer_map_problem(text: str) -> str | None:
    """What is wrong with a ``layer_map`` on its own (before the depths are known), or None."""
    if text in NAMED_MAPPINGS:
        return None
    if not _EXPLICIT.match(text):
        return (f"must be one of {', '.join(NAMED_MAPPINGS)} or a comma-separated list of teacher layers numbered "
                f"from 1, one per student layer (got {text!r})")
    layers = [int(x) for x in text.split(",")]
    if min(layers) < 1:
        return f"teacher layers are numbered from 1 (0 is the embeddings, the embedding term's) (got {text!r})"
    return None


def resolve_layer_map(text: str, student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """The teacher layer (1..N) matched with each student layer 1..M; ValueError naming the problem."""
    if (problem := layer_map_problem(text)) is not None:
        raise ValueError(f"layer_map {problem}")
    if text == "uniform":
        if student_layers > teacher_layers:
            raise ValueError(f"layer_map uniform: the student has more layers ({student_layers}) than the teacher "
                             f"({teacher_layers})")
        return tuple(math.ceil(i * teacher_layers / student_layers) for i in range(1, student_layers + 1))
    if text in ("top", "bottom"):
        if student_layers > teacher_layers:
            raise ValueError(f"layer_map {text}: the student has more layers ({student_layers}) than the teacher "
                             f"({teacher_layers})")
        first = teacher_layers - student_layers + 1 if text == "top" else 1
        return tuple(range(first, first + student_layers))
    layers = tuple(int(x) for x in text.split(","))
    if len(layers) != student_layers:
        raise ValueError(f"layer_map {text!r} names {len(layers)} teacher layers, but the student has "
                         f"{student_layers}: one per student layer")
    if max(layers) > teacher_layers:
        raise ValueError(f"layer_map {text!r}: the teacher has {teacher_layers} layers (numbered from 1)")
    return layers


def align_teacher(teacher: TeacherOutputs, layers: tuple[int, ...]) -> TeacherOutputs:
    """The teacher's internals picked for the student's layers: ``hidden_states`` (embeddings, then the teacher
    layer matched with each student layer) and ``qkv`` (each matched layer's)."""
    hidden = None if teacher.hidden_states is None else (
        teacher.hidden_states[0], *(teacher.hidden_states[layer] for layer in layers))
    qkv = None if teacher.qkv is None else tuple(teacher.qkv[layer - 1] for layer in layers)
    attentions = None if teacher.attentions is None else tuple(teacher.attentions[layer - 1] for layer in layers)
    return TeacherOutputs(teacher.logits, hidden, attentions, qkv)


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens' elements: ``sum(mask * (s - t)^2) / (real tokens * width)``, both
    ``[B, T, D]``, in fp32."""
    diff = (student.float() - teacher.float()) ** 2
    weights = mask.to(diff.dtype)
    return (diff.sum(-1) * weights).sum() / (weights.sum() * diff.shape[-1]).clamp_min(1.0)


class Projection(torch.nn.Module):
    """A learned linear map of the student's width onto the teacher's (TinyBERT's ``W_h``, ``W_e``)."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(student_width, teacher_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())

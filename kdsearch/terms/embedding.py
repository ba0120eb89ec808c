"""Embedding-layer distillation (TinyBERT, Jiao et al. 2020): the student's embedding output (word + position +
segment embeddings after their LayerNorm: ``hidden_states[0]``), through its own learned linear projection ``W_e``
onto the teacher's width, matched by MSE to the teacher's over the real (unpadded) tokens, weighted by
``embedding_weight``."""

from __future__ import annotations

import dataclasses

import torch

from kdsearch.terms.base import DistillationTerm, Needs, SearchParam, StudentOutputs, TeacherOutputs
from kdsearch.terms.layers import Projection, masked_mse


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    embedding_weight: float = 0.0  # 0: off


class EmbeddingKD(DistillationTerm[EmbeddingConfig]):
    name = "embedding"
    config_class = EmbeddingConfig
    search = (SearchParam("embedding_weight", 0.0, lambda x: x >= 0, ">= 0", symbol="w_emb"),)
    needs = Needs(student_hidden_states=True, teacher_hidden_states=True)
    intermediate = True

    def active(self, config: EmbeddingConfig) -> bool:
        return float(config.embedding_weight) > 0

    def trainable(self, config: EmbeddingConfig, student_width: int, teacher_width: int) -> torch.nn.Module:
        return Projection(student_width, teacher_width)

    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor,
             config: EmbeddingConfig, regression: bool) -> torch.Tensor:
        assert student.hidden_states is not None and teacher.hidden_states is not None
        assert student.attention_mask is not None
        project = student.trainable[self.name]
        return config.embedding_weight * masked_mse(project(student.hidden_states[0]), teacher.hidden_states[0],
                                                    student.attention_mask)

    def describe(self, config: EmbeddingConfig, regression: bool) -> str:
        return (f"embedding distillation, `{config.embedding_weight:g} * MSE(W_e e_s, e_t)` on the embedding layer's "
                "output (TinyBERT: W_e a linear projection learned with the student and not exported, real tokens "
                "only)")

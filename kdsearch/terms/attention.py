"""Self-attention distillation through MiniLM relations (MiniLMv2, Wang et al. 2021): for each student layer and the
teacher layer the layer mapping pairs it with (``kdsearch.terms.layers``), the query-query, key-key and value-value
self-relations (``kdsearch.terms.relations``) of the student matched to the teacher's by KL, averaged over the three
relations and the student's layers, weighted by ``attention_weight``.

Why relations, not attention probabilities: the student (2 heads, say) and the teacher (12) have different head
counts, and relations over ``R`` relation heads have the same shape whatever the widths: no projection is learned.
``R`` is the largest number that divides both widths and leaves the student at least ``MIN_RELATION_DIMS`` dims per
relation head (a 128-wide student and a 384-wide teacher: 4 heads of 32 and 96 dims; 1 at least). They are
computed from the attention's query, key and value projections (captured by forward hooks), before the attention
dropout, and the model keeps its fused SDPA attention. Attention probabilities (``output_attentions``) need the
slower eager attention in transformers 5 (SDPA returns none), and the student's come after its attention dropout
(checked: rows sum to 1.11 with dropout 0.1, and a dropped zero makes the KL infinite); raw scores hurt in the probe
(issue 25).
"""

from __future__ import annotations

import dataclasses

import torch

from kdsearch.terms.base import DistillationTerm, Needs, SearchParam, StudentOutputs, TeacherOutputs
from kdsearch.terms.relations import relation_loss


@dataclasses.dataclass(frozen=True)
class AttentionRelationsConfig:
    attention_weight: float = 0.0  # 0: off


MIN_RELATION_DIMS = 32


def relation_heads(student_width: int, teacher_width: int) -> int:
    """The relation heads of a student and a teacher of these widths (see the module's docstring)."""
    fitting = [r for r in range(1, student_width // MIN_RELATION_DIMS + 1)
               if student_width % r == 0 and teacher_width % r == 0]
    return max(fitting, default=1)


class AttentionRelations(DistillationTerm[AttentionRelationsConfig]):
    name = "attention"
    config_class = AttentionRelationsConfig
    search = (SearchParam("attention_weight", 0.0, lambda x: x >= 0, ">= 0", symbol="w_attn"),)
    needs = Needs(student_qkv=True, teacher_qkv=True)
    intermediate = True

    def active(self, config: AttentionRelationsConfig) -> bool:
        return float(config.attention_weight) > 0

    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor,
             config: AttentionRelationsConfig, regression: bool) -> torch.Tensor:
        assert student.qkv is not None and teacher.qkv is not None and student.attention_mask is not None
        if len(teacher.qkv) != len(student.qkv):
            raise ValueError(f"the attention term needs the teacher's layers aligned to the student's "
                             f"{len(student.qkv)} (got {len(teacher.qkv)})")
        heads = relation_heads(student.qkv[0][0].shape[-1], teacher.qkv[0][0].shape[-1])
        total = torch.stack([relation_loss(t, s, heads, student.attention_mask)
                             for s_layer, t_layer in zip(student.qkv, teacher.qkv, strict=True)
                             for s, t in zip(s_layer, t_layer, strict=True)]).mean()
        return config.attention_weight * total

    def describe(self, config: AttentionRelationsConfig, regression: bool) -> str:
        return (f"self-attention relation distillation, `{config.attention_weight:g} * mean over student layers and "
                "Q-Q, K-K, V-V of KL(relation_t || relation_s)` (MiniLMv2 relations, softmax(x x^T / sqrt(d_r)) over "
                "real tokens, averaged over relation heads, against the teacher layer the layer mapping pairs with "
                "each)")

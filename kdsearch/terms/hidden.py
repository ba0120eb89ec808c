"""Hidden-state distillation (TinyBERT, Jiao et al. 2020): each student layer's output, through one learned linear
projection ``W_h`` of the student's width onto the teacher's, matched by MSE to the output of the teacher layer the
trial's layer mapping pairs it with (``kdsearch.terms.layers``), over the real (unpadded) tokens, averaged over the
student's layers and weighted by ``hidden_weight``."""

from __future__ import annotations

import dataclasses

import torch

from kdsearch.terms.base import DistillationTerm, Needs, SearchParam, StudentOutputs, TeacherOutputs
from kdsearch.terms.layers import Projection, masked_mse


@dataclasses.dataclass(frozen=True)
class HiddenStatesConfig:
    hidden_weight: float = 0.0  # 0: off


class HiddenStates(DistillationTerm[HiddenStatesConfig]):
    name = "hidden"
    config_class = HiddenStatesConfig
    search = (SearchParam("hidden_weight", 0.0, lambda x: x >= 0, ">= 0", symbol="w_hidden"),)
    needs = Needs(student_hidden_states=True, teacher_hidden_states=True)
    intermediate = True

    def active(self, config: HiddenStatesConfig) -> bool:
        return float(config.hidden_weight) > 0

    def trainable(self, config: HiddenStatesConfig, student_width: int, teacher_width: int) -> torch.nn.Module:
        return Projection(student_width, teacher_width)

    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor,
             config: HiddenStatesConfig, regression: bool) -> torch.Tensor:
        assert student.hidden_states is not None and teacher.hidden_states is not None
        assert student.attention_mask is not None
        project = student.trainable[self.name]
        layers = student.hidden_states[1:]  # 0 is the embeddings' output: the embedding term's
        if len(teacher.hidden_states) != len(layers) + 1:
            raise ValueError(f"the hidden term needs the teacher's layers aligned to the student's {len(layers)} "
                             f"(got {len(teacher.hidden_states) - 1})")
        per_layer = [masked_mse(project(s), t, student.attention_mask)
                     for s, t in zip(layers, teacher.hidden_states[1:], strict=True)]
        return config.hidden_weight * torch.stack(per_layer).mean()

    def describe(self, config: HiddenStatesConfig, regression: bool) -> str:
        return (f"hidden-state distillation, `{config.hidden_weight:g} * mean over student layers of MSE(W_h h_s, "
                "h_t)` (TinyBERT: W_h a linear projection learned with the student and not exported, h_t the "
                "teacher layer the layer mapping pairs with the student layer, real tokens only)")

"""The seed's distillation trainer (tiny-bert-sst2-distilled), re-implemented faithfully on transformers.Trainer.

Module level because Trainer pickles its arguments into every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments


class DistillationTrainingArguments(TrainingArguments):
    def __init__(self, *args, alpha: float = 0.5, temperature: float = 2.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature


class DistillationTrainer(Trainer):
    """The teacher runs on every batch of every step, as in the seed."""

    def __init__(self, *args, teacher_model=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.model.device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        outputs_student = model(**inputs)
        student_loss = outputs_student.loss
        with torch.no_grad():
            outputs_teacher = self.teacher(**inputs)
        t = self.args.temperature
        loss_logits = nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(outputs_student.logits / t, dim=-1), F.softmax(outputs_teacher.logits / t, dim=-1)
        ) * (t**2)
        loss = self.args.alpha * student_loss + (1.0 - self.args.alpha) * loss_logits
        return (loss, outputs_student) if return_outputs else loss

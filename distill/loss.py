"""The seed's distillation objective, extended to rows without a gold label (teacher-labelled transfer rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_LABEL = -100  # a transfer-set row: the teacher's logits are its only target (cross_entropy's ignore_index)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """Per row ``alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    averaged over the batch; a row labelled ``NO_LABEL`` contributes ``T^2 * KL`` alone.

    On a batch of labelled rows this is exactly the seed's loss (its KL used ``reduction="batchmean"``); the T^2
    factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015).
    """
    labelled = labels != NO_LABEL
    ce = F.cross_entropy(student_logits, labels, ignore_index=NO_LABEL, reduction="none")  # 0 on unlabelled rows
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    kd_weight = torch.where(labelled, 1.0 - alpha, 1.0)
    return (alpha * ce + kd_weight * temperature**2 * kl).mean()

"""Logit distillation (Hinton et al., 2015): the student's outputs matched to the teacher's, mixed with the gold
labels. Softened KL for classification; MSE for a regression head, which has no temperature."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdsearch.terms.base import NO_LABEL, DistillationTerm, Needs, SearchParam, StudentOutputs, TeacherOutputs


@dataclasses.dataclass(frozen=True)
class LogitKDConfig:
    alpha: float = 0.5  # the gold labels' share; 1 - alpha is the teacher's
    temperature: float = 1.0  # classification only


class LogitKD(DistillationTerm[LogitKDConfig]):
    name = "logits"
    config_class = LogitKDConfig
    # Defaults are the seed search's (tiny-bert-sst2-distilled).
    search = (
        SearchParam("temperature", {"low": 2.0, "high": 30.0}, lambda x: x > 0, "> 0", classification_only=True,
                    symbol="T"),
        SearchParam("alpha", {"low": 0.0, "high": 1.0}, lambda x: 0 <= x <= 1, "within [0, 1]",
                    symbol="\N{GREEK SMALL LETTER ALPHA}"),
    )
    needs = Needs(teacher_logits=True)

    def loss(self, student: StudentOutputs, teacher: TeacherOutputs, labels: torch.Tensor, config: LogitKDConfig,
             regression: bool) -> torch.Tensor:
        logits = student.logits.float()  # fp32 whatever the forward pass's precision
        if regression:
            return regression_distillation_loss(logits, teacher.logits, labels, config.alpha)
        return distillation_loss(logits, teacher.logits, labels, config.alpha, config.temperature)

    def describe(self, config: LogitKDConfig, regression: bool) -> str:
        if regression:
            return (f"logit distillation, `alpha * MSE(student, labels) + (1 - alpha) * MSE(student, teacher)` with "
                    f"alpha {config.alpha:g} (a regression head: the teacher's score is the soft target, no "
                    "temperature)")
        return ("logit distillation, `alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || "
                f"softmax(student / T))` with alpha {config.alpha:g} and T {config.temperature:g}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float | torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Per row ``alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    averaged over the batch; a row labelled ``NO_LABEL`` contributes ``T^2 * KL`` alone. ``alpha`` and ``temperature``
    may be 0-d tensors (a stacked pack's members, each its own under ``torch.func.vmap``).

    On a batch of labelled rows this is exactly the seed's loss (its KL used ``reduction="batchmean"``); the T^2
    factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015).
    """
    labelled = labels != NO_LABEL
    ce = F.cross_entropy(student_logits, labels, ignore_index=NO_LABEL, reduction="none")  # 0 on unlabelled rows
    # KL(teacher || student) per row, written out as F.kl_div(log_target=True) computes it: kl_div has no vmap rule,
    # and a stacked pack (distill.stacked) computes this loss under vmap.
    student_log = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    kd_weight = torch.where(labelled, 1.0 - alpha, 1.0)
    return (alpha * ce + kd_weight * temperature**2 * kl).mean()


def regression_distillation_loss(student_outputs: torch.Tensor, teacher_outputs: torch.Tensor,
                                 targets: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Per row ``alpha * (student - gold)^2 + (1 - alpha) * (student - teacher)^2``, averaged over the batch; a row
    whose target is NaN (a transfer-set row) contributes ``(student - teacher)^2`` alone. Outputs are ``[N, 1]``
    or ``[N]``; there is no temperature: the teacher's output is already the soft target."""
    student = student_outputs.reshape(-1)
    teacher = teacher_outputs.reshape(-1)
    labelled = ~torch.isnan(targets)
    gold = torch.where(labelled, (student - torch.nan_to_num(targets)) ** 2, 0.0)
    kd = (student - teacher) ** 2
    kd_weight = torch.where(labelled, 1.0 - alpha, 1.0)
    return (alpha * gold + kd_weight * kd).mean()

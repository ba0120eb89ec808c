"""The distillation loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdsearch.terms import distillation_loss


def _softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


Logits = list[list[float]]


def hand_loss(student: Logits, teacher: Logits, labels: list[int], alpha: float, t: float) -> float:
    ce = kl = 0.0
    for s, te, y in zip(student, teacher, labels, strict=True):
        ce += -math.log(_softmax(s)[y])
        p = _softmax([v / t for v in te])
        q = _softmax([v / t for v in s])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    n = len(labels)
    return alpha * ce / n + (1 - alpha) * t * t * kl / n


@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.5, 4.0), (1.0, 2.0), (0.3, 30.0)])
def test_matches_hand_computation(alpha: float, temperature: float) -> None:
    student = [[1.0, -0.5], [0.2, 0.3], [-2.0, 1.5]]
    teacher = [[2.0, -1.0], [0.0, 1.0], [-1.0, 3.0]]
    labels = [0, 1, 1]
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha, temperature)
    assert got.item() == pytest.approx(hand_loss(student, teacher, labels, alpha, temperature), rel=1e-5)


def test_known_value() -> None:
    # student uniform, teacher [log 3, 0] at T=1 → p = (0.75, 0.25); KL = 0.75 ln 1.5 + 0.25 ln 0.5; CE = ln 2
    got = distillation_loss(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]), 0.5, 1.0)
    expected = 0.5 * math.log(2) + 0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_identical_logits_leave_only_cross_entropy() -> None:
    logits = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    labels = torch.tensor([1, 0])
    got = distillation_loss(logits, logits, labels, 0.25, 5.0)
    assert got.item() == pytest.approx(0.25 * torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def hand_mixed_loss(student: Logits, teacher: Logits, labels: list[int], alpha: float, t: float) -> float:
    """Labelled rows: the seed's loss; rows labelled -100 (teacher-labelled transfer rows): T^2 * KL alone."""
    total = 0.0
    for s, te, y in zip(student, teacher, labels, strict=True):
        p = _softmax([v / t for v in te])
        q = _softmax([v / t for v in s])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        total += t * t * kl if y == -100 else alpha * -math.log(_softmax(s)[y]) + (1 - alpha) * t * t * kl
    return total / len(labels)


@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.5, 4.0), (1.0, 2.0), (0.9, 10.0)])
def test_unlabelled_rows_get_the_kd_term_alone(alpha: float, temperature: float) -> None:
    student = [[1.0, -0.5], [0.2, 0.3], [-2.0, 1.5], [0.7, 0.1]]
    teacher = [[2.0, -1.0], [0.0, 1.0], [-1.0, 3.0], [-0.4, 0.9]]
    labels = [0, -100, 1, -100]
    got = distillation_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                            torch.tensor(labels), alpha, temperature)
    assert got.item() == pytest.approx(hand_mixed_loss(student, teacher, labels, alpha, temperature), rel=1e-9)


def test_alpha_one_still_distils_unlabelled_rows() -> None:
    # With alpha = 1 a labelled row ignores the teacher, but a transfer row has nothing else to learn from.
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, -3.0]])
    assert distillation_loss(student, teacher, torch.tensor([1]), 1.0, 1.0).item() == pytest.approx(math.log(2))
    unlabelled = distillation_loss(student, teacher, torch.tensor([-100]), 1.0, 1.0)
    assert unlabelled.item() > 0.5

"""Self-attention relations (MiniLM, Wang et al. 2020; MiniLMv2, Wang et al. 2021): width-free targets for
distilling a transformer's internals into a narrower one.

A layer's queries, keys or values ``x`` ([B, T, D]) are split into ``heads`` relation heads of D / heads dims each,
and each head's token-to-token relation is ``softmax(x_h x_h^T / sqrt(D / heads))`` over the unpadded tokens: a
[B, heads, T, T] distribution per query token, whatever D is. A teacher 384 wide and a student 128 wide have
relations of the same shape when they use the same number of relation heads, so no projection is learned. The
loss is the KL divergence from the teacher's relations to the student's, averaged over the real (unpadded) query
tokens and the heads.

Vmap-safe: no Python branching on tensor values, no ``F.kl_div``.
"""

from __future__ import annotations

import math

import torch


def relation_log_probs(x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """Log relation distributions [B, heads, T, T] of ``x`` [B, T, D]; ``mask`` [B, T] is 1 on real tokens. Padded
    keys get no probability; a padded query row is a real distribution too (it is masked out of the loss)."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"a relation needs the width ({width}) to be a multiple of the relation heads ({heads})")
    head_dim = width // heads
    split = x.float().reshape(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    scores = split @ split.transpose(-1, -2) / math.sqrt(head_dim)  # the costly line: [B, H, T, T]
    keys = mask[:, None, None, :].bool()
    scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def relation_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per query row, averaged over the real query tokens and the heads (a 0-d tensor).
    Padded keys carry no teacher probability, so they add nothing."""
    keys = mask[:, None, None, :].to(teacher_log.dtype)
    row_kl = (teacher_log.exp() * (teacher_log - student_log) * keys).sum(-1)  # [B, H, T]
    queries = mask[:, None, :].to(row_kl.dtype)
    return (row_kl * queries).sum() / (queries.sum() * row_kl.shape[1]).clamp_min(1.0)


def relation_loss(teacher_x: torch.Tensor, student_x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """KL from the teacher's self-relations of ``teacher_x`` to the student's of ``student_x`` (both [B, T, *])."""
    return relation_kl(relation_log_probs(teacher_x, heads, mask), relation_log_probs(student_x, heads, mask), mask)

"""Similarity-space distillation of (SS)2D and SSD (Omama, Li, Chinchali, ICLR 2025) as plain torch blocks.

For a batch, every row of the teacher's cosine-similarity matrix, divided by a temperature ``tau``, is turned
into a distribution over the other examples by a softmax; the student's row for the same example, computed on
its first ``m`` dimensions, is pushed towards it:

    loss_m = mean_i KL( softmax(T_i / tau) || softmax(S^m_i / tau) ),   loss = sum_m w_m * loss_m

The similarity of an example with itself is 1 for every model and carries no information; by default
(``diagonal="mask"``) it is left out of both distributions, ``"keep"`` keeps it (the paper does not say).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

DiagonalHandling = Literal["mask", "keep"]


def similarity_log_distribution(
    embeddings: torch.Tensor, temperature: float, diagonal: DiagonalHandling
) -> torch.Tensor:
    """Row-wise ``log_softmax(cos_sim / temperature)`` of a batch ``[n, d]``; a masked diagonal gets ``-inf``."""
    if diagonal not in ("mask", "keep"):
        raise ValueError(f"diagonal must be 'mask' or 'keep', got {diagonal!r}")
    unit = F.normalize(embeddings, dim=-1)
    logits = unit @ unit.T / temperature
    if diagonal == "mask":
        logits = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool, device=logits.device), float("-inf"))
    return logits.log_softmax(dim=-1)


def similarity_distillation_loss(
    teacher: torch.Tensor, student: torch.Tensor, temperature: float = 0.05, diagonal: DiagonalHandling = "mask"
) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher row / tau) || softmax(student row / tau))``."""
    return multi_size_distillation_losses(teacher, {0: student}, temperature, diagonal)[0]


def multi_size_distillation_losses(
    teacher: torch.Tensor,
    students: Mapping[int, torch.Tensor],
    temperature: float = 0.05,
    diagonal: DiagonalHandling = "mask",
) -> dict[int, torch.Tensor]:
    """``{m: loss_m}`` for the student embedding of each size ``m`` (the teacher's distribution computed once)."""
    if len(teacher) < 2 + (diagonal == "mask"):
        raise ValueError("similarity distillation needs a batch of at least 3 examples")
    log_p = similarity_log_distribution(teacher.detach(), temperature, diagonal)
    p = log_p.exp()
    losses = {}
    for size, student in students.items():
        if len(student) != len(teacher):
            raise ValueError(f"teacher and student batches differ in size: {len(teacher)} vs {len(student)}")
        log_q = similarity_log_distribution(student, temperature, diagonal)
        # 0 * log 0 := 0, including the masked diagonal (-inf - -inf would be NaN).
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        losses[size] = terms.sum(dim=-1).mean()
    return losses

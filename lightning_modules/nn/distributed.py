"""Collectives that keep batch statistics identical with 1 or N processes."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows`` of every process in rank order, keeping the autograd graph.

    A loss on batch statistics (covariance, variance, mean, similarity matrices) computed on the gathered
    rows is the loss of the global batch. Every process computes the same value; the backward of the
    gather sums the gradients of all processes' copies, and DDP then averages over processes, so the
    parameter gradient equals the single-process gradient of the global batch. Processes must hold
    equally many rows (the training sampler guarantees it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    return torch.cat(torch.distributed.nn.functional.all_gather(rows), dim=0)

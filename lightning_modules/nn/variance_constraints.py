"""The strong variance constraints of AE-SVC (Omama, Li, Chinchali, ICLR 2025) as plain loss terms.

On a batch of latents ``z`` ``[n, k]`` with mean ``mu`` and (population) covariance ``C``:

* covariance: ``||C - I||_F^2`` (``"full"``), or only the off-diagonal part ``sum_{i != j} C_ij^2``
  (``"off_diagonal"``); pushes the dimensions to be decorrelated;
* variance: ``mean_j (C_jj - 1)^2``; every dimension has unit variance;
* mean: ``mean_j mu_j^2``; the latent is centred.

The paper gives the three constraints but not their exact form; these follow the public reproduction the
default weights come from (see ``AESVC``), and the covariance form is a configuration option.
"""

from __future__ import annotations

from typing import Literal

import torch

CovarianceTarget = Literal["full", "off_diagonal"]


def variance_constraint_losses(z: torch.Tensor, covariance_target: CovarianceTarget = "full") -> dict[str, torch.Tensor]:
    """The three constraint terms of a batch of latents ``z`` ``[n, k]``."""
    if z.shape[0] < 2:
        raise ValueError("the variance constraints need a batch of at least 2 examples")
    mu = z.mean(dim=0)
    centred = z - mu
    cov = centred.T @ centred / z.shape[0]
    diagonal = torch.diagonal(cov)
    if covariance_target == "full":
        covariance = ((cov - torch.eye(cov.shape[0], device=z.device, dtype=z.dtype)) ** 2).sum()
    elif covariance_target == "off_diagonal":
        covariance = (cov**2).sum() - (diagonal**2).sum()
    else:
        raise ValueError(f"covariance_target must be 'full' or 'off_diagonal', got {covariance_target!r}")
    return {
        "covariance": covariance,
        "variance": ((diagonal - 1) ** 2).mean(),
        "mean": (mu**2).mean(),
    }

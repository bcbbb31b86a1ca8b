"""The strong variance constraints of AE-SVC (Omama, Li, Chinchali, ICLR 2025) as plain loss terms.

On a batch of latents ``z`` ``[n, k]`` with mean ``mu`` and (population) covariance ``C``:

* covariance: ``||C - I||_F^2`` (``"full"``), or only the off-diagonal part ``sum_{i != j} C_ij^2``
  (``"off_diagonal"``); pushes the dimensions to be decorrelated;
* variance: ``mean_j (C_jj - 1)^2``; every dimension has unit variance;
* mean: ``mean_j mu_j^2``; the latent is centred.

The paper gives the three constraints but not their exact form; these follow the public reproduction the
default weights come from (see ``AESVC``), and the covariance form is a configuration option.

The covariance term of a *batch* is not zero even for a perfect encoder: the batch covariance of ``n``
latents drawn with covariance ``I`` misses ``I`` by ``E||C_batch - I||_F^2 ~ k(k+1)/n`` (Gaussian latents;
:func:`covariance_noise_floor`). With ``reduction="sum"`` it is a sum over ``k^2`` entries while the other
terms are means, so for ``k = 64`` and ``n = 500`` this floor alone (8.3) outweighs everything else in the
objective; ``reduction="mean"`` averages the entries instead, and ``estimator="split_halves"`` removes the floor
(see ``AESVC`` for what each did in training).
"""

from __future__ import annotations

from typing import Literal

import torch

CovarianceTarget = Literal["full", "off_diagonal"]
CovarianceReduction = Literal["sum", "mean"]
ConstraintEstimator = Literal["batch", "split_halves"]


def variance_constraint_losses(
    z: torch.Tensor,
    covariance_target: CovarianceTarget = "full",
    reduction: CovarianceReduction = "sum",
    estimator: ConstraintEstimator = "batch",
) -> dict[str, torch.Tensor]:
    """The three constraint terms of a batch of latents ``z`` ``[n, k]``.

    ``reduction`` of the covariance term: ``"sum"`` over its ``k^2`` entries, or their ``"mean"``.
    ``estimator``: ``"batch"`` squares the errors of the batch's statistics (the reproduction's form; its
    expectation is the population term plus a noise floor, see :func:`covariance_noise_floor`); ``"split_halves"``
    multiplies the errors of the two halves of the batch, ``(C_A - I) . (C_B - I)``, ``mu_A . mu_B``, with
    unbiased covariances: independent halves make it an unbiased estimate of the population term and of its
    gradient, with no floor (so a batch value may be slightly negative).
    """
    if covariance_target not in ("full", "off_diagonal"):
        raise ValueError(f"covariance_target must be 'full' or 'off_diagonal', got {covariance_target!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"covariance reduction must be 'sum' or 'mean', got {reduction!r}")
    if estimator == "batch":
        if z.shape[0] < 2:
            raise ValueError("the variance constraints need a batch of at least 2 examples")
        errors = _errors(z, correction=0, covariance_target=covariance_target)
        terms = [(error * error) for error in errors]
    elif estimator == "split_halves":
        if z.shape[0] < 4:
            raise ValueError("the split-halves variance constraints need a batch of at least 4 examples")
        half = z.shape[0] // 2
        first = _errors(z[:half], correction=1, covariance_target=covariance_target)
        second = _errors(z[half:], correction=1, covariance_target=covariance_target)
        terms = [a * b for a, b in zip(first, second)]
    else:
        raise ValueError(f"constraint estimator must be 'batch' or 'split_halves', got {estimator!r}")
    covariance, variance, mean = terms
    covariance = covariance.sum()
    if reduction == "mean":
        covariance = covariance / z.shape[1] ** 2
    return {"covariance": covariance, "variance": variance.mean(), "mean": mean.mean()}


def _errors(z: torch.Tensor, correction: int, covariance_target: CovarianceTarget):
    """How far the rows' covariance (the part the target constrains), variances and mean are from I, 1, 0."""
    mu = z.mean(dim=0)
    centred = z - mu
    cov = centred.T @ centred / (z.shape[0] - correction)
    diagonal = torch.diagonal(cov)
    eye = torch.eye(cov.shape[0], device=z.device, dtype=z.dtype)
    covariance_error = cov - eye if covariance_target == "full" else cov * (1 - eye)
    return covariance_error, diagonal - 1, mu


def covariance_noise_floor(
    batch_size: int,
    latent_dim: int,
    covariance_target: CovarianceTarget = "full",
    reduction: CovarianceReduction = "sum",
    estimator: ConstraintEstimator = "batch",
) -> float:
    """Expected covariance term of a batch of ``batch_size`` Gaussian latents whose true covariance is ``I``.

    Each of the ``k(k-1)`` off-diagonal entries of the batch covariance has variance ``1/n``, each of the ``k``
    diagonal ones ``2/n``: ``k(k+1)/n`` for ``"full"``, ``k(k-1)/n`` for ``"off_diagonal"`` (divided by ``k^2``
    for ``reduction="mean"``). An encoder cannot lower it except by shaping the latent's distribution, which
    is why a training batch must be much larger than the latent (and is refused when smaller). The
    ``"split_halves"`` estimator has no floor (0).
    """
    if estimator == "split_halves":
        return 0.0
    n, k = batch_size, latent_dim
    floor = k * (k + 1) / n if covariance_target == "full" else k * (k - 1) / n
    return floor / (k * k) if reduction == "mean" else floor

"""Linear baselines in closed form: the raw embeddings, PCA and PCA-whitening.

PCA-whitening is the honest linear rival of AE-SVC: on its fit set the whitened projection is exactly
centred, decorrelated and of unit variance, i.e. it satisfies all three AE-SVC constraints by construction.
All three go through the same evaluation as every other method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_modules.base import ClosedFormModule, nested_views
from lightning_modules.nn.multi_size import check_sizes
from retrieval.diagnostics import RunningMoments


class RawEmbedding(ClosedFormModule):
    """The input embeddings as they are (L2-normalised for cosine similarity); nothing to fit."""

    method_name = "raw"

    def __init__(self):
        super().__init__()
        self._dim: int | None = None

    def observe(self, batch) -> None:
        self._dim = batch["embedding"].shape[-1]

    def solve(self, all_reduce_sum=None) -> None:
        pass

    @property
    def retrieval_dim(self) -> int | None:
        return self._dim

    def embed(self, batch) -> torch.Tensor:
        self._dim = batch["embedding"].shape[-1]
        return F.normalize(batch["embedding"], dim=-1)


class PCAProjection(ClosedFormModule):
    """Projection on the top ``dim`` principal components of the training embeddings.

    Args:
        dim: number of components kept (the retrieval embedding size); ``None`` only inside a
            ``BaselineComparison``, which sets it to the compared method's size.
        whiten: divide each component by its standard deviation (PCA-whitening).
        eps: added to the eigenvalues before whitening, for numerically zero-variance directions.
        sizes: evaluate the projection truncated to each of these sizes (the PCA prefix baseline of (SS)2D:
            components are sorted by variance, so a prefix is the PCA of that size); ``dim`` defaults to the
            largest.

    The mean and covariance are accumulated in float64 over the whole training set (summed over processes)
    and decomposed once; the fitted mean and projection are buffers, saved in checkpoints.
    """

    def __init__(
        self, dim: int | None = None, whiten: bool = False, eps: float = 1e-8, sizes: Sequence[int] | None = None
    ):
        super().__init__()
        if sizes is not None:
            sizes = check_sizes(sizes, dim, "sizes")
            dim = sizes[-1] if dim is None else dim
        self.save_hyperparameters()
        # Sized when fitted (or when a checkpoint is loaded).
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("projection", torch.zeros(0, 0))
        self.register_buffer("eigenvalues", torch.zeros(0))
        self._moments: RunningMoments | None = None

    @property
    def method_name(self) -> str:
        return "PCA-whitening" if self.hparams.whiten else "PCA"

    @property
    def retrieval_dim(self) -> int:
        return self.hparams.dim

    def size_views(self) -> dict[int, slice] | None:
        sizes = self.hparams.get("sizes")
        return nested_views(sizes) if sizes else None

    def reset_statistics(self) -> None:
        self._moments = None

    def observe(self, batch) -> None:
        x = batch["embedding"]
        if self._moments is None:
            self._moments = RunningMoments(x.shape[-1])
        self._moments.update(x)

    def solve(self, all_reduce_sum=None) -> None:
        if self._moments is None:
            raise RuntimeError("PCAProjection.solve() called before any training batch was observed")
        if all_reduce_sum is not None:
            self._moments.load_tensors([all_reduce_sum(t) for t in self._moments.tensors()])
        input_dim, dim = self._moments.dim, self.hparams.dim
        if dim is None:
            raise ValueError("PCAProjection: set dim, the number of components to keep")
        if dim > input_dim:
            raise ValueError(f"PCAProjection: dim={dim} exceeds the input embedding size {input_dim}")
        mean, components, eigenvalues = self._moments.principal_components(dim, self.hparams.whiten, self.hparams.eps)
        self.mean = mean.float().to(self.device)
        self.projection = components.float().to(self.device)
        self.eigenvalues = eigenvalues.float().to(self.device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The projected (not normalised) embedding."""
        if self.mean.numel() == 0:
            raise RuntimeError("PCAProjection is not fitted: run fit (one epoch) or load a fitted checkpoint")
        return (x - self.mean.to(x.dtype)) @ self.projection.to(x.dtype)

    def embed(self, batch) -> torch.Tensor:
        return F.normalize(self.project(batch["embedding"]), dim=-1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # The buffers' shapes depend on the fitted input size: size them before the state dict is loaded.
        state = checkpoint["state_dict"]
        for name in ("mean", "projection", "eigenvalues"):
            setattr(self, name, torch.zeros_like(state[name]))

"""Generic blocks of methods with embeddings of several sizes: the sizes, and networks with an output per size.

A nested network's first ``m`` output dimensions are its embedding of size ``m`` ((SS)2D, Matryoshka AE-SVC);
separate networks give one embedding per size side by side (SSD and the per-size baselines). The evaluation
scores every size from one output through ``RetrievalModule.size_views``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.nn.mlp import mlp

#: The sizes of the (SS)2D paper.
DEFAULT_SIZES = (8, 16, 32, 64, 128, 256)


def check_sizes(sizes: Sequence[int], largest_allowed: int | None = None, what: str = "sizes") -> list[int]:
    """``sizes`` as a list of strictly increasing positive integers, or a ``ValueError`` saying why not."""
    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes) or sorted(set(sizes)) != sizes:
        raise ValueError(f"{what} must be strictly increasing positive integers, got {sizes}")
    if largest_allowed is not None and sizes[-1] > largest_allowed:
        raise ValueError(f"{what}: the largest size {sizes[-1]} exceeds the {largest_allowed} available dimensions")
    return sizes


class NestedEmbedding(nn.Module):
    """One network whose output's first ``m`` dimensions are the embedding of size ``m``, for every ``m``.

    ``hidden_dims=()`` is a linear map; otherwise an MLP with ReLU (no activation on the output).
    """

    def __init__(self, input_dim: int, sizes: Sequence[int], hidden_dims: Sequence[int] = ()):
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.network = mlp(input_dim, hidden_dims, self.sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def by_size(self, output: torch.Tensor) -> dict[int, torch.Tensor]:
        """The embedding of every size, as prefixes of one output (views, no other forward)."""
        return {size: output[..., :size] for size in self.sizes}


class SeparateEmbeddings(nn.Module):
    """One independent network per size (SSD, and the per-size baselines); the output concatenates them."""

    def __init__(self, input_dim: int, sizes: Sequence[int], hidden_dims: Sequence[int] = ()):
        super().__init__()
        self.sizes = check_sizes(sizes)
        self.networks = nn.ModuleList(mlp(input_dim, hidden_dims, size) for size in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([network(x) for network in self.networks], dim=-1)

    def by_size(self, output: torch.Tensor) -> dict[int, torch.Tensor]:
        return dict(zip(self.sizes, output.split(self.sizes, dim=-1)))


def sizes_below(sizes: Sequence[int], limit: int, what: str = "sizes") -> tuple[list[int], list[int]]:
    """``(kept, dropped)``: the sizes smaller than ``limit`` and those at or above it (a size equal to a latent
    of ``limit`` dimensions is that latent itself, already evaluated)."""
    sizes = check_sizes(sizes, what=what)
    return [s for s in sizes if s < limit], [s for s in sizes if s >= limit]

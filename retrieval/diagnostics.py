"""Distribution diagnostics of embeddings: how far they are from zero mean, unit variance and decorrelation.

The AE-SVC paper argues that cosine similarity discriminates best when the embedding dimensions are
centred, decorrelated and of equal variance: the variance of the cosine similarity of random pairs is then at
its minimum, ``1/dim``. These statistics are streamed (float64 sums), so they cover a whole epoch or dataset
in bounded memory and can be summed across processes.
"""

from __future__ import annotations

import torch


class RunningMoments:
    """Streaming count, sum and sum of outer products of row vectors (float64)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.reset()

    def reset(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        # Accumulated on the rows' device, so a GPU run does not synchronise with the host every step.
        rows = rows.detach().to(torch.float64)
        if self.sum.device != rows.device:
            self.count, self.sum, self.outer = (t.to(rows.device) for t in self.tensors())
        self.count += rows.shape[0]
        self.sum += rows.sum(dim=0)
        self.outer += rows.T @ rows

    def tensors(self) -> list[torch.Tensor]:
        """The sums, in a fixed order, e.g. for summing across processes."""
        return [self.count, self.sum, self.outer]

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        self.count, self.sum, self.outer = (t.detach().to(torch.float64) for t in tensors)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """Population covariance (divides by the count)."""
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    def principal_components(
        self, dim: int, whiten: bool = False, eps: float = 1e-8
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PCA of the rows: ``(mean [D], components [D, dim], eigenvalues [dim])``, float64, components sorted by
        decreasing variance, so ``(x - mean) @ components`` projects. ``whiten`` divides each component by its
        standard deviation (``sqrt(eigenvalue + eps)``), so the projected rows have unit variance."""
        if dim > self.dim:
            raise ValueError(f"cannot keep {dim} principal components of {self.dim}-d rows")
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance)
        order = torch.argsort(eigenvalues, descending=True)[:dim]
        eigenvalues, components = eigenvalues[order].clamp_min(0), eigenvectors[:, order]
        if whiten:
            components = components / torch.sqrt(eigenvalues + eps)
        return self.mean, components, eigenvalues


def constraint_errors(moments: RunningMoments) -> dict[str, float]:
    """How far the rows are from the AE-SVC constraints.

    * ``cov_offdiag_rms``: root mean square of the off-diagonal covariance entries (decorrelation).
    * ``var_rms_error``: root mean square of ``variance_j - 1`` (unit variance per dimension).
    * ``mean_norm``: Euclidean norm of the mean (mean centring).
    """
    cov = moments.covariance
    dim = cov.shape[0]
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return {
        "cov_offdiag_rms": float(torch.sqrt((off_diagonal**2).sum() / max(dim * (dim - 1), 1))),
        "var_rms_error": float(torch.sqrt(((torch.diagonal(cov) - 1) ** 2).mean())),
        "mean_norm": float(moments.mean.norm()),
    }


def cosine_similarities_of_pairs(rows: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of disjoint pairs ``(rows[i], rows[i + n//2])``; rows are assumed in random order."""
    half = rows.shape[0] // 2
    a = torch.nn.functional.normalize(rows[:half].double(), dim=1)
    b = torch.nn.functional.normalize(rows[half : 2 * half].double(), dim=1)
    return (a * b).sum(dim=1)


def cosine_similarity_variance(embeddings, num_pairs: int = 100_000, seed: int = 0) -> float:
    """Variance of the cosine similarity of ``num_pairs`` random pairs of distinct rows (ideal: ``1/dim``)."""
    embeddings = torch.as_tensor(embeddings)
    generator = torch.Generator().manual_seed(seed)
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("need at least two embeddings to form a pair")
    first = torch.randint(n, (num_pairs,), generator=generator)
    # Offset in [1, n) so the two rows of a pair always differ.
    second = (first + torch.randint(1, n, (num_pairs,), generator=generator)) % n
    pairs = torch.cat([embeddings[first], embeddings[second]])
    return float(cosine_similarities_of_pairs(pairs).var(unbiased=True))

"""Visual-word codebook: k-means centroids of local descriptors, trained with faiss, and the assignment of
descriptors to their nearest words.

Detect-to-Retrieve (Teichmann et al., CVPR 2019) and the ``asmk`` package (Jenicek & Tolias) quantise local
descriptors with a flat k-means codebook of 65,536 words (:data:`D2R_CODEBOOK_SIZE`), fitted on the descriptors
of another dataset than the one searched (Revisited Oxford's codebook on Paris and vice versa). Database
descriptors go to their nearest word (single assignment); the ``asmk`` package sends each *query* descriptor to
its 5 nearest words (:data:`ASMK_QUERY_ASSIGNMENTS`), the D2R release to 1.

A codebook is its centroids, ``float32 [size, dim]``: that array is all a file keeps (``.npy``), and
``Codebook(centroids)`` rebuilds the same codebook from it.
"""

from __future__ import annotations

import os

import numpy as np

from retrieval.files import replace_atomically
from retrieval.validation import as_float32_matrix

#: Codebook size of Detect-to-Retrieve and of the ``asmk`` package's published runs.
D2R_CODEBOOK_SIZE = 65_536
#: Nearest words per query descriptor in the ``asmk`` package (database descriptors: 1).
ASMK_QUERY_ASSIGNMENTS = 5
#: k-means iterations of the ``asmk`` package (faiss ``Clustering`` with ``niter = 10``).
ASMK_KMEANS_ITERATIONS = 10


class Codebook:
    """Visual words: ``centroids`` ``float32 [size, dim]``, searched exactly (faiss flat L2 index)."""

    def __init__(self, centroids):
        centroids = as_float32_matrix(centroids, "codebook centroids")
        if centroids.shape[0] < 1 or centroids.shape[1] < 1:
            raise ValueError(f"codebook centroids must be a non-empty [size, dim] array, got shape {centroids.shape}")
        self.centroids = centroids
        self._index = None  # built on first assignment

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @classmethod
    def train(cls, descriptors, size: int, iterations: int = ASMK_KMEANS_ITERATIONS, seed: int = 0) -> Codebook:
        """k-means (faiss, L2) of ``descriptors [N, dim]`` into ``size`` words.

        faiss samples at most 256 descriptors per centroid (16.8M for 65,536 words) and reports nothing for
        fewer than 39 per centroid: a small training set gives a weaker codebook, not an error. ``seed`` fixes
        the initial centroids and that sample, so the same call gives the same codebook.
        """
        import faiss

        descriptors = as_float32_matrix(descriptors, "codebook training descriptors")
        if size < 1:
            raise ValueError(f"codebook size must be at least 1, got {size}")
        if iterations < 1:
            raise ValueError(f"k-means iterations must be at least 1, got {iterations}")
        if len(descriptors) < size:
            raise ValueError(
                f"codebook training needs at least one descriptor per word: {len(descriptors)} descriptors "
                f"[N, dim] given for {size} words"
            )
        kmeans = faiss.Kmeans(
            descriptors.shape[1], size, niter=iterations, seed=seed, verbose=False, min_points_per_centroid=1
        )
        kmeans.train(descriptors)
        return cls(kmeans.centroids)

    def assign(self, descriptors, assignments: int = 1) -> np.ndarray:
        """``int64 [N, assignments]``: the ``assignments`` nearest words (L2) of every descriptor, nearest
        first. 1 for database images, :data:`ASMK_QUERY_ASSIGNMENTS` for queries as in the ``asmk`` package."""
        import faiss

        descriptors = as_float32_matrix(descriptors, "descriptors to assign")
        if descriptors.shape[1] != self.dim:
            raise ValueError(
                f"descriptors to assign must be [N, {self.dim}] (the codebook's dimension), "
                f"got shape {descriptors.shape}"
            )
        if not 1 <= assignments <= self.size:
            raise ValueError(f"assignments must be between 1 and the codebook size {self.size}, got {assignments}")
        if len(descriptors) == 0:
            return np.empty((0, assignments), dtype=np.int64)
        if self._index is None:
            self._index = faiss.IndexFlatL2(self.dim)
            self._index.add(self.centroids)
        _, words = self._index.search(descriptors, assignments)
        return words.astype(np.int64, copy=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the centroids as a ``.npy`` file, through a temporary file renamed when complete."""
        with replace_atomically(path) as temporary, open(temporary, "wb") as handle:
            # A file handle, not a name: np.save would append ".npy" to the temporary name.
            np.save(handle, self.centroids, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Codebook:
        """Read a codebook written by :meth:`save` (any ``.npy`` file of ``[size, dim]`` float centroids)."""
        try:
            centroids = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(
                f"{path} is not a codebook: expected a .npy file of float [size, dim] centroids"
            ) from error
        if not isinstance(centroids, np.ndarray):  # an .npz archive
            centroids.close()
            raise ValueError(f"{path} is an .npz archive; expected a .npy file of float [size, dim] centroids")
        if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
            raise ValueError(
                f"{path} holds a {centroids.dtype} array of shape {centroids.shape}; "
                "expected float [size, dim] centroids"
            )
        return cls(centroids)

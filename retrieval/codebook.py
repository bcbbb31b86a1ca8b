"""Visual-word codebook: k-means centroids of local descriptors, trained with faiss, and the assignment of
descriptors to their nearest words.

Detect-to-Retrieve (Teichmann et al., CVPR 2019) and the ``asmk`` package (Jenicek & Tolias) quantise local
descriptors with a flat k-means codebook of 65,536 words (:data:`D2R_CODEBOOK_SIZE`), fitted on the descriptors
of another dataset than the one searched (Revisited Oxford's codebook on Paris and vice versa). Database
descriptors go to their nearest word (single assignment); the ``asmk`` package sends each *query* descriptor to
its 5 nearest words (:data:`ASMK_QUERY_ASSIGNMENTS`), the D2R release to 1.

A codebook is its centroids, ``float32 [size, dim]``: that array is all a file keeps (``.npy``), and
``Codebook(centroids)`` rebuilds the same codebook from it.

From the command line, a codebook of the local descriptors of feature stores (every non-padding row's descriptor
columns, as stored):

    python -m retrieval.codebook --stores A.h5 [B.h5 ...] --size K --output codebook.npy
        [--max-descriptors N] [--seed S] [--iterations I]

At most ``N`` descriptors (default ``256 K``, the most faiss uses per word) are drawn uniformly from all those of
the stores, the same ones for the same seed and stores; the file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from retrieval.files import replace_atomically
from retrieval.validation import as_float32_matrix

#: Codebook size of Detect-to-Retrieve and of the ``asmk`` package's published runs.
D2R_CODEBOOK_SIZE = 65_536
#: Nearest words per query descriptor in the ``asmk`` package (database descriptors: 1).
ASMK_QUERY_ASSIGNMENTS = 5
#: k-means iterations of the ``asmk`` package (faiss ``Clustering`` with ``niter = 10``).
ASMK_KMEANS_ITERATIONS = 10
#: faiss k-means uses at most this many training descriptors per word (it samples the rest away).
MAX_POINTS_PER_WORD = 256
# Images read from a store at a time when sampling descriptors.
_READ_ROWS = 1024


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


# Training from feature stores (the command line)


def sample_store_descriptors(stores: Sequence[str | os.PathLike], max_descriptors: int, seed: int = 0) -> np.ndarray:
    """``float32 [n, d]``: at most ``max_descriptors`` local descriptors drawn uniformly without replacement from
    the non-padding rows of all ``stores`` (every one if there are fewer), in store and row order.

    One pass over the stores (:meth:`~retrieval.feature_store.FeatureStore.local_sets`): every descriptor gets a
    seeded uniform key and the ``max_descriptors`` smallest keys are kept, so memory stays at the sample's size.
    """
    from retrieval.feature_store import LOCAL_COLUMNS, FeatureStore

    if max_descriptors < 1:
        raise ValueError(f"max_descriptors must be at least 1, got {max_descriptors}")
    if not stores:
        raise ValueError("give at least one feature store with local descriptors")
    opened = [FeatureStore(path) for path in stores]
    sets = [store.local_sets(block=_READ_ROWS) for store in opened]
    dims = {store.local_shape[1] - len(LOCAL_COLUMNS) for store in opened if store.has_local}
    if len(dims) > 1:
        raise ValueError(f"the stores' local descriptors differ in dimension ({sorted(dims)}); give stores of one kind")
    generator = np.random.default_rng(seed)
    kept, kept_keys, count = [np.empty((0, dims.pop() if dims else 0), dtype=np.float32)], [np.empty(0)], 0
    for store_sets in sets:
        for descriptors in store_sets:  # the first next() refuses a store without (float) locals
            kept.append(descriptors)
            kept_keys.append(generator.random(len(descriptors)))
            count += len(descriptors)
            if count > 2 * max_descriptors:  # prune now and then: linear time, at most twice the sample in memory
                kept, kept_keys = _smallest_keys(kept, kept_keys, max_descriptors)
                count = max_descriptors
    return _smallest_keys(kept, kept_keys, max_descriptors)[0][0]


def _smallest_keys(blocks: list[np.ndarray], keys: list[np.ndarray], count: int):
    """The rows of the ``blocks`` with the ``count`` smallest keys, in their order, as one block."""
    rows, values = np.concatenate(blocks), np.concatenate(keys)
    if len(rows) > count:
        smallest = np.sort(np.argpartition(values, count - 1)[:count])
        rows, values = rows[smallest], values[smallest]
    return [rows], [values]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.codebook",
        description="Train a visual-word codebook (faiss k-means) on the local descriptors of feature stores "
        "and save its centroids as a .npy file.",
    )
    parser.add_argument("--stores", nargs="+", required=True, help="feature stores (.h5) with local descriptors")
    parser.add_argument("--size", type=int, required=True, help="number of visual words K (D2R: 65536)")
    parser.add_argument("--output", required=True, help="the codebook file to write (.npy)")
    parser.add_argument(
        "--max-descriptors",
        type=int,
        default=None,
        help=f"train on at most this many descriptors, drawn uniformly (default {MAX_POINTS_PER_WORD} x size)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of k-means (default 0)")
    parser.add_argument(
        "--iterations", type=int, default=ASMK_KMEANS_ITERATIONS, help="k-means iterations (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be at least 1, got {args.size}")
    maximum = args.max_descriptors if args.max_descriptors is not None else MAX_POINTS_PER_WORD * args.size
    try:
        start = time.perf_counter()
        descriptors = sample_store_descriptors(args.stores, maximum, args.seed)
        print(
            f"training {args.size} words on {len(descriptors)} local descriptors of {descriptors.shape[1]} dimensions"
        )
        codebook = Codebook.train(descriptors, args.size, iterations=args.iterations, seed=args.seed)
        codebook.save(args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.output} ({codebook.size} x {codebook.dim}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Approximate nearest-neighbour search by inner product: a faiss IVF-PQ index, and its recall against exact search.

For databases where exact search (:mod:`retrieval.search`) is too slow or too large to hold: Revisited
Oxford/Paris + 1M distractors, the 761k index images of Google Landmarks v2. The index (Jegou et al., PAMI 2011):

* **IVF**: k-means with ``nlist`` centroids cuts the database into lists; a query visits the ``nprobe`` lists
  whose centroids score highest, so it scores about ``nprobe / nlist`` of the database.
* **PQ**: each item is stored as its list and ``m`` codes of ``nbits`` bits for its residual to the list's
  centroid (``m`` sub-spaces of ``dim / m`` dimensions), ``m * nbits / 8`` bytes instead of ``4 * dim``.
  Scores are inner products with the reconstruction, so the order differs from exact search.
* **OPQ** (optional): a learned rotation applied first, so the sub-spaces share the variance evenly.

The index is trained on a random sample of the database (``training_size`` rows) and filled in chunks of
``ADD_CHUNK_ROWS`` rows, so a memory-mapped database of millions of rows (e.g. :class:`FeatureStore` globals)
is never held in memory as float32 next to its codes.

Results follow :func:`retrieval.search.knn`'s contract: ``(scores float32, ids int64)`` ``[num_queries, k]``,
best first, equal scores by ascending index. A query whose probed lists hold fewer than ``k`` candidates has
``-1`` ids (and ``-inf`` scores) in the remaining slots: the ranking contract's empty slots, which every metric
counts as misses.

Protocols that rank the whole database (Revisited: :attr:`GroundTruth.ranking_items`) get the top
``ranking_depth`` items; a labelled item not among them has place ``-1``, "not ranked", which is what the
official Revisited evaluation code makes of a truncated ranking (the item adds nothing to AP).

Command line, recall against exact search on stored descriptors::

    python -m retrieval.approximate_search --queries Q.h5 --database D.h5 --k 100 --nlist 1024 --m 64 \\
        --nprobe 1 4 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retrieval.search import knn
from retrieval.validation import as_float32_matrix

# Rows converted to float32 and encoded at a time when filling the index.
ADD_CHUNK_ROWS = 65536
# Queries searched at a time (sets the progress step; faiss parallelises within a chunk).
SEARCH_CHUNK_QUERIES = 16384
# Bytes of an item's id in faiss' inverted lists (int64), stored beside its code.
ID_BYTES = 8
# Working-memory budget of the database rows gathered at a time to refine candidates' scores, in bytes.
REFINE_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class IVFPQSettings:
    """How to build and search an IVF-PQ index (see the module docstring).

    Args:
        nlist: inverted lists (coarse k-means centroids); about ``4 * sqrt(N)`` to ``16 * sqrt(N)`` is usual
            (1024 to 16384 for 1M). Needs at least ``nlist`` training rows.
        m: PQ sub-quantizers, i.e. bytes per item with 8-bit codes; must divide the dimension.
        nbits: bits per sub-quantizer code (256 centroids at 8); needs at least ``2 ** nbits`` training rows.
        nprobe: lists visited per query (``nprobe = nlist``: every list, only the PQ approximation remains).
        training_size: database rows sampled (without replacement) to train the coarse quantizer and the PQ.
        seed: the sample and the k-means initialisations.
        kmeans_iterations: iterations of the coarse k-means and of each sub-quantizer's (faiss' default 25).
        opq: learn an OPQ rotation before the IVF-PQ.
        refine: re-score the top ``refine`` candidates of the index by exact inner products with the database
            rows and rank them by those (0: PQ scores only). Reads ``refine`` rows per query from the database
            as given (a memory-mapped store stays on disk) and costs ``refine x dim`` multiply-adds per query;
            recovers most of what the codes lose, but needs the float rows at search time.
        ranking_depth: items ranked per query for protocols that rank the whole database (Revisited).
        recall_sample: queries whose exact top-k is computed for ``ann_recall@k`` in the evaluation (0: none).
    """

    nlist: int = 1024
    m: int = 64
    nbits: int = 8
    nprobe: int = 32
    training_size: int = 65536
    seed: int = 0
    kmeans_iterations: int = 25
    opq: bool = False
    refine: int = 0
    ranking_depth: int = 1000
    recall_sample: int = 1000

    def __post_init__(self):
        for name in ("nlist", "m", "nbits", "nprobe", "training_size", "kmeans_iterations", "ranking_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"IVF-PQ setting {name} must be at least 1, got {getattr(self, name)}")
        if self.nbits > 16:
            raise ValueError(f"IVF-PQ nbits must be at most 16, got {self.nbits}")
        if self.refine < 0:
            raise ValueError(f"IVF-PQ refine must be 0 (off) or more candidates, got {self.refine}")
        if self.recall_sample < 0:
            raise ValueError(f"IVF-PQ recall_sample must be 0 (none) or more, got {self.recall_sample}")

    @property
    def factory_string(self) -> str:
        """The index in faiss' ``index_factory`` notation, e.g. ``IVF1024,PQ64x8``."""
        return f"{f'OPQ{self.m},' if self.opq else ''}IVF{self.nlist},PQ{self.m}x{self.nbits}"

    def describe(self) -> str:
        refine = f", exact re-scoring of the top {self.refine}" if self.refine else ""
        return f"{self.factory_string}, nprobe {self.nprobe}{refine}"


class IVFPQIndex:
    """A trained and filled faiss IVF-PQ index over a database, searched by inner product.

    Build with :meth:`build`; :meth:`search` and :meth:`ranking_positions` mirror :func:`retrieval.search.knn`
    and :func:`retrieval.search.ranking_positions`.
    """

    def __init__(self, dim: int, settings: IVFPQSettings):
        if dim % settings.m:
            raise ValueError(f"IVF-PQ: m = {settings.m} sub-quantizers must divide the dimension {dim}")
        self.dim = dim
        self.settings = settings
        #: The float rows ``settings.refine`` re-scores candidates with (set by :meth:`build`).
        self.database = None
        self.index = faiss.index_factory(dim, settings.factory_string, faiss.METRIC_INNER_PRODUCT)
        self.ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
        for clustering in (self.ivf.cp, self.ivf.pq.cp):
            clustering.seed = settings.seed
            clustering.niter = settings.kmeans_iterations
        # faiss' default polysemous training (a Hamming-distance ordering of the codes, for a filter this index
        # never uses) takes most of the training time.
        self.ivf.do_polysemous_training = False
        # Silences faiss' warning for fewer than 39 points per centroid, printed once per sub-quantizer.
        self.ivf.pq.cp.min_points_per_centroid = 1
        self.ivf.nprobe = settings.nprobe

    @classmethod
    def build(cls, database, settings: IVFPQSettings, progress: bool = False) -> IVFPQIndex:
        """Train on a sample of ``database`` ``[N, D]`` (array, tensor, memory map, :class:`RowBlocks`, ...)
        and add all of it, ``ADD_CHUNK_ROWS`` rows at a time."""
        num_database = len(database)
        dim = int(database.shape[1]) if len(database.shape) == 2 else 0
        if num_database == 0 or dim == 0:
            raise ValueError(f"IVF-PQ needs a non-empty [N, D] database, got shape {tuple(database.shape)}")
        index = cls(dim, settings)
        index.database = database
        needed = max(settings.nlist, 2**settings.nbits)
        training_rows = min(settings.training_size, num_database)
        if training_rows < needed:
            raise ValueError(
                f"IVF-PQ with nlist {settings.nlist} and nbits {settings.nbits} needs at least {needed} training "
                f"rows (one per centroid), got {training_rows} (training_size {settings.training_size}, database "
                f"{num_database}): lower nlist or nbits, or raise training_size"
            )
        rng = np.random.default_rng(settings.seed)
        rows = np.sort(rng.choice(num_database, training_rows, replace=False))
        index.train(as_float32_matrix(database[rows], "IVF-PQ training sample"))
        starts = range(0, num_database, ADD_CHUNK_ROWS)
        for start in tqdm(starts, desc="IVF-PQ add", unit="chunk", disable=not progress or len(starts) < 2):
            stop = min(start + ADD_CHUNK_ROWS, num_database)
            index.add(as_float32_matrix(database[start:stop], f"database rows {start}..{stop - 1}"))
        return index

    def train(self, sample: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; they get the next ids (0, 1, ... in the order added)."""
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def nprobe(self) -> int:
        """Lists visited per query; may be changed between searches (e.g. to trace recall against it)."""
        return int(self.ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be at least 1, got {value}")
        self.ivf.nprobe = int(value)

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def code_bytes_per_image(self) -> int:
        """Bytes of one item's PQ code (``m * nbits / 8``, rounded up)."""
        return int(self.ivf.code_size)

    @property
    def bytes_per_image(self) -> int:
        """What each item adds to the index in memory: its code and its int64 id in the inverted lists."""
        return self.code_bytes_per_image + ID_BYTES

    def index_bytes(self) -> int:
        """Memory of the filled index: codes and ids, coarse centroids, PQ codebooks, OPQ rotation."""
        fixed = self.settings.nlist * self.dim * 4 + 2**self.settings.nbits * self.dim * 4
        if self.settings.opq:
            fixed += self.dim * self.dim * 4
        return self.num_items * self.bytes_per_image + fixed

    def search(
        self, queries, k: int, exclude_self: bool = False, progress: bool = False, query_rows=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` by inner product, shaped like :func:`retrieval.search.knn`'s result (empty slots:
        id ``-1``, score ``-inf``). ``exclude_self``: query ``i`` is indexed item ``query_rows[i]`` (default: the
        queries are the whole indexed database, in order) and never lists itself. With ``settings.refine`` the
        scores are exact inner products with the database rows."""
        queries = as_float32_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the index has dimension {self.dim}")
        if exclude_self:
            query_rows = np.arange(len(queries)) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
            if query_rows.shape != (len(queries),):
                raise ValueError(
                    f"exclude_self=True needs the database row of each query: {len(queries)} queries, "
                    f"{len(query_rows)} rows (all {self.num_items} items when the queries are the database)"
                )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.num_items - int(exclude_self))
        if k < 1:
            raise ValueError("the index has no candidates to rank (it is empty, or holds only the query)")
        depth = k + int(exclude_self)
        fetched = max(depth, min(self.settings.refine, self.num_items))
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        starts = range(0, len(queries), SEARCH_CHUNK_QUERIES)
        for start in tqdm(starts, desc="IVF-PQ search", unit="chunk", disable=not progress or len(starts) < 2):
            stop = min(start + SEARCH_CHUNK_QUERIES, len(queries))
            chunk_scores, chunk_ids = self.index.search(queries[start:stop], fetched)
            if self.settings.refine:
                chunk_scores = self._exact_scores(queries[start:stop], chunk_ids)
            chunk_scores, chunk_ids = _in_ranking_order(chunk_scores, chunk_ids)
            chunk_scores, chunk_ids = chunk_scores[:, :depth], chunk_ids[:, :depth]
            if exclude_self:
                chunk_scores, chunk_ids = drop_own(chunk_scores, chunk_ids, query_rows[start:stop], k)
            scores[start:stop], ids[start:stop] = chunk_scores, chunk_ids
        return scores, ids

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products of each query with the database rows of its candidates (``-inf`` for empty slots), a
        few queries at a time so the gathered rows stay within ``REFINE_CHUNK_BYTES``."""
        if self.database is None or len(self.database) != self.num_items:
            raise ValueError("refine needs the indexed database's rows: set IVFPQIndex.database (build does)")
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows_per_step = max(1, REFINE_CHUNK_BYTES // (4 * self.dim * max(ids.shape[1], 1)))
        for start in range(0, len(ids), rows_per_step):
            chunk = ids[start : start + rows_per_step]
            found = chunk >= 0
            vectors = as_float32_matrix(self.database[chunk[found]], "database rows to refine")
            by_query = np.repeat(np.arange(len(chunk)), found.sum(axis=1))
            exact = np.einsum("nd,nd->n", vectors, queries[start : start + rows_per_step][by_query])
            scores[start : start + rows_per_step][found] = exact
        return scores

    def ranking_positions(self, queries, items: Sequence, exclude_self: bool = False) -> list[np.ndarray]:
        """Places of ``items[q]`` in query ``q``'s approximate ranking of depth ``settings.ranking_depth``, ``-1``
        for an item not in it (the not-ranked place of :func:`retrieval.metrics.revisited_map_at_positions`)."""
        _, ids = self.search(queries, self.settings.ranking_depth, exclude_self=exclude_self)
        return positions_in_rankings(ids, items)


def positions_in_rankings(ids: np.ndarray, items: Sequence) -> list[np.ndarray]:
    """Per query, the column of each of ``items[q]`` in ``ids[q]`` (a ranking without repeats), ``-1`` where
    it is absent."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(items) != len(ids):
        raise ValueError(f"{len(items)} item lists given for {len(ids)} rankings")
    positions = []
    for row, row_items in zip(ids, items):
        row_items = np.asarray(row_items, dtype=np.int64).reshape(-1)
        order = np.argsort(row, kind="stable")
        at = np.minimum(np.searchsorted(row[order], row_items), len(row) - 1)
        found = (row[order][at] == row_items) & (row_items >= 0)
        positions.append(np.where(found, order[at], -1).astype(np.int64))
    return positions


def recall_against_exact(approximate_ids, exact_ids, k: int) -> float:
    """Recall@k of the exact top-``k``: the mean over queries of the fraction of the exact top-``k`` items
    found among the approximate top-``k`` (empty ``-1`` slots never count; a query with fewer than ``k``
    candidates is scored on those it has)."""
    approximate_ids = np.asarray(approximate_ids)
    exact_ids = np.asarray(exact_ids)
    if approximate_ids.ndim != 2 or exact_ids.ndim != 2 or len(approximate_ids) != len(exact_ids):
        raise ValueError(
            f"expected rankings [num_queries, depth] for the same queries, got {approximate_ids.shape} and "
            f"{exact_ids.shape}"
        )
    if k < 1 or k > min(approximate_ids.shape[1], exact_ids.shape[1]):
        raise ValueError(
            f"k = {k} must be in [1, {min(approximate_ids.shape[1], exact_ids.shape[1])}] (the rankings' depth)"
        )
    if len(exact_ids) == 0:
        return float("nan")
    recalls = []
    for approximate_row, exact_row in zip(approximate_ids[:, :k], exact_ids[:, :k]):
        exact_row = exact_row[exact_row >= 0]
        if len(exact_row):
            recalls.append(np.isin(exact_row, approximate_row[approximate_row >= 0]).mean())
    return float(np.mean(recalls)) if recalls else float("nan")


def sampled_exact_knn(queries, database, rows: np.ndarray, k: int, exclude_self: bool = False, device=None):
    """Exact top-``k`` (:func:`retrieval.search.knn`) of the queries at ``rows``; with ``exclude_self`` query
    ``rows[i]`` is database item ``rows[i]`` and never lists itself."""
    sample = as_float32_matrix(queries[rows], "sampled queries")
    if not exclude_self:
        return knn(sample, database, k, device=device)
    scores, ids = knn(sample, database, k + 1, device=device)
    return drop_own(scores, ids, rows, min(k, ids.shape[1] - 1))


def drop_own(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row without its query's own id (or without its last entry where the own id is absent), ``k`` long."""
    is_own = ids == np.asarray(own)[:, None]
    is_own[~is_own.any(axis=1), -1] = True
    keep = ~is_own
    return scores[keep].reshape(-1, ids.shape[1] - 1)[:, :k], ids[keep].reshape(-1, ids.shape[1] - 1)[:, :k]


def _in_ranking_order(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by descending score, then ascending id, empty slots (faiss: id -1) last with score -inf."""
    empty = ids < 0
    scores = np.where(empty, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, ids), -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1).astype(np.int64)


# ---- command line ------------------------------------------------------------------------------------------------


def measure_recall(
    queries,
    database,
    settings: IVFPQSettings,
    k: int,
    nprobes: Sequence[int],
    sample: int = 1000,
    exclude_self: bool = False,
    progress: bool = False,
) -> dict:
    """Build an index over ``database``, then for each ``nprobe`` search a sample of the queries and compare
    with exact search: build seconds, per-nprobe recall@k and milliseconds per query, bytes per image."""
    start = time.perf_counter()
    index = IVFPQIndex.build(database, settings, progress=progress)
    build_seconds = time.perf_counter() - start
    num_queries = len(queries)
    rng = np.random.default_rng(settings.seed)
    sample = num_queries if not sample else min(sample, num_queries)
    rows = np.sort(rng.choice(num_queries, sample, replace=False))
    start = time.perf_counter()
    _, exact_ids = sampled_exact_knn(queries, database, rows, k, exclude_self=exclude_self)
    exact_ms = 1000 * (time.perf_counter() - start) / len(rows)
    sampled_queries = as_float32_matrix(queries[rows], "sampled queries")
    results = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        start = time.perf_counter()
        _, ids = index.search(sampled_queries, k, exclude_self=exclude_self, query_rows=rows)
        seconds = time.perf_counter() - start
        results.append(
            {
                "nprobe": nprobe,
                f"recall@{k}": recall_against_exact(ids, exact_ids, min(k, exact_ids.shape[1])),
                "ms_per_query": 1000 * seconds / len(rows),
            }
        )
    index.nprobe = settings.nprobe
    return {
        "settings": asdict(settings),
        "database": len(database),
        "dim": index.dim,
        "queries_sampled": len(rows),
        "k": k,
        "build_seconds": build_seconds,
        "exact_ms_per_query": exact_ms,
        "code_bytes_per_image": index.code_bytes_per_image,
        "index_bytes_per_image": index.bytes_per_image,
        "float32_bytes_per_image": 4 * index.dim,
        "index_mib": index.index_bytes() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nprobes": results,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    from reporting.tables import format_table
    from retrieval.feature_store import FeatureStore, RowBlocks
    from retrieval.files import write_text_atomic

    defaults = IVFPQSettings()
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.approximate_search",
        description="Recall of a faiss IVF-PQ index against exact search, its build and search time and its "
        "bytes per image, on stored global descriptors.",
    )
    parser.add_argument(
        "--database",
        required=True,
        type=Path,
        nargs="+",
        help="feature store(s) of the database, concatenated in order (e.g. a Revisited database, then the 1M "
        "distractors)",
    )
    parser.add_argument(
        "--queries", type=Path, help="feature store of the queries; omitted: the database against itself, leave-one-out"
    )
    parser.add_argument("--k", type=int, default=100, help="depth of the rankings compared")
    parser.add_argument("--nlist", type=int, default=defaults.nlist)
    parser.add_argument("--m", type=int, default=defaults.m, help="PQ sub-quantizers (bytes per image at 8 bits)")
    parser.add_argument("--nbits", type=int, default=defaults.nbits)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64], help="lists visited, one run each")
    parser.add_argument("--training-size", type=int, default=defaults.training_size)
    parser.add_argument("--opq", action="store_true", help="learn an OPQ rotation first")
    parser.add_argument("--refine", type=int, default=0, help="re-score this many candidates exactly (0: off)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kmeans-iterations", type=int, default=defaults.kmeans_iterations)
    parser.add_argument("--sample", type=int, default=1000, help="queries searched and compared (0: all)")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    try:
        parts = [FeatureStore(path).global_descriptors() for path in args.database]
        database = parts[0] if len(parts) == 1 else RowBlocks(parts)  # memory-mapped parts, not copied
        queries = database if args.queries is None else FeatureStore(args.queries).global_descriptors()
        settings = IVFPQSettings(
            nlist=args.nlist,
            m=args.m,
            nbits=args.nbits,
            nprobe=args.nprobe[0],
            training_size=args.training_size,
            seed=args.seed,
            kmeans_iterations=args.kmeans_iterations,
            opq=args.opq,
            refine=args.refine,
        )
        result = measure_recall(
            queries,
            database,
            settings,
            args.k,
            args.nprobe,
            args.sample,
            exclude_self=args.queries is None,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("RETRIEVAL_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    result["database_stores"] = [str(path) for path in args.database]
    result["query_store"] = None if args.queries is None else str(args.queries)
    title = (
        f"{settings.factory_string}{', refine ' + str(settings.refine) if settings.refine else ''} over {result['database']:,} x {result['dim']} "
        f"({result['queries_sampled']:,} queries): built in {result['build_seconds']:.1f} s, "
        f"{result['code_bytes_per_image']} B code + {ID_BYTES} B id per image "
        f"(float32: {result['float32_bytes_per_image']} B), index {result['index_mib']:.1f} MiB, "
        f"exact search {result['exact_ms_per_query']:.2f} ms/query"
    )
    rows = [[r["nprobe"], r[f"recall@{args.k}"], f"{r['ms_per_query']:.3f}"] for r in result["nprobes"]]
    print(format_table(["nprobe", f"recall@{args.k} vs exact", "ms/query"], rows, title=title))
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()

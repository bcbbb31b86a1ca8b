"""Exact nearest-neighbour search by inner product.

Every method's evaluation ends here: query and database embeddings in, a ranking of database indices out
(the ranking contract: ``int64 [num_queries, k]``, 0-based database indices, best first).

Memory stays ``O(chunk x database + queries x k)``: queries are processed in chunks and a full
``queries x database`` score matrix is never built. Small ``k`` goes through faiss' exhaustive BLAS search
(which tiles the database internally); a ranking deeper than ``DENSE_SORT_MIN_K`` (e.g. the full ranking the
Revisited Oxford/Paris protocol needs) scores one chunk of queries against the whole database and sorts it,
which is faster than faiss' heap for such ``k``.

Ties: within a returned list, equal scores are ordered by ascending database index. Which of several tied
items enters the list at the k-th position is not specified, and scores that differ only by float32
rounding may be ordered differently by the two paths (their sums run in different orders).
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
from tqdm.auto import tqdm

from retrieval.validation import as_float32_matrix

# Rankings deeper than this are computed by scoring a chunk against the whole database and sorting.
DENSE_SORT_MIN_K = 1024
# Working-memory budget of one chunk on the dense path, in bytes.
DENSE_CHUNK_BYTES = 256 * 2**20
# Queries per chunk on the faiss path; faiss tiles the database itself, so this only sets the progress step.
FAISS_CHUNK_QUERIES = 4096


def knn(
    queries,
    database,
    k: int,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` database items for every query by inner product.

    Args:
        queries: float array or tensor ``[num_queries, dim]``.
        database: float array or tensor ``[num_database, dim]``.
        k: ranking depth; values above the number of candidates are clipped to it.
        exclude_self: leave-one-out search where ``queries`` *are* the database (query ``i`` is database
            item ``i``, as in the Stanford Online Products protocol): item ``i`` never appears in row ``i``.
        chunk_size: queries per chunk; by default chosen from the memory budget above.
        progress: show a progress bar over the chunks.

    Returns:
        ``(scores, ids)``, both ``[num_queries, k]`` numpy arrays (``float32`` and ``int64``), best first.
    """
    queries = as_float32_matrix(queries, "queries")
    database = as_float32_matrix(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]} but the database has dimension {database.shape[1]}"
        )
    if exclude_self and queries.shape[0] != database.shape[0]:
        raise ValueError(
            "exclude_self=True needs the queries to be the database itself "
            f"(got {queries.shape[0]} queries and {database.shape[0]} database items)"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_queries, num_database = queries.shape[0], database.shape[0]
    k = min(k, num_database - int(exclude_self))
    if k < 1:
        raise ValueError("the database has no candidates to rank (it is empty, or holds only the query)")
    # With exclude_self one extra neighbour is fetched so the list stays k long after the query is dropped.
    depth = k + int(exclude_self)

    dense = depth >= min(DENSE_SORT_MIN_K, num_database)
    if chunk_size is None:
        # ~20 bytes per score: the scores, their negation, the int64 partition/sort indices, the gathered scores.
        chunk_size = max(1, DENSE_CHUNK_BYTES // (20 * num_database)) if dense else FAISS_CHUNK_QUERIES

    scores = np.empty((num_queries, k), dtype=np.float32)
    ids = np.empty((num_queries, k), dtype=np.int64)
    for start, stop in _chunks(num_queries, chunk_size, progress):
        if dense:
            chunk_scores, chunk_ids = _dense_topk(queries[start:stop], database, depth)
        else:
            chunk_scores, chunk_ids = faiss.knn(
                queries[start:stop], database, depth, metric=faiss.METRIC_INNER_PRODUCT
            )
            chunk_scores, chunk_ids = _order_ties_by_index(chunk_scores, chunk_ids)
        if exclude_self:
            chunk_scores, chunk_ids = _drop_self(chunk_scores, chunk_ids, np.arange(start, stop), k)
        scores[start:stop] = chunk_scores
        ids[start:stop] = chunk_ids
    return scores, ids


def _chunks(total: int, size: int, progress: bool) -> Iterator[tuple[int, int]]:
    starts = range(0, total, size)
    bar = tqdm(starts, desc="search", unit="chunk", disable=not progress or len(starts) < 2, leave=False)
    for start in bar:
        yield start, min(start + size, total)


def _dense_topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ database.T
    if k < scores.shape[1]:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        return _order_ties_by_index(candidate_scores, candidates)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64, copy=False)


def _order_ties_by_index(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending score, then ascending id."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1).astype(np.int64)


def _drop_self(scores: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, k: int):
    """Remove each query's own index from its row (or the surplus last entry when it is absent)."""
    is_self = ids == query_ids[:, None]
    # Rows without their own index drop the last (extra) column instead.
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return scores[keep].reshape(-1, k), ids[keep].reshape(-1, k)

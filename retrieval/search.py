"""Exact nearest-neighbour search by inner product, and where given items fall in the full ranking.

Every method's evaluation ends here: query and database embeddings in, a ranking of database indices out
(the ranking contract: ``int64 [num_queries, k]``, 0-based database indices, best first).

The ranking of a query is the whole database ordered by descending score, equal scores by ascending database
index; :func:`knn` returns its first ``k`` entries (which tied items enter at the k-th place is part of that
order), :func:`ranking_positions` the 0-based places of chosen items in it without sorting the database (all
that AP and mP@k need for protocols that rank the whole database, such as Revisited Oxford/Paris).

Memory stays ``O(chunk x database + queries x k)``: queries are processed in chunks and a full
``queries x database`` score matrix is never built. On the CPU (``device=None``), small ``k`` goes through
faiss' exhaustive BLAS search (which tiles the database internally); a ranking deeper than
``DENSE_SORT_MIN_K`` (e.g. the full ranking) scores one chunk of queries against the whole database and sorts
it, which is faster than faiss' heap for such ``k``. With a torch ``device`` (the GPU the evaluation runs on)
each chunk is a matrix product and a top-k or sort on that device, giving the same rankings.

Scores are float32 inner products; the paths sum them in different orders (faiss, numpy and torch BLAS, or a
GPU), so two scores that differ only by float32 rounding may be ordered differently by two paths. Where the
scores are exact in float32 (e.g. small integer vectors) all paths return identical rankings.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from tqdm.auto import tqdm

from retrieval.validation import as_float32_matrix

# Rankings deeper than this are computed by scoring a chunk against the whole database and sorting.
DENSE_SORT_MIN_K = 1024
# Working-memory budget of one chunk of scores on the CPU paths, in bytes.
DENSE_CHUNK_BYTES = 256 * 2**20
# Queries per chunk on the faiss path; faiss tiles the database itself, so this only sets the progress step.
FAISS_CHUNK_QUERIES = 4096
# Working-memory budget of one chunk on a torch device, in bytes (scores, their int64 keys and the sort).
DEVICE_CHUNK_BYTES = 1024 * 2**20
# Score cells of the CPU position count: finer cells leave fewer items to compare exactly, coarser ones keep
# the per-cell counts in cache; 2**16 int64 counts (512 KiB) fit in L2.
POSITION_CELLS = 2**16


def knn(
    queries,
    database,
    k: int,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
    device=None,
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
        device: ``None`` searches with numpy and faiss on the CPU; a torch device (``"cuda"``, ``"cpu"``,
            a ``torch.device``) computes each chunk with torch on that device.

    Returns:
        ``(scores, ids)``, both ``[num_queries, k]`` numpy arrays (``float32`` and ``int64``), best first:
        the first ``k`` entries of each query's ranking (score descending, then database index ascending).
    """
    queries, database = _checked_inputs(queries, database, exclude_self)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_queries, num_database = queries.shape[0], database.shape[0]
    k = min(k, num_database - int(exclude_self))
    if k < 1:
        raise ValueError("the database has no candidates to rank (it is empty, or holds only the query)")
    # With exclude_self one extra neighbour is fetched so the list stays k long after the query is dropped.
    depth = k + int(exclude_self)

    dense = depth >= min(DENSE_SORT_MIN_K, num_database)
    if device is not None:
        scorer = _TorchScorer(database, device)
        chunk_size = chunk_size or scorer.chunk_queries()
        topk = scorer.topk
    elif dense:
        # ~20 bytes per score: the scores, their negation, the int64 partition/sort indices, the gathered scores.
        chunk_size = chunk_size or max(1, DENSE_CHUNK_BYTES // (20 * num_database))
        topk = lambda chunk, depth: _dense_topk(chunk, database, depth)  # noqa: E731
    else:
        chunk_size = chunk_size or FAISS_CHUNK_QUERIES
        topk = lambda chunk, depth: _faiss_topk(chunk, database, depth)  # noqa: E731

    scores = np.empty((num_queries, k), dtype=np.float32)
    ids = np.empty((num_queries, k), dtype=np.int64)
    for start, stop in _chunks(num_queries, chunk_size, progress, "search"):
        chunk_scores, chunk_ids = topk(queries[start:stop], depth)
        if exclude_self:
            chunk_scores, chunk_ids = _drop_self(chunk_scores, chunk_ids, np.arange(start, stop), k)
        scores[start:stop] = chunk_scores
        ids[start:stop] = chunk_ids
    return scores, ids


def ranking_positions(
    queries,
    database,
    items: Sequence,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
    device=None,
) -> list[np.ndarray]:
    """0-based places of chosen database items in each query's full ranking, without ranking the database.

    The ranking is the one :func:`knn` returns with ``k`` = the whole database (score descending, then
    database index ascending), so ``positions[q][i]`` equals the column of ``items[q][i]`` in that ranking.
    An item's place is the number of database items ranked before it, which is counted: about ``O(database)``
    per query instead of a sort, and no ``[queries, database]`` ranking is ever held.

    Args:
        queries, database, exclude_self, chunk_size, progress, device: as in :func:`knn`; with
            ``exclude_self`` the query's own item is not in its ranking (its place is ``-1``).
        items: per query, an int array of database indices.

    Returns:
        Per query, an ``int64`` array of the places of ``items[q]``, in the same order.
    """
    queries, database = _checked_inputs(queries, database, exclude_self)
    num_queries, num_database = queries.shape[0], database.shape[0]
    if len(items) != num_queries:
        raise ValueError(f"{len(items)} item lists given for {num_queries} queries")
    items = [np.asarray(row, dtype=np.int64).reshape(-1) for row in items]
    for query, row in enumerate(items):
        if row.size and (row.min() < 0 or row.max() >= num_database):
            raise ValueError(
                f"items of query {query} must be database indices in [0, {num_database}), "
                f"got values from {row.min()} to {row.max()}"
            )
    with contextlib.ExitStack() as resources:
        if device is not None:
            scorer = _TorchScorer(database, device)
            chunk_size = chunk_size or scorer.chunk_queries()
            count = scorer.positions
        else:
            chunk_size = chunk_size or max(1, DENSE_CHUNK_BYTES // (4 * max(num_database, 1)))
            # Rows are counted in parallel threads (numpy releases the GIL), each with its own buffers.
            threads = resources.enter_context(ThreadPoolExecutor(min(8, usable_cpus())))
            own = threading.local()

            def count_row(scores: np.ndarray, row: np.ndarray) -> np.ndarray:
                if not hasattr(own, "counter"):
                    own.counter = _CellCounter(num_database)
                return own.counter.positions(scores, row)

            def count(chunk: np.ndarray, chunk_items: list[np.ndarray]) -> list[np.ndarray]:
                return list(threads.map(count_row, chunk @ database.T, chunk_items))

        positions = []
        for start, stop in _chunks(num_queries, chunk_size, progress, "positions"):
            chunk_items = items[start:stop]
            if exclude_self:  # the query's own place is needed too: the items behind it move up by one
                chunk_items = [np.append(row, query) for query, row in enumerate(chunk_items, start=start)]
            chunk_positions = count(queries[start:stop], chunk_items)
            if exclude_self:
                chunk_positions = [
                    _positions_without_self(row_positions[:-1], row_positions[-1], row[:-1], query)
                    for query, (row_positions, row) in enumerate(zip(chunk_positions, chunk_items), start=start)
                ]
            positions.extend(chunk_positions)
    return positions


def ranking_keys(scores, ids):
    """Integer keys that order items like the ranking: a larger key is ranked earlier, and keys are unique.

    The high 32 bits are the float32 score's bits mapped to an integer of the same order, the low 32 bits
    the complement of the database index, so equal scores rank by ascending index. Works on numpy arrays and
    torch tensors alike (``int64``); indices must be below ``2**32``.
    """
    scores = scores + 0.0  # -0.0 becomes +0.0: the two are equal scores and must share a key
    if hasattr(scores, "detach"):
        import torch

        bits = scores.float().view(torch.int32)
        monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats order backwards as integers: flip them
        return (monotone.to(torch.int64) << 32) | (0xFFFFFFFF - ids.to(torch.int64))
    bits = np.asarray(scores, dtype=np.float32).view(np.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (monotone.astype(np.int64) << 32) | (0xFFFFFFFF - np.asarray(ids, dtype=np.int64))


def _checked_inputs(queries, database, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
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
    return queries, database


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (Linux), not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _chunks(total: int, size: int, progress: bool, description: str) -> Iterator[tuple[int, int]]:
    starts = range(0, total, size)
    bar = tqdm(starts, desc=description, unit="chunk", disable=not progress or len(starts) < 2, leave=False)
    for start in bar:
        yield start, min(start + size, total)


# ---- CPU: numpy and faiss -------------------------------------------------------------------------------------


def _faiss_topk(queries: np.ndarray, database: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    # One more result than needed shows whether ties run past the list's end; faiss then keeps an arbitrary
    # subset of the tied items, so those rows are ranked again exactly.
    extra = int(depth < database.shape[0])
    scores, ids = faiss.knn(queries, database, depth + extra, metric=faiss.METRIC_INNER_PRODUCT)
    if extra:
        tied_at_end = np.flatnonzero(scores[:, depth] == scores[:, depth - 1])
        scores, ids = scores[:, :depth], ids[:, :depth]
        # In chunks: with quantised embeddings every row may tie.
        rows_per_chunk = max(1, DENSE_CHUNK_BYTES // (20 * database.shape[0]))
        for first in range(0, tied_at_end.size, rows_per_chunk):
            rows = tied_at_end[first : first + rows_per_chunk]
            scores[rows], ids[rows] = _dense_topk(queries[rows], database, depth)
    return _order_ties_by_index(scores, ids)


def _dense_topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ database.T
    if k < scores.shape[1]:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        _take_lowest_tied_indices(scores, candidates, candidate_scores)
        return _order_ties_by_index(candidate_scores, candidates)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64, copy=False)


def _take_lowest_tied_indices(scores: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray) -> None:
    """Where more items tie with the k-th score than fit, keep those of lowest index (in place).

    ``argpartition`` keeps an arbitrary subset of such items; the ranking's order keeps the lowest indices.
    """
    last = candidate_scores.min(axis=1)
    tied_total = np.count_nonzero(scores == last[:, None], axis=1)
    tied_kept = np.count_nonzero(candidate_scores == last[:, None], axis=1)
    for row in np.flatnonzero(tied_total > tied_kept):
        above = candidate_scores[row] > last[row]
        tied = np.flatnonzero(scores[row] == last[row])[: candidates.shape[1] - np.count_nonzero(above)]
        candidates[row] = np.concatenate([candidates[row][above], tied])
        candidate_scores[row] = scores[row, candidates[row]]


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


def _positions_without_self(positions: np.ndarray, self_position: int, items: np.ndarray, query: int) -> np.ndarray:
    """Places once the query's own item leaves the ranking: one less behind it, -1 for the item itself."""
    positions = positions - (positions > self_position)
    positions[items == query] = -1
    return positions


class _CellCounter:
    """Places of a few items in one query's ranking of a large database, by counting instead of sorting.

    The scores are cut into ``POSITION_CELLS`` equal-width cells spanning the items' scores: one pass, a
    histogram, and the items of every cell above an item's cell are ranked before it. Within the item's own
    cell the few items there are compared exactly by :func:`ranking_keys`. Any order-preserving cell
    assignment gives exact places; the equal widths only keep the exact part small.
    """

    def __init__(self, num_database: int):
        self.scaled = np.empty(num_database, dtype=np.float32)
        self.cells = np.empty(num_database, dtype=np.int64)

    def positions(self, scores: np.ndarray, items: np.ndarray) -> np.ndarray:
        if items.size == 0:
            return np.empty(0, dtype=np.int64)
        item_scores = scores[items]
        low, high = float(item_scores.min()), float(item_scores.max())
        # Items' scores land in cells 2 .. POSITION_CELLS - 2, so cells 0 and the last few hold only the
        # database items far below or above them, which are counted and never compared.
        scale = (POSITION_CELLS - 4) / (high - low) if high > low else 1.0
        scale = min(scale, 1e30)
        base = low - 2.0 / scale
        np.subtract(scores, np.float32(base), out=self.scaled)
        np.multiply(self.scaled, np.float32(scale), out=self.scaled)
        np.clip(self.scaled, 0, POSITION_CELLS - 1, out=self.scaled)
        np.copyto(self.cells, self.scaled, casting="unsafe")  # truncation: still order-preserving
        counts = np.bincount(self.cells, minlength=POSITION_CELLS)
        in_higher_cells = len(scores) - np.cumsum(counts)  # [cell] -> items in cells above it
        item_cells = self.cells[items]
        shares_a_cell = np.zeros(POSITION_CELLS, dtype=bool)
        shares_a_cell[item_cells] = True
        neighbours = np.flatnonzero(np.take(shares_a_cell, self.cells, mode="clip"))  # no bounds check: cells fit
        neighbour_keys = np.sort(ranking_keys(scores[neighbours], neighbours))
        neighbour_cells = np.sort(self.cells[neighbours])
        item_keys = ranking_keys(item_scores, items)
        # Neighbours ranked before the item, minus those in higher cells (already counted).
        ranked_before = len(neighbour_keys) - np.searchsorted(neighbour_keys, item_keys, side="right")
        in_higher_neighbour_cells = len(neighbour_cells) - np.searchsorted(neighbour_cells, item_cells, side="right")
        return in_higher_cells[item_cells] + ranked_before - in_higher_neighbour_cells


# ---- torch device ----------------------------------------------------------------------------------------------


class _TorchScorer:
    """Chunks of queries scored against the whole database with torch on one device (the evaluation's GPU).

    Every score gets a unique :func:`ranking_keys` key, so a top-k, a sort or a count over keys gives
    exactly the CPU path's order, ties included.
    """

    def __init__(self, database: np.ndarray, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.database = torch.from_numpy(database).to(self.device)
        self.index = torch.arange(database.shape[0], device=self.device)

    def chunk_queries(self) -> int:
        # ~48 bytes per score: the float32 scores, the int64 keys and their intermediates, the sort's output.
        return max(1, DEVICE_CHUNK_BYTES // (48 * max(self.database.shape[0], 1)))

    def _scores_and_keys(self, queries: np.ndarray):
        with _full_float32_matmul(self.torch):
            scores = self.torch.from_numpy(queries).to(self.device) @ self.database.T
        return scores, ranking_keys(scores, self.index)

    def topk(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        scores, keys = self._scores_and_keys(queries)
        if depth >= min(DENSE_SORT_MIN_K, keys.shape[1]):
            ids = self.torch.sort(keys, dim=1, descending=True).indices[:, :depth]
        else:
            ids = self.torch.topk(keys, depth, dim=1, sorted=True).indices
        return self.torch.gather(scores, 1, ids).cpu().numpy(), ids.cpu().numpy().astype(np.int64, copy=False)

    def positions(self, queries: np.ndarray, items: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        _, keys = self._scores_and_keys(queries)
        width = max(1, max(len(row) for row in items))
        padded = np.zeros((len(items), width), dtype=np.int64)
        for row, row_items in enumerate(items):
            padded[row, : len(row_items)] = row_items
        padded = torch.from_numpy(padded).to(self.device)
        item_keys = torch.gather(keys, 1, padded)
        lengths = torch.tensor([len(row) for row in items], device=self.device)
        is_padding = torch.arange(width, device=self.device)[None, :] >= lengths[:, None]
        item_keys[is_padding] = torch.iinfo(torch.int64).max  # above every real key: ranked before nothing
        sorted_keys, order = torch.sort(item_keys, dim=1)
        # below[q, j] = how many of query q's items database item j is ranked before (keys are unique).
        below = torch.searchsorted(sorted_keys, keys)
        offsets = torch.arange(len(items), device=self.device)[:, None] * (width + 1)
        counts = torch.bincount((below + offsets).flatten(), minlength=len(items) * (width + 1))
        counts = counts.view(len(items), width + 1)
        # The i-th smallest item key is preceded by the database items with below > i.
        ranked_before = counts.flip(1).cumsum(1).flip(1)[:, 1:]
        positions = torch.empty_like(ranked_before).scatter_(1, order, ranked_before).cpu().numpy()
        return [positions[row, : len(row_items)] for row, row_items in enumerate(items)]


@contextlib.contextmanager
def _full_float32_matmul(torch):
    """Full float32 matrix products (no TF32), whatever the run set, so scores match the CPU path's."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)

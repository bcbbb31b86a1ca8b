"""Re-ranking of a global shortlist by a pair scorer, scored by the benchmark's own protocol.

Global search gives each query a shortlist, the first ``m`` items of its global ranking (:func:`global_shortlist`,
``m = 1600`` by default, as in AMES); a pair scorer (any module) gives a logit per (query, shortlisted item); the
two similarities are fused as

    s = lambda * s_global + (1 - lambda) * sigmoid(gamma * logit)

(AMES, Suma et al., ECCV 2024, eq. 6 and 7), and the shortlist is sorted by ``s``, equal fused scores keeping
their global order. The query's ranking is this re-ranked head followed by the rest of its global ranking in
the global order, so protocols that rank the whole database (Revisited Oxford/Paris) are scored as before.
``lambda``, ``gamma`` and how much of the shortlist is re-ranked are chosen by a grid on a validation split
(:func:`tune_fusion`) and applied unchanged to the test split.

Scoring the pairs is the expensive part. :class:`RerankingEvaluation` computes once everything that does not
depend on the fusion (the global ranking, or where the labelled items fall in it), so each grid point only
fuses, sorts the shortlist and scores the ranking. :class:`PairChunks` splits the pairs over processes in fixed
chunks, so each pair is scored in the same batch whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from retrieval.evaluation import checked_queries
from retrieval.ground_truth import GroundTruth
from retrieval.search import knn, ranking_positions

#: Shortlist length of AMES ("we re-rank the top-m images", m = 1600).
DEFAULT_SHORTLIST = 1600
#: lambda from 0 (re-ranker only) to 1 (global only) in steps of 0.05, the step of the published values
#: (0.35 to 0.85).
DEFAULT_LAMBDAS = tuple(round(0.05 * i, 2) for i in range(21))
#: gamma: the published values (0.1 to 0.8 for a scorer trained with gamma = 1) lie on a 0.1 grid; 2, 5 and
#: 10 add sharper sigmoids for scorers whose logits are small.
DEFAULT_GAMMAS = tuple(round(0.1 * i, 1) for i in range(1, 11)) + (2.0, 5.0, 10.0)
# Rows handled at once where a shortlist does not start with the global ranking (bounds the membership test).
_ROWS_PER_CHUNK = 4096


# ---- fusion and re-ordering -----------------------------------------------------------------------------------


def fuse_scores(global_scores, logits, fusion_weight: float, temperature: float) -> np.ndarray:
    """``fusion_weight * global_scores + (1 - fusion_weight) * sigmoid(temperature * logits)``, in float64.

    In float64, so that distinct fused scores are not rounded into ties; with ``fusion_weight = 1`` the result
    is the global scores exactly, so re-ranking with it reproduces the global order.
    """
    global_scores = _finite_matrix(global_scores, "global_scores")
    logits = _finite_matrix(logits, "logits")
    if global_scores.shape != logits.shape:
        raise ValueError(f"global_scores have shape {global_scores.shape} but logits {logits.shape}")
    for name, value in (("fusion_weight", fusion_weight), ("temperature", temperature)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    return fusion_weight * global_scores + (1.0 - fusion_weight) * expit(temperature * logits)


def rerank_order(global_scores, logits, fusion_weight: float, temperature: float, depth: int | None = None):
    """Columns of the first ``depth`` shortlist entries by descending fused score, ``int64 [queries, depth]``.

    The sort is stable: equal fused scores keep the shortlist's (global) order.
    """
    global_scores, logits = _numpy(global_scores), _numpy(logits)
    if global_scores.ndim != 2:
        raise ValueError(f"global_scores must be a 2-D [queries, m] array, got shape {global_scores.shape}")
    depth = _rerank_depth(depth, global_scores.shape[1])
    fused = fuse_scores(global_scores[:, :depth], logits[:, :depth], fusion_weight, temperature)
    return np.argsort(-fused, axis=1, kind="stable")


def _leading_order(fused: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` columns of the stable descending order of ``fused``, without sorting whole rows.

    A protocol scoring the top 100 of a 1600 shortlist needs only those; a tuning grid repeats this.
    """
    if count >= fused.shape[1]:
        return np.argsort(-fused, axis=1, kind="stable")
    threshold = -np.partition(-fused, count - 1, axis=1)[:, count - 1 : count]  # the count-th largest per row
    above = fused > threshold
    # Of the columns tied at the threshold, those of lowest index fill the remaining places (the stable order).
    at = fused == threshold
    quota = count - above.sum(axis=1, keepdims=True)
    chosen = above | (at & (np.cumsum(at, axis=1) <= quota))
    columns = np.nonzero(chosen)[1].reshape(len(fused), count)  # ascending columns within each row
    order = np.argsort(-np.take_along_axis(fused, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def rerank_shortlist(
    shortlist, global_scores, logits, fusion_weight: float, temperature: float, depth: int | None = None
) -> np.ndarray:
    """The shortlist ``int64 [queries, m]`` with its first ``depth`` entries (all by default) sorted by fused score.

    ``global_scores`` and ``logits`` are ``[queries, m]``, column for column with ``shortlist``. Entries beyond
    ``depth`` keep their place, so one scored shortlist serves every re-ranking depth up to ``m``.
    """
    shortlist = _numpy(shortlist).astype(np.int64, copy=False)
    global_scores, logits = _numpy(global_scores), _numpy(logits)
    if shortlist.ndim != 2 or global_scores.shape != shortlist.shape or logits.shape != shortlist.shape:
        raise ValueError(
            f"shortlist, global_scores and logits must share one [queries, m] shape, got {shortlist.shape}, "
            f"{global_scores.shape} and {logits.shape}"
        )
    order = rerank_order(global_scores, logits, fusion_weight, temperature, depth)
    reranked = shortlist.copy()
    reranked[:, : order.shape[1]] = np.take_along_axis(shortlist[:, : order.shape[1]], order, axis=1)
    return reranked


# ---- the shortlist -------------------------------------------------------------------------------------------


def global_shortlist(
    queries,
    database,
    m: int = DEFAULT_SHORTLIST,
    exclude_self: bool = False,
    device=None,
    exclude: Sequence | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``m`` items of every query's global ranking: ``(scores float32, indices int64)``, ``[queries, m]``.

    Args:
        queries, database, exclude_self, device, progress: as in :func:`retrieval.search.knn` (``m`` is clipped
            to the number of candidates); with ``exclude_self`` ``queries`` may be ``None``.
        exclude: optional, per query, database indices kept out of the shortlist, which then holds the first
            ``m`` other items. The AMES code does this with the Revisited junk images (medium) or junk and
            easy images (hard), following DELG; the tail of the ranking still holds them, so the evaluation
            stays exact. With ``exclude`` the length is at most the candidates minus the longest list.
    """
    if exclude_self and queries is None:  # leave-one-out: the queries are the database
        queries = database
    if exclude is None:
        return knn(queries, database, m, exclude_self=exclude_self, progress=progress, device=device)
    exclude = [np.unique(np.asarray(row, dtype=np.int64).reshape(-1)) for row in exclude]
    if len(exclude) != len(database if exclude_self else queries):
        raise ValueError(f"{len(exclude)} exclusion lists for {len(database if exclude_self else queries)} queries")
    extra = max((len(row) for row in exclude), default=0)
    scores, ids = knn(queries, database, m + extra, exclude_self=exclude_self, progress=progress, device=device)
    keep = min(m, ids.shape[1] - extra)  # every row has at least this many items left
    if keep < 1:
        raise ValueError(f"excluding up to {extra} items leaves no database item to shortlist")
    excluded = _row_membership(ids, exclude, len(database))
    order = np.argsort(excluded, axis=1, kind="stable")[:, :keep]  # kept items first, in global order
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


# ---- evaluation ----------------------------------------------------------------------------------------------


class RerankingEvaluation:
    """Metrics of re-rankings of one shortlist under ``ground_truth``'s protocol, for any fusion parameters.

    The query's ranking is the re-ranked first ``depth`` shortlist entries, then its global ranking without
    them. Built once (one global search or one count of places), then :meth:`metrics` costs one fusion, one
    sort of the shortlist and one scoring per call, which is what a tuning grid repeats.

    * Ground truths that score rankings: the global ranking to ``ground_truth.depth`` is searched once; the
      re-ranked ranking is the head, then that ranking without the head's items, to the protocol's depth.
    * Ground truths with ``ranking_items`` (Revisited Oxford/Paris): the places of those items and of the
      shortlisted items in the full global ranking are counted once (:func:`retrieval.search.ranking_positions`);
      an item in the head takes its re-ranked place, any other item moves by the head items it overtakes,
      which for a shortlist of the first ``m`` global items leaves it where it was.
    * Leave-one-out ground truths (``queries_are_database``): ``queries`` is ignored and the shortlist must not
      contain the query itself (:func:`global_shortlist` with ``exclude_self=True``).

    The shortlist may be any items in global order (e.g. with :func:`global_shortlist`'s ``exclude``): the
    ranking above stays a ranking of the whole database and is scored exactly.
    """

    def __init__(
        self,
        ground_truth: GroundTruth,
        queries,
        database,
        shortlist_scores,
        shortlist_indices,
        device=None,
        progress: bool = False,
    ):
        queries = checked_queries(queries, database, ground_truth)
        self._set_shortlist(ground_truth, shortlist_scores, shortlist_indices)
        exclude_self = ground_truth.queries_are_database
        if ground_truth.ranking_items is None:
            _, ranks = knn(
                queries, database, ground_truth.depth, exclude_self=exclude_self, progress=progress, device=device
            )
            self._set_global_ranks(ranks)
            return
        # One count gives the places of the labelled items and of the shortlisted ones.
        labelled = [np.asarray(row, dtype=np.int64).reshape(-1) for row in ground_truth.ranking_items]
        items = [np.concatenate([row, shortlisted]) for row, shortlisted in zip(labelled, self.shortlist)]
        positions = ranking_positions(
            queries, database, items, exclude_self=exclude_self, progress=progress, device=device
        )
        self._set_positions(
            [row_positions[: len(row)] for row_positions, row in zip(positions, labelled)],
            np.stack([row_positions[len(row) :] for row_positions, row in zip(positions, labelled)]),
        )

    @classmethod
    def from_global(
        cls,
        ground_truth: GroundTruth,
        shortlist_scores,
        shortlist_indices,
        global_ranks=None,
        item_positions: Sequence | None = None,
        shortlist_positions=None,
    ) -> RerankingEvaluation:
        """The same evaluation from a global search done elsewhere, searching nothing.

        Args:
            global_ranks: for ground truths that score rankings, the global ranking ``[queries, >= depth]``.
            item_positions: for ground truths with ``ranking_items``, the places of those items in the full
                global ranking (as :func:`retrieval.search.ranking_positions` returns them).
            shortlist_positions: the places of the shortlisted items in it, ``[queries, m]``; by default
                ``0 .. m - 1``, i.e. the shortlist is the first ``m`` global items.
        """
        evaluation = cls.__new__(cls)
        evaluation._set_shortlist(ground_truth, shortlist_scores, shortlist_indices)
        if ground_truth.ranking_items is None:
            if global_ranks is None:
                raise ValueError(f"{type(ground_truth).__name__} scores rankings: give global_ranks")
            evaluation._set_global_ranks(global_ranks)
            return evaluation
        if item_positions is None:
            raise ValueError(f"{type(ground_truth).__name__} is scored from places: give item_positions")
        if shortlist_positions is None:
            shortlist_positions = np.broadcast_to(np.arange(evaluation.shortlist_length), evaluation.shortlist.shape)
        evaluation._set_positions(item_positions, shortlist_positions)
        return evaluation

    @property
    def shortlist_length(self) -> int:
        return self.shortlist.shape[1]

    def global_metrics(self) -> dict[str, float]:
        """Metrics of the global ranking alone (those of :func:`retrieval.evaluation.evaluate_embeddings`)."""
        if self._global_ranks is not None:
            return self.ground_truth.evaluate(self._global_ranks)
        return self.ground_truth.evaluate_positions(np.split(self._item_global, self._item_splits))

    def metrics(self, logits, fusion_weight: float, temperature: float, depth: int | None = None) -> dict[str, float]:
        """Metrics of the ranking re-ranked with these parameters; ``depth`` (<= m) re-ranks only the first
        ``depth`` shortlist entries, the rest keep their global order."""
        logits = _numpy(logits)
        if logits.shape != self.shortlist.shape:
            raise ValueError(f"expected logits of shape {self.shortlist.shape} (the shortlist's), got {logits.shape}")
        depth = _rerank_depth(depth, self.shortlist_length)
        fused = fuse_scores(self.shortlist_scores[:, :depth], logits[:, :depth], fusion_weight, temperature)
        if self._global_ranks is not None:
            # The protocol reads only its depth: the head's order beyond it does not matter.
            order = _leading_order(fused, min(depth, self.ground_truth.depth))
            return self.ground_truth.evaluate(self._ranking(order, depth))
        order = np.argsort(-fused, axis=1, kind="stable")
        return self.ground_truth.evaluate_positions(self._positions(order, depth))

    # -- construction

    def _set_shortlist(self, ground_truth: GroundTruth, shortlist_scores, shortlist_indices) -> None:
        self.ground_truth = ground_truth
        shortlist = _numpy(shortlist_indices)
        if shortlist.ndim != 2 or shortlist.shape[0] != ground_truth.num_queries or shortlist.shape[1] < 1:
            raise ValueError(
                f"expected a shortlist of shape [{ground_truth.num_queries}, m >= 1], got {shortlist.shape}"
            )
        if not np.issubdtype(shortlist.dtype, np.integer):
            raise ValueError(f"shortlist indices must be integers, got {shortlist.dtype}")
        self.shortlist = shortlist.astype(np.int64, copy=False)
        if self.shortlist.min() < 0 or self.shortlist.max() >= ground_truth.num_database:
            raise ValueError(f"shortlist indices must be database indices in [0, {ground_truth.num_database})")
        ordered = np.sort(self.shortlist, axis=1)
        repeats = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if repeats.size:
            raise ValueError(f"the shortlists of {repeats.size} queries repeat an item (first: query {repeats[0]})")
        if ground_truth.queries_are_database:
            holds_self = np.flatnonzero((self.shortlist == np.arange(len(self.shortlist))[:, None]).any(axis=1))
            if holds_self.size:
                raise ValueError(
                    f"leave-one-out: the shortlists of {holds_self.size} queries hold the query itself "
                    f"(first: query {holds_self[0]}); build them with exclude_self=True"
                )
        self.shortlist_scores = _finite_matrix(shortlist_scores, "shortlist_scores")
        if self.shortlist_scores.shape != self.shortlist.shape:
            raise ValueError(
                f"shortlist scores have shape {self.shortlist_scores.shape} but the indices {self.shortlist.shape}"
            )
        self._global_ranks = None
        self._tails: dict[int, object] = {}  # per re-ranking depth: what does not depend on the fusion

    def _set_global_ranks(self, ranks) -> None:
        ranks = _numpy(ranks).astype(np.int64, copy=False)
        if ranks.ndim != 2 or ranks.shape[0] != self.ground_truth.num_queries:
            raise ValueError(
                f"expected global ranks of shape [{self.ground_truth.num_queries}, depth], got {ranks.shape}"
            )
        if ranks.shape[1] < self.ground_truth.depth:
            raise ValueError(f"the protocol needs rankings {self.ground_truth.depth} deep, got {ranks.shape[1]}")
        self._global_ranks = ranks

    def _set_positions(self, item_positions: Sequence, shortlist_positions) -> None:
        ground_truth = self.ground_truth
        items = [np.asarray(row, dtype=np.int64).reshape(-1) for row in ground_truth.ranking_items]
        item_positions = [np.asarray(row, dtype=np.int64).reshape(-1) for row in item_positions]
        if len(item_positions) != len(items) or any(p.shape != i.shape for p, i in zip(item_positions, items)):
            raise ValueError("item_positions must hold one place per ranking item of every query")
        shortlist_positions = np.asarray(shortlist_positions, dtype=np.int64)
        if shortlist_positions.shape != self.shortlist.shape or (shortlist_positions < 0).any():
            raise ValueError(f"expected shortlist places >= 0 of shape {self.shortlist.shape}")
        # All labelled items of all queries in one flat array, split back per query for the protocol.
        lengths = np.array([len(row) for row in items], dtype=np.int64)
        self._item_splits = np.cumsum(lengths)[:-1]
        self._item_query = np.repeat(np.arange(len(items)), lengths)
        self._item_global = np.concatenate(item_positions) if items else np.empty(0, dtype=np.int64)
        self._shortlist_positions = shortlist_positions
        # Column of each labelled item in its query's shortlist, -1 where it is not shortlisted.
        stride = ground_truth.num_database + 1
        flat = (np.arange(len(self.shortlist))[:, None] * stride + self.shortlist).ravel()
        by_key = np.argsort(flat, kind="stable")
        keys = self._item_query * stride + (np.concatenate(items) if items else np.empty(0, dtype=np.int64))
        at = np.minimum(np.searchsorted(flat[by_key], keys), flat.size - 1)
        found = flat[by_key[at]] == keys
        self._item_column = np.where(found, by_key[at] % self.shortlist_length, -1)

    # -- one grid point

    def _ranking(self, order: np.ndarray, depth: int) -> np.ndarray:
        """The ranking to the protocol's depth; ``order`` holds the head's first columns (all of them when the
        head is shorter than the protocol's depth)."""
        head = np.take_along_axis(self.shortlist[:, :depth], order, axis=1)
        needed = self.ground_truth.depth
        if depth >= needed:
            return head[:, :needed]
        if depth not in self._tails:
            self._tails[depth] = self._global_tail(depth, needed - depth)
        return np.concatenate([head, self._tails[depth]], axis=1)

    def _global_tail(self, depth: int, length: int) -> np.ndarray:
        """Per query, the first ``length`` global items that are not among the first ``depth`` shortlisted."""
        ranks, head = self._global_ranks, self.shortlist[:, :depth]
        tail = ranks[:, depth : depth + length].copy()
        # Rows whose shortlist does not start with the global ranking (e.g. built with exclusions).
        other = np.flatnonzero(~(head == ranks[:, :depth]).all(axis=1))
        for first in range(0, other.size, _ROWS_PER_CHUNK):
            rows = other[first : first + _ROWS_PER_CHUNK]
            shortlisted = _row_membership(ranks[rows], list(head[rows]), self.ground_truth.num_database)
            kept = np.argsort(shortlisted, axis=1, kind="stable")[:, :length]
            tail[rows] = np.take_along_axis(ranks[rows], kept, axis=1)
        return tail

    def _positions(self, order: np.ndarray, depth: int) -> list[np.ndarray]:
        if depth not in self._tails:
            self._tails[depth] = self._places_outside_head(depth)
        positions, in_head = self._tails[depth]
        positions = positions.copy()
        place_of_column = np.empty_like(order)
        np.put_along_axis(place_of_column, order, np.arange(depth)[None, :], axis=1)
        positions[in_head] = place_of_column[self._item_query[in_head], self._item_column[in_head]]
        return np.split(positions, self._item_splits)

    def _places_outside_head(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Places of the labelled items once the first ``depth`` shortlisted items move to the front (those
        items' own places are filled in per fusion), and which labelled items are among them."""
        num_queries, stride = len(self.shortlist), self.ground_truth.num_database + 1
        head_places = np.sort(self._shortlist_positions[:, :depth], axis=1)
        # Sorted within rows and offset per row, hence sorted overall: one search counts per query.
        flat = (np.arange(num_queries)[:, None] * stride + head_places).ravel()
        overtaken = np.searchsorted(flat, self._item_query * stride + self._item_global) - self._item_query * depth
        positions = np.where(self._item_global >= 0, depth + self._item_global - overtaken, -1)
        in_head = (self._item_column >= 0) & (self._item_column < depth)
        return positions, in_head


def evaluate_reranked(
    ground_truth: GroundTruth,
    queries,
    database,
    shortlist_scores,
    shortlist_indices,
    logits,
    fusion_weight: float,
    temperature: float,
    depth: int | None = None,
    device=None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of one re-ranking (see :class:`RerankingEvaluation`, which a grid should use instead, so the
    global search runs once)."""
    evaluation = RerankingEvaluation(
        ground_truth, queries, database, shortlist_scores, shortlist_indices, device=device, progress=progress
    )
    return evaluation.metrics(logits, fusion_weight, temperature, depth)


# ---- tuning --------------------------------------------------------------------------------------------------


def tune_fusion(
    evaluation: RerankingEvaluation,
    logits,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    depths: Sequence[int] | None = None,
    metric: str | Callable[[Mapping[str, float]], float] = "mAP@100",
) -> tuple[tuple[float, float, int], float, list[dict]]:
    """Grid search of (lambda, gamma, depth) maximising ``metric`` on a validation split.

    Args:
        evaluation: the validation split's :class:`RerankingEvaluation`.
        logits: the pair scorer's logits on its shortlist, ``[queries, m]``.
        lambdas, gammas: fusion weights and temperatures; the defaults are :data:`DEFAULT_LAMBDAS` and
            :data:`DEFAULT_GAMMAS`.
        depths: how many shortlist entries to re-rank (each at most ``m``; the same logits serve all);
            by default only ``m``.
        metric: a metric name, matching a key exactly or as the key's last part after ``/`` (``"mAP@100"``
            matches GLDv2's ``"public/mAP@100"``; a name matching several keys is refused), or a function of
            the metrics dict (e.g. the mean of ``medium/mAP`` and ``hard/mAP``).

    Returns:
        ``((lambda, gamma, depth), best value, table)``; the table has one row per grid point, in grid order
        (depth, then lambda, then gamma, outermost first), with its parameters, ``value`` and ``metrics``.
        Equal values go to the first grid point in that order, as in the AMES code; NaN never wins.
    """
    depths = [evaluation.shortlist_length] if depths is None else [int(depth) for depth in depths]
    for depth in depths:
        _rerank_depth(depth, evaluation.shortlist_length)
    if not (len(lambdas) and len(gammas) and len(depths)):
        raise ValueError("the grid is empty: give at least one lambda, gamma and depth")
    best, best_value, table = None, -math.inf, []
    for depth in depths:
        for fusion_weight in lambdas:
            for temperature in gammas:
                metrics = evaluation.metrics(logits, fusion_weight, temperature, depth)
                value = metric(metrics) if callable(metric) else metrics[metric_key(metrics, metric)]
                table.append(
                    {"lambda": fusion_weight, "gamma": temperature, "depth": depth, "value": value, "metrics": metrics}
                )
                if value > best_value:  # strict: earlier grid points win ties; NaN compares False
                    best, best_value = (fusion_weight, temperature, depth), value
    if best is None:
        raise ValueError("the tuned metric is NaN (or -inf) at every grid point")
    return best, best_value, table


def metric_key(metrics: Mapping[str, float], name: str) -> str:
    """The key of ``metrics`` that ``name`` designates: the key itself, or the one key whose last part after
    ``/`` it is."""
    if name in metrics:
        return name
    matches = [key for key in metrics if key.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"metric {name!r} is ambiguous: it matches {matches}; name one of them")
    raise ValueError(f"no metric {name!r}; available: {sorted(metrics)}")


# ---- distributing the pairs ----------------------------------------------------------------------------------


class PairChunk(NamedTuple):
    """One fixed chunk of (query, shortlist entry) pairs: ``shortlist[query_rows, shortlist_columns]``."""

    index: int
    query_rows: np.ndarray
    shortlist_columns: np.ndarray


class PairChunks:
    """The ``num_queries x shortlist_length`` pairs, row-major, cut into chunks of ``chunk_size`` pairs.

    Chunk ``c`` goes to process ``c % world_size``. The chunks do not depend on the number of processes, so
    each pair is scored in the same batch on 1 or N processes, and the logits (hence the metrics) are
    bitwise identical wherever the scorer's output for a batch depends only on that batch (same kind of
    device, deterministic kernels).
    """

    def __init__(self, num_queries: int, shortlist_length: int, chunk_size: int):
        if num_queries < 0 or shortlist_length < 1 or chunk_size < 1:
            raise ValueError(
                f"need num_queries >= 0, shortlist_length >= 1 and chunk_size >= 1, got {num_queries}, "
                f"{shortlist_length} and {chunk_size}"
            )
        self.num_queries, self.shortlist_length, self.chunk_size = num_queries, shortlist_length, chunk_size
        self.num_pairs = num_queries * shortlist_length
        self.num_chunks = -(-self.num_pairs // chunk_size)

    def __len__(self) -> int:
        return self.num_chunks

    def chunk(self, index: int) -> PairChunk:
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range [0, {self.num_chunks})")
        pairs = np.arange(index * self.chunk_size, min((index + 1) * self.chunk_size, self.num_pairs))
        return PairChunk(index, pairs // self.shortlist_length, pairs % self.shortlist_length)

    def chunks_for(self, rank: int, world_size: int) -> list[PairChunk]:
        """The chunks process ``rank`` of ``world_size`` scores: ``rank``, ``rank + world_size``, ..."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        return [self.chunk(index) for index in range(rank, self.num_chunks, world_size)]

    def assemble(self, chunk_results: Mapping[int, object]) -> np.ndarray:
        """Logits ``[num_queries, shortlist_length]`` from every chunk's logits (``{chunk index: 1-D logits}``,
        e.g. gathered from all processes)."""
        missing = [index for index in range(self.num_chunks) if index not in chunk_results]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"{len(missing)} of {self.num_chunks} chunks have no logits: {shown}")
        unknown = sorted(set(chunk_results) - set(range(self.num_chunks)))
        if unknown:
            raise ValueError(f"logits given for chunks that do not exist: {unknown[:10]}")
        values = [_numpy(chunk_results[index]).reshape(-1) for index in range(self.num_chunks)]
        for index, chunk_values in enumerate(values):
            expected = min(self.chunk_size, self.num_pairs - index * self.chunk_size)
            if chunk_values.size != expected:
                raise ValueError(f"chunk {index} holds {expected} pairs but {chunk_values.size} logits were given")
        dtype = np.result_type(*values) if values else np.float32
        flat = np.concatenate(values).astype(dtype, copy=False) if values else np.empty(0, dtype=dtype)
        return flat.reshape(self.num_queries, self.shortlist_length)


# ---- helpers -------------------------------------------------------------------------------------------------


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _finite_matrix(values, name: str) -> np.ndarray:
    values = _numpy(values)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [queries, m] array, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be numbers, got {values.dtype}")
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{name}: {int((~finite).sum())} values are NaN or Inf (first at {np.argwhere(~finite)[0]})")
    return values


def _rerank_depth(depth: int | None, shortlist_length: int) -> int:
    if depth is None:
        return shortlist_length
    if not 1 <= depth <= shortlist_length:
        raise ValueError(
            f"the re-ranking depth must be in [1, {shortlist_length}] (the shortlist's length), got {depth}"
        )
    return int(depth)


def _row_membership(ids: np.ndarray, members: Sequence[np.ndarray], num_database: int) -> np.ndarray:
    """``bool`` like ``ids``: whether ``ids[q, j]`` is in ``members[q]``, for all rows in one search."""
    stride = num_database + 1
    rows = np.arange(len(ids))
    lengths = [len(row) for row in members]
    member_keys = np.repeat(rows, lengths) * stride + (
        np.concatenate(members).astype(np.int64) if sum(lengths) else np.empty(0, dtype=np.int64)
    )
    return np.isin(rows[:, None] * stride + ids, member_keys)

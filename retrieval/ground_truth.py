"""Ground-truth objects: what a benchmark counts as correct, how deep it ranks, and how it scores a ranking.

A datamodule builds one per evaluation set; the evaluation callback asks it for the ranking depth, searches,
and hands the ranking back to :meth:`GroundTruth.evaluate`. A protocol that ranks the whole database but
scores only where a few items fall in it (Revisited Oxford/Paris) lists those items in ``ranking_items`` and
is scored from their places by :meth:`GroundTruth.evaluate_positions`, without building the ranking. Metric
names returned here are the last part of the logged key ``<stage>/<dataset>/<metric>``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from retrieval.metrics import (
    map_at_k,
    positives_from_labels,
    positives_within_radius,
    recall_at_k,
    revisited_labelled,
    revisited_map,
    revisited_map_at_positions,
)


class GroundTruth(ABC):
    """Relevance of database items to queries, plus the protocol that scores a ranking."""

    num_queries: int
    num_database: int
    #: Leave-one-out protocol: the queries are the database items themselves, and a query never retrieves itself.
    queries_are_database: bool = False
    #: Per query, the database items whose places in the full ranking are all the protocol needs; then
    #: :meth:`evaluate_positions` scores it and no ranking is built. ``None``: it scores a ranking.
    ranking_items: list[np.ndarray] | None = None

    @property
    @abstractmethod
    def depth(self) -> int:
        """How many results per query the protocol needs."""

    @abstractmethod
    def evaluate(self, ranks) -> dict[str, float]:
        """Metrics of a ranking ``[num_queries, >= depth]`` as fractions in [0, 1]."""

    def evaluate_positions(self, positions) -> dict[str, float]:
        """Metrics from ``positions[q]``, the 0-based places of ``ranking_items[q]`` in query ``q``'s full
        ranking; the same numbers as :meth:`evaluate` on that ranking."""
        raise NotImplementedError(f"{type(self).__name__} scores rankings (its ranking_items is None)")

    def _candidates(self) -> int:
        return self.num_database - int(self.queries_are_database)

    def _check(self, ranks) -> np.ndarray:
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or ranks.shape[0] != self.num_queries:
            raise ValueError(f"expected rankings of shape [{self.num_queries}, depth], got {ranks.shape}")
        if ranks.shape[1] < self.depth:
            raise ValueError(f"the protocol needs rankings {self.depth} deep, got {ranks.shape[1]}")
        return ranks


class PositivesGroundTruth(GroundTruth):
    """Explicit positives per query, scored by Recall@k and (GLDv2-style) mAP@k.

    ``k`` beyond the number of candidates is scored on the full list, which is then exact.
    """

    def __init__(
        self,
        positives: Sequence[np.ndarray],
        num_database: int,
        recall_ks: Sequence[int] = (1, 10),
        map_ks: Sequence[int] = (100,),
        queries_are_database: bool = False,
        exclude_empty: bool = False,
    ):
        self.positives = [np.asarray(p, dtype=np.int64) for p in positives]
        self.num_queries = len(self.positives)
        self.num_database = num_database
        self.recall_ks = tuple(recall_ks)
        self.map_ks = tuple(map_ks)
        self.queries_are_database = queries_are_database
        self.exclude_empty = exclude_empty

    @property
    def depth(self) -> int:
        return max(1, min(max(self.recall_ks + self.map_ks), self._candidates()))

    def evaluate(self, ranks) -> dict[str, float]:
        ranks = self._check(ranks)[:, : self.depth]
        recalls = recall_at_k(ranks, self.positives, [min(k, self.depth) for k in self.recall_ks], self.exclude_empty)
        metrics = {f"recall@{k}": recalls[min(k, self.depth)] for k in self.recall_ks}
        for k in self.map_ks:
            metrics[f"mAP@{k}"] = map_at_k(ranks, self.positives, k)
        return metrics


class LabelGroundTruth(PositivesGroundTruth):
    """Same label = relevant (metric-learning benchmarks such as Stanford Online Products).

    With ``database_labels=None`` the queries are the database (leave-one-out, the SOP protocol).
    """

    def __init__(
        self,
        query_labels,
        database_labels=None,
        recall_ks: Sequence[int] = (1, 10),
        map_ks: Sequence[int] = (100,),
    ):
        leave_one_out = database_labels is None
        database_labels = query_labels if leave_one_out else database_labels
        super().__init__(
            positives_from_labels(query_labels, database_labels, same_set=leave_one_out),
            num_database=len(database_labels),
            recall_ks=recall_ks,
            map_ks=map_ks,
            queries_are_database=leave_one_out,
        )


class RadiusGroundTruth(PositivesGroundTruth):
    """Place recognition: database images within ``radius`` (metres, UTM) of the query are correct.

    Queries without any database image in range stay in the Recall@k average and count as misses, as in the
    published Pittsburgh evaluation code. mAP@k (the AE-SVC paper reports mAP@4) averages over the queries that
    have a positive (:func:`~retrieval.metrics.map_at_k`).
    """

    def __init__(
        self,
        query_xy,
        database_xy,
        radius: float = 25.0,
        recall_ks: Sequence[int] = (1, 5, 10, 20),
        map_ks: Sequence[int] = (4,),
    ):
        super().__init__(
            positives_within_radius(query_xy, database_xy, radius),
            num_database=len(database_xy),
            recall_ks=recall_ks,
            map_ks=map_ks,
        )


class RevisitedGroundTruth(GroundTruth):
    """Revisited Oxford/Paris: full ranking, easy/medium/hard mAP and mP@k (see :func:`revisited_map`).

    The metrics depend only on where each query's easy, hard and junk images fall in its ranking of the whole
    database, so the evaluation counts those places (:attr:`ranking_items`) instead of sorting, e.g., 1M
    distractors per query.
    """

    def __init__(self, gnd, num_database: int, kappas: Sequence[int] = (1, 5, 10)):
        self.gnd = gnd["gnd"] if isinstance(gnd, dict) else list(gnd)
        self.num_queries = len(self.gnd)
        self.num_database = num_database
        self.kappas = tuple(kappas)
        self.ranking_items = [revisited_labelled(query_gnd) for query_gnd in self.gnd]

    @property
    def depth(self) -> int:
        return self.num_database

    def evaluate(self, ranks) -> dict[str, float]:
        return revisited_map(self._check(ranks), self.gnd, self.kappas)

    def evaluate_positions(self, positions) -> dict[str, float]:
        return revisited_map_at_positions(self.ranking_items, positions, self.gnd, self.kappas)


class GLDv2GroundTruth(GroundTruth):
    """Google Landmarks v2 retrieval: mAP@k (k = 100) computed separately for each query subset.

    ``subsets`` names each query's subset ("public" or "private" in ``retrieval_solution_v2.1.csv``); every
    subset is averaged over all its queries, as the challenge scores them (see :func:`map_at_k`).
    Returns ``<subset>/mAP@<k>``.
    """

    def __init__(self, positives: Sequence[np.ndarray], subsets: Sequence[str], num_database: int, k: int = 100):
        if len(positives) != len(subsets):
            raise ValueError(f"{len(positives)} queries with positives but {len(subsets)} subset names")
        self.positives = [np.asarray(p, dtype=np.int64) for p in positives]
        self.subsets = np.asarray(subsets)
        self.num_queries = len(self.positives)
        self.num_database = num_database
        self.k = k

    @property
    def depth(self) -> int:
        return min(self.k, self.num_database)

    def evaluate(self, ranks) -> dict[str, float]:
        ranks = self._check(ranks)
        metrics = {}
        for subset in dict.fromkeys(self.subsets.tolist()):  # in order of first appearance
            rows = np.flatnonzero(self.subsets == subset)
            metrics[f"{subset}/mAP@{self.k}"] = map_at_k(ranks[rows], [self.positives[i] for i in rows], self.k)
        return metrics

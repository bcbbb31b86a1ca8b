"""The one evaluation path: embeddings -> exact (or, as an option, approximate) search -> the benchmark's own
protocol."""

from __future__ import annotations

import numpy as np

from retrieval.approximate_search import (
    IVFPQIndex,
    IVFPQSettings,
    positions_in_rankings,
    recall_against_exact,
    sampled_exact_knn,
)
from retrieval.ground_truth import GroundTruth
from retrieval.search import knn, ranking_positions


def evaluate_embeddings(
    queries,
    database,
    ground_truth: GroundTruth,
    progress: bool = False,
    device=None,
    approximate: IVFPQSettings | None = None,
) -> dict[str, float]:
    """Rank ``database`` for every query by inner product and score the ranking with ``ground_truth``.

    Embeddings are compared by inner product, so methods hand over L2-normalised embeddings for cosine
    similarity. For leave-one-out protocols (``ground_truth.queries_are_database``) ``queries`` is ignored
    and may be ``None``. A ground truth with ``ranking_items`` (Revisited Oxford/Paris) is scored from the
    places of those items in the full ranking, counted chunk by chunk from the scores, so neither the sorted
    database nor a ``[queries, database]`` ranking is built. ``device``: ``None`` searches on the CPU with
    numpy and faiss; a torch device (the GPU the evaluation runs on) searches there, with the same rankings
    (see :mod:`retrieval.search`).

    ``approximate``: search a faiss IVF-PQ index built over ``database`` with these settings instead, on the
    CPU (:mod:`retrieval.approximate_search`); the metrics are those of the approximate ranking, plus
    ``ann_recall@<k>``, the recall of the exact top-``k`` (``k``: the depth the protocol ranked) on
    ``approximate.recall_sample`` random queries. Protocols with ``ranking_items`` (Revisited) rank the top
    ``approximate.ranking_depth``; a labelled item beyond it counts as not retrieved.
    """
    queries = checked_queries(queries, database, ground_truth)
    exclude_self = ground_truth.queries_are_database
    if approximate is not None:
        return _evaluate_approximate(queries, database, ground_truth, approximate, progress, device)
    if ground_truth.ranking_items is not None:
        positions = ranking_positions(
            queries, database, ground_truth.ranking_items, exclude_self=exclude_self, progress=progress, device=device
        )
        return ground_truth.evaluate_positions(positions)
    _, ranks = knn(queries, database, ground_truth.depth, exclude_self=exclude_self, progress=progress, device=device)
    return ground_truth.evaluate(ranks)


def _evaluate_approximate(
    queries, database, ground_truth: GroundTruth, settings: IVFPQSettings, progress: bool, device
) -> dict[str, float]:
    exclude_self = ground_truth.queries_are_database
    index = IVFPQIndex.build(database, settings, progress=progress)
    candidates = ground_truth.num_database - int(exclude_self)
    if ground_truth.ranking_items is not None:
        depth = min(settings.ranking_depth, candidates)
        _, ranks = index.search(queries, depth, exclude_self=exclude_self, progress=progress)
        metrics = ground_truth.evaluate_positions(positions_in_rankings(ranks, ground_truth.ranking_items))
    else:
        _, ranks = index.search(queries, ground_truth.depth, exclude_self=exclude_self, progress=progress)
        metrics = ground_truth.evaluate(ranks)
    if settings.recall_sample:
        rng = np.random.default_rng(settings.seed)
        num_queries, depth = len(ranks), ranks.shape[1]
        rows = np.sort(rng.choice(num_queries, min(settings.recall_sample, num_queries), replace=False))
        _, exact = sampled_exact_knn(queries, database, rows, depth, exclude_self=exclude_self, device=device)
        metrics[f"ann_recall@{depth}"] = recall_against_exact(ranks[rows], exact, depth)
    return metrics


def checked_queries(queries, database, ground_truth: GroundTruth):
    """The queries to search with (the database itself for leave-one-out), checked against the ground truth."""
    if ground_truth.queries_are_database:
        queries = database
    if len(queries) != ground_truth.num_queries or len(database) != ground_truth.num_database:
        raise ValueError(
            f"got {len(queries)} query and {len(database)} database embeddings; the ground truth has "
            f"{ground_truth.num_queries} queries and {ground_truth.num_database} database items"
        )
    return queries


def evaluate_scores(scores, ground_truth: GroundTruth) -> dict[str, float]:
    """Score a method that gives every (query, database item) pair a similarity (``[num_queries, num_database]``,
    e.g. an aggregated-kernel search) with the benchmark's protocol: the ranking is the one :func:`knn` would
    return (score descending, equal scores by ascending database index); with ``ranking_items`` only those
    items' places are kept, one query at a time, so no ``[queries, database]`` ranking is held."""
    scores = np.asarray(scores)
    expected = (ground_truth.num_queries, ground_truth.num_database)
    if scores.ndim != 2 or scores.shape != expected:
        raise ValueError(f"scores must be [num_queries, num_database] = {list(expected)}, got shape {scores.shape}")
    if ground_truth.queries_are_database:
        scores = scores.copy()
        np.fill_diagonal(scores, -np.inf)  # a query is not its own result
    if ground_truth.ranking_items is None:
        depth = ground_truth.depth
        return ground_truth.evaluate(np.stack([np.argsort(-row, kind="stable")[:depth] for row in scores]))
    positions = []
    for row, items in zip(scores, ground_truth.ranking_items):
        places = np.empty(len(row), dtype=np.int64)
        places[np.argsort(-row, kind="stable")] = np.arange(len(row))
        positions.append(places[np.asarray(items, dtype=np.int64)])
    return ground_truth.evaluate_positions(positions)

"""The one evaluation path: embeddings -> exact search -> the benchmark's own protocol."""

from __future__ import annotations

from retrieval.ground_truth import GroundTruth
from retrieval.search import knn


def evaluate_embeddings(queries, database, ground_truth: GroundTruth, progress: bool = False) -> dict[str, float]:
    """Rank ``database`` for every query by inner product and score the ranking with ``ground_truth``.

    Embeddings are compared by inner product, so methods hand over L2-normalised embeddings for cosine
    similarity. For leave-one-out protocols (``ground_truth.queries_are_database``) ``queries`` is ignored
    and may be ``None``.
    """
    if ground_truth.queries_are_database:
        queries = database
    if len(queries) != ground_truth.num_queries or len(database) != ground_truth.num_database:
        raise ValueError(
            f"got {len(queries)} query and {len(database)} database embeddings; the ground truth has "
            f"{ground_truth.num_queries} queries and {ground_truth.num_database} database items"
        )
    _, ranks = knn(
        queries, database, ground_truth.depth, exclude_self=ground_truth.queries_are_database, progress=progress
    )
    return ground_truth.evaluate(ranks)

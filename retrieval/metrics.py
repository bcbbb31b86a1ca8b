"""Retrieval metrics of the published protocols, as fractions in [0, 1].

Rankings follow the project contract: ``int [num_queries, k]`` arrays of 0-based database indices, best
first. ``-1`` marks an empty slot (a list shorter than ``k``); a list of 1-D arrays of unequal length is
accepted too. Positives are given per query as an array of database indices.

* :func:`recall_at_k` - "Recall@K" of the metric-learning (SOP) and place-recognition (Pittsburgh) papers.
* :func:`map_at_k` - mAP@k of the Google Landmarks v2 retrieval challenge.
* :func:`revisited_map` - mAP and mP@k of Revisited Oxford/Paris (Radenovic et al., CVPR 2018), easy /
  medium / hard; :func:`revisited_map_at_positions` the same from the places of the labelled images in the
  full ranking (no ranking needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

REVISITED_MODES = ("easy", "medium", "hard")


def recall_at_k(ranks, positives: Sequence, ks: Sequence[int], exclude_empty: bool = False) -> dict[int, float]:
    """Fraction of queries with at least one positive among their first ``k`` results, for each ``k``.

    Args:
        ranks: rankings ``[num_queries, depth]``.
        positives: per query, the database indices that count as correct.
        ks: cut-offs; each must be at most the ranking depth.
        exclude_empty: leave queries without any positive out of the average. By default they stay in and
            count as misses, which is how the place-recognition code (NetVLAD and its PyTorch ports) counts
            Pittsburgh queries; every SOP query has positives, so there the choice does not matter.
    """
    hits = hit_matrix(ranks, positives)
    depth = hits.shape[1]
    for k in ks:
        if not 1 <= k <= depth:
            raise ValueError(f"recall@{k} needs rankings at least {k} deep; these are {depth} deep")
    if exclude_empty:
        hits = hits[np.array([len(p) > 0 for p in positives], dtype=bool)]
    if hits.shape[0] == 0:
        return {k: float("nan") for k in ks}
    # first_hit[q] = position of the first positive (depth when there is none).
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), depth)
    return {k: float(np.mean(first_hit < k)) for k in ks}


def map_at_k(ranks, positives: Sequence, k: int) -> float:
    """Mean average precision at ``k``, Google Landmarks v2 style.

    AP@k of a query is ``sum_i P(i) * rel(i) / min(#positives, k)`` over the first ``k`` positions. A
    database index that repeats earlier in the same list is skipped (it is neither a hit nor a miss, but it
    still occupies its position), as in the challenge's scoring code. Queries without positives are left
    out; a query whose list is empty scores 0.

    mAP@4, the metric the AE-SVC / (SS)2D paper reports on SOP, Pittsburgh30k and InShop, is this with ``k = 4``
    (the paper gives no formula; we read it as this standard AP@k): on SOP leave-one-out, so the query itself
    is neither ranked nor a positive; on Pittsburgh the positives are the database images within 25 m.
    Example: positives {a, b}, ranking (c, a, b, d): AP@4 = (1/2 + 2/3) / min(2, 4) = 0.583.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rankings = _as_ranking_matrix(ranks)[:, :k]
    num_positives = np.array([len(np.unique(p)) for p in positives], dtype=np.int64)
    hits = hit_matrix(rankings, positives) & first_occurrences(rankings)
    scored = num_positives > 0
    if not scored.any():
        return float("nan")
    hits, num_positives = hits[scored], num_positives[scored]
    positions = np.arange(1, hits.shape[1] + 1)
    precision = np.cumsum(hits, axis=1) / positions
    ap = (precision * hits).sum(axis=1) / np.minimum(num_positives, k)
    return float(ap.mean())


def revisited_map(ranks, gnd, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """mAP and mP@k of the Revisited Oxford/Paris protocol for the easy, medium and hard setups.

    ``gnd`` is the ``gnd`` list of a published ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (or the whole
    loaded dict): per query a dict with 0-based ``easy``, ``hard`` and ``junk`` database indices.

    Setups: easy counts ``easy`` as positive and ignores ``junk + hard``; medium counts ``easy + hard`` and
    ignores ``junk``; hard counts ``hard`` and ignores ``junk + easy``. Ignored (junk) images are removed
    from the list before positions are taken, AP is the trapezoidal area under the precision-recall curve
    over all positives of the query, and queries without positives in a setup are excluded from its mean.
    mP@k is the precision at ``min(k, position of the last retrieved positive)``, as in the published
    evaluation code. When ``ranks`` covers the whole database the numbers equal that code's output
    (divided by 100); with a truncated ranking, positives beyond it count as not retrieved.

    Returns keys ``<setup>/mAP`` and ``<setup>/mP@<k>``.
    """
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    rankings = _as_ranking_matrix(ranks)
    if len(gnd) != rankings.shape[0]:
        raise ValueError(f"{rankings.shape[0]} rankings given for {len(gnd)} ground-truth queries")
    _refuse_repeats(rankings)

    ranked = [ranking[ranking >= 0] for ranking in rankings]  # without the empty slots

    def places(query: int, images: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(ranked[query], images))

    return _revisited_scores(gnd, kappas, places)


def revisited_labelled(query_gnd: Mapping) -> np.ndarray:
    """The database images a Revisited query labels (easy, hard or junk), sorted, each once: the only
    images whose places in the ranking its metrics depend on."""
    return np.unique(np.concatenate(_revisited_sets(query_gnd, "medium")))


def revisited_map_at_positions(items: Sequence, positions: Sequence, gnd, kappas: Sequence[int] = (1, 5, 10)):
    """:func:`revisited_map` of the full ranking, from where the labelled images fall in it.

    ``items[q]`` holds database indices that include every easy, hard and junk image of query ``q``
    (e.g. :func:`revisited_labelled`), ``positions[q]`` their 0-based places in the query's ranking of the
    whole database (``-1``: not ranked). The result is exactly :func:`revisited_map` of that ranking: AP and
    mP@k depend only on these places (``retrieval.search.ranking_positions`` counts them without a sort).
    """
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    if not len(items) == len(positions) == len(gnd):
        raise ValueError(f"{len(items)} item lists and {len(positions)} position lists for {len(gnd)} queries")
    by_item = []  # per query, items sorted and their places in the same order, for lookups by searchsorted
    for query, (row_items, row_positions) in enumerate(zip(items, positions)):
        row_items = np.asarray(row_items, dtype=np.int64).reshape(-1)
        row_positions = np.asarray(row_positions, dtype=np.int64).reshape(-1)
        if row_items.shape != row_positions.shape:
            raise ValueError(f"query {query}: {len(row_items)} items but {len(row_positions)} positions")
        order = np.argsort(row_items, kind="stable")
        by_item.append((row_items[order], row_positions[order]))

    def places(query: int, images: np.ndarray) -> np.ndarray:
        sorted_items, sorted_positions = by_item[query]
        at = np.minimum(np.searchsorted(sorted_items, images), max(len(sorted_items) - 1, 0))
        found = sorted_items[at] == images if len(sorted_items) else np.zeros(len(images), dtype=bool)
        if not found.all():
            missing = np.unique(images[~found])[:5].tolist()
            raise ValueError(f"query {query}: the places of labelled images {missing} are missing")
        ranked = np.sort(sorted_positions[at])
        ranked = ranked[ranked >= 0]
        return ranked[np.concatenate([[True], ranked[1:] != ranked[:-1]])] if len(ranked) else ranked

    return _revisited_scores(gnd, kappas, places)


def _revisited_scores(gnd: Sequence[Mapping], kappas: Sequence[int], places) -> dict[str, float]:
    """Per-setup means of AP and mP@k; ``places(query, images)`` gives the sorted 0-based places of those
    of ``images`` that are ranked."""
    results: dict[str, float] = {}
    for mode in REVISITED_MODES:
        aps, precisions = [], []
        for query, query_gnd in enumerate(gnd):
            positive, junk = _revisited_sets(query_gnd, mode)
            if len(positive) == 0:
                continue
            ap, precision = _revisited_query(places(query, positive), places(query, junk), len(positive), kappas)
            aps.append(ap)
            precisions.append(precision)
        results[f"{mode}/mAP"] = float(np.mean(aps)) if aps else float("nan")
        for j, kappa in enumerate(kappas):
            results[f"{mode}/mP@{kappa}"] = float(np.mean([p[j] for p in precisions])) if aps else float("nan")
    return results


def rop_map(revisited_results: Sequence[Mapping[str, float]]) -> float:
    """The ROP average of the AMES paper: mean of the medium and hard mAP over the given datasets' results
    (e.g. ROxford and RParis, each with the 1M distractors: "ROP+1M")."""
    return float(np.mean([r[f"{setup}/mAP"] for r in revisited_results for setup in ("medium", "hard")]))


def positives_from_labels(query_labels, db_labels, same_set: bool = False) -> list[np.ndarray]:
    """Per query, the database indices with the same label (sorted).

    ``same_set=True`` is the leave-one-out case where the queries are the database (query ``i`` is database
    item ``i``): the query's own index is not its positive.
    """
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if same_set and len(query_labels) != len(db_labels):
        raise ValueError("same_set=True needs as many query labels as database labels")
    order = np.argsort(db_labels, kind="stable")
    sorted_labels = db_labels[order]
    starts = np.searchsorted(sorted_labels, query_labels, side="left")
    stops = np.searchsorted(sorted_labels, query_labels, side="right")
    positives = []
    for i, (start, stop) in enumerate(zip(starts, stops)):
        matches = np.sort(order[start:stop]).astype(np.int64)
        if same_set:
            matches = matches[matches != i]
        positives.append(matches)
    return positives


def positives_within_radius(query_xy, db_xy, radius: float = 25.0) -> list[np.ndarray]:
    """Per query, the database indices at most ``radius`` away (Euclidean, e.g. UTM metres), sorted.

    The Pittsburgh/Tokyo protocol: a database image within 25 m of the query is a correct match.
    """
    from scipy.spatial import cKDTree

    query_xy = np.asarray(query_xy, dtype=np.float64)
    db_xy = np.asarray(db_xy, dtype=np.float64)
    if len(db_xy) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(query_xy))]
    neighbours = cKDTree(db_xy).query_ball_point(query_xy, r=radius, return_sorted=True)
    return [np.asarray(n, dtype=np.int64) for n in neighbours]


def hit_matrix(ranks, positives: Sequence) -> np.ndarray:
    """``bool [num_queries, depth]``: whether each ranked item is a positive of its query."""
    rankings = _as_ranking_matrix(ranks)
    num_queries, depth = rankings.shape
    if len(positives) != num_queries:
        raise ValueError(f"{num_queries} rankings given for {len(positives)} queries with positives")
    pair_queries = np.repeat(np.arange(num_queries), [len(p) for p in positives])
    pair_items = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives]) if num_queries else []
    stride = int(max(rankings.max(initial=0), np.max(pair_items, initial=0))) + 1
    # Encode (query, item) pairs as one integer so one vectorised membership test covers all queries.
    valid = rankings >= 0
    encoded = np.arange(num_queries)[:, None] * stride + np.where(valid, rankings, 0)
    hits = np.isin(encoded, pair_queries * stride + pair_items) & valid
    return hits.reshape(num_queries, depth)


def first_occurrences(ranks) -> np.ndarray:
    """``bool [num_queries, depth]``: False where an index repeats one earlier in its list (or is padding)."""
    rankings = _as_ranking_matrix(ranks)
    order = np.argsort(rankings, axis=1, kind="stable")
    ordered = np.take_along_axis(rankings, order, axis=1)
    repeated_sorted = np.zeros_like(ordered, dtype=bool)
    repeated_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.ones_like(rankings, dtype=bool)
    np.put_along_axis(first, order, ~repeated_sorted, axis=1)
    return first & (rankings >= 0)


def _as_ranking_matrix(ranks) -> np.ndarray:
    """Rankings as an ``int64 [num_queries, depth]`` matrix, ragged lists padded with -1."""
    if hasattr(ranks, "detach"):
        ranks = ranks.detach().cpu().numpy()
    if isinstance(ranks, np.ndarray):
        if ranks.ndim != 2:
            raise ValueError(f"rankings must be [num_queries, depth], got shape {ranks.shape}")
        return ranks.astype(np.int64, copy=False)
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in ranks]
    depth = max((len(r) for r in rows), default=0)
    matrix = np.full((len(rows), depth), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def _refuse_repeats(rankings: np.ndarray) -> None:
    repeated = ~first_occurrences(rankings) & (rankings >= 0)
    if repeated.any():
        query, position = np.argwhere(repeated)[0]
        raise ValueError(
            f"the ranking of query {query} repeats database index {rankings[query, position]} "
            f"(position {position}); the Revisited protocol scores rankings without repeats"
        )


def _revisited_sets(query_gnd: Mapping, mode: str) -> tuple[np.ndarray, np.ndarray]:
    easy = np.asarray(query_gnd["easy"], dtype=np.int64).reshape(-1)
    hard = np.asarray(query_gnd["hard"], dtype=np.int64).reshape(-1)
    junk = np.asarray(query_gnd["junk"], dtype=np.int64).reshape(-1)
    if mode == "easy":
        return easy, np.concatenate([junk, hard])
    if mode == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def _revisited_query(positive_positions, junk_positions, num_positive, kappas) -> tuple[float, list[float]]:
    """AP and mP@k of one query from the sorted places of its ranked positives and junk images."""
    # Remove junk: each positive moves up by the number of junk images ranked before it.
    positions = positive_positions - np.searchsorted(junk_positions, positive_positions, side="left")
    if len(positions) == 0:
        return 0.0, [0.0 for _ in kappas]
    found = np.arange(len(positions))
    precision_before = np.where(positions == 0, 1.0, found / np.maximum(positions, 1))
    precision_after = (found + 1) / (positions + 1)
    ap = float(np.sum(precision_before + precision_after) / 2.0 / num_positive)
    one_based = positions + 1
    precisions = []
    for kappa in kappas:
        cutoff = min(int(one_based.max()), kappa)
        precisions.append(float(np.sum(one_based <= cutoff) / cutoff))
    return ap, precisions

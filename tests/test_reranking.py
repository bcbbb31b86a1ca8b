"""Re-ranking a global shortlist: fusion by hand, head + tail rankings, the places path against the full
ranking, tuning, and the pair chunks that spread scoring over processes."""

import numpy as np
import pytest
import torch

from retrieval import (
    GLDv2GroundTruth,
    LabelGroundTruth,
    PositivesGroundTruth,
    RevisitedGroundTruth,
    evaluate_embeddings,
    knn,
)
from retrieval.reranking import (
    DEFAULT_GAMMAS,
    DEFAULT_LAMBDAS,
    PairChunks,
    RerankingEvaluation,
    _leading_order,
    evaluate_reranked,
    fuse_scores,
    global_shortlist,
    metric_key,
    rerank_shortlist,
    tune_fusion,
)


def unit(*angles_degrees):
    angles = np.radians(angles_degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


class RecordingGroundTruth(PositivesGroundTruth):
    """Keeps the rankings it scores, to check the ranking the evaluation builds."""

    def evaluate(self, ranks):
        self.ranks = np.array(ranks)
        return super().evaluate(ranks)


def expected_ranking(shortlist, scores, logits, lam, gamma, depth, full_global):
    """The definition, row by row: the re-ranked head, then the global ranking without the head's items."""
    head = rerank_shortlist(shortlist, scores, logits, lam, gamma, depth)[:, :depth]
    rows = [np.concatenate([h, [item for item in g if item not in set(h)]]) for h, g in zip(head, full_global)]
    return np.array(rows, dtype=np.int64)


# ---- fusion --------------------------------------------------------------------------------------------------


def test_fusion_formula_on_one_query_by_hand():
    global_scores, logits = np.array([[0.9, 0.5, 0.1]]), np.array([[-2.0, 0.0, 3.0]])
    # sigmoid(-2) = 0.11920292, sigmoid(0) = 0.5, sigmoid(3) = 0.95257413; lambda = 0.5:
    # 0.45 + 0.05960146, 0.25 + 0.25, 0.05 + 0.47628707
    np.testing.assert_allclose(fuse_scores(global_scores, logits, 0.5, 1.0), [[0.50960146, 0.5, 0.52628707]])
    # gamma = 2: sigmoid(-4) = 0.01798621, sigmoid(6) = 0.99752738
    np.testing.assert_allclose(fuse_scores(global_scores, logits, 0.5, 2.0), [[0.45899311, 0.5, 0.54876369]])
    # lambda = 0.2, gamma = 1: 0.18 + 0.8 * 0.11920292, 0.1 + 0.4, 0.02 + 0.8 * 0.95257413
    np.testing.assert_allclose(fuse_scores(global_scores, logits, 0.2, 1.0), [[0.27536234, 0.5, 0.78205930]])
    shortlist = np.array([[7, 3, 5]])
    np.testing.assert_array_equal(rerank_shortlist(shortlist, global_scores, logits, 0.5, 1.0), [[5, 7, 3]])
    np.testing.assert_array_equal(rerank_shortlist(shortlist, global_scores, logits, 0.5, 2.0), [[5, 3, 7]])


def test_fusion_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        fuse_scores(np.zeros((1, 2)), np.array([[0.0, np.nan]]), 0.5, 1.0)
    with pytest.raises(ValueError, match="shape"):
        fuse_scores(np.zeros((1, 2)), np.zeros((1, 3)), 0.5, 1.0)
    with pytest.raises(ValueError, match="re-ranking depth"):
        rerank_shortlist(np.zeros((1, 2), dtype=np.int64), np.zeros((1, 2)), np.zeros((1, 2)), 0.5, 1.0, depth=3)


def test_equal_fused_scores_keep_the_global_order():
    shortlist, scores = np.array([[4, 2, 9, 1]]), np.array([[0.5, 0.5, 0.5, 0.5]])
    logits = np.array([[1.0, 2.0, 1.0, 2.0]])
    # Items 2 and 1 (logit 2) first, each pair in its shortlist order.
    np.testing.assert_array_equal(rerank_shortlist(shortlist, scores, logits, 0.5, 1.0), [[2, 1, 4, 9]])


def test_depth_reranks_only_the_first_entries():
    shortlist = np.array([[10, 11, 12, 13, 14]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    logits = np.array([[-9.0, 0.0, 9.0, 9.0, 9.0]])
    np.testing.assert_array_equal(
        rerank_shortlist(shortlist, scores, logits, 0.0, 1.0, depth=3), [[12, 11, 10, 13, 14]]
    )
    np.testing.assert_array_equal(rerank_shortlist(shortlist, scores, logits, 0.0, 1.0), [[12, 13, 14, 11, 10]])


def test_leading_order_is_the_start_of_the_stable_order_with_ties():
    rng = np.random.default_rng(5)
    fused = rng.integers(0, 4, (50, 30)).astype(np.float64)  # ties at every threshold
    full = np.argsort(-fused, axis=1, kind="stable")
    for count in (1, 5, 17, 29, 30, 31):
        np.testing.assert_array_equal(_leading_order(fused, count), full[:, :count])


# ---- rankings and metrics ------------------------------------------------------------------------------------


def test_lambda_one_reproduces_the_global_ranking_with_ties():
    rng = np.random.default_rng(0)
    # Small integer vectors: exact scores with many ties, which the global order breaks by index.
    database = rng.integers(-2, 3, (200, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, (15, 4)).astype(np.float32)
    ground_truth = LabelGroundTruth(rng.integers(0, 5, 15), rng.integers(0, 5, 200), recall_ks=(1, 10), map_ks=(50,))
    scores, shortlist = global_shortlist(queries, database, m=80)  # deeper than the protocol's 50
    logits = rng.standard_normal(shortlist.shape)
    for gamma in (0.1, 1.0, 10.0):
        np.testing.assert_array_equal(rerank_shortlist(shortlist, scores, logits, 1.0, gamma), shortlist)
    evaluation = RerankingEvaluation(ground_truth, queries, database, scores, shortlist)
    assert evaluation.global_metrics() == evaluate_embeddings(queries, database, ground_truth)
    assert evaluation.metrics(logits, 1.0, 0.3) == evaluation.global_metrics()
    assert evaluation.metrics(logits, 1.0, 0.3, depth=10) == evaluation.global_metrics()


def test_reranking_moves_a_positive_from_third_to_first_head_then_tail():
    database = unit(0, 10, 20, 30, 40)  # the global ranking of the query at 0 degrees is 0, 1, 2, 3, 4
    queries = unit(0)
    ground_truth = RecordingGroundTruth([[2, 4]], num_database=5, recall_ks=(1,), map_ks=(5,))
    scores, shortlist = global_shortlist(queries, database, m=3)
    np.testing.assert_array_equal(shortlist, [[0, 1, 2]])
    logits = np.array([[-5.0, -5.0, 5.0]])
    evaluation = RerankingEvaluation(ground_truth, queries, database, scores, shortlist)
    # Global: positives at places 3 and 5: AP@5 = (1/3 + 2/5) / 2.
    assert evaluation.global_metrics() == pytest.approx({"recall@1": 0.0, "mAP@5": (1 / 3 + 2 / 5) / 2})
    # Re-ranked head (2, 0, 1), then the untouched tail (3, 4): places 1 and 5, AP@5 = (1 + 2/5) / 2 = 0.7.
    metrics = evaluation.metrics(logits, 0.5, 1.0)
    np.testing.assert_array_equal(ground_truth.ranks, [[2, 0, 1, 3, 4]])
    assert metrics == pytest.approx({"recall@1": 1.0, "mAP@5": 0.7})
    assert evaluate_reranked(ground_truth, queries, database, scores, shortlist, logits, 0.5, 1.0) == metrics
    # Only the first two entries re-ranked: item 2 is not among them and stays third; 0 and 1 (equal logits)
    # keep their order, so the ranking is the global one.
    evaluation.metrics(logits, 0.5, 1.0, depth=2)
    np.testing.assert_array_equal(ground_truth.ranks, [[0, 1, 2, 3, 4]])


@pytest.mark.parametrize("depth", [None, 7])
def test_ranking_path_equals_the_definition_with_exclusions_and_leave_one_out(depth):
    rng = np.random.default_rng(1)
    database = rng.standard_normal((120, 8)).astype(np.float32)
    labels = rng.integers(0, 6, 120)
    ground_truth = RecordingGroundTruth(
        LabelGroundTruth(labels, recall_ks=(1, 10), map_ks=(40,)).positives,
        num_database=120,
        recall_ks=(1, 10),
        map_ks=(40,),
        queries_are_database=True,
    )
    # Some rows keep items of the global top out of the shortlist: the shortlist no longer starts the ranking.
    exclude = [rng.choice(120, 3, replace=False) if q % 3 == 0 else [] for q in range(120)]
    scores, shortlist = global_shortlist(None, database, m=25, exclude_self=True, exclude=exclude)
    assert not any(q in row for q, row in enumerate(shortlist))
    assert not any(set(row) & set(ex) for row, ex in zip(shortlist, exclude))
    _, full_global = knn(database, database, 119, exclude_self=True)
    logits = rng.standard_normal(shortlist.shape)
    evaluation = RerankingEvaluation(ground_truth, None, database, scores, shortlist)
    for lam, gamma in [(0.3, 1.0), (0.0, 5.0), (0.8, 0.2)]:
        metrics = evaluation.metrics(logits, lam, gamma, depth)
        expected = expected_ranking(shortlist, scores, logits, lam, gamma, depth or 25, full_global)[:, :40]
        np.testing.assert_array_equal(ground_truth.ranks, expected)
        assert metrics == PositivesGroundTruth.evaluate(ground_truth, expected)


def test_leave_one_out_refuses_a_shortlist_holding_the_query():
    database = unit(0, 1, 90, 91)
    ground_truth = LabelGroundTruth([0, 0, 1, 1], recall_ks=(1,), map_ks=())
    scores, shortlist = knn(database, database, 2)  # not leave-one-out: each row starts with the query
    with pytest.raises(ValueError, match="hold the query itself"):
        RerankingEvaluation(ground_truth, None, database, scores, shortlist)


def revisited_like(rng, num_queries, num_database):
    gnd = []
    for _ in range(num_queries):
        labelled = rng.choice(num_database, rng.integers(4, 20), replace=False)
        cut = np.sort(rng.choice(np.arange(1, len(labelled)), 2, replace=False))
        easy, hard, junk = np.split(labelled, cut)
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    return RevisitedGroundTruth(gnd, num_database, kappas=(1, 5, 10))


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("depth", [None, 15])
def test_places_path_equals_scoring_the_full_reranked_ranking(device, depth):
    rng = np.random.default_rng(2)
    # Few distinct directions: many tied scores, which both paths must order alike.
    database = rng.integers(-1, 2, (300, 6)).astype(np.float32)
    queries = rng.standard_normal((7, 6)).astype(np.float32)
    ground_truth = revisited_like(rng, 7, 300)
    # Put labelled images (junk included) inside the shortlist too, so they move within it.
    for q, query_gnd in enumerate(ground_truth.gnd):
        database[query_gnd["easy"][:2]] = queries[q] * 2
        database[query_gnd["junk"][:2]] = queries[q] * 3
    scores, shortlist = global_shortlist(queries, database, m=40, device=device)
    logits = rng.standard_normal(shortlist.shape) * 3
    _, full_global = knn(queries, database, 300)
    evaluation = RerankingEvaluation(ground_truth, queries, database, scores, shortlist, device=device)
    assert evaluation.global_metrics() == evaluate_embeddings(queries, database, ground_truth)
    assert evaluation.global_metrics() == ground_truth.evaluate(full_global)
    for lam, gamma in [(0.0, 1.0), (0.5, 0.2), (0.9, 10.0), (1.0, 1.0)]:
        full = expected_ranking(shortlist, scores, logits, lam, gamma, depth or 40, full_global)
        assert evaluation.metrics(logits, lam, gamma, depth) == ground_truth.evaluate(full)
    # The same from a global search done elsewhere.
    positions = [full_global[q].argsort()[items] for q, items in enumerate(ground_truth.ranking_items)]
    again = RerankingEvaluation.from_global(ground_truth, scores, shortlist, item_positions=positions)
    assert again.metrics(logits, 0.5, 0.2, depth) == evaluation.metrics(logits, 0.5, 0.2, depth)


def test_places_path_with_junk_kept_out_of_the_shortlist():
    rng = np.random.default_rng(3)
    database = rng.standard_normal((250, 5)).astype(np.float32)
    queries = rng.standard_normal((5, 5)).astype(np.float32)
    ground_truth = revisited_like(rng, 5, 250)
    for q, query_gnd in enumerate(ground_truth.gnd):
        database[query_gnd["junk"]] = queries[q] * 4  # junk would fill the top of the shortlist
    exclude = [query_gnd["junk"] for query_gnd in ground_truth.gnd]
    scores, shortlist = global_shortlist(queries, database, m=30, exclude=exclude)
    logits = rng.standard_normal(shortlist.shape)
    _, full_global = knn(queries, database, 250)
    evaluation = RerankingEvaluation(ground_truth, queries, database, scores, shortlist)
    for depth in (30, 12):
        full = expected_ranking(shortlist, scores, logits, 0.4, 0.5, depth, full_global)
        assert evaluation.metrics(logits, 0.4, 0.5, depth) == ground_truth.evaluate(full)


# ---- tuning --------------------------------------------------------------------------------------------------


def tuning_case():
    """Two queries whose positives need opposite pulls (worked out by hand).

    Query 0: positive 2 is third globally (0.9, 0.8, 0.7) but has the only high logit: first iff
    0.7 l + (1 - l) s(+) > 0.9 l + (1 - l) s(-). Query 1: positive 3 is first (0.9, 0.2, 0.1) but item 4 has the
    high logit: first iff 0.9 l + (1 - l) s(-) > 0.2 l + (1 - l) s(+). With logits +-10: gamma 1 gives
    s = 1 or 0, so 0.588 < l < 0.833; gamma 0.1 gives s = 0.731 or 0.269, so 0.398 < l < 0.698.
    """
    ground_truth = PositivesGroundTruth([[2], [3]], num_database=6, recall_ks=(1,), map_ks=(3,))
    shortlist = np.array([[0, 1, 2], [3, 4, 5]])
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.2, 0.1]])
    logits = np.array([[-10.0, -10.0, 10.0], [-10.0, 10.0, -10.0]])
    evaluation = RerankingEvaluation.from_global(ground_truth, scores, shortlist, global_ranks=shortlist)
    return evaluation, logits


def test_tuning_picks_the_known_best_grid_point_first_in_grid_order():
    evaluation, logits = tuning_case()
    lambdas, gammas = [0.0, 0.25, 0.5, 0.75, 1.0], [0.1, 1.0]
    best, value, table = tune_fusion(evaluation, logits, lambdas, gammas, depths=[1, 3], metric="mAP@3")
    # Both queries right only at (0.5, 0.1) and (0.75, 1.0) on the full shortlist; the first in grid order wins.
    assert best == (0.5, 0.1, 3)
    assert value == 1.0
    assert [(row["lambda"], row["gamma"], row["depth"]) for row in table if row["value"] == 1.0] == [
        (0.5, 0.1, 3),
        (0.75, 1.0, 3),
    ]
    assert [(row["lambda"], row["gamma"], row["depth"]) for row in table[:3]] == [
        (0.0, 0.1, 1),
        (0.0, 1.0, 1),
        (0.25, 0.1, 1),
    ]
    assert len(table) == 2 * 5 * 2
    # Depth 1 re-ranks one item: the global ranking, AP@3 = (1/3 + 1) / 2 at every lambda and gamma.
    assert [row["value"] for row in table if row["depth"] == 1] == [pytest.approx((1 / 3 + 1) / 2)] * 10
    assert table[0]["metrics"] == evaluation.global_metrics()
    # Without the (0.5, 0.1) point the other maximum is chosen.
    best, _, _ = tune_fusion(evaluation, logits, [0.25, 0.75, 1.0], gammas, metric=lambda m: m["mAP@3"])
    assert best == (0.75, 1.0, 3)


def test_default_grids():
    assert DEFAULT_LAMBDAS[0] == 0.0 and DEFAULT_LAMBDAS[-1] == 1.0 and len(DEFAULT_LAMBDAS) == 21
    assert 0.35 in DEFAULT_LAMBDAS and 0.55 in DEFAULT_LAMBDAS and 0.85 in DEFAULT_LAMBDAS  # published choices
    assert {0.1, 0.2, 0.3, 0.8} <= set(DEFAULT_GAMMAS)
    evaluation, logits = tuning_case()
    best, value, table = tune_fusion(evaluation, logits, metric="mAP@3")
    assert len(table) == len(DEFAULT_LAMBDAS) * len(DEFAULT_GAMMAS) and value == 1.0


def test_metric_names():
    gldv2 = {"public/mAP@100": 0.3, "private/mAP@100": 0.2}
    assert metric_key({"public/mAP@100": 0.3}, "mAP@100") == "public/mAP@100"
    assert metric_key(gldv2, "private/mAP@100") == "private/mAP@100"
    with pytest.raises(ValueError, match="ambiguous"):
        metric_key(gldv2, "mAP@100")
    with pytest.raises(ValueError, match=r"available: \['private/mAP@100', 'public/mAP@100'\]"):
        metric_key(gldv2, "recall@1")
    ground_truth = GLDv2GroundTruth([[0], [1]], ["public", "private"], num_database=6, k=3)
    shortlist = np.array([[1, 0, 2], [1, 0, 2]])
    evaluation = RerankingEvaluation.from_global(ground_truth, np.ones((2, 3)), shortlist, global_ranks=shortlist)
    best, value, _ = tune_fusion(evaluation, np.array([[0.0, 9.0, 0.0]] * 2), [1.0, 0.0], [1.0], metric="public/mAP@3")
    assert best == (0.0, 1.0, 3) and value == 1.0


# ---- pair chunks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pair_chunks_cover_every_pair_once_and_assemble_direct_scoring(world_size):
    rng = np.random.default_rng(4)
    num_queries, length = 5, 7
    query_embeddings = torch.from_numpy(rng.standard_normal((num_queries, 6)).astype(np.float32))
    database = torch.from_numpy(rng.standard_normal((40, 6)).astype(np.float32))
    shortlist = np.stack([rng.choice(40, length, replace=False) for _ in range(num_queries)])
    scorer = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def score(rows, columns):
        pairs = torch.cat([query_embeddings[rows], database[shortlist[rows, columns]]], dim=1)
        with torch.no_grad():
            return scorer(pairs).squeeze(1)

    chunks = PairChunks(num_queries, length, chunk_size=4)
    assert len(chunks) == 9  # 35 pairs
    results, seen = {}, []
    for rank in range(world_size):
        for chunk in chunks.chunks_for(rank, world_size):
            assert chunk.index % world_size == rank
            seen.extend(zip(chunk.query_rows.tolist(), chunk.shortlist_columns.tolist()))
            results[chunk.index] = score(chunk.query_rows, chunk.shortlist_columns)
    assert sorted(seen) == [(q, c) for q in range(num_queries) for c in range(length)]
    logits = chunks.assemble(results)
    direct = score(np.repeat(np.arange(num_queries), length), np.tile(np.arange(length), num_queries)).numpy()
    # One batch of all pairs may round differently from the chunks: what fixed chunks avoid across world sizes.
    np.testing.assert_allclose(logits, direct.reshape(num_queries, length), rtol=1e-5, atol=1e-6)
    # Bitwise the same as one process, chunk for chunk.
    single = PairChunks(num_queries, length, chunk_size=4)
    reference = single.assemble({c.index: score(c.query_rows, c.shortlist_columns) for c in single.chunks_for(0, 1)})
    assert logits.dtype == np.float32 and np.array_equal(logits, reference)


def test_assemble_names_missing_chunks():
    chunks = PairChunks(3, 4, chunk_size=5)  # 12 pairs: chunks of 5, 5 and 2
    assert [len(chunks.chunk(i).query_rows) for i in range(3)] == [5, 5, 2]
    with pytest.raises(ValueError, match="1 of 3 chunks have no logits: 1"):
        chunks.assemble({0: np.zeros(5), 2: np.zeros(2)})
    with pytest.raises(ValueError, match="chunk 2 holds 2 pairs"):
        chunks.assemble({0: np.zeros(5), 1: np.zeros(5), 2: np.zeros(3)})
    with pytest.raises(ValueError, match="rank must be in"):
        chunks.chunks_for(2, 2)

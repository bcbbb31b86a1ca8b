"""Metrics against hand-computed cases and against deliberately simple loop implementations."""

import numpy as np
import pytest

from retrieval.metrics import (
    map_at_k,
    positives_from_labels,
    positives_within_radius,
    recall_at_k,
    revisited_labelled,
    revisited_map,
    revisited_map_at_positions,
)


def places_of_labelled(ranks, gnd):
    """Per query, the labelled images and their 0-based places in the (full) ranking."""
    items = [revisited_labelled(query_gnd) for query_gnd in gnd]
    places = [np.argsort(ranking)[labelled] for ranking, labelled in zip(np.asarray(ranks), items)]
    return items, places


# ---- hand-computed cases ------------------------------------------------------------------------------------


def test_recall_at_k_hand_computed():
    ranks = np.array([[3, 1, 2], [0, 2, 1], [4, 5, 6]])
    positives = [np.array([1]), np.array([0, 2]), np.array([9])]
    # query 0: first hit at position 2; query 1: position 1; query 2: never.
    assert recall_at_k(ranks, positives, [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_recall_counts_queries_without_positives_as_misses_unless_excluded():
    ranks = np.array([[0, 1], [1, 0]])
    positives = [np.array([0]), np.array([], dtype=np.int64)]
    assert recall_at_k(ranks, positives, [1]) == {1: 0.5}
    assert recall_at_k(ranks, positives, [1], exclude_empty=True) == {1: 1.0}


def test_recall_refuses_k_deeper_than_the_ranking():
    with pytest.raises(ValueError, match="at least 5 deep"):
        recall_at_k(np.array([[0, 1]]), [np.array([0])], [5])


def test_recall_with_padding_and_ragged_lists():
    # -1 marks an empty slot; ragged lists are padded the same way.
    positives = [np.array([7]), np.array([3])]
    assert recall_at_k(np.array([[2, -1], [3, -1]]), positives, [2]) == {2: 0.5}
    assert recall_at_k([[2], [5, 3]], positives, [1, 2]) == {1: 0.0, 2: 0.5}


def test_map_at_k_hand_computed():
    # Hits at positions 2 and 4 of 4, two positives: AP = (1/2 + 2/4) / 2 = 0.5.
    assert map_at_k(np.array([[1, 0, 2, 3]]), [np.array([0, 3])], 4) == pytest.approx(0.5)
    # Normalised by min(#positives, k): 3 positives, k = 2, hits at 1 and 2 -> (1 + 1) / 2.
    assert map_at_k(np.array([[5, 6, 7]]), [np.array([5, 6, 7])], 2) == pytest.approx(1.0)
    # One hit at position 3 out of 5 positives, k = 3: (1/3) / 3.
    assert map_at_k(np.array([[9, 8, 1]]), [np.arange(5)], 3) == pytest.approx(1 / 9)


def test_map_at_k_skips_repeated_indices_but_keeps_their_position():
    # GLDv2 scoring: the repeated 0 is neither hit nor miss, yet the hit on 1 is at position 3.
    assert map_at_k(np.array([[0, 0, 1]]), [np.array([0, 1])], 3) == pytest.approx((1 + 2 / 3) / 2)


def test_map_at_k_empty_rankings_score_zero_and_queries_without_positives_are_excluded():
    ranks = [[], [4, 2], [0]]
    positives = [np.array([1]), np.array([2]), np.array([], dtype=np.int64)]
    # query 0 (empty list) = 0, query 1 = (1/2)/1, query 2 excluded.
    assert map_at_k(ranks, positives, 2) == pytest.approx(0.25)


def test_revisited_map_hand_computed():
    # Database of 6 images; the ranking is [1, 0, 3, 2, 4, 5] for both queries.
    gnd = [
        {"easy": [0], "hard": [2], "junk": [1]},
        {"easy": [3], "hard": [], "junk": []},
    ]
    ranks = np.array([[1, 0, 3, 2, 4, 5], [1, 0, 3, 2, 4, 5]])
    result = revisited_map(ranks, gnd, kappas=(1, 5))
    # Query 0, easy: positive 0 at position 1, junk {1, 2} -> one junk before it -> position 0: AP 1.
    # Query 1, easy: positive 3 at position 2, no junk: trapezoid (0/2 + 1/3) / 2 = 1/6.
    assert result["easy/mAP"] == pytest.approx((1 + 1 / 6) / 2)
    # mP@k uses k' = min(k, last positive position): query 0 -> 1/1; query 1 -> position 3, k'=1 -> 0.
    assert result["easy/mP@1"] == pytest.approx(0.5)
    # query 1, k=5: k' = min(5, 3) = 3 -> 1/3.
    assert result["easy/mP@5"] == pytest.approx((1 + 1 / 3) / 2)
    # Medium, query 0: positives {0, 2} at 1 and 3, junk {1} at 0 -> positions 0 and 2.
    #   AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 2 = 0.5 + 0.291666...
    # Medium, query 1: same as easy (1/6).
    assert result["medium/mAP"] == pytest.approx((0.5 + 7 / 24 + 1 / 6) / 2)
    assert result["medium/mP@5"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # Hard: only query 0 has a hard positive (2, at 3; junk {1, 0} before it -> position 1):
    #   AP = (0/1 + 1/2) / 2 = 0.25; query 1 is excluded from the hard mean.
    assert result["hard/mAP"] == pytest.approx(0.25)
    assert result["hard/mP@1"] == pytest.approx(0.0)
    assert result["hard/mP@5"] == pytest.approx(0.5)
    # The same numbers from where the labelled images fall: query 0 labels {0, 1, 2} at places 1, 0, 3.
    items, places = places_of_labelled(ranks, gnd)
    assert [p.tolist() for p in places] == [[1, 0, 3], [2]]
    assert revisited_map_at_positions(items, places, gnd, kappas=(1, 5)) == result


def test_revisited_from_positions_needs_every_labelled_image():
    gnd = [{"easy": [0, 4], "hard": [], "junk": [2]}]
    with pytest.raises(ValueError, match=r"query 0: the places of labelled images \[4\] are missing"):
        revisited_map_at_positions([np.array([0, 2])], [np.array([0, 1])], gnd)
    with pytest.raises(ValueError, match="query 0: 3 items but 2 positions"):
        revisited_map_at_positions([np.array([0, 2, 4])], [np.array([0, 1])], gnd)


def test_revisited_refuses_rankings_with_repeats():
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="repeats database index 2"):
        revisited_map(np.array([[2, 0, 2]]), gnd)


def test_revisited_accepts_the_loaded_pickle_dict():
    gnd = {"gnd": [{"easy": [1], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}], "imlist": ["a", "b"], "qimlist": ["q"]}
    assert revisited_map(np.array([[1, 0]]), gnd)["easy/mAP"] == pytest.approx(1.0)


def test_positives_from_labels():
    positives = positives_from_labels([1, 2, 3], [2, 1, 1, 5])
    assert [p.tolist() for p in positives] == [[1, 2], [0], []]
    # Leave-one-out: the query itself is not its own positive.
    same = positives_from_labels([7, 7, 8], [7, 7, 8], same_set=True)
    assert [p.tolist() for p in same] == [[1], [0], []]


def test_positives_within_radius_includes_the_boundary():
    database = np.array([[0.0, 0.0], [25.0, 0.0], [25.0001, 0.0], [3.0, 4.0]])
    positives = positives_within_radius(np.array([[0.0, 0.0], [100.0, 100.0]]), database, radius=25.0)
    assert positives[0].tolist() == [0, 1, 3]
    assert positives[1].tolist() == []


# ---- against deliberately simple loop implementations ----------------------------------------------------------


def simple_recall(ranks, positives, k):
    hits = 0
    for ranking, positive in zip(ranks, positives):
        if any(item in set(positive.tolist()) for item in ranking[:k]):
            hits += 1
    return hits / len(ranks)


def simple_map(ranks, positives, k):
    aps = []
    for ranking, positive in zip(ranks, positives):
        positive = set(positive.tolist())
        if not positive:
            continue
        seen, found, total = set(), 0, 0.0
        for position, item in enumerate(ranking[:k], start=1):
            if item in seen:
                continue
            seen.add(item)
            if item in positive:
                found += 1
                total += found / position
        aps.append(total / min(len(positive), k))
    return sum(aps) / len(aps)


def simple_revisited(ranks, gnd, kappas):
    """Junk removed from the list first, then the trapezoidal AP summed positive by positive."""
    result = {}
    setups = {
        "easy": (lambda g: g["easy"], lambda g: g["junk"] + g["hard"]),
        "medium": (lambda g: g["easy"] + g["hard"], lambda g: g["junk"]),
        "hard": (lambda g: g["hard"], lambda g: g["junk"] + g["easy"]),
    }
    for setup, (ok_of, junk_of) in setups.items():
        aps, precisions = [], []
        for ranking, g in zip(ranks, gnd):
            ok, junk = set(ok_of(g)), set(junk_of(g))
            if not ok:
                continue
            cleaned = [item for item in ranking if item not in junk]
            ap, found, last_position = 0.0, 0, 0
            for position, item in enumerate(cleaned):
                if item in ok:
                    before = 1.0 if position == 0 else found / position
                    found += 1
                    after = found / (position + 1)
                    ap += (before + after) / 2 / len(ok)
                    last_position = position + 1
            aps.append(ap)
            row = []
            for kappa in kappas:
                cut = min(last_position, kappa)
                row.append(sum(1 for item in cleaned[:cut] if item in ok) / cut if cut else 0.0)
            precisions.append(row)
        result[f"{setup}/mAP"] = sum(aps) / len(aps)
        for j, kappa in enumerate(kappas):
            result[f"{setup}/mP@{kappa}"] = sum(p[j] for p in precisions) / len(precisions)
    return result


@pytest.mark.parametrize("seed", range(5))
def test_recall_and_map_match_simple_loops_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_database, depth = 40, 60, 25
    ranks = np.stack([rng.permutation(num_database)[:depth] for _ in range(num_queries)])
    ranks[rng.random(ranks.shape) < 0.1] = rng.integers(0, num_database)  # some repeats
    positives = [rng.choice(num_database, rng.integers(0, 8), replace=False) for _ in range(num_queries)]
    positives[0] = rng.choice(num_database, 3, replace=False)  # at least one query with positives
    for k in (1, 5, 25):
        assert recall_at_k(ranks, positives, [k])[k] == pytest.approx(simple_recall(ranks, positives, k))
        assert map_at_k(ranks, positives, k) == pytest.approx(simple_map(ranks, positives, k))


@pytest.mark.parametrize("seed", range(5))
def test_revisited_matches_simple_loops_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    num_database = 80
    gnd = []
    for _ in range(15):
        labelled = rng.permutation(num_database)[: rng.integers(0, 20)]
        cut1, cut2 = sorted(rng.integers(0, len(labelled) + 1, size=2))
        gnd.append(
            {"easy": labelled[:cut1].tolist(), "hard": labelled[cut1:cut2].tolist(), "junk": labelled[cut2:].tolist()}
        )
    gnd[0] = {"easy": [1, 2], "hard": [3], "junk": [4]}  # every setup has at least one scored query
    full = np.stack([rng.permutation(num_database) for _ in gnd])
    for ranks in (full, full[:, :30]):  # the whole database, and a truncated ranking
        ours = revisited_map(ranks, gnd, (1, 5, 10))
        reference = simple_revisited(ranks.tolist(), gnd, (1, 5, 10))
        assert ours.keys() == reference.keys()
        for key in ours:
            assert ours[key] == pytest.approx(reference[key]), key
    # From the places of the labelled images in the full ranking: the very same numbers.
    from_positions = revisited_map_at_positions(*places_of_labelled(full, gnd), gnd, (1, 5, 10))
    assert from_positions == revisited_map(full, gnd, (1, 5, 10))

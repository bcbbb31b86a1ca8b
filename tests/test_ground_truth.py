"""Ground-truth objects and the one evaluation path on tiny hand-built datasets."""

import numpy as np
import pytest

from retrieval import LabelGroundTruth, RadiusGroundTruth, RevisitedGroundTruth, evaluate_embeddings, knn


def unit(*angles_degrees):
    angles = np.radians(angles_degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_labels_with_separate_queries_hand_computed(device):
    database = unit(0, 10, 90, 100, 180)
    queries = unit(5, 95, 170)
    ground_truth = LabelGroundTruth([0, 1, 0], [0, 0, 1, 1, 2], recall_ks=(1, 2), map_ks=(2,))
    metrics = evaluate_embeddings(queries, database, ground_truth, device=device)
    # q0 -> [0, 1] both class 0; q1 -> [2, 3] both class 1; q2 (class 0) -> [4 (class 2), 3 (class 1)]
    assert metrics["recall@1"] == pytest.approx(2 / 3)
    assert metrics["recall@2"] == pytest.approx(2 / 3)
    assert metrics["mAP@2"] == pytest.approx((1 + 1 + 0) / 3)


def test_leave_one_out_never_retrieves_the_query_itself():
    database = unit(0, 1, 90, 91, 180)
    ground_truth = LabelGroundTruth([0, 0, 1, 1, 2], recall_ks=(1,), map_ks=())
    # Each image's nearest other image has its label, except the lone class-2 image (no positive: a miss).
    assert evaluate_embeddings(None, database, ground_truth) == {"recall@1": pytest.approx(4 / 5)}


def test_place_recognition_radius():
    database = unit(0, 45, 90)
    queries = unit(44, 89)
    utm_database = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 30.0]])
    utm_queries = np.array([[80.0, 0.0], [0.0, 0.0]])  # q0 within 25 m of db1; q1 within 25 m of db0 only
    ground_truth = RadiusGroundTruth(utm_queries, utm_database, radius=25.0, recall_ks=(1, 2))
    # q0's nearest is db1 (correct); q1's nearest is db2 (30 m away), then db1 -> no positive in the top 2.
    # mAP@4 (whole list of 3): q0's positive first -> 1; q1's positive db0 comes third (db2, db1, db0) -> 1/3.
    expected = {"recall@1": 0.5, "recall@2": 0.5, "mAP@4": pytest.approx((1 + 1 / 3) / 2)}
    assert evaluate_embeddings(queries, database, ground_truth) == expected


def test_revisited_ranks_the_whole_database():
    database = unit(0, 20, 40, 60)
    queries = unit(0)
    gnd = [{"easy": [1], "hard": [3], "junk": [0]}]
    ground_truth = RevisitedGroundTruth(gnd, num_database=4, kappas=(1,))
    assert ground_truth.depth == 4
    metrics = evaluate_embeddings(queries, database, ground_truth)
    # Ranking [0, 1, 2, 3]; medium: junk 0 removed -> positives 1 and 3 at positions 0 and 2.
    assert metrics["medium/mAP"] == pytest.approx(((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert metrics["easy/mAP"] == pytest.approx(1.0)


def test_embedding_counts_must_match_the_ground_truth():
    with pytest.raises(ValueError, match="got 2 query and 5 database embeddings; the ground truth has 3 queries"):
        evaluate_embeddings(unit(0, 1), unit(0, 1, 2, 3, 4), LabelGroundTruth([0, 1, 0], [0, 0, 1, 1, 2]))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_revisited_positive_tied_with_a_distractor_ranks_after_it(device):
    # db1 (distractor) and db2 (easy) are the same image, tied with the query; the lower index ranks first:
    # ranking 1, 2, 3 (junk), 0, 4 (hard).
    database = unit(30, 10, 10, 0, 50)
    queries = unit(10)
    gnd = [{"easy": [2], "hard": [4], "junk": [3]}]
    ground_truth = RevisitedGroundTruth(gnd, num_database=5, kappas=(1, 5))
    metrics = evaluate_embeddings(queries, database, ground_truth, device=device)
    # Easy (junk 3 and 4 removed): 1, 2, 0 -> positive at place 1: AP = (0/1 + 1/2) / 2.
    assert metrics["easy/mAP"] == pytest.approx(0.25)
    # Medium (junk 3 removed): 1, 2, 0, 4 -> positives at places 1 and 3: AP = [(0 + 1/2)/2 + (1/3 + 2/4)/2] / 2.
    assert metrics["medium/mAP"] == pytest.approx((0.25 + 5 / 12) / 2)
    assert metrics["medium/mP@1"] == 0.0 and metrics["medium/mP@5"] == pytest.approx(2 / 4)
    # Hard (junk 3 and 2 removed): 1, 0, 4 -> place 2: AP = (0/2 + 1/3) / 2.
    assert metrics["hard/mAP"] == pytest.approx(1 / 6)
    assert metrics == ground_truth.evaluate(knn(queries, database, 5)[1])


def random_gnd(rng, num_queries, num_database):
    gnd = []
    for _ in range(num_queries):
        labelled = rng.choice(num_database, rng.integers(1, 60), replace=False)
        cut1, cut2 = sorted(rng.integers(0, len(labelled) + 1, size=2))
        gnd.append({"easy": labelled[:cut1], "hard": labelled[cut1:cut2], "junk": labelled[cut2:]})
    return gnd


@pytest.mark.parametrize("values", ["integers", "floats"])
def test_revisited_scored_from_positions_equals_the_full_sort(values):
    rng = np.random.default_rng(5)
    if values == "integers":  # many exact ties, positives and junk among them
        queries, database = rng.integers(-2, 3, (20, 4)), rng.integers(-2, 3, (2000, 4))
    else:
        queries, database = rng.standard_normal((20, 8)), rng.standard_normal((2000, 8))
    queries, database = queries.astype(np.float32), database.astype(np.float32)
    ground_truth = RevisitedGroundTruth(random_gnd(rng, 20, 2000), num_database=2000)
    full_sort = ground_truth.evaluate(knn(queries, database, ground_truth.depth)[1])
    assert evaluate_embeddings(queries, database, ground_truth) == full_sort
    torch_full_sort = ground_truth.evaluate(knn(queries, database, ground_truth.depth, device="cpu")[1])
    assert evaluate_embeddings(queries, database, ground_truth, device="cpu") == torch_full_sort
    if values == "integers":  # exact scores: the torch path ranks exactly as the CPU path
        assert torch_full_sort == full_sort

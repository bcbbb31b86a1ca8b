"""Ground-truth objects and the one evaluation path on tiny hand-built datasets."""

import numpy as np
import pytest

from retrieval import LabelGroundTruth, RadiusGroundTruth, RevisitedGroundTruth, evaluate_embeddings


def unit(*angles_degrees):
    angles = np.radians(angles_degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def test_labels_with_separate_queries_hand_computed():
    database = unit(0, 10, 90, 100, 180)
    queries = unit(5, 95, 170)
    ground_truth = LabelGroundTruth([0, 1, 0], [0, 0, 1, 1, 2], recall_ks=(1, 2), map_ks=(2,))
    metrics = evaluate_embeddings(queries, database, ground_truth)
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
    assert evaluate_embeddings(queries, database, ground_truth) == {"recall@1": 0.5, "recall@2": 0.5}


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

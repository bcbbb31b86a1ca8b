"""Lightning-free retrieval core: exact search, the benchmarks' metrics, ground truth, feature stores."""

from retrieval.evaluation import evaluate_embeddings
from retrieval.feature_store import FeatureStore, FeatureStoreError, FeatureStoreWriter, write_feature_store
from retrieval.ground_truth import (
    GLDv2GroundTruth,
    GroundTruth,
    LabelGroundTruth,
    PositivesGroundTruth,
    RadiusGroundTruth,
    RevisitedGroundTruth,
)
from retrieval.metrics import (
    map_at_k,
    positives_from_labels,
    positives_within_radius,
    recall_at_k,
    revisited_map,
    rop_map,
)
from retrieval.search import knn

__all__ = [
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreWriter",
    "GLDv2GroundTruth",
    "GroundTruth",
    "LabelGroundTruth",
    "PositivesGroundTruth",
    "RadiusGroundTruth",
    "RevisitedGroundTruth",
    "evaluate_embeddings",
    "knn",
    "map_at_k",
    "positives_from_labels",
    "positives_within_radius",
    "recall_at_k",
    "revisited_map",
    "rop_map",
    "write_feature_store",
]

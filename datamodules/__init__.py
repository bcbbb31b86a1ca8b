"""One LightningDataModule per dataset family, plus the feature-store datamodules."""

from datamodules.base import EvalSet, RetrievalDataModule
from datamodules.embedded import EmbeddedBenchmark, EmbeddedBenchmarkSpec, generate_embedded_benchmark
from datamodules.feature_store import EmbeddingDataset, LabelledFeatureStores
from datamodules.gldv2 import GoogleLandmarksV2
from datamodules.images import ImageBenchmark, ImageList, ImageListDataset
from datamodules.landmark_boxes import LandmarkBoxes
from datamodules.pittsburgh import Pittsburgh30k
from datamodules.revisited import RevisitedOxfordParis
from datamodules.sop import StanfordOnlineProducts

__all__ = [
    "EmbeddedBenchmark",
    "EmbeddedBenchmarkSpec",
    "EmbeddingDataset",
    "EvalSet",
    "GoogleLandmarksV2",
    "ImageBenchmark",
    "ImageList",
    "ImageListDataset",
    "LabelledFeatureStores",
    "LandmarkBoxes",
    "Pittsburgh30k",
    "RetrievalDataModule",
    "RevisitedOxfordParis",
    "StanfordOnlineProducts",
    "generate_embedded_benchmark",
]

"""One LightningDataModule per dataset family, plus the feature-store datamodules."""

from datamodules.base import EvalSet, RetrievalDataModule
from datamodules.embedded import EmbeddedBenchmark, EmbeddedBenchmarkSpec, generate_embedded_benchmark
from datamodules.feature_store import EmbeddingDataset, LabelledFeatureStores

__all__ = [
    "EmbeddedBenchmark",
    "EmbeddedBenchmarkSpec",
    "EmbeddingDataset",
    "EvalSet",
    "LabelledFeatureStores",
    "RetrievalDataModule",
    "generate_embedded_benchmark",
]

"""One LightningModule per method; ``cli.py`` is the entry point."""

from lightning_modules.aesvc import AESVC, AESVCPerSize, MatryoshkaAESVC
from lightning_modules.ames import AMES
from lightning_modules.asmk_reranker import AsmkReranker
from lightning_modules.base import ClosedFormModule, RetrievalModule
from lightning_modules.d2r import LandmarkDetector
from lightning_modules.delf import DelfLocalFeatures
from lightning_modules.extraction import FeatureExtractor
from lightning_modules.projections import PCAProjection, RawEmbedding
from lightning_modules.rrt import RRT
from lightning_modules.spatial_context import SpatialContextRetrieval
from lightning_modules.ss2d import SS2D, SSD
from lightning_modules.vae import VAEPerSize

__all__ = [
    "AESVC",
    "AMES",
    "AsmkReranker",
    "AESVCPerSize",
    "ClosedFormModule",
    "DelfLocalFeatures",
    "FeatureExtractor",
    "LandmarkDetector",
    "MatryoshkaAESVC",
    "PCAProjection",
    "RawEmbedding",
    "RetrievalModule",
    "RRT",
    "SpatialContextRetrieval",
    "SS2D",
    "SSD",
    "VAEPerSize",
]

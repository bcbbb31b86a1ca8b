"""One LightningModule per method; ``cli.py`` is the entry point."""

from lightning_modules.aesvc import AESVC
from lightning_modules.base import ClosedFormModule, RetrievalModule
from lightning_modules.extraction import FeatureExtractor
from lightning_modules.projections import PCAProjection, RawEmbedding

__all__ = ["AESVC", "ClosedFormModule", "FeatureExtractor", "PCAProjection", "RawEmbedding", "RetrievalModule"]

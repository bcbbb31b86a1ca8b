"""Callbacks: the shared retrieval evaluation, baseline comparison, the localisation check, the retrieval gallery and
run-config saving."""

from callbacks.baseline_comparison import BaselineComparison
from callbacks.localisation_check import LocalisationCheck
from callbacks.prediction_writer import PredictionWriter
from callbacks.retrieval_evaluation import RetrievalEvaluation
from callbacks.retrieval_gallery import RetrievalGallery
from callbacks.run_config import SaveRunConfig

__all__ = [
    "BaselineComparison",
    "LocalisationCheck",
    "PredictionWriter",
    "RetrievalEvaluation",
    "RetrievalGallery",
    "SaveRunConfig",
]

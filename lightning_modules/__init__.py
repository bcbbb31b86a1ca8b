"""One LightningModule per method; ``cli.py`` is the entry point.

The methods are imported on first use (``lightning_modules.AESVC``, as configs name them), so that light tools of
this package (the offline sweep runner, which only starts trials) do not import every model and its libraries.
"""

from importlib import import_module

_MODULE_OF = {
    "AESVC": "aesvc",
    "AESVCPerSize": "aesvc",
    "MatryoshkaAESVC": "aesvc",
    "AMES": "ames",
    "AsmkReranker": "asmk_reranker",
    "ClosedFormModule": "base",
    "RetrievalModule": "base",
    "LandmarkDetector": "d2r",
    "DelfLocalFeatures": "delf",
    "FeatureExtractor": "extraction",
    "PCAProjection": "projections",
    "RawEmbedding": "projections",
    "RRT": "rrt",
    "SpatialContextRetrieval": "spatial_context",
    "SS2D": "ss2d",
    "SSD": "ss2d",
    "VAEPerSize": "vae",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def import_all_methods() -> None:
    """Import every method, so that the CLI knows them all as subclasses of ``RetrievalModule`` (its help lists them)."""
    for name in __all__:
        __getattr__(name)

"""The embedded benchmark: a seeded, generated stand-in for foundation-model embeddings that needs no download.

Each embedding is ``x = mean + B_sem (S c_y + w) + B_nui a + e`` in ``dim`` dimensions:

* ``c_y``: the centre of class ``y`` in a ``semantic_dim``-dimensional subspace ``B_sem``, scaled by a decaying
  spectrum ``S`` (coordinate ``j`` has standard deviation ``(1 + j)^-spectrum_decay``), so a few directions carry
  most of the class information, as in real embeddings;
* ``w``: within-class variation in the same subspace, isotropic (``within_class_std``), so the weak class
  directions are also the noisy ones and equalising every direction is not free;
* ``a``: ``nuisance_dim`` high-variance directions ``B_nui`` shared by all classes (standard deviation
  ``nuisance_std``), like background, viewpoint or style that dominate foundation-model embeddings;
* ``mean``: a common offset of norm ``mean_norm`` (foundation embeddings are far from centred);
* ``e``: small isotropic noise (``noise_std``).

Cosine similarity on the raw vectors is dominated by the offset and the nuisance directions; PCA keeps the
nuisance (it has the most variance); equalising the variance of the directions (PCA-whitening, AE-SVC)
lets the class directions count. Training, validation and test use disjoint classes, as in Stanford Online
Products. The generated data is linear by construction: see the README for what it can and cannot show.

Splits are written as feature stores (``train.h5``, ``{val,test}_{query,database}.h5``) with labels; they are
regenerated only when the generation parameters change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datamodules.feature_store import LabelledFeatureStores
from retrieval.feature_store import FeatureStore, write_feature_store

SPLITS = ("train", "val_query", "val_database", "test_query", "test_database")


@dataclass(frozen=True)
class EmbeddedBenchmarkSpec:
    """Generation parameters; stored in every file's config so a change regenerates the data."""

    seed: int = 0
    dim: int = 384
    semantic_dim: int = 96
    spectrum_decay: float = 0.5
    within_class_std: float = 0.3
    nuisance_dim: int = 12
    nuisance_std: float = 1.0
    mean_norm: float = 3.0
    noise_std: float = 0.1
    train_classes: int = 1000
    train_per_class: int = 20
    eval_classes: int = 200
    queries_per_class: int = 5
    database_per_class: int = 20


def generate_embedded_benchmark(root: str | Path, spec: EmbeddedBenchmarkSpec = EmbeddedBenchmarkSpec()) -> Path:
    """Write the benchmark's feature stores under ``root`` (skipped when they exist with the same spec)."""
    root = Path(root)
    config = {"generator": "embedded_benchmark", **asdict(spec)}
    if all(_store_matches(root / f"{split}.h5", config) for split in SPLITS):
        return root
    rng = np.random.default_rng(spec.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((spec.dim, spec.semantic_dim + spec.nuisance_dim)))
    semantic_basis, nuisance_basis = basis[:, : spec.semantic_dim], basis[:, spec.semantic_dim :]
    mean = rng.standard_normal(spec.dim)
    mean *= spec.mean_norm / np.linalg.norm(mean)
    spectrum = (1.0 + np.arange(spec.semantic_dim)) ** -spec.spectrum_decay

    def sample(labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
        n = len(labels)
        semantic = centres[labels] * spectrum + spec.within_class_std * rng.standard_normal((n, spec.semantic_dim))
        nuisance = spec.nuisance_std * rng.standard_normal((n, spec.nuisance_dim))
        noise = spec.noise_std * rng.standard_normal((n, spec.dim))
        return (mean + semantic @ semantic_basis.T + nuisance @ nuisance_basis.T + noise).astype(np.float32)

    def classes(count: int) -> np.ndarray:
        return rng.standard_normal((count, spec.semantic_dim))

    train_labels = np.repeat(np.arange(spec.train_classes), spec.train_per_class)
    splits = {"train": (sample(train_labels, classes(spec.train_classes)), train_labels)}
    label_offset = spec.train_classes
    for stage in ("val", "test"):
        centres = classes(spec.eval_classes)
        eval_labels = np.arange(spec.eval_classes)
        query_labels = np.repeat(eval_labels, spec.queries_per_class)
        database_labels = np.repeat(eval_labels, spec.database_per_class)
        splits[f"{stage}_query"] = (sample(query_labels, centres), query_labels + label_offset)
        splits[f"{stage}_database"] = (sample(database_labels, centres), database_labels + label_offset)
        label_offset += spec.eval_classes
    for split, (embeddings, labels) in splits.items():
        ids = [f"{split}/{i:06d}" for i in range(len(labels))]
        write_feature_store(root / f"{split}.h5", ids, embeddings, labels=labels, config={**config, "split": split})
    return root


def _store_matches(path: Path, config: dict) -> bool:
    if not path.is_file():
        return False
    try:
        stored = FeatureStore(path).config
    except (OSError, ValueError):
        return False
    return {k: v for k, v in stored.items() if k != "split"} == json.loads(json.dumps(config))


class EmbeddedBenchmark(LabelledFeatureStores):
    """The embedded benchmark as a datamodule: generated on first use, then read from its feature stores.

    Sizes with the default spec: 20,000 training embeddings (1,000 classes); validation and test each 1,000
    queries and 4,000 database embeddings of 200 unseen classes; 384 dimensions.
    """

    name = "embedded"

    def __init__(
        self,
        root: str = "data/embedded",
        spec: EmbeddedBenchmarkSpec | None = None,
        recall_ks: tuple[int, ...] = (1, 10),
        map_ks: tuple[int, ...] = (4, 100),
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        predict_split: str = "test_database",
    ):
        paths = {split: str(Path(root) / f"{split}.h5") for split in SPLITS}
        super().__init__(
            **paths,
            name="embedded",
            recall_ks=recall_ks,
            map_ks=map_ks,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
            predict_split=predict_split,
        )
        self.root = root
        self.spec = spec or EmbeddedBenchmarkSpec()

    def prepare_data(self) -> None:
        generate_embedded_benchmark(self.root, self.spec)

"""The embedded local-descriptor benchmark: layout, splits, determinism, regeneration and calibration."""

from dataclasses import replace

import numpy as np
import pytest

from datamodules.embedded_local import (
    DESCRIPTOR,
    PAD,
    SCALE,
    SPLITS,
    WEIGHT,
    EmbeddedLocalBenchmarkSpec,
    X,
    Y,
    baseline_metrics,
    descriptor_similarities,
    generate_embedded_local_benchmark,
    mutual_nn_scores,
)
from retrieval.feature_store import FeatureStore

SMALL = replace(EmbeddedLocalBenchmarkSpec(), train_objects=12, train_per_object=4, eval_objects=6)


def read(root, split):
    store = FeatureStore(root / f"{split}.h5")
    return store, np.asarray(store.global_descriptors()), store.local_descriptors(slice(None))


def test_layout(tmp_path):
    spec = SMALL
    generate_embedded_local_benchmark(tmp_path, spec)
    sizes = {
        "train": spec.train_objects * spec.train_per_object,
        "val_query": spec.eval_objects * spec.queries_per_object,
        "val_database": spec.eval_objects * spec.database_per_object,
    }
    valid_counts = []
    for split in SPLITS:
        store, global_, local = read(tmp_path, split)
        n = sizes.get(split.replace("test", "val"))
        assert global_.shape == (n, spec.global_dim) and global_.dtype == np.float32
        assert local.shape == (n, spec.num_locals, DESCRIPTOR + spec.local_dim) and local.dtype == np.float16
        assert len(store.ids) == len(set(store.ids)) == n and store.labels.shape == (n,)
        np.testing.assert_allclose(np.linalg.norm(global_, axis=1), 1, atol=1e-5)
        pad = local[:, :, PAD]
        assert set(np.unique(pad)) <= {0, 1}
        valid = pad == 0
        counts = valid.sum(axis=1)
        # Valid rows first, then padding: the mask is a prefix.
        np.testing.assert_array_equal(valid, np.arange(spec.num_locals) < counts[:, None])
        assert counts.min() >= spec.min_valid and counts.max() <= spec.num_locals
        valid_counts.extend(counts)
        padding = local[~valid]
        assert np.all(padding[:, PAD] == 1) and not np.any(np.delete(padding, PAD, axis=1))
        rows = local[valid].astype(np.float32)
        assert np.all(rows[:, WEIGHT] > 0)
        # Sorted by weight, descending; padding (-1 here, below every weight) last.
        assert np.all(np.diff(np.where(valid, local[:, :, WEIGHT].astype(np.float32), -1), axis=1) <= 0)
        assert np.all((rows[:, [X, Y]] >= 0) & (rows[:, [X, Y]] <= spec.image_size))
        assert set(np.unique(rows[:, SCALE])) <= set(range(7))
        np.testing.assert_allclose(np.linalg.norm(rows[:, DESCRIPTOR:], axis=1), 1, atol=5e-3)
    assert len(set(valid_counts)) > 5, "images differ in their number of valid descriptors"


def test_objects_are_disjoint_between_stages(tmp_path):
    generate_embedded_local_benchmark(tmp_path, SMALL)
    labels = {split: set(FeatureStore(tmp_path / f"{split}.h5").labels.tolist()) for split in SPLITS}
    assert len(labels["train"]) == SMALL.train_objects
    for stage in ("val", "test"):
        assert labels[f"{stage}_query"] == labels[f"{stage}_database"]
        assert len(labels[f"{stage}_query"]) == SMALL.eval_objects
    assert not labels["train"] & labels["val_query"]
    assert not labels["train"] & labels["test_query"]
    assert not labels["val_query"] & labels["test_query"]


def test_generation_is_deterministic_under_the_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_embedded_local_benchmark(tmp_path / name, replace(SMALL, seed=seed))
    for split in SPLITS:
        (_, global_a, local_a), (_, global_b, local_b), (_, global_c, local_c) = (
            read(tmp_path / name, split) for name in "abc"
        )
        assert global_a.tobytes() == global_b.tobytes() and local_a.tobytes() == local_b.tobytes()
        assert not np.array_equal(global_a, global_c) and not np.array_equal(local_a, local_c)


def test_regenerates_only_when_the_spec_changes(tmp_path):
    generate_embedded_local_benchmark(tmp_path, SMALL)
    stamps = {split: (tmp_path / f"{split}.h5").stat().st_mtime_ns for split in SPLITS}
    generate_embedded_local_benchmark(tmp_path, SMALL)
    assert {split: (tmp_path / f"{split}.h5").stat().st_mtime_ns for split in SPLITS} == stamps
    _, before, _ = read(tmp_path, "val_query")
    changed = replace(SMALL, global_noise=0.5)
    generate_embedded_local_benchmark(tmp_path, changed)
    store, after, _ = read(tmp_path, "val_query")
    assert store.config["global_noise"] == 0.5 and store.config["split"] == "val_query"
    assert not np.array_equal(before, after)


def test_mutual_nn_ignores_padding():
    # Padding rows hold descriptors here (the layout has zeros) so that counting them would show.
    image = np.zeros((1, 8, DESCRIPTOR + 16), dtype=np.float32)
    descriptors = np.random.default_rng(0).standard_normal((8, 16))
    image[0, :, DESCRIPTOR:] = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    image[0, 5:, PAD] = 1
    assert mutual_nn_scores(descriptor_similarities(image[0], image)).tolist() == [5.0]


@pytest.fixture(scope="module")
def default_benchmark(tmp_path_factory):
    return generate_embedded_local_benchmark(tmp_path_factory.mktemp("embedded_local"))


@pytest.mark.parametrize("stage", ["val", "test"])
def test_local_matching_beats_the_global_ranking_but_not_perfectly(default_benchmark, stage):
    # The benchmark's reason to exist: the global ranking leaves room that local matching takes back, and
    # shared clutter and occlusion keep local matching from solving it.
    metrics = baseline_metrics(default_benchmark, stage)
    global_map, local_map = metrics["global"]["mAP@100"], metrics["mutual NN"]["mAP@100"]
    assert 0.2 < global_map < 0.6, metrics
    assert local_map > global_map + 0.3, metrics
    assert local_map < 0.95 and metrics["mutual NN + scale"]["mAP@100"] < 0.97, metrics
    assert global_map < metrics["chamfer"]["mAP@100"] < 0.85, metrics

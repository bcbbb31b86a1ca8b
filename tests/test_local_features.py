"""Local descriptors as data: the first L stored rows per example, triplet batches, and the re-ranking stage's
reads across the parts of a database (e.g. a test database followed by distractors)."""

import numpy as np
import pytest
import torch

from callbacks.reranking_stage import read_rows
from datamodules.base import RowSubset
from datamodules.feature_store import EmbeddingDataset, collate_embeddings
from datamodules.triplets import TripletDataset
from retrieval.feature_store import FeatureStore, write_feature_store


def make_store(path, n=6, stored=5, dim=3, offset=0.0):
    """A store whose values encode (row, local row, column), so every read can be checked exactly."""
    rows = np.arange(n)[:, None, None]
    local = np.zeros((n, stored, 5 + dim), dtype=np.float32)
    local[..., 5:] = offset + rows * 100 + np.arange(stored)[None, :, None] + np.arange(dim)[None, None, :] / 10
    local[:, -1, 3] = 1  # the last row is padding
    global_ = (offset + np.arange(n, dtype=np.float32))[:, None].repeat(4, 1)
    write_feature_store(path, [f"{offset}-{i}" for i in range(n)], global_, local, labels=np.arange(n) // 2)
    return FeatureStore(path)


def test_examples_carry_the_first_l_locals_and_batched_reads_equal_single_ones(tmp_path):
    store = make_store(tmp_path / "a.h5")
    dataset = EmbeddingDataset.from_store(store, locals_per_example=3)
    batch = collate_embeddings(dataset.__getitems__([4, 1, 4]))
    assert batch["local"].shape == (3, 3, 8)
    assert torch.equal(batch["local"][1], dataset[1]["local"])
    assert batch["local"][0, 2, 5].item() == pytest.approx(402.0)  # row 4, local row 2, column 0
    assert np.array_equal(dataset.local_descriptors([2], 5)[0, :, 3], [0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="6 local descriptors per image asked.*stores 5"):
        dataset.local_descriptors([0], 6)
    without = EmbeddingDataset.from_store(store)
    assert "local" not in without[0]
    with pytest.raises(ValueError, match="carry no local descriptors"):
        without.local_descriptors([0])


def test_a_subset_reads_the_locals_of_its_own_rows(tmp_path):
    dataset = EmbeddingDataset.from_store(make_store(tmp_path / "a.h5"), locals_per_example=2)
    subset = RowSubset(dataset, [5, 2])
    assert subset.local_descriptors([1, 0], 2)[0, 1, 5] == pytest.approx(201.0)
    batch = collate_embeddings(subset.__getitems__([0, 1]))
    assert batch["index"].tolist() == [0, 1] and batch["local"][0, 0, 5].item() == pytest.approx(500.0)


def test_triplet_batches_hold_the_three_images_of_each_triplet(tmp_path):
    dataset = EmbeddingDataset.from_store(make_store(tmp_path / "a.h5"), locals_per_example=4)
    batch = TripletDataset(dataset).__getitems__([(0, 1, 3), (5, 4, 0)])
    assert batch["index"].tolist() == [[0, 1, 3], [5, 4, 0]]
    assert batch["embedding"].shape == (2, 3, 4) and batch["embedding"][1, :, 0].tolist() == [5, 4, 0]
    assert batch["local"].shape == (2, 3, 4, 8) and batch["local"][0, 2, 1, 5].item() == pytest.approx(301.0)


def test_reranking_reads_rows_across_database_parts_by_their_global_index(tmp_path):
    own = EmbeddingDataset.from_store(make_store(tmp_path / "own.h5", n=4), with_locals=True)
    distractors = EmbeddingDataset.from_store(make_store(tmp_path / "1m.h5", n=6, offset=1000), with_locals=True)
    parts = {"db": own, "distractors": distractors}
    global_, local = read_rows(parts, np.array([5, 1, 5, 9]), count=2, device="cpu")
    # rows 5 and 9 of the concatenation are distractors 1 and 5
    assert global_[:, 0].tolist() == [1001, 1, 1001, 1005]
    assert local[:, 0, 5].tolist() == [1100, 100, 1100, 1500] and local.shape == (4, 2, 8)

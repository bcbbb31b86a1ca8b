"""Stored embeddings read a batch at a time give the same batches as rows read one by one."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from datamodules import LabelledFeatureStores
from datamodules.feature_store import EmbeddingDataset, EmbeddingRows, collate_embeddings
from retrieval import write_feature_store


class RowByRow(EmbeddingDataset):
    """The dataset as it was: the DataLoader falls back to one ``__getitem__`` per example."""

    __getitems__ = None


def batches(loader):
    return [(batch["index"].clone(), batch["embedding"].clone()) for batch in loader]


def test_batched_reads_give_the_batches_of_row_reads_in_the_same_order(tmp_path, monkeypatch):
    values = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float16)  # stored dtype is converted
    path = write_feature_store(tmp_path / "train.h5", [f"x{i}" for i in range(37)], values, global_dtype="float16")
    data = LabelledFeatureStores(train=str(path), batch_size=8, shuffle_seed=3)
    dataset = data.train_dataset()
    assert isinstance(dataset.embeddings, np.memmap)  # the store is read through a memory map
    row_by_row = batches(DataLoader(RowByRow(dataset.embeddings), batch_sampler=data.train_dataloader().batch_sampler))

    def no_row_reads(self, index):
        raise AssertionError("a batch must be read with one indexed read, not row by row")

    monkeypatch.setattr(EmbeddingDataset, "__getitem__", no_row_reads)
    batched = batches(data.train_dataloader())
    assert len(batched) == 4  # 37 // 8: the incomplete last batch is dropped
    for (index, embedding), (row_index, row_embedding) in zip(batched, row_by_row, strict=True):
        assert not torch.equal(index, index.sort().values)  # shuffled: the order of the batch is kept
        assert index.dtype == row_index.dtype == torch.int64
        torch.testing.assert_close(index, row_index, rtol=0, atol=0)
        assert embedding.dtype == torch.float32
        stored = torch.from_numpy(values[index.numpy()].astype(np.float32))
        torch.testing.assert_close(embedding, stored, rtol=0, atol=0)
        torch.testing.assert_close(embedding, row_embedding, rtol=0, atol=0)


@pytest.mark.parametrize("collate", [collate_embeddings, default_collate], ids=["as read", "default collation"])
def test_a_repeated_index_is_read_once_and_returned_twice_with_either_collation(collate):
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    rows = EmbeddingDataset(values).__getitems__([4, 1, 4, 0])
    assert isinstance(rows, EmbeddingRows) and len(rows) == 4 and rows[1]["index"] == 1
    batch = collate(rows)
    assert batch["index"].tolist() == [4, 1, 4, 0]
    assert batch["embedding"].tolist() == [[8.0, 9.0], [2.0, 3.0], [8.0, 9.0], [0.0, 1.0]]
    batch["embedding"][0, 0] = -1.0  # the batch owns its memory: the stored array is untouched
    assert values[4, 0] == 8.0


def test_examples_read_one_by_one_still_collate_by_default():
    examples = [EmbeddingDataset(np.ones((3, 2), dtype=np.float32))[i] for i in (2, 0)]
    batch = collate_embeddings(examples)
    assert batch["index"].tolist() == [2, 0] and batch["embedding"].shape == (2, 2)

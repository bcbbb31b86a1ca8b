"""Datamodules over stored descriptors (feature stores), for methods that train on embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datamodules.base import EvalSet, EvalStage, RetrievalDataModule
from retrieval.feature_store import FeatureStore
from retrieval.ground_truth import LabelGroundTruth


class EmbeddingDataset(Dataset):
    """Rows of a ``[N, D]`` array (memory-mapped or in memory) as ``{"index", "embedding"}`` examples.

    ``ids`` and ``labels`` describe the rows (e.g. for writing predictions); they are not part of examples.
    A DataLoader with a batch size reads each batch with one indexed read (:meth:`__getitems__`), not one
    read per row; with :func:`collate_embeddings` as its ``collate_fn`` the batch is not even split into
    examples and stacked again.
    """

    def __init__(self, embeddings: np.ndarray, ids: list[str] | None = None, labels: np.ndarray | None = None):
        self.embeddings = embeddings
        self.ids = ids
        self.labels = labels

    @classmethod
    def from_store(cls, store: FeatureStore) -> EmbeddingDataset:
        return cls(store.global_descriptors(), store.ids, store.labels)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        # A copy: rows of a read-only memory map must not be handed out as writable tensors.
        return {"index": index, "embedding": torch.tensor(self.embeddings[index], dtype=torch.float32)}

    def __getitems__(self, indices: Sequence[int]) -> EmbeddingRows:
        """The examples of a batch, read with one indexed read (PyTorch's DataLoader calls this when present).

        The rows are read in increasing order and once each (a memory map then reads each page once, in file
        order), then put back in the batch's order.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(indices, return_inverse=True)
        # Fancy indexing copies, so the tensors own writable memory, as in __getitem__. numpy reorders: torch's
        # multi-threaded indexing of a small batch is slower on busy cores.
        rows = np.asarray(self.embeddings[unique], dtype=np.float32)[inverse]
        return EmbeddingRows(torch.from_numpy(indices), torch.from_numpy(rows))


class EmbeddingRows(Sequence):
    """A batch read at once that still behaves as the list of its examples (so the default collation, which
    indexes and stacks them, gives the same batch); :func:`collate_embeddings` takes the batch as it is."""

    def __init__(self, index: torch.Tensor, embedding: torch.Tensor):
        self.index, self.embedding = index, embedding

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        return {"index": int(self.index[position]), "embedding": self.embedding[position]}


def collate_embeddings(examples) -> dict[str, torch.Tensor]:
    """Collation for :class:`EmbeddingDataset` loaders: a batch read at once as it is, anything else (e.g. a
    ``ConcatDataset`` of stores, read example by example) by PyTorch's default collation."""
    if isinstance(examples, EmbeddingRows):
        return {"index": examples.index, "embedding": examples.embedding}
    return default_collate(examples)


class LabelledFeatureStores(RetrievalDataModule):
    """Global descriptors from feature stores, with labels in the stores as ground truth (same label = match).

    Args:
        train: store of the training (fit) split.
        val_database, test_database: stores searched at validation / test time.
        val_query, test_query: query stores; ``None`` means leave-one-out on the database (every database
            image is a query, itself excluded), the Stanford Online Products protocol.
        name: benchmark name in metric keys.
        recall_ks, map_ks: cut-offs of Recall@k and mAP@k.
        predict_split: which store ``predict`` embeds (``train``, ``val_query``, ..., ``test_database``).
    """

    def __init__(
        self,
        train: str | None = None,
        val_database: str | None = None,
        val_query: str | None = None,
        test_database: str | None = None,
        test_query: str | None = None,
        name: str = "features",
        recall_ks: Sequence[int] = (1, 10),
        map_ks: Sequence[int] = (4, 100),
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        predict_split: str = "test_database",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.predict_split = predict_split
        self.paths = {
            "train": train,
            "val_database": val_database,
            "val_query": val_query,
            "test_database": test_database,
            "test_query": test_query,
        }
        self.name = name
        self.recall_ks = tuple(recall_ks)
        self.map_ks = tuple(map_ks)

    @property
    def embedding_dim(self) -> int:
        """Size of the stored global descriptors (all stores must agree)."""
        dims = {path: FeatureStore(path).global_dim for path in self.paths.values() if path is not None}
        if len(set(dims.values())) != 1:
            raise ValueError(f"feature stores disagree on the descriptor size: {dims}")
        return next(iter(dims.values()))

    def _store(self, split: str) -> FeatureStore:
        path = self.paths[split]
        if path is None:
            raise ValueError(f"{type(self).__name__}: no '{split}' feature store configured (data.init_args.{split})")
        return FeatureStore(path)

    def train_dataset(self) -> EmbeddingDataset:
        return EmbeddingDataset.from_store(self._store("train"))

    def collate_fn(self):
        return collate_embeddings  # batches read with one indexed read stay one batch

    def predict_datasets(self) -> dict[str, EmbeddingDataset]:
        if self.predict_split not in self.paths:
            raise ValueError(f"predict_split must be one of {sorted(self.paths)}, got {self.predict_split!r}")
        return {self.predict_split: EmbeddingDataset.from_store(self._store(self.predict_split))}

    def build_eval_sets(self, stage: EvalStage) -> list[EvalSet]:
        database = self._store(f"{stage}_database")
        queries = self._store(f"{stage}_query") if self.paths[f"{stage}_query"] is not None else None
        for store in (database, queries):
            if store is not None and store.labels is None:
                raise ValueError(f"{store.path} has no 'labels' dataset, needed as ground truth here")
        ground_truth = LabelGroundTruth(
            queries.labels if queries is not None else database.labels,
            database.labels if queries is not None else None,
            recall_ks=self.recall_ks,
            map_ks=self.map_ks,
        )
        return [
            EvalSet(
                name=self.name,
                database=EmbeddingDataset.from_store(database),
                queries=EmbeddingDataset.from_store(queries) if queries is not None else None,
                ground_truth=ground_truth,
            )
        ]

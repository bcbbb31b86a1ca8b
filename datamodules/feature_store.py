"""Datamodules over stored descriptors (feature stores), for methods that train on embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datamodules.base import EvalSet, EvalStage, RetrievalDataModule
from datamodules.triplets import TripletMining
from retrieval.feature_store import EXPECTED_LAYOUT, LOCAL_COLUMNS, FeatureStore
from retrieval.ground_truth import LabelGroundTruth


class EmbeddingDataset(Dataset):
    """Rows of a ``[N, D]`` array (memory-mapped or in memory) as ``{"index", "embedding"}`` examples.

    ``ids`` and ``labels`` describe the rows (e.g. for writing predictions); they are not part of examples.
    A DataLoader with a batch size reads each batch with one indexed read (:meth:`__getitems__`), not one
    read per row; with :func:`collate_embeddings` as its ``collate_fn`` the batch is not even split into
    examples and stacked again.

    With ``local_store`` (the feature store holding the rows' local descriptors), :meth:`local_descriptors`
    reads the first ``L`` stored locals of any rows (they are sorted by weight, so these are the strongest) for
    re-ranking; with ``locals_per_example`` set, every example also carries ``"local"``: its first
    ``locals_per_example`` rows, ``[L, 5 + D]`` (columns as in the store).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: list[str] | None = None,
        labels: np.ndarray | None = None,
        local_store: FeatureStore | None = None,
        locals_per_example: int | None = None,
        store: FeatureStore | None = None,
    ):
        #: The store the rows come from, when known (what they take as stored: ``stored_bytes_per_image``).
        self.store = store or local_store
        self.embeddings = embeddings
        self.ids = ids
        self.labels = labels
        if local_store is not None and not local_store.has_local:
            raise ValueError(f"{local_store.path} holds no local descriptors, needed here; expected {EXPECTED_LAYOUT}")
        if locals_per_example is not None and local_store is None:
            raise ValueError("locals_per_example needs the store of the local descriptors (local_store)")
        self.local_store = local_store
        self.locals_per_example = locals_per_example

    @classmethod
    def from_store(cls, store: FeatureStore, with_locals: bool = False, locals_per_example: int | None = None):
        """The store's global descriptors; ``with_locals`` also gives access to its local descriptors."""
        local_store = store if with_locals or locals_per_example is not None else None
        return cls(store.global_descriptors(), store.ids, store.labels, local_store, locals_per_example, store)

    @property
    def local_encoding(self) -> str:
        """``"binary"`` when the stored locals are binary codes (read as ±1), else ``"float"``."""
        return getattr(self.local_store, "local_encoding", None) or "float"

    @property
    def num_stored_locals(self) -> int | None:
        return None if self.local_store is None else self.local_store.local_shape[0]

    def local_descriptors(self, rows: Sequence[int], count: int | None = None) -> np.ndarray:
        """``float32 [len(rows), count, 5 + D]``: the first ``count`` stored locals of ``rows`` (all when
        ``None``; a count above the stored number is refused rather than silently cut)."""
        if self.local_store is None:
            raise ValueError(
                "these examples carry no local descriptors: the datamodule was built without them (a re-ranker "
                "needs feature stores with 'local' descriptors)"
            )
        stored = self.num_stored_locals
        if count is not None and count > stored:
            raise ValueError(f"{count} local descriptors per image asked, {self.local_store.path} stores {stored}")
        values = self.local_store.local_descriptors(rows)
        return np.asarray(values[:, : stored if count is None else count], dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        # A copy: rows of a read-only memory map must not be handed out as writable tensors.
        example = {"index": index, "embedding": torch.tensor(self.embeddings[index], dtype=torch.float32)}
        if self.locals_per_example is not None:
            example["local"] = torch.from_numpy(self.local_descriptors([index], self.locals_per_example)[0])
        return example

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
        local = None
        if self.locals_per_example is not None:
            local = torch.from_numpy(self.local_descriptors(unique, self.locals_per_example)[inverse])
        return EmbeddingRows(torch.from_numpy(indices), torch.from_numpy(rows), local)


class EmbeddingRows(Sequence):
    """A batch read at once that still behaves as the list of its examples (so the default collation, which
    indexes and stacks them, gives the same batch); :func:`collate_embeddings` takes the batch as it is."""

    def __init__(self, index: torch.Tensor, embedding: torch.Tensor, local: torch.Tensor | None = None):
        self.index, self.embedding, self.local = index, embedding, local

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        example = {"index": int(self.index[position]), "embedding": self.embedding[position]}
        if self.local is not None:
            example["local"] = self.local[position]
        return example

    def as_batch(self) -> dict[str, torch.Tensor]:
        batch = {"index": self.index, "embedding": self.embedding}
        if self.local is not None:
            batch["local"] = self.local
        return batch


def collate_embeddings(examples) -> dict[str, torch.Tensor]:
    """Collation for :class:`EmbeddingDataset` loaders: a batch read at once as it is, anything else (e.g. a
    ``ConcatDataset`` of stores, read example by example) by PyTorch's default collation."""
    if hasattr(examples, "as_batch"):
        return examples.as_batch()
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
        local_descriptors: give the evaluation sets access to the stores' local descriptors (for re-ranking).
        train_locals: training examples carry their first ``train_locals`` stored local descriptors
            (``None``: none, or all stored ones when training on triplets).
        triplet_mining: train on mined triplets (:class:`datamodules.triplets.TripletMining`), ``batch_size``
            triplets per global batch; ``None``: on the training embeddings.
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
        local_descriptors: bool = False,
        train_locals: int | None = None,
        triplet_mining: TripletMining | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.predict_split = predict_split
        self.local_descriptors = local_descriptors
        self.train_locals = train_locals
        self.triplet_mining = triplet_mining
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

    @property
    def local_dim(self) -> int | None:
        """Size of the stored local descriptors (``None`` when no store holds any)."""
        for path in self.paths.values():
            if path is not None and FeatureStore(path).has_local:
                return FeatureStore(path).local_shape[1] - len(LOCAL_COLUMNS)
        return None

    def _store(self, split: str) -> FeatureStore:
        path = self.paths[split]
        if path is None:
            raise ValueError(f"{type(self).__name__}: no '{split}' feature store configured (data.init_args.{split})")
        return FeatureStore(path)

    def train_dataset(self) -> EmbeddingDataset:
        store = self._store("train")
        return EmbeddingDataset.from_store(store, locals_per_example=training_locals(self, store))

    def train_store_path(self) -> str:
        return str(self._store("train").path)

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
                database=EmbeddingDataset.from_store(database, self.local_descriptors),
                queries=EmbeddingDataset.from_store(queries, self.local_descriptors) if queries is not None else None,
                ground_truth=ground_truth,
            )
        ]


def training_locals(datamodule, store: FeatureStore) -> int | None:
    """How many local descriptors each training example of ``store`` carries: the datamodule's
    ``train_locals``, or every stored one when it trains on triplets and sets none."""
    if datamodule.train_locals is not None:
        return datamodule.train_locals
    if datamodule.triplet_mining is not None:
        if not store.has_local:
            raise ValueError(f"{store.path}: triplet training needs local descriptors; expected {EXPECTED_LAYOUT}")
        return store.local_shape[0]
    return None

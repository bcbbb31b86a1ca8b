"""The datamodule contract every benchmark follows.

A datamodule provides a training set and, per stage, one or more *evaluation sets*: a database, optionally
separate queries, and the ground truth that scores a ranking of the database. Databases and queries are made of
named *parts* (most have one; a Revisited database with distractors has two: its own images, then the 1M
distractors). A part with the same name in several evaluation sets of a stage is the same data: it gets one
dataloader and is embedded and gathered once per evaluation (the distractors shared by Oxford and Paris). Every
example carries its ``index`` within its part. The evaluation callback reads :meth:`RetrievalDataModule.eval_sets`
and :meth:`RetrievalDataModule.eval_parts` (one dataloader per part, in that order).

Distribution is handled here, not by Lightning's sampler injection (the CLI sets
``use_distributed_sampler=False``): see :mod:`datamodules.sampling` for why 1 and N processes then agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import (
    ClassBalanced,
    ClassBalancedSampler,
    EpochPermutation,
    GlobalBatchSampler,
    ResumableDataLoader,
    ShapeBatchSampler,
    ShardSampler,
    contiguous_block,
)
from retrieval.ground_truth import GroundTruth

EvalStage = Literal["val", "test"]


Parts = Mapping[str, Dataset]


@dataclass
class EvalSet:
    """One benchmark's queries, database and ground truth; ``queries=None`` means leave-one-out.

    ``database`` and ``queries`` are a dataset or named parts concatenated in order (see the module docstring); a
    single dataset is the part ``<name>/database`` (``<name>/query``). Ground-truth indices count across the
    concatenated parts.
    """

    name: str
    database: Dataset | Parts
    ground_truth: GroundTruth
    queries: Dataset | Parts | None = None

    def __post_init__(self) -> None:
        if self.queries is None and not self.ground_truth.queries_are_database:
            raise ValueError(f"eval set '{self.name}': no queries given, but the protocol is not leave-one-out")
        expected = {"database": (self.database_parts, self.ground_truth.num_database)}
        if self.queries is not None:
            expected["query"] = (self.query_parts, self.ground_truth.num_queries)
        for role, (parts, count) in expected.items():
            if not parts:
                raise ValueError(f"eval set '{self.name}': no {role} parts given")
            size = sum(len(dataset) for dataset in parts.values())
            if size != count:
                raise ValueError(f"eval set '{self.name}': {size} {role} examples but the ground truth expects {count}")

    @property
    def database_parts(self) -> dict[str, Dataset]:
        return _named_parts(self.database, f"{self.name}/database")

    @property
    def query_parts(self) -> dict[str, Dataset]:
        """Empty for leave-one-out."""
        return {} if self.queries is None else _named_parts(self.queries, f"{self.name}/query")


def _named_parts(value: Dataset | Parts, default_name: str) -> dict[str, Dataset]:
    return dict(value) if isinstance(value, Mapping) else {default_name: value}


class RowSubset(Dataset):
    """Some rows of a dataset as a dataset of their own (e.g. a validation split held out from a training list):
    each example's ``index`` is its position in the subset, as the evaluation and the samplers expect."""

    def __init__(self, dataset: Dataset, rows):
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[int(self.rows[index])], "index": index}

    def __getitems__(self, indices: Sequence[int]):
        """A batch through the dataset's own batched read when it has one (one indexed read of a store)."""
        read = getattr(self.dataset, "__getitems__", None)
        if read is None:
            return [self[i] for i in indices]
        batch = read([int(self.rows[i]) for i in indices])
        if isinstance(batch, list):
            return [{**example, "index": i} for example, i in zip(batch, indices)]
        batch.index = torch.as_tensor(indices, dtype=torch.int64)  # a batch read at once (EmbeddingRows)
        return batch

    def resized_shapes(self, indices: Sequence[int]):
        """The shapes of the images at ``indices`` (see ``ImageListDataset.resized_shapes``), so a subset of
        images resized keeping their aspect ratio is batched by shape too; ``None`` for other datasets."""
        shapes = getattr(self.dataset, "resized_shapes", None)
        return None if shapes is None else shapes([int(self.rows[i]) for i in indices])

    @property
    def num_stored_locals(self) -> int | None:
        return getattr(self.dataset, "num_stored_locals", None)

    @property
    def store(self):
        return getattr(self.dataset, "store", None)

    @property
    def local_encoding(self) -> str:
        return getattr(self.dataset, "local_encoding", "float")

    def local_descriptors(self, indices: Sequence[int], count: int | None = None):
        """The local descriptors of the subset's examples ``indices`` (see ``EmbeddingDataset.local_descriptors``)."""
        return self.dataset.local_descriptors(self.rows[np.asarray(indices, dtype=np.int64)], count)

    @property
    def ids(self) -> list[str] | None:
        ids = getattr(self.dataset, "ids", None)
        return None if ids is None else [ids[row] for row in self.rows]

    @property
    def labels(self) -> np.ndarray | None:
        labels = getattr(self.dataset, "labels", None)
        return None if labels is None else np.asarray(labels)[self.rows]


class RetrievalDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`train_dataset`, :meth:`build_eval_sets` and :attr:`name`.

    Args:
        batch_size: the *global* training batch size, split evenly across processes.
        eval_batch_size: per-process batch size for embedding evaluation sets (default: ``batch_size``).
        num_workers: dataloader worker processes.
        shuffle_seed: seed of the training order; ``None`` uses the run's seed (``seed_everything``).
    """

    #: Name of the benchmark: the default run directory is ``runs/<method>/<name>``; subclasses with a single
    #: evaluation set also use it as that set's name in metric keys (``<stage>/<name>/<metric>``).
    name: str = "dataset"

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._eval_sets: dict[str, list[EvalSet]] = {}
        #: Per predict dataset name, the indices this process still has to predict. Set by a resuming
        #: prediction writer; unset names get this process's whole shard.
        self.predict_indices: dict[str, list[int]] = {}

    # ---- to implement -------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no training split")

    def build_eval_sets(self, stage: EvalStage) -> list[EvalSet]:
        raise NotImplementedError

    def predict_datasets(self) -> dict[str, Dataset]:
        """What ``predict`` runs over, by name (the names of the written files), in dataloader order."""
        raise NotImplementedError(f"{type(self).__name__} does not define what to predict")

    def summary_metrics(self, stage: EvalStage, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from several evaluation sets' metrics (e.g. an average the benchmark reports)."""
        return {}

    def collate_fn(self):
        """Batch collation of this datamodule's examples (``None``: PyTorch's default)."""
        return None

    # ---- provided -----------------------------------------------------------------------------------------
    def eval_sets(self, stage: EvalStage) -> list[EvalSet]:
        if stage not in self._eval_sets:
            eval_sets = self.build_eval_sets(stage)
            names = [e.name for e in eval_sets]
            if len(set(names)) != len(names):
                raise ValueError(
                    f"{type(self).__name__}: evaluation sets need distinct names (metric keys), got {names}"
                )
            self._eval_sets[stage] = eval_sets
        return self._eval_sets[stage]

    def eval_parts(self, stage: EvalStage) -> dict[str, Dataset]:
        """Every distinct part of the stage's evaluation sets by name, in dataloader order (a part shared by
        several evaluation sets appears once)."""
        parts: dict[str, Dataset] = {}
        for eval_set in self.eval_sets(stage):
            for name, dataset in [*eval_set.query_parts.items(), *eval_set.database_parts.items()]:
                if name in parts and len(parts[name]) != len(dataset):
                    raise ValueError(
                        f"{type(self).__name__}: evaluation part '{name}' has {len(parts[name])} examples in one "
                        f"evaluation set and {len(dataset)} in another; a part name must always mean the same data"
                    )
                parts.setdefault(name, dataset)
        return parts

    def train_dataloader(self) -> DataLoader:
        """Global batches of training examples, or - with :attr:`triplet_mining` set (the pair re-rankers) - of
        mined triplets, ``batch_size`` triplets each (see :mod:`datamodules.triplets`), or - with
        :attr:`class_balanced` set - P classes x K images each (:class:`~datamodules.sampling.ClassBalancedSampler`)."""
        dataset = self.train_dataset()
        rank, world_size = self._distribution()
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        collate_fn = self.collate_fn()
        if self.triplet_mining is not None:
            from datamodules.triplets import TripletDataset, collate_triplets, mined_triplets

            trainer = self.trainer
            sampler = mined_triplets(
                dataset,
                self.triplet_mining,
                self.train_store_path(),
                seed,
                is_builder=rank == 0,
                barrier=trainer.strategy.barrier if trainer is not None else (lambda: None),
            )
            rank_zero_info(f"triplet mining: {sampler.summary}")
            dataset, collate_fn = TripletDataset(dataset), collate_triplets
        elif self.class_balanced is not None:
            sampler = self._class_balanced_sampler(dataset, seed)
            rank_zero_info(sampler.summary)
        else:
            sampler = EpochPermutation(len(dataset), seed=seed)
        batches = GlobalBatchSampler(sampler, self.batch_size, rank, world_size)
        if batches.left_out:  # the incomplete last global batch is dropped: say so
            rank_zero_info(batches.summary)
        return ResumableDataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory,
        )

    #: How training triplets are mined (:class:`datamodules.triplets.TripletMining`); ``None``: the training
    #: set's examples in shuffled global batches. Set by datamodules over feature stores with local descriptors.
    triplet_mining = None

    #: P x K class-balanced training batches (:class:`~datamodules.sampling.ClassBalanced`); ``None``: shuffled
    #: global batches. Set by the image datamodules' ``class_balanced`` argument (see :meth:`set_class_balanced`).
    class_balanced: ClassBalanced | None = None

    def set_class_balanced(self, class_balanced: ClassBalanced | dict | None) -> None:
        """Validate and set :attr:`class_balanced` (a :class:`ClassBalanced` or its arguments as a dict):
        ``batch_size`` must be its P x K, and triplet mining cannot be used with it."""
        if isinstance(class_balanced, Mapping):
            try:
                class_balanced = ClassBalanced(**class_balanced)
            except TypeError as error:
                raise ValueError(
                    f"{type(self).__name__}: class_balanced expects {{classes_per_batch: P, images_per_class: K, "
                    f"min_images_per_class: M (optional)}}, got {dict(class_balanced)} ({error})"
                ) from None
        if class_balanced is not None:
            if self.triplet_mining is not None:
                raise ValueError(f"{type(self).__name__}: set class_balanced or triplet_mining, not both")
            if self.batch_size != class_balanced.batch_size:
                raise ValueError(
                    f"{type(self).__name__}: batch_size {self.batch_size} must equal class_balanced classes_per_batch "
                    f"x images_per_class = {class_balanced.classes_per_batch} x {class_balanced.images_per_class} = "
                    f"{class_balanced.batch_size} (the global batch); set batch_size: {class_balanced.batch_size}"
                )
        self.class_balanced = class_balanced

    def _class_balanced_sampler(self, dataset: Dataset, seed: int) -> ClassBalancedSampler:
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ValueError(
                f"{type(self).__name__}: class_balanced batches need the training examples' labels, but the "
                f"training dataset ({type(dataset).__name__}) has none"
            )
        balanced = self.class_balanced
        return ClassBalancedSampler(
            labels, balanced.classes_per_batch, balanced.images_per_class, balanced.min_images_per_class, seed=seed
        )

    def train_store_path(self) -> str:
        """The feature store of the training split (where its triplet neighbour file is kept by default)."""
        raise NotImplementedError(f"{type(self).__name__} does not train from a feature store")

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """Per predicted dataset, this process's contiguous block (see :func:`contiguous_block`), or the
        indices a resuming prediction writer left in :attr:`predict_indices`."""
        rank, world_size = self._distribution()
        return [
            self.sharded_dataloader(
                dataset, self.predict_indices.get(name, contiguous_block(len(dataset), rank, world_size))
            )
            for name, dataset in self.predict_datasets().items()
        ]

    def sharded_dataloader(self, dataset: Dataset, indices: Sequence[int] | None = None) -> DataLoader:
        """Loader over this process's (padded) shard of ``dataset`` (see :class:`ShardSampler`), or over
        ``indices`` when given. Images resized to different shapes (a dataset with ``resized_shapes``) are
        batched by shape, so any ``eval_batch_size`` works with aspect-ratio-keeping resizing."""
        rank, world_size = self._distribution()
        indices = list(ShardSampler(len(dataset), rank, world_size) if indices is None else indices)
        shapes = getattr(dataset, "resized_shapes", None)
        shapes = shapes(indices) if shapes is not None and self.eval_batch_size > 1 else None
        batching = (
            {"batch_size": self.eval_batch_size, "sampler": indices}
            if shapes is None
            else {"batch_sampler": ShapeBatchSampler(indices, shapes, self.eval_batch_size)}
        )
        return DataLoader(
            dataset, num_workers=self.num_workers, collate_fn=self.collate_fn(), pin_memory=self.pin_memory, **batching
        )

    @property
    def pin_memory(self) -> bool:
        """Batches in page-locked memory when the trainer runs on a CUDA device, so that Lightning's copy to the
        GPU (``non_blocking``) is asynchronous instead of a synchronous copy from pageable memory."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def eval_dataloaders(self, stage: EvalStage) -> list[DataLoader]:
        """One sharded loader per evaluation part, in :meth:`eval_parts` order."""
        parts = self.eval_parts(stage)
        if not parts and stage == "val":
            rank_zero_info(
                f"{type(self).__name__} has no validation sets (e.g. a test-only benchmark such as Revisited "
                "Oxford/Paris): nothing is validated or selected on it; `test` scores its test sets"
            )
        return [self.sharded_dataloader(dataset) for dataset in parts.values()]

    def _distribution(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

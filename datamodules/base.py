"""The datamodule contract every benchmark follows.

A datamodule provides a training set and, per stage, one or more *evaluation sets*: a database, optionally
separate queries, and the ground truth that scores a ranking of the database. The evaluation callback reads
:meth:`RetrievalDataModule.eval_sets` and :meth:`RetrievalDataModule.eval_loader_roles` to know which
dataloader holds what; every example carries its global ``index`` within its dataset.

Distribution is handled here, not by Lightning's sampler injection (the CLI sets
``use_distributed_sampler=False``): see :mod:`datamodules.sampling` for why 1 and N processes then agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import EpochPermutation, GlobalBatchSampler, ResumableDataLoader, ShardSampler
from retrieval.ground_truth import GroundTruth

EvalStage = Literal["val", "test"]
Role = Literal["query", "database"]


@dataclass
class EvalSet:
    """One benchmark's queries, database and ground truth; ``queries=None`` means leave-one-out."""

    name: str
    database: Dataset
    ground_truth: GroundTruth
    queries: Dataset | None = None

    def __post_init__(self) -> None:
        if self.queries is None and not self.ground_truth.queries_are_database:
            raise ValueError(f"eval set '{self.name}': no queries given, but the protocol is not leave-one-out")
        expected = {"database": (self.database, self.ground_truth.num_database)}
        if self.queries is not None:
            expected["query"] = (self.queries, self.ground_truth.num_queries)
        for role, (dataset, count) in expected.items():
            if len(dataset) != count:
                raise ValueError(
                    f"eval set '{self.name}': {len(dataset)} {role} examples but the ground truth expects {count}"
                )

    def roles(self) -> list[tuple[Role, Dataset]]:
        loaders: list[tuple[Role, Dataset]] = [] if self.queries is None else [("query", self.queries)]
        return loaders + [("database", self.database)]


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
                raise ValueError(f"{type(self).__name__}: evaluation sets need distinct names (metric keys), got {names}")
            self._eval_sets[stage] = eval_sets
        return self._eval_sets[stage]

    def eval_loader_roles(self, stage: EvalStage) -> list[tuple[EvalSet, Role]]:
        """What each dataloader of ``stage`` holds, in dataloader order."""
        return [(eval_set, role) for eval_set in self.eval_sets(stage) for role, _ in eval_set.roles()]

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        rank, world_size = self._distribution()
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        batches = GlobalBatchSampler(EpochPermutation(len(dataset), seed=seed), self.batch_size, rank, world_size)
        return ResumableDataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return [
            self.sharded_dataloader(dataset, self.predict_indices.get(name))
            for name, dataset in self.predict_datasets().items()
        ]

    def sharded_dataloader(self, dataset: Dataset, indices: list[int] | None = None) -> DataLoader:
        """Sequential loader over this process's (padded) shard of ``dataset`` (see :class:`ShardSampler`),
        or over ``indices`` when given."""
        rank, world_size = self._distribution()
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=ShardSampler(len(dataset), rank, world_size) if indices is None else indices,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )

    def eval_dataloaders(self, stage: EvalStage) -> list[DataLoader]:
        """One sharded loader per (eval set, role), in :meth:`eval_loader_roles` order."""
        return [
            self.sharded_dataloader(dataset) for eval_set in self.eval_sets(stage) for _, dataset in eval_set.roles()
        ]

    def _distribution(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

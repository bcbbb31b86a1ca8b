"""Training on mined triplets: what a pair re-ranker (AMES, RRT) learns from.

Every anchor of the training list gets its top-``m`` global neighbours (the training list searched against
itself, leave-one-out), kept in a neighbour file next to the training store (rebuilt when the list changes).
:class:`~datamodules.pair_sampling.MinedTriplets` draws, per epoch and anchor, a positive and a hard negative
among them; a batch is a set of triplets, each process taking its slice of the global batch and a killed run
resuming at the next batch (the contract of :mod:`datamodules.sampling`). :class:`TripletDataset` reads the
three images' global and first ``L`` local descriptors with one indexed read per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import RowSubset
from datamodules.pair_sampling import MinedTriplets
from retrieval.neighbours import build_neighbours, read_neighbours, write_neighbours


@dataclass
class TripletMining:
    """How training triplets are mined (defaults: the AMES training code's).

    Args:
        neighbours: how many global neighbours of each anchor positives and negatives are drawn from.
        power: a candidate is drawn with probability proportional to ``similarity ** power``.
        min_positives, min_negatives: anchors with fewer candidates of either kind are skipped (and counted).
        neighbour_file: where the training list's neighbours are kept; default next to the training store,
            ``<store>.neighbours<m>.h5``.
    """

    neighbours: int = 300
    power: float = 3.0
    min_positives: int = 5
    min_negatives: int = 5
    neighbour_file: str | None = None


class TripletDataset(Dataset):
    """Triplets ``(anchor, positive, negative)`` of rows of ``dataset`` (an ``EmbeddingDataset`` or a
    ``RowSubset`` of one, with ``locals_per_example`` set) as batches ``{"index" [B, 3], "embedding"
    [B, 3, Dg], "local" [B, 3, L, 5 + D]}``.

    The batch sampler hands over lists of triplets (:class:`MinedTriplets` behind a ``GlobalBatchSampler``);
    every distinct row of a batch is read once.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, triplets: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        rows = np.asarray(triplets, dtype=np.int64).reshape(-1, 3)
        batch = self.dataset.__getitems__(rows.reshape(-1).tolist())
        batch = batch.as_batch() if hasattr(batch, "as_batch") else _stack(batch)
        if "local" not in batch:
            raise ValueError("triplet training needs local descriptors in the examples (locals_per_example)")
        return {
            "index": torch.from_numpy(rows),
            "embedding": batch["embedding"].reshape(len(rows), 3, -1),
            "local": batch["local"].reshape(len(rows), 3, *batch["local"].shape[1:]),
        }


def collate_triplets(batch):
    """A triplet batch is assembled by :meth:`TripletDataset.__getitems__`; nothing left to collate."""
    return batch


def _stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in ("embedding", "local")}


def mined_triplets(
    dataset: Dataset, mining: TripletMining, store_path: str | Path, seed: int, is_builder: bool, barrier
) -> MinedTriplets:
    """The triplet sampler of ``dataset`` (rows of the store ``store_path``), building its neighbour file first
    if it is missing or was built from another list (on one process: ``is_builder``; ``barrier()`` waits)."""
    labels = getattr(dataset, "labels", None)
    ids = getattr(dataset, "ids", None)
    if labels is None:
        raise ValueError(f"{store_path}: triplet mining needs labels (same label = positive) in the training store")
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(dataset))]
    path = Path(mining.neighbour_file or f"{store_path}.neighbours{mining.neighbours}.h5")
    if is_builder and not _neighbours_match(_readable_neighbours(path), ids, mining.neighbours):
        descriptors = _unit_globals(dataset)
        scores, indices = build_neighbours(descriptors, descriptors, mining.neighbours, exclude_self=True)
        write_neighbours(
            path, scores, indices, ids, ids, query=str(store_path), database=str(store_path), exclude_self=True
        )
    barrier()
    neighbours = read_neighbours(path)
    if not _neighbours_match(neighbours, ids, mining.neighbours):
        raise ValueError(f"{path}: the neighbour file does not list the training images of {store_path}")
    return MinedTriplets(
        neighbours.indices,
        neighbours.scores,
        np.asarray(labels),
        power=mining.power,
        min_positives=mining.min_positives,
        min_negatives=mining.min_negatives,
        seed=seed,
    )


def _unit_globals(dataset: Dataset) -> np.ndarray:
    """The dataset's global descriptors, L2-normalised (neighbours by cosine similarity), without its locals."""
    if isinstance(dataset, RowSubset):
        descriptors = np.asarray(dataset.dataset.embeddings[dataset.rows], dtype=np.float32)
    else:
        descriptors = np.asarray(dataset.embeddings, dtype=np.float32)
    return descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)


def _readable_neighbours(path: Path):
    """The neighbour file at ``path``, or ``None`` when there is none or it cannot be read (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return read_neighbours(path)
    except (OSError, ValueError):
        return None


def _neighbours_match(neighbours, ids: list[str], m: int) -> bool:
    return (
        neighbours is not None
        and neighbours.query_ids is not None
        and list(neighbours.query_ids) == ids
        and neighbours.indices.shape[1] >= min(m, len(ids) - 1)
    )

"""Samplers that make 1 process and N processes see the same data, and a dataloader that resumes mid-epoch.

Training: the *global* batch (``batch_size`` in every datamodule) is drawn from one seeded permutation per
epoch, identical on every process, and each process takes its contiguous slice of it. With 1 process or 8,
every optimisation step sees the same examples, so - with a loss that gathers batch statistics across
processes - training follows the same trajectory (up to floating-point summation order).

Evaluation: each process embeds every ``world_size``-th example; shards are padded to equal length by
repeating examples from the start, and the evaluation callback drops the repeats by global index.

Prediction (extraction): each process takes one contiguous block of indices (:func:`contiguous_block`), so its
output is a consecutive range of rows that the final store joins without copying.

Images of different shapes (aspect ratio kept) cannot share a batch: :class:`ShapeBatchSampler` batches
together the indices whose images are resized to the same shape.

Class-balanced training (P x K batches, for losses that need several images of each class in a batch):
:class:`ClassBalancedSampler` takes the place of :class:`EpochPermutation` and yields global batches of
``classes_per_batch`` classes with ``images_per_class`` images each, one batch after the other.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class EpochPermutation(Sampler[int]):
    """A permutation of ``range(num_examples)`` that depends only on ``seed`` and the epoch."""

    def __init__(self, num_examples: int, shuffle: bool = True, seed: int = 0):
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_examples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_examples


@dataclass
class ClassBalanced:
    """P x K training batches (see :class:`ClassBalancedSampler`); the datamodule's ``batch_size`` (the global
    batch) must equal ``classes_per_batch * images_per_class``."""

    classes_per_batch: int
    images_per_class: int
    min_images_per_class: int = 2

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class


class ClassBalancedSampler(Sampler[int]):
    """Indices in global batches of ``classes_per_batch`` (P) classes x ``images_per_class`` (K) images.

    A drop-in for :class:`EpochPermutation` (``epoch``, ``seed``, ``set_epoch``, ``__len__``; the order depends
    only on ``(seed, epoch)``): behind ``GlobalBatchSampler(sampler, P * K, rank, world_size)`` each process
    takes its contiguous slice of every P x K batch, and ``ResumableDataLoader`` resumes mid-epoch. A batch lists
    its classes one after the other (K consecutive indices each), so with P divisible by the number of
    processes every process holds whole classes.

    An epoch visits every class once, in a seeded random order: ``ceil(C / P)`` batches for C classes. The last
    batch is completed with the first classes of the epoch's order (they are then seen twice), so no class
    is left out of an epoch. Each visit draws K distinct images of the class at random; a class with fewer than K
    images gives all of them plus draws with replacement among them (augmentation makes the repeats differ).

    Classes with fewer than ``min_images_per_class`` images are skipped (default 2: a class of one image gives
    no positive pair of distinct images); they are counted in ``skipped_classes`` / ``skipped_images`` and
    ``summary`` says so in one line.

    Args:
        labels: ``[N]`` integer class of every dataset index (any integers, e.g. landmark ids).
        classes_per_batch, images_per_class: P and K.
        min_images_per_class: classes with fewer images are skipped (and counted).
        seed: seed of the class order and of the draws; the epoch is set by :meth:`set_epoch`.
    """

    def __init__(
        self,
        labels,
        classes_per_batch: int,
        images_per_class: int,
        min_images_per_class: int = 2,
        seed: int = 0,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape} ({labels.dtype})")
        for name, value in (
            ("classes_per_batch", classes_per_batch),
            ("images_per_class", images_per_class),
            ("min_images_per_class", min_images_per_class),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"class_balanced: {name} must be an integer >= 1, got {value!r}")
        self.classes_per_batch, self.images_per_class = int(classes_per_batch), int(images_per_class)
        self.min_images_per_class = int(min_images_per_class)
        self.seed = seed
        self.epoch = 0
        classes, class_of_index, counts = np.unique(labels, return_inverse=True, return_counts=True)
        kept = counts >= self.min_images_per_class
        self.classes = classes[kept]  # the dataset labels of the kept classes, sorted
        self.class_sizes = counts[kept]
        # Dataset indices of the kept classes, grouped by class (in ``classes`` order), ascending within a class.
        in_kept = kept[class_of_index]
        self.members = np.flatnonzero(in_kept)[np.argsort(class_of_index[in_kept], kind="stable")]
        self.member_class = np.repeat(np.arange(len(self.classes)), self.class_sizes)
        self.class_starts = np.concatenate([[0], np.cumsum(self.class_sizes)[:-1]]).astype(np.int64)
        self.skipped_classes = int((~kept).sum())
        self.skipped_images = int(counts[~kept].sum())
        num_classes = len(self.classes)
        self.num_batches = math.ceil(num_classes / self.classes_per_batch)
        self.repeated_classes = self.num_batches * self.classes_per_batch - num_classes
        self.classes_with_repeats = int((self.class_sizes < self.images_per_class).sum())
        self.summary = (
            f"class-balanced batches of {self.classes_per_batch} classes x {self.images_per_class} images: "
            f"{num_classes} classes ({len(self.members)} images) in {self.num_batches} batches per epoch, "
            f"{self.repeated_classes} classes seen twice to complete the last batch, {self.classes_with_repeats} "
            f"classes with fewer than {self.images_per_class} images drawn with replacement; "
            f"{self.skipped_classes} classes ({self.skipped_images} images) skipped with fewer than "
            f"{self.min_images_per_class} images"
        )
        if num_classes < self.classes_per_batch:
            raise ValueError(
                f"class_balanced: {num_classes} classes have at least {self.min_images_per_class} images, fewer "
                f"than classes_per_batch = {self.classes_per_batch} ({self.summary})"
            )

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's indices (default: the current epoch), ``[ceil(C / P) * P * K]``, batch after batch."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([int(self.seed), int(epoch)])
        order = rng.permutation(len(self.classes))
        # The first classes of the order complete the last batch: distinct from its own, as C >= P.
        order = np.concatenate([order, order[: self.repeated_classes]])
        # A random permutation of every class's images at once: sort the members by (class, random key).
        shuffled = self.members[np.lexsort((rng.random(len(self.members)), self.member_class))]
        draws = np.arange(self.images_per_class)[None, :]
        sizes = self.class_sizes[:, None]
        # The first K of the permutation, or all of a smaller class plus uniform draws with replacement.
        extra = rng.integers(0, sizes, size=(len(self.classes), self.images_per_class))
        positions = self.class_starts[:, None] + np.where(draws < sizes, draws, extra)
        return shuffled[positions][order].reshape(-1)


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of each global batch, plus skipping batches already trained on when resuming.

    Process ``r`` of ``W`` takes positions ``[r * B / W, (r + 1) * B / W)`` of every global batch of ``B``, so the
    processes' batches of a step, in rank order, are the global batch of 1 process: nothing duplicated, nothing
    dropped. Only the incomplete last global batch of an epoch is dropped (the last :attr:`left_out` items of the
    epoch's order, the same for any number of processes), so every process runs the same number of equally sized
    steps; :attr:`summary` says so, and the datamodules log it.
    """

    def __init__(self, sampler: EpochPermutation, global_batch_size: int, rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(
                f"batch_size {global_batch_size} is the global batch and must be divisible by the "
                f"number of processes ({world_size})"
            )
        sampler_batch = getattr(sampler, "batch_size", None)  # samplers laid out in batches (P x K)
        if sampler_batch is not None and sampler_batch != global_batch_size:
            raise ValueError(
                f"batch_size {global_batch_size} (the global batch) must equal the {type(sampler).__name__}'s "
                f"batch of {sampler_batch} indices (classes_per_batch x images_per_class)"
            )
        if len(sampler) < global_batch_size:
            raise ValueError(
                f"the training set has {len(sampler)} examples, fewer than one batch of {global_batch_size}"
            )
        self.sampler = sampler  # Lightning calls sampler.set_epoch through this attribute
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = global_batch_size // world_size
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches the next time epoch ``epoch`` is iterated."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            skip = self._resume[1]
        self._resume = None
        order = list(self.sampler)
        start = self.rank * self.local_batch_size
        for b in range(skip, len(self)):
            offset = b * self.global_batch_size + start
            yield order[offset : offset + self.local_batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch_size

    @property
    def left_out(self) -> int:
        """Items at the end of every epoch's order that fill no global batch (different ones each epoch when the
        order is shuffled)."""
        return len(self.sampler) % self.global_batch_size

    @property
    def summary(self) -> str:
        return (
            f"{len(self.sampler)} training items per epoch in {len(self)} global batches of {self.global_batch_size} "
            f"({self.local_batch_size} per process x {self.world_size}); the last {self.left_out} of each "
            "epoch's order fill no global batch and are left out of that epoch"
        )


class ResumableDataLoader(DataLoader):
    """A training dataloader whose position in the epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` of stateful dataloaders in the checkpoint and calls
    ``load_state_dict()`` before iterating again, so a run killed mid-epoch continues with the batch after
    the last one it trained on, not from the start of the epoch.
    """

    batch_sampler: GlobalBatchSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, GlobalBatchSampler):
            raise TypeError("ResumableDataLoader needs a GlobalBatchSampler as batch_sampler")
        self._batches_done = 0

    def __iter__(self):
        pending = self.batch_sampler._resume
        self._batches_done = pending[1] if pending and pending[0] == self.batch_sampler.sampler.epoch else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler.sampler
        return {"epoch": sampler.epoch, "batches_done": self._batches_done, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = state["epoch"], state["batches_done"]
        # The permutation of the interrupted run, even if this run was given another seed.
        self.batch_sampler.sampler.seed = state.get("seed", self.batch_sampler.sampler.seed)
        if done >= len(self.batch_sampler):  # saved at the end of an epoch: the next one starts fresh
            epoch, done = epoch + 1, 0
        self.batch_sampler.sampler.set_epoch(epoch)
        self.batch_sampler.resume_at(epoch, done)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank``, padded to ``ceil(n / world_size)`` if ``pad``."""

    def __init__(self, num_examples: int, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.num_examples = num_examples
        self.rank = rank
        self.world_size = world_size
        self.pad = pad

    def __iter__(self) -> Iterator[int]:
        indices = list(range(self.rank, self.num_examples, self.world_size))
        if self.pad and self.num_examples:
            per_rank = math.ceil(self.num_examples / self.world_size)
            indices += list(range(per_rank - len(indices)))  # repeats, dropped again by global index
        return iter(indices)

    def __len__(self) -> int:
        if self.pad and self.num_examples:
            return math.ceil(self.num_examples / self.world_size)
        return len(range(self.rank, self.num_examples, self.world_size))


def contiguous_block(num_examples: int, rank: int = 0, world_size: int = 1) -> range:
    """Process ``rank``'s block of ``range(num_examples)``: ``world_size`` consecutive blocks, in rank order,
    whose sizes differ by at most one."""
    return range(rank * num_examples // world_size, (rank + 1) * num_examples // world_size)


class ShapeBatchSampler(Sampler[list[int]]):
    """Batches of ``indices`` whose examples have the same ``shapes`` entry (e.g. the resized image shape).

    Shapes are visited in order of first appearance and, within a shape, indices in the given order; each
    shape's last batch may be smaller. Every index appears exactly once (repeats included, as given).
    """

    def __init__(self, indices: Sequence[int], shapes: Sequence[Hashable], batch_size: int):
        if len(indices) != len(shapes):
            raise ValueError(f"{len(indices)} indices but {len(shapes)} shapes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        buckets: dict[Hashable, list[int]] = {}
        for index, shape in zip(indices, shapes):
            buckets.setdefault(shape, []).append(int(index))
        self.batches = [
            bucket[start : start + batch_size]
            for bucket in buckets.values()
            for start in range(0, len(bucket), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

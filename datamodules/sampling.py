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
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

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


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of each global batch, plus skipping batches already trained on when resuming.

    Incomplete last global batches are dropped, so every process runs the same number of equally sized steps.
    """

    def __init__(self, sampler: EpochPermutation, global_batch_size: int, rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(
                f"batch_size {global_batch_size} is the global batch and must be divisible by the "
                f"number of processes ({world_size})"
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

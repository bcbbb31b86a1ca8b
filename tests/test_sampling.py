"""Global batches are the same with 1 or N processes; resuming skips exactly the batches already trained on."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from datamodules.sampling import (
    EpochPermutation,
    GlobalBatchSampler,
    ResumableDataLoader,
    ShapeBatchSampler,
    ShardSampler,
    contiguous_block,
)


def batches(num_examples, batch_size, rank, world_size, epoch=0, seed=3):
    sampler = EpochPermutation(num_examples, seed=seed)
    sampler.set_epoch(epoch)
    return list(GlobalBatchSampler(sampler, batch_size, rank, world_size))


@pytest.mark.parametrize("world_size", [2, 4])
def test_processes_split_each_global_batch_of_the_single_process_run(world_size):
    single = batches(103, 20, 0, 1, epoch=2)
    shards = [batches(103, 20, rank, world_size, epoch=2) for rank in range(world_size)]
    assert len(single) == 5 and all(len(s) == 5 for s in shards)  # incomplete last batch dropped
    for step, global_batch in enumerate(single):
        assert sum((shard[step] for shard in shards), []) == global_batch


def test_epochs_and_seeds_change_the_order_deterministically():
    assert batches(50, 10, 0, 1, epoch=0) == batches(50, 10, 0, 1, epoch=0)
    assert batches(50, 10, 0, 1, epoch=0) != batches(50, 10, 0, 1, epoch=1)
    assert batches(50, 10, 0, 1, seed=1) != batches(50, 10, 0, 1, seed=2)


def test_refuses_batches_not_divisible_by_processes_and_tiny_datasets():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        GlobalBatchSampler(EpochPermutation(100), 10, 0, 3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        GlobalBatchSampler(EpochPermutation(5), 10)


def make_loader(num_examples=40, batch_size=8):
    dataset = TensorDataset(torch.arange(num_examples))
    return ResumableDataLoader(
        dataset, batch_sampler=GlobalBatchSampler(EpochPermutation(num_examples, seed=1), batch_size)
    )


def test_loader_state_resumes_after_the_last_consumed_batch():
    loader = make_loader()
    loader.batch_sampler.sampler.set_epoch(1)
    reference = [b[0].tolist() for b in loader]
    iterator = iter(loader)
    consumed = [next(iterator)[0].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 2, "seed": 1}
    resumed = make_loader()
    resumed.batch_sampler.sampler.seed = 99  # e.g. a resumed run with seed_everything: true
    resumed.load_state_dict(state)
    assert consumed + [b[0].tolist() for b in resumed] == reference
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 5, "seed": 1}
    # The skip applies once: the next pass over the same epoch is whole again.
    assert [b[0].tolist() for b in resumed] == reference


def test_loader_state_saved_at_the_end_of_an_epoch_resumes_at_the_next():
    loader = make_loader()
    list(loader)
    resumed = make_loader()
    resumed.load_state_dict(loader.state_dict())
    assert resumed.batch_sampler.sampler.epoch == 1
    loader.batch_sampler.sampler.set_epoch(1)
    assert [b[0].tolist() for b in resumed] == [b[0].tolist() for b in loader]


@pytest.mark.parametrize("num_examples,world_size", [(10, 3), (9, 3), (2, 4), (0, 2)])
def test_shards_cover_every_index_and_have_equal_length(num_examples, world_size):
    shards = [list(ShardSampler(num_examples, rank, world_size)) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == len(ShardSampler(num_examples, 0, world_size))
    assert sorted(set(np.concatenate(shards).tolist())) == list(range(num_examples))
    unpadded = [list(ShardSampler(num_examples, rank, world_size, pad=False)) for rank in range(world_size)]
    assert sorted(sum(unpadded, [])) == list(range(num_examples))


@pytest.mark.parametrize("num_examples,world_size", [(10, 3), (9, 3), (2, 4), (0, 2), (7, 1)])
def test_contiguous_blocks_tile_the_indices_in_rank_order(num_examples, world_size):
    blocks = [contiguous_block(num_examples, rank, world_size) for rank in range(world_size)]
    assert sum((list(b) for b in blocks), []) == list(range(num_examples))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [list(b) for b in [contiguous_block(10, r, 3) for r in range(3)]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_shape_batches_hold_one_shape_each_and_every_index_once():
    indices = [5, 0, 3, 8, 1, 2, 7]
    shapes = ["wide", "tall", "wide", "wide", "tall", "wide", "square"]
    batches = list(ShapeBatchSampler(indices, shapes, batch_size=2))
    assert batches == [[5, 3], [8, 2], [0, 1], [7]]
    assert len(ShapeBatchSampler(indices, shapes, batch_size=2)) == 4
    with pytest.raises(ValueError, match="7 indices but 6 shapes"):
        ShapeBatchSampler(indices, shapes[:-1], 2)

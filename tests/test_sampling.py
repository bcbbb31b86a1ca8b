"""Global batches are the same with 1 or N processes; resuming skips exactly the batches already trained on."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from datamodules.base import RetrievalDataModule
from datamodules.pair_sampling import MinedTriplets
from datamodules.sampling import (
    ClassBalancedSampler,
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


# ---- every training sampler under DDP: the processes share out the global batches of 1 process ---------------------


def _mined_triplets():
    # 40 anchors of 8 classes, each listing its 4 same-class others then 11 random others, scores decreasing: every
    # anchor is usable, so 40 triplets per epoch, 3 global batches of 12 and 4 left out.
    labels = np.repeat(np.arange(8), 5)
    rng = np.random.default_rng(0)
    indices = np.stack(
        [
            np.concatenate(
                [
                    np.flatnonzero((labels == labels[a]) & (np.arange(40) != a)),
                    rng.choice(np.flatnonzero(labels != labels[a]), 11, replace=False),
                ]
            )
            for a in range(40)
        ]
    )
    scores = np.tile(np.linspace(0.9, 0.1, 15, dtype=np.float32), (40, 1))
    return MinedTriplets(indices, scores, labels, min_positives=1, min_negatives=1, seed=5)


TRAINING_SAMPLERS = {
    # 103 examples: 8 global batches of 12, the last 7 of each epoch's order left out
    "permutation": lambda: EpochPermutation(103, seed=5),
    # 11 classes of 2 to 6 images (and one of a single image, skipped) in batches of 4 classes x 3 images
    "class_balanced": lambda: ClassBalancedSampler(np.repeat(np.arange(12), [2, 3, 4, 5, 6, 1] * 2), 4, 3, seed=5),
    "mined_triplets": _mined_triplets,
}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("kind", TRAINING_SAMPLERS)
def test_processes_share_out_the_global_batches_of_one_process(kind, world_size):
    def process_batches(rank, size):
        sampler = TRAINING_SAMPLERS[kind]()
        sampler.set_epoch(2)  # every process sets its own sampler's epoch, as Lightning does
        return GlobalBatchSampler(sampler, 12, rank, size)

    single = process_batches(0, 1)
    order = list(single.sampler)  # the epoch's order, the same on every process
    shards = [list(process_batches(rank, world_size)) for rank in range(world_size)]
    steps = len(order) // 12
    expected_left_out = {"permutation": 7, "class_balanced": 0, "mined_triplets": 4}[kind]
    assert len(order) - steps * 12 == single.left_out == process_batches(0, world_size).left_out == expected_left_out
    assert all(len(shard) == steps for shard in shards)  # every process runs the same steps...
    assert {len(batch) for shard in shards for batch in shard} == {12 // world_size}  # ...of equal size
    for step, global_batch in enumerate(single):
        # disjoint slices of the step's global batch of 1 process, in rank order: nothing duplicated or dropped
        assert sum((shard[step] for shard in shards), []) == global_batch == order[step * 12 : (step + 1) * 12]
    if kind == "permutation":  # every example once per epoch, but for the documented incomplete last batch
        seen = [i for shard in shards for batch in shard for i in batch]
        assert sorted(seen + order[steps * 12 :]) == list(range(103))
    if expected_left_out:
        assert f"the last {expected_left_out} of each epoch's order fill no global batch" in single.summary


class _LabelledExamples(torch.utils.data.Dataset):
    labels = np.repeat(np.arange(10), 4)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"index": index, "label": int(self.labels[index])}


class _Examples(RetrievalDataModule):
    def train_dataset(self):
        return _LabelledExamples()


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("balanced", [False, True], ids=["shuffled", "class_balanced"])
def test_the_datamodule_gives_each_process_its_share_of_every_global_batch(world_size, balanced, caplog):
    def loader(rank, size):
        data = _Examples(batch_size=6, shuffle_seed=1)
        data.set_class_balanced({"classes_per_batch": 3, "images_per_class": 2} if balanced else None)
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=size, strategy=strategy)
        return data.train_dataloader()

    with caplog.at_level(logging.INFO):
        single = [batch["index"].tolist() for batch in loader(0, 1)]
    shards = [[batch["index"].tolist() for batch in loader(rank, world_size)] for rank in range(world_size)]
    assert len(single) == (4 if balanced else 6)  # 10 classes in batches of 3; 40 examples in batches of 6
    assert all(len(shard) == len(single) for shard in shards)
    for step, global_batch in enumerate(single):
        assert sum((shard[step] for shard in shards), []) == global_batch
    # the 4 examples the 6 batches of 6 leave out of each epoch are said
    dropped = "40 training items per epoch in 6 global batches of 6 (6 per process x 1); the last 4 of"
    assert (dropped in caplog.text) != balanced

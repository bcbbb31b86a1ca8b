"""Mined triplets: drawn ∝ similarity ** power among global neighbours, split across processes like any global
batch, resumed mid-epoch exactly, with skipped anchors counted."""

import numpy as np
import pytest
from torch.utils.data import Dataset

from datamodules.pair_sampling import MinedTriplets
from datamodules.sampling import GlobalBatchSampler, ResumableDataLoader


def clustered_neighbours(num_classes=30, per_class=8, m=20, seed=0):
    """Leave-one-out top-``m`` neighbours of random embeddings clustered by class, with their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.normal(size=(num_classes, 16))
    x = centres[labels] + 0.6 * rng.normal(size=(len(labels), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    return indices, np.take_along_axis(scores, indices, axis=1).astype(np.float32), labels


def sampler(seed=3, **kwargs):
    indices, scores, labels = clustered_neighbours()
    # 4 of the 240 anchors lack positives: 236 triplets, not a multiple of the batches below.
    return MinedTriplets(indices, scores, labels, seed=seed, min_positives=5, min_negatives=2, **kwargs)


def test_triplets_pair_each_usable_anchor_with_a_positive_and_a_negative_among_its_neighbours():
    indices, scores, labels = clustered_neighbours()
    triplets = MinedTriplets(indices, scores, labels, min_positives=2, min_negatives=2)
    drawn = list(triplets)
    assert len(drawn) == len(triplets) > 0 and len(triplets) + triplets.skipped_anchors == len(labels)
    assert len({a for a, _, _ in drawn}) == len(drawn)  # each usable anchor once per epoch
    for anchor, positive, negative in drawn:
        assert all(isinstance(i, int) for i in (anchor, positive, negative))
        row = list(indices[anchor])
        assert positive in row and negative in row and anchor not in (positive, negative)
        assert labels[positive] == labels[anchor] != labels[negative]
        assert scores[anchor, row.index(positive)] > 0 and scores[anchor, row.index(negative)] > 0


def test_draws_depend_only_on_seed_epoch_and_anchor():
    a, b = sampler(), sampler()
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) != a.triplets(epoch=5) and list(a) != sampler(seed=4).triplets(epoch=4)
    # The draw of an anchor does not depend on its place in the permutation.
    unshuffled = sampler(shuffle=False)
    assert sorted(a.triplets(epoch=2)) == unshuffled.triplets(epoch=2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_processes_take_slices_of_the_single_process_global_batches(world_size):
    single_sampler = sampler()
    single_sampler.set_epoch(1)
    single = list(GlobalBatchSampler(single_sampler, 12, rank=0, world_size=1))
    shards = []
    for rank in range(world_size):
        triplets = sampler()
        triplets.set_epoch(1)  # each process sets its own copy's epoch, as Lightning does
        shards.append(list(GlobalBatchSampler(triplets, 12, rank, world_size)))
    assert len(single_sampler) == 236 and single_sampler.skipped_anchors == 4
    assert all(len(shard) == len(single) == 236 // 12 for shard in shards)
    for step, global_batch in enumerate(single):
        assert sum((shard[step] for shard in shards), []) == global_batch
    # Nothing duplicated, nothing dropped but the incomplete last global batch.
    union = [t for shard in shards for batch in shard for t in batch]
    assert len(set(union)) == len(union) == len(single) * 12
    epoch = single_sampler.triplets(epoch=1)
    assert sorted(union) == sorted(epoch[: len(single) * 12])


class Triplets(Dataset):
    """A dataset that returns the triplets it is given: the DataLoader hands ``__getitems__`` a list of them."""

    def __len__(self):
        return 240

    def __getitem__(self, triplet):
        raise AssertionError("a batch is read at once, through __getitems__")

    def __getitems__(self, triplets):
        return list(triplets)


def loader(seed=3):
    return ResumableDataLoader(Triplets(), batch_sampler=GlobalBatchSampler(sampler(seed), 16), collate_fn=list)


def test_the_loader_resumes_mid_epoch_with_exactly_the_next_batch():
    reference_loader = loader()
    reference_loader.batch_sampler.sampler.set_epoch(2)
    reference = list(reference_loader)
    assert all(isinstance(t, tuple) and len(t) == 3 for t in reference[0])
    interrupted = loader()
    interrupted.batch_sampler.sampler.set_epoch(2)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches_done": 3, "seed": 3}
    resumed = loader(seed=99)  # the interrupted run's seed wins
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest[0] == reference[3] and consumed + rest == reference
    # An epoch that had ended resumes at the next one.
    finished = loader()
    finished.load_state_dict({"epoch": 2, "batches_done": len(reference), "seed": 3})
    assert list(finished) == [list(batch) for batch in GlobalBatchSampler(_at_epoch(sampler(), 3), 16)]


def _at_epoch(triplets, epoch):
    triplets.set_epoch(epoch)
    return triplets


def one_row_neighbours(num_anchors, positive_scores, negative_scores):
    """``num_anchors`` anchors with the same neighbour scores: their draws are samples of one distribution.

    Anchor ``a`` (label ``a``) has its own positives and negatives, so a drawn item tells its column.
    """
    columns = len(positive_scores) + len(negative_scores)
    per_anchor = 1 + columns
    labels = np.zeros(num_anchors * per_anchor, dtype=np.int64)
    indices = np.full((num_anchors, columns), -1, dtype=np.int64)
    rows = []
    for a in range(num_anchors):
        base = a * per_anchor
        labels[base : base + 1 + len(positive_scores)] = a
        labels[base + 1 + len(positive_scores) : base + per_anchor] = num_anchors + a
        indices[a] = np.arange(base + 1, base + per_anchor)
        rows.append(base)
    scores = np.tile(np.array(list(positive_scores) + list(negative_scores), dtype=np.float32), (num_anchors, 1))
    return indices, scores, labels, np.array(rows)


def column_frequencies(power, epochs=4, num_anchors=2500):
    positive_scores = [0.9, 0.6, 0.3, 0.2, 0.1, 0.0, -0.4]
    negative_scores = [0.8, 0.4, 0.2, -0.1]
    indices, scores, labels, anchors = one_row_neighbours(num_anchors, positive_scores, negative_scores)
    triplets = MinedTriplets(indices, scores, labels, anchors=anchors, power=power, seed=7, min_negatives=3)
    positive_counts, negative_counts = np.zeros(len(positive_scores)), np.zeros(len(negative_scores))
    for epoch in range(epochs):
        for anchor, positive, negative in triplets.triplets(epoch):
            positive_counts[positive - anchor - 1] += 1
            negative_counts[negative - anchor - 1 - len(positive_scores)] += 1
    expected = [np.maximum(s, 0) ** power * (np.array(s) > 0) for s in (positive_scores, negative_scores)]
    return (
        positive_counts / positive_counts.sum(),
        negative_counts / negative_counts.sum(),
        *(e / e.sum() for e in expected),
    )


@pytest.mark.parametrize("power", [3.0, 1.0, 0.0])
def test_positives_and_negatives_are_drawn_with_probability_proportional_to_score_to_the_power(power):
    positive, negative, expected_positive, expected_negative = column_frequencies(power)
    # 10,000 draws per role: a standard error below 0.005; the power-3, -1 and -0 distributions differ by > 0.1.
    np.testing.assert_allclose(positive, expected_positive, atol=0.015)
    np.testing.assert_allclose(negative, expected_negative, atol=0.015)
    assert positive[-2:].sum() == 0 and negative[-1] == 0  # a score <= 0 is never drawn


def test_the_frequency_test_tells_the_authors_power_from_others():
    positive, negative, _, _ = column_frequencies(3.0)
    for other in (0.0, 1.0):
        _, _, expected_positive, expected_negative = column_frequencies(other, epochs=1, num_anchors=1)
        assert np.abs(positive - expected_positive).max() > 0.1
        assert np.abs(negative - expected_negative).max() > 0.1


def test_anchors_without_enough_candidates_are_skipped_and_counted():
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 1])
    indices = np.array(
        [
            [1, 2, 3, 4],  # 2 positives, 2 negatives: usable
            [0, 0, 3, 4],  # 0 twice: both count, drawn like one candidate of twice the weight
            [2, 0, 1, 3],  # itself listed: ignored, leaving 2 positives and 1 negative
            [4, 7, 0, -1],  # an empty slot: 2 positives, 1 negative
            [3, 7, 0, 5],  # 2 positives, 2 negatives, one of them with score 0: 1 negative
            [0, 1, 3, 4],  # no positive at all
            [0, 1, 3, 4],  # usable
            [3, 4, 0, 1],  # usable
        ]
    )
    scores = np.array([[0.9, 0.8, 0.7, 0.6]] * 8, dtype=np.float32)
    scores[4, 3] = 0.0
    triplets = MinedTriplets(indices, scores, labels, min_positives=2, min_negatives=2)
    assert sorted(a for a, _, _ in triplets) == [0, 1, 6, 7]
    assert (len(triplets), triplets.skipped_anchors, triplets.skipped_for_positives) == (4, 4, 1)
    assert triplets.summary == (
        "mined triplets: 4 of 8 anchors usable, 4 skipped (1 with fewer than 2 positives, 3 more with fewer than "
        "2 negatives, among their top-4 neighbours with score > 0)"
    )
    for anchor, positive, negative in triplets:
        assert anchor not in (positive, negative)
    with pytest.raises(ValueError, match="no usable anchor: mined triplets: 0 of 8"):
        MinedTriplets(indices, scores, labels, min_positives=5, min_negatives=5)


def test_scores_whose_power_underflows_still_draw_among_the_candidates():
    indices = np.array([[1, 2], [0, 2], [0, 1]])
    scores = np.full((3, 2), 1e-200, dtype=np.float64)
    triplets = MinedTriplets(indices, scores, np.array([0, 0, 1]), min_positives=1, min_negatives=1, power=3)
    assert sorted(triplets) == [(0, 1, 2), (1, 0, 2)]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(neighbour_indices=np.zeros(4, dtype=np.int64)), r"2-d \[anchors, m\] array"),
        (dict(neighbour_indices=np.zeros((4, 2))), "must be integers"),
        (dict(neighbour_scores=np.zeros((4, 3), dtype=np.float32)), "differ in shape"),
        (dict(neighbour_scores=np.zeros((4, 2), dtype=np.int64)), "must be floats"),
        (dict(labels=np.zeros(5, dtype=np.int64)), "4 neighbour rows for 5 labels: without `anchors`"),
        (dict(labels=np.zeros(4)), "labels must be a 1-d integer array"),
        (dict(neighbour_indices=np.full((4, 2), 4)), r"neighbour row 0 holds indices outside \[-1, 4\)"),
        (dict(neighbour_scores=np.full((4, 2), np.nan, dtype=np.float32)), "neighbour row 0 holds NaN"),
        (dict(anchors=[0, 1]), "2 anchors for 4 neighbour rows"),
        (dict(anchors=[0, 1, 2, 7]), r"anchors must be dataset indices in \[0, 4\)"),
        (dict(power=-1.0), "power must be a finite number >= 0"),
        (dict(power=float("inf")), "power must be a finite number >= 0"),
        (dict(min_positives=0), "min_positives must be an integer >= 1"),
        (dict(min_negatives=2.5), "min_negatives must be an integer >= 1"),
        (dict(seed=-1), "seed must be an integer >= 0"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(change, message):
    arguments = dict(
        neighbour_indices=np.array([[1, 2], [0, 3], [3, 0], [2, 1]]),
        neighbour_scores=np.full((4, 2), 0.5, dtype=np.float32),
        labels=np.array([0, 0, 1, 1]),
        min_positives=1,
        min_negatives=1,
    )
    with pytest.raises(ValueError, match=message):
        MinedTriplets(**{**arguments, **change})

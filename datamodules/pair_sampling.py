"""Training triplets mined from global nearest neighbours, as the AMES training code draws them.

Every training image is an *anchor*. Among its top-``m`` global neighbours (a leave-one-out neighbour file of
the training list against itself, :mod:`retrieval.neighbours`) with a positive similarity, those of the same
label are its positive candidates, the others its negative candidates. Each epoch, every anchor with at least
``min_positives`` and ``min_negatives`` candidates yields one ``(anchor, positive, negative)`` triplet, the
positive and the negative each drawn with probability proportional to ``similarity ** power`` (the authors:
top-300 neighbours, similarity > 0, at least 5 of each, power 3). Hard examples, the most similar images, are
thus drawn most often, while every candidate keeps a chance.

:class:`MinedTriplets` behaves as :class:`datamodules.sampling.EpochPermutation` (``epoch``, ``seed``,
``set_epoch``, ``__len__``, a seeded permutation per epoch), with triplets in place of indices, so the samplers
and the loader that make 1 and N processes agree and resume mid-epoch take it unchanged::

    sampler = MinedTriplets(neighbours.indices, neighbours.scores, labels, seed=seed)
    loader = ResumableDataLoader(
        dataset, batch_sampler=GlobalBatchSampler(sampler, triplets_per_batch, rank, world_size), collate_fn=...
    )

A global batch is ``triplets_per_batch`` triplets (the authors: 100 triplets, 300 images); each process takes
its contiguous slice. **The dataset receives triplets**: with a ``batch_sampler`` the DataLoader calls
``dataset.__getitems__(batch)`` with ``batch`` a list of ``(anchor, positive, negative)`` tuples of dataset
indices (without ``__getitems__``, ``dataset[triplet]`` for each), and its ``collate_fn`` gets what that returns.

Every draw depends only on ``(seed, epoch, anchor)`` and the neighbours: all processes draw the same triplets
without communicating, and a resumed run draws those of the interrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

Triplet = tuple[int, int, int]
# Neighbour rows processed at a time: bounds the float64 weights of a pass to about 150 MB at m = 300.
_CHUNK_ROWS = 65536


class MinedTriplets(Sampler[Triplet]):
    """Per epoch, a seeded permutation of the usable anchors, each with a positive and a negative drawn among
    its global neighbours (see the module docstring).

    Args:
        neighbour_indices: ``[A, m]`` int, row ``a`` the dataset indices of anchor ``a``'s neighbours, best first
            (-1 = empty slot; the anchor itself, if listed, is ignored). May be a memory map.
        neighbour_scores: ``[A, m]`` float, their global similarities; only candidates with a score > 0 are drawn.
        labels: ``[N]`` int, the label of every dataset index (same label = positive).
        anchors: ``[A]`` dataset index of each row's anchor; default: row ``a`` is dataset index ``a``
            (``A == N``, the training list against itself).
        power: draw probability ``∝ score ** power`` (0: uniform among candidates).
        min_positives, min_negatives: an anchor with fewer candidates is skipped (and counted).
        seed: seed of the permutation and of the draws; the epoch is set by :meth:`set_epoch`.
        shuffle: permute the anchors each epoch (``False``: anchors in row order; draws still change per epoch).

    Attributes:
        skipped_anchors: anchors skipped for too few candidates (``skipped_for_positives`` of them lack
            positives, the others negatives only); ``summary`` says so in one line.
    """

    def __init__(
        self,
        neighbour_indices,
        neighbour_scores,
        labels,
        anchors: Sequence[int] | None = None,
        power: float = 3.0,
        min_positives: int = 5,
        min_negatives: int = 5,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.indices = _as_matrix(neighbour_indices, "neighbour_indices")
        self.scores = _as_matrix(neighbour_scores, "neighbour_scores")
        self.labels = np.asarray(labels)
        if not np.issubdtype(self.indices.dtype, np.integer):
            raise ValueError(f"neighbour_indices must be integers, got dtype {self.indices.dtype}")
        if not np.issubdtype(self.scores.dtype, np.floating):
            raise ValueError(f"neighbour_scores must be floats, got dtype {self.scores.dtype}")
        if self.scores.shape != self.indices.shape:
            raise ValueError(
                f"neighbour_scores {self.scores.shape} and neighbour_indices {self.indices.shape} differ in shape"
            )
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array, got shape {self.labels.shape} ({self.labels.dtype})")
        num_rows, num_items = self.indices.shape[0], len(self.labels)
        if anchors is None:
            if num_rows != num_items:
                raise ValueError(
                    f"{num_rows} neighbour rows for {num_items} labels: without `anchors`, row i must be the "
                    "neighbours of dataset index i (the training list against itself); pass anchors=[dataset "
                    "index of each row] otherwise"
                )
            self.anchors = np.arange(num_rows, dtype=np.int64)
        else:
            self.anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
            if len(self.anchors) != num_rows:
                raise ValueError(f"{len(self.anchors)} anchors for {num_rows} neighbour rows")
            if num_rows and (self.anchors.min() < 0 or self.anchors.max() >= num_items):
                raise ValueError(f"anchors must be dataset indices in [0, {num_items})")
        if isinstance(power, bool) or not isinstance(power, (int, float, np.number)) or not 0 <= power < math.inf:
            raise ValueError(f"power must be a finite number >= 0, got {power!r}")
        for name, value in (("min_positives", min_positives), ("min_negatives", min_negatives), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (name != "seed"):
                raise ValueError(f"{name} must be an integer >= {int(name != 'seed')}, got {value!r}")
        self.power = float(power)
        self.min_positives, self.min_negatives = int(min_positives), int(min_negatives)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._count_candidates(num_items)

    def _count_candidates(self, num_items: int) -> None:
        """Validate the neighbours and find the usable anchors, in chunks of rows (the arrays may be mapped)."""
        positives = np.empty(len(self.anchors), dtype=np.int64)
        negatives = np.empty(len(self.anchors), dtype=np.int64)
        for start, stop in _chunks(len(self.anchors)):
            indices = np.asarray(self.indices[start:stop])
            scores = np.asarray(self.scores[start:stop])
            outside = (indices < -1) | (indices >= num_items)
            if outside.any():
                row = start + int(np.flatnonzero(outside.any(1))[0])
                raise ValueError(f"neighbour row {row} holds indices outside [-1, {num_items}) (the labelled items)")
            if np.isnan(scores).any():
                row = start + int(np.flatnonzero(np.isnan(scores).any(1))[0])
                raise ValueError(f"neighbour row {row} holds NaN scores")
            candidate, same = self._candidates(self.anchors[start:stop], indices, scores)
            positives[start:stop] = (candidate & same).sum(1)
            negatives[start:stop] = (candidate & ~same).sum(1)
        few_positives = positives < self.min_positives
        few_negatives = negatives < self.min_negatives
        self.usable_rows = np.flatnonzero(~few_positives & ~few_negatives)
        self.skipped_anchors = int(len(self.anchors) - len(self.usable_rows))
        self.skipped_for_positives = int(few_positives.sum())
        depth = self.indices.shape[1]
        self.summary = (
            f"mined triplets: {len(self.usable_rows)} of {len(self.anchors)} anchors usable, "
            f"{self.skipped_anchors} skipped ({self.skipped_for_positives} with fewer than {self.min_positives} "
            f"positives, {int((few_negatives & ~few_positives).sum())} more with fewer than {self.min_negatives} "
            f"negatives, among their top-{depth} neighbours with score > 0)"
        )
        if len(self.usable_rows) == 0:
            raise ValueError(f"no usable anchor: {self.summary}")

    def _candidates(self, anchors: np.ndarray, indices: np.ndarray, scores: np.ndarray):
        """``(candidate, same label)`` masks of neighbour rows: a candidate is a listed item other than the row's
        anchor, with a positive score."""
        anchors = anchors[:, None]
        candidate = (indices >= 0) & (indices != anchors) & (scores > 0)
        same = self.labels[np.maximum(indices, 0)] == self.labels[anchors]
        return candidate, same

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.usable_rows)

    def __iter__(self) -> Iterator[Triplet]:
        return iter(self.triplets())

    def triplets(self, epoch: int | None = None) -> list[Triplet]:
        """The epoch's triplets (default: the current epoch), in the order the sampler yields them."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([int(self.seed), int(epoch)])
        # One uniform number per row and role, whether the row is usable or not, so an anchor's draw depends
        # on (seed, epoch, anchor) only.
        uniforms = rng.random((len(self.anchors), 2))
        order = rng.permutation(len(self.usable_rows)) if self.shuffle else np.arange(len(self.usable_rows))
        positive = np.empty(len(self.usable_rows), dtype=np.int64)
        negative = np.empty(len(self.usable_rows), dtype=np.int64)
        for start, stop in _chunks(len(self.usable_rows)):
            rows = self.usable_rows[start:stop]
            indices, scores = np.asarray(self.indices[rows]), np.asarray(self.scores[rows])
            candidate, same = self._candidates(self.anchors[rows], indices, scores)
            weights = np.where(candidate, np.maximum(scores, 0).astype(np.float64) ** self.power, 0.0)
            for role, (out, mask) in enumerate(((positive, candidate & same), (negative, candidate & ~same))):
                role_weights = np.where(mask, weights, 0.0)
                # Scores so small that their power underflows to 0: uniform among the candidates instead.
                vanished = role_weights.sum(1) == 0
                role_weights[vanished] = mask[vanished]
                column = _draw(role_weights, uniforms[rows, role])
                out[start:stop] = np.take_along_axis(indices, column[:, None], axis=1)[:, 0]
        anchors = self.anchors[self.usable_rows]
        return [(int(anchors[i]), int(positive[i]), int(negative[i])) for i in order]


def _draw(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row, a column drawn with probability ∝ its weight (inverse CDF): the first column whose cumulative
    weight exceeds ``u x total``. Columns of zero weight never are, as their cumulative weight equals the one
    before. Rows need a positive total (usable anchors have candidates)."""
    cumulative = np.cumsum(weights, axis=1)
    targets = uniforms * cumulative[:, -1]
    column = (cumulative <= targets[:, None]).sum(1)
    # Rounding could leave the target at the total: take the last column of positive weight.
    last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    return np.minimum(column, last)


def _as_matrix(values, name: str):
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if not hasattr(values, "shape"):
        values = np.asarray(values)
    if len(values.shape) != 2:
        raise ValueError(f"{name} must be a 2-d [anchors, m] array, got shape {tuple(values.shape)}")
    return values


def _chunks(total: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, _CHUNK_ROWS):
        yield start, min(start + _CHUNK_ROWS, total)

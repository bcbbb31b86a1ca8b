"""ASMK and ASMK* between batches of local-descriptor sets, in plain torch: the pairwise form of
:mod:`retrieval.asmk` for re-ranking a shortlist (GPU or CPU, float32).

The kernel is the one :func:`retrieval.asmk.asmk_similarity` defines, step for step:

1. every valid descriptor goes to its nearest visual word (L2; a query's to its ``query_assignments`` nearest,
   the ``asmk`` package's multiple assignment, each receiving the full residual);
2. per image and word, the residuals ``x - q_c`` are summed: ``V(X_c)``;
3. ASMK: ``V(X_c) / ||V(X_c)||``; ASMK*: its signs as ``+-1`` (``> 0`` is ``+1``, as the packed bits);
4. per word both images hold, ``u_c``: the inner product (ASMK) or the ``+-1`` inner product over ``d``, i.e.
   ``1 - 2 hamming / d`` (ASMK*); then ``sigma(u) = sign(u) |u|^alpha`` where ``u > tau``, summed;
5. the image normalisation: ``1 / sqrt(|C_q| |C_x|)`` (``"word_counts"``, 0 when either has no word) or none.

Vectorised over images: an image's ``L * a`` (descriptor, word) entries are sorted by word (padding under a
sentinel word ``K`` that sorts last), the residuals of equal words are summed into their group, and each image
becomes an :class:`AggregatedSets` row: its distinct words ascending, padded with ``K``, and one vector per
word. The words two images share are found by ``searchsorted`` of the database image's words in the query's, so
a pair costs ``O(G_x d)`` and no ``G_q x G_x`` matrix is built. :class:`AsmkKernel` aggregates each distinct
set of a pair batch once (a shortlist repeats its query in every pair, and a database image shared by several
queries' shortlists once per batch).

Arithmetic is float32 (autocast off): assignment distances, residual sums (``scatter_add``; on CUDA its
summation order, hence the last bits, may vary between runs) and ``u``. The numpy reference computes ``u`` and
``sigma`` in float64; the two agree to float32 rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: As :mod:`retrieval.asmk` (kept here so that this module needs no numpy code).
NORMALISATIONS = ("word_counts", "none")
#: Elements of one block of the assignment's ``rows x K`` distance matrix (256 MiB of float32).
ASSIGNMENT_BLOCK = 1 << 26


@dataclass
class AggregatedSets:
    """ASMK / ASMK* representations of ``N`` images, padded to ``G`` words each.

    ``words``: ``int64 [N, G]``, each row's distinct words ascending, then the sentinel ``K`` (codebook size).
    ``vectors``: ``float32 [N, G, d]``, the unit residual sum (ASMK) or its ``+-1`` signs (ASMK*) of each word
    (anything at sentinel entries). ``counts``: ``int64 [N]``, the number of distinct words ``|C|``.
    """

    words: Tensor
    vectors: Tensor
    counts: Tensor


def assign_words(descriptors: Tensor, padding: Tensor, centroids: Tensor, assignments: int = 1) -> Tensor:
    """``int64 [N, L, assignments]``: the nearest words (L2, nearest first) of every valid descriptor of
    ``descriptors [N, L, d]``; padding rows (``padding [N, L]`` true) get word 0, which aggregation ignores.

    Distances ``||c||^2 - 2 x.c`` (``||x||^2`` does not change the order), in blocks of rows so that no more
    than :data:`ASSIGNMENT_BLOCK` distances exist at once.
    """
    size, dim = centroids.shape
    if not 1 <= assignments <= size:
        raise ValueError(f"assignments must be between 1 and the codebook size {size}, got {assignments}")
    if descriptors.shape[-1] != dim:
        raise ValueError(
            f"local descriptors have {descriptors.shape[-1]} dimensions but the codebook's words {dim}: "
            "the codebook must be trained on descriptors of this kind"
        )
    flat = descriptors.reshape(-1, dim)
    valid = torch.nonzero(~padding.reshape(-1)).squeeze(1)
    words = torch.zeros(flat.shape[0], assignments, dtype=torch.long, device=descriptors.device)
    squared_norms = (centroids * centroids).sum(1)
    rows = max(1, ASSIGNMENT_BLOCK // size)
    for start in range(0, len(valid), rows):
        block = valid[start : start + rows]
        distances = torch.addmm(squared_norms, flat[block], centroids.T, alpha=-2.0)
        if assignments == 1:
            words[block] = distances.argmin(1, keepdim=True)
        else:
            words[block] = distances.topk(assignments, dim=1, largest=False, sorted=True).indices
    return words.reshape(*descriptors.shape[:-1], assignments)


def aggregate(descriptors: Tensor, padding: Tensor, words: Tensor, centroids: Tensor, binary: bool) -> AggregatedSets:
    """ASMK (``binary=False``) or ASMK* representations of ``N`` sets of local descriptors.

    Args:
        descriptors: float ``[N, L, d]``.
        padding: bool ``[N, L]``, true for rows that are not descriptors.
        words: int ``[N, L, a]``, each row's word(s) (:func:`assign_words`); a row adds its residual to each.
        centroids: float32 ``[K, d]``, the codebook.
    """
    count, length, assignments = words.shape
    size, dim = centroids.shape
    keys = words.masked_fill(padding.unsqueeze(-1), size).reshape(count, length * assignments)
    residuals = (descriptors.unsqueeze(2) - centroids[words]).reshape(count, length * assignments, dim)
    sorted_keys, order = keys.sort(dim=1, stable=True)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    group = starts.cumsum(1) - 1
    groups = int(group.max()) + 1 if group.numel() else 0
    sums = residuals.new_zeros(count, groups, dim)
    sums.scatter_add_(
        1, group.unsqueeze(-1).expand(-1, -1, dim), residuals.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
    )
    group_words = torch.full((count, groups), size, dtype=torch.long, device=words.device)
    group_words.scatter_(1, group, sorted_keys)
    vectors = torch.where(sums > 0, 1.0, -1.0) if binary else F.normalize(sums, dim=-1)
    return AggregatedSets(group_words, vectors, (group_words < size).sum(1))


def pair_similarities(
    query: AggregatedSets,
    database: AggregatedSets,
    query_rows: Tensor,
    database_rows: Tensor,
    size: int,
    binary: bool,
    alpha: float = 3.0,
    threshold: float = 0.0,
    normalisation: str = "word_counts",
) -> Tensor:
    """``float32 [P]``: the kernel of pair ``p`` = (``query`` row ``query_rows[p]``, ``database`` row
    ``database_rows[p]``); ``size`` is the codebook size ``K`` (the sentinel word)."""
    check_normalisation(normalisation)
    query_words = query.words[query_rows]  # [P, G_q]
    database_words = database.words[database_rows]  # [P, G_x]
    if query_words.shape[1] == 0 or database_words.shape[1] == 0:
        return torch.zeros(len(query_rows), device=query_words.device)
    position = torch.searchsorted(query_words, database_words).clamp_(max=query_words.shape[1] - 1)
    shared = (query_words.gather(1, position) == database_words) & (database_words < size)
    query_vectors = query.vectors[query_rows.unsqueeze(1), position]  # [P, G_x, d]
    u = (query_vectors * database.vectors[database_rows]).sum(-1)
    if binary:
        u = u / query_vectors.shape[-1]
    kept = shared & (u > threshold)
    total = torch.where(kept, torch.sign(u) * u.abs().pow(alpha), 0.0).sum(1)
    if normalisation == "none":
        return total
    product = (query.counts[query_rows] * database.counts[database_rows]).float()
    return torch.where(product > 0, total / product.clamp(min=1.0).sqrt(), 0.0)


def check_normalisation(normalisation: str) -> None:
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown image normalisation {normalisation!r}; expected one of {NORMALISATIONS}")


class AsmkKernel(nn.Module):
    """ASMK (``binary=False``) or ASMK* similarity of pairs of local-descriptor sets, with the codebook
    ``centroids [K, d]`` as a (non-persistent) buffer.

    Args:
        centroids: the visual words (``retrieval.codebook.Codebook.centroids``).
        binary: ASMK* (signs) rather than ASMK (unit residual sums); ``d`` must then be a multiple of 8, as the
            packed form stores it.
        alpha, threshold: the selectivity ``sigma(u) = sign(u) |u|^alpha`` for ``u > threshold``.
        query_assignments: nearest words per query descriptor (database descriptors: 1).
        normalisation: ``"word_counts"`` or ``"none"`` (see :mod:`retrieval.asmk`).
    """

    def __init__(
        self,
        centroids: Tensor,
        binary: bool = True,
        alpha: float = 3.0,
        threshold: float = 0.0,
        query_assignments: int = 5,
        normalisation: str = "word_counts",
    ):
        super().__init__()
        centroids = torch.as_tensor(centroids, dtype=torch.float32)
        if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] < 1:
            raise ValueError(f"codebook centroids must be a non-empty [K, d] array, got shape {tuple(centroids.shape)}")
        if binary and centroids.shape[1] % 8:
            raise ValueError(f"ASMK* packs d / 8 bytes per word; the descriptor dimension {centroids.shape[1]} is not")
        if not 1 <= query_assignments <= centroids.shape[0]:
            raise ValueError(
                f"query_assignments must be between 1 and the codebook size {centroids.shape[0]}, "
                f"got {query_assignments}"
            )
        check_normalisation(normalisation)
        self.register_buffer("centroids", centroids, persistent=False)
        self.binary, self.alpha, self.threshold = bool(binary), float(alpha), float(threshold)
        self.query_assignments, self.normalisation = int(query_assignments), normalisation

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def aggregate_sets(self, descriptors: Tensor, padding: Tensor, assignments: int) -> AggregatedSets:
        """Assign and aggregate ``N`` sets (``[N, L, d]``, ``[N, L]`` padding)."""
        descriptors = descriptors.float()
        words = assign_words(descriptors, padding, self.centroids, assignments)
        return aggregate(descriptors, padding, words, self.centroids, self.binary)

    def forward(
        self, query_descriptors: Tensor, query_padding: Tensor, database_descriptors: Tensor, database_padding: Tensor
    ) -> Tensor:
        """``float32 [P]``: the kernel of ``P`` pairs of sets, ``[P, L_q, d]`` / ``[P, L_q]`` against
        ``[P, L_x, d]`` / ``[P, L_x]``."""
        with torch.autocast(query_descriptors.device.type, enabled=False):
            query_sets, query_rows = distinct_sets(query_descriptors, query_padding)
            database_sets, database_rows = distinct_sets(database_descriptors, database_padding)
            query = self.aggregate_sets(*query_sets, self.query_assignments)
            database = self.aggregate_sets(*database_sets, 1)
            return pair_similarities(
                query,
                database,
                query_rows,
                database_rows,
                self.size,
                self.binary,
                self.alpha,
                self.threshold,
                self.normalisation,
            )


def distinct_sets(descriptors: Tensor, padding: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``((descriptors [U, L, d], padding [U, L]), rows [P])``: the ``U`` distinct sets among ``P`` (equal
    descriptors and padding) and which one each of the ``P`` is.

    Sets are grouped by a fingerprint (four seeded random projections of all their values), then checked equal
    to their group's first set value for value; should a fingerprint ever join different sets, every set is
    kept as its own (the result is exact either way). ``torch.unique(dim=0)`` on the whole rows does the same
    but takes seconds on a GPU for a shortlist that repeats one query 256 times.
    """
    count, length, dim = descriptors.shape
    every = torch.arange(count, device=descriptors.device)
    if count <= 1:
        return (descriptors, padding), every
    flat = torch.cat([descriptors.reshape(count, -1).float(), padding.float()], dim=1)
    generator = torch.Generator().manual_seed(0)
    projections = torch.randn(flat.shape[1], 4, generator=generator).to(flat.device)
    _, rows = torch.unique(flat @ projections, dim=0, return_inverse=True)
    first = torch.full((int(rows.max()) + 1,), count, device=rows.device).scatter_reduce_(0, rows, every, "amin")
    if not torch.equal(flat[first][rows], flat):
        return (descriptors, padding), every
    return (descriptors[first], padding[first]), rows

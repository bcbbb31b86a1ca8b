"""Inverted file over ASMK / ASMK* database images: search by the aggregated matching kernel without scoring
every (query, image) pair.

For every visual word, a posting list holds the database images that have the word and their per-word
vectors (ASMK, ``float32 [d]``) or packed signs (ASMK*, ``d / 8`` bytes). All posting lists are stored
contiguously, word after word (within a word, by ascending image), so the index is four arrays and never a
``words x images`` matrix. A query visits only the posting lists of its own words and adds ``sigma(u)`` of
every entry to a score vector over the database images, then applies the image normalisation
(:mod:`retrieval.asmk`): the same scores as :func:`retrieval.asmk.kernel_similarities`, summed in another
order.

Rankings follow the contract of :func:`retrieval.search.knn`: ``(scores float32 [num_queries, k],
ids int64 [num_queries, k])``, 0-based database indices, score descending and equal scores by ascending index
(images sharing no word with the query score 0 and fill the end of a deep ranking in index order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from retrieval.asmk import (
    _BYTE_POPCOUNT,
    DEFAULT_ALPHA,
    DEFAULT_THRESHOLD,
    AggregatedImage,
    check_compatible,
    check_normalisation,
    normalisation_factors,
    selectivity,
    word_similarities,
)

# Working memory of one step of a query's posting-list scan, in bytes: the gathered query and database rows
# and the similarity temporaries. Bounds memory for long posting lists (common words of a 1M-image database).
SEARCH_CHUNK_BYTES = 64 * 2**20
# numpy >= 2.0 counts set bits natively; older versions look each byte up in a table.
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")


class InvertedFile:
    """Posting lists of an aggregated database (:class:`retrieval.asmk.AggregatedImage` per image, all ASMK or
    all ASMK*, of one dimension); image ``i`` of ``database`` is database index ``i``.

    Attributes:
        binary: ASMK* (packed codes) rather than ASMK; ``dim``: the descriptor dimension ``d``.
        posting_words: ``int64 [W]``, the words present in the database, ascending.
        posting_offsets: ``int64 [W + 1]``: the entries of ``posting_words[j]`` are
            ``posting_offsets[j]:posting_offsets[j + 1]``.
        entry_images: ``int32 [E]`` (``int64`` past 2**31 images), the image of every entry.
        entry_vectors: ``float32 [E, d]`` or ``uint8 [E, d / 8]``, the image's vector for the word.
        image_word_counts: ``int64 [N]``, ``|C_x|`` of every image (for the image normalisation).
    """

    def __init__(self, database: Sequence[AggregatedImage]):
        images = list(database)
        if not images:
            raise ValueError("an inverted file needs at least one database image")
        for number, image in enumerate(images):
            check_compatible(images[0], image, "database image 0", f"database image {number}")
        self.binary = images[0].binary
        self.dim = images[0].dim
        counts = np.array([image.num_words for image in images], dtype=np.int64)
        words = np.concatenate([image.words for image in images])
        vectors = np.concatenate([image.vectors for image in images])
        id_type = np.int32 if len(images) < 2**31 else np.int64
        image_ids = np.repeat(np.arange(len(images), dtype=id_type), counts)
        # Stable: images stay in ascending order within a word's posting list.
        order = np.argsort(words, kind="stable")
        sorted_words = words[order]
        starts = np.flatnonzero(np.r_[words.size > 0, sorted_words[1:] != sorted_words[:-1]])
        self.posting_words = sorted_words[starts]
        self.posting_offsets = np.r_[starts, words.size].astype(np.int64)
        self.entry_images = image_ids[order]
        self.entry_vectors = vectors[order]
        self.image_word_counts = counts

    @property
    def num_images(self) -> int:
        return self.image_word_counts.shape[0]

    @property
    def num_entries(self) -> int:
        """Posting entries: one per (image, word present in it)."""
        return self.entry_images.shape[0]

    @property
    def memory_bytes(self) -> int:
        """Bytes of every array the index holds (entries, posting offsets and words, per-image word counts)."""
        arrays = (self.posting_words, self.posting_offsets, self.entry_images, self.entry_vectors)
        return int(sum(array.nbytes for array in arrays) + self.image_word_counts.nbytes)

    @property
    def bytes_per_image(self) -> float:
        """:attr:`memory_bytes` per database image. Entries dominate: per word of an image, ``d / 8`` bytes
        for ASMK* (16 B at ``d = 128``) or ``4 d`` for ASMK, plus a 4-byte image id."""
        return self.memory_bytes / self.num_images

    def query_scores(
        self,
        query: AggregatedImage,
        alpha: float = DEFAULT_ALPHA,
        threshold: float = DEFAULT_THRESHOLD,
        normalisation: str = "word_counts",
    ) -> np.ndarray:
        """``float64 [num_images]``: ``S(query, x)`` for every database image ``x`` (see
        :func:`retrieval.asmk.asmk_similarity`), from the posting lists of the query's words only."""
        check_normalisation(normalisation)
        self._check_query(query, "query")
        scores = np.zeros(self.num_images, dtype=np.float64)
        if self.posting_words.size:
            self._accumulate(query, scores, alpha, threshold)
        scores *= normalisation_factors(normalisation, query.num_words, self.image_word_counts)
        return scores

    def search(
        self,
        queries: Sequence[AggregatedImage],
        k: int,
        alpha: float = DEFAULT_ALPHA,
        threshold: float = DEFAULT_THRESHOLD,
        normalisation: str = "word_counts",
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` database images of every query by the kernel similarity.

        Returns ``(scores, ids)``, ``float32`` and ``int64`` ``[num_queries, k]``, as
        :func:`retrieval.search.knn` (``k`` above the database size is clipped to it).
        """
        check_normalisation(normalisation)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = list(queries)
        for number, query in enumerate(queries):
            self._check_query(query, f"query {number}")
        k = min(k, self.num_images)
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for row, query in enumerate(tqdm(queries, desc="search", disable=not progress)):
            query_scores = self.query_scores(query, alpha, threshold, normalisation)
            ids[row] = _top_k(query_scores, k)
            scores[row] = query_scores[ids[row]]
        return scores, ids

    def _check_query(self, query: AggregatedImage, name: str) -> None:
        # An empty image of the index's kind stands for its images in the comparison (and its message).
        like_index = AggregatedImage(self.posting_words[:0], self.entry_vectors[:0])
        check_compatible(query, like_index, name, "the inverted file's images")

    def _accumulate(self, query: AggregatedImage, scores: np.ndarray, alpha: float, threshold: float) -> None:
        """Add ``sigma(u)`` of every posting entry of the query's words to ``scores``, a bounded number of
        entries at a time, one by one in query-word order (``np.add.at``: each image's terms are summed in the
        order of its words, whatever the chunking)."""
        slots = np.searchsorted(self.posting_words, query.words)
        found = slots < self.posting_words.size
        found[found] = self.posting_words[slots[found]] == query.words[found]
        query_rows = np.flatnonzero(found)
        slots = slots[found]
        starts = self.posting_offsets[slots]
        lengths = self.posting_offsets[slots + 1] - starts
        # Entries of the visited lists, numbered 0..total-1 in query-word order: list j holds [begin_j, end_j).
        ends = np.cumsum(lengths)
        begins = ends - lengths
        total = int(ends[-1]) if ends.size else 0
        if self.binary:
            # u takes d + 1 values (1 - 2 h / d for h differing bits): sigma(u) is a table look-up.
            bits = 8 * self.entry_vectors.shape[1]
            weight_of = selectivity(1.0 - 2.0 * np.arange(bits + 1) / bits, alpha, threshold)
            entry_codes, query_codes = _code_words(self.entry_vectors), _code_words(query.vectors)
        # Per entry: the two gathered rows and, for ASMK, their float64 products; for ASMK*, xor and popcounts.
        row_bytes = self.entry_vectors.shape[1] * self.entry_vectors.itemsize
        chunk = max(1, SEARCH_CHUNK_BYTES // (row_bytes * (4 if self.binary else 6)))
        for first in range(0, total, chunk):
            last = min(total, first + chunk)
            # The lists this step overlaps, and how many of its entries each holds.
            low = int(np.searchsorted(ends, first, side="right"))
            high = int(np.searchsorted(ends, last - 1, side="right")) + 1
            counts = np.minimum(ends[low:high], last) - np.maximum(begins[low:high], first)
            owner = np.repeat(np.arange(low, high), counts)
            entries = np.arange(first, last) + np.repeat(starts[low:high] - begins[low:high], counts)
            if self.binary:
                differing = np.take(entry_codes, entries, axis=0) ^ np.take(query_codes, query_rows[owner], axis=0)
                weights = weight_of[_popcount_rows(differing)]
            else:
                u = word_similarities(
                    np.take(query.vectors, query_rows[owner], axis=0), np.take(self.entry_vectors, entries, axis=0)
                )
                weights = selectivity(u, alpha, threshold)
            # Adding the zero weights changes no score: no filtering pass.
            np.add.at(scores, np.take(self.entry_images, entries), weights)


def _code_words(codes: np.ndarray) -> np.ndarray:
    """Packed codes ``uint8 [m, b]`` viewed as ``[m, b / w]`` words of the widest unsigned type (``w`` = 8, 4,
    2 or 1 bytes) that divides ``b``: the same bits, fewer and cheaper xors and popcounts."""
    codes = np.ascontiguousarray(codes)
    for dtype in (np.uint64, np.uint32, np.uint16):
        if codes.shape[1] % np.dtype(dtype).itemsize == 0:
            return codes.view(dtype)
    return codes


def _popcount_rows(words: np.ndarray) -> np.ndarray:
    """Set bits of each row of an unsigned-integer matrix, ``int64 [m]``."""
    if _HAS_BITWISE_COUNT:
        counts = np.bitwise_count(words)
    else:
        counts = _BYTE_POPCOUNT[words.view(np.uint8)]
    # Column by column: a reduction along a short last axis (2 words for d = 128) is far slower.
    total = counts[:, 0].astype(np.int64)
    for column in range(1, counts.shape[1]):
        total += counts[:, column]
    return total


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, score descending and equal scores by ascending index, without sorting
    the whole vector when ``k`` is small."""
    if k < scores.shape[0]:
        kth = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
        candidates = np.flatnonzero(scores >= kth)  # ascending, with every item tied at the k-th score
    else:
        candidates = np.arange(scores.shape[0])
    order = np.argsort(-scores[candidates], kind="stable")[:k]
    return candidates[order]

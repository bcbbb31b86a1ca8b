"""Aggregated matching kernels of Detect-to-Retrieve: VLAD, R-VLAD, ASMK, ASMK* and the regional R-ASMK(*).

Sources: the D2R paper's slides ("Detect-to-Retrieve", Teichmann, Araujo, Zhu, Sim, CVPR 2019), the authors'
release in DELF (``delf/python/feature_aggregation_extractor.py`` and
``feature_aggregation_similarity.py``, ``protos/aggregation_config.proto``) where the slides' formulas are
garbled or silent, and the ``asmk`` package (Jenicek & Tolias, 0.1.1) for the image normalisation it uses.

An image is a set of local descriptors ``X`` (``[n, d]``), each assigned to one or more visual words of a
codebook (:mod:`retrieval.codebook`). With ``X_c`` the descriptors assigned to word ``c``:

- ``V(X_c) = sum_{x in X_c} (x - q_c)``, the residuals to the word's centroid summed, and ``V(X)`` the
  concatenation of ``V(X_c)`` over all words (``K d`` values). VLAD is ``V(X) / ||V(X)||``.
- ASMK keeps one entry per word present: ``V_hat(X_c) = V(X_c) / ||V(X_c)||``. ASMK* keeps only its signs,
  ``V(X_c) > 0`` packed 8 to a byte (``d / 8`` bytes per word, 16 B for ``d = 128``; first dimension in the
  byte's top bit, as :func:`retrieval.compression.pack_bits`).
- Regions ``r`` (the whole image and detected boxes) give ``X^r``. R-VLAD is ``mean_r V(X^r) / ||V(X^r)||``.
  R-ASMK aggregates per word over regions, ``V_R(X_c) = 1/R sum_r gamma(X^r) V(X^r_c)``, then normalises per
  word (R-ASMK) or binarises (R-ASMK*): the per-word block of R-VLAD, renormalised.
- Similarity of a query ``q`` and a database image ``x``: ``S(q, x) = sum_{c in C_q & C_x} sigma(u_c)`` with
  ``sigma(u) = sign(u) |u|^alpha`` if ``u > tau`` else 0 (:func:`selectivity`, ``alpha = 3, tau = 0``);
  ``u_c = V_hat(q_c)^T V_hat(x_c)`` for ASMK and ``u_c = 1 - 2 hamming(b_q, b_x) / d`` for ASMK* (the inner
  product of the two ``+-1`` sign vectors over ``d``).

Regions are given as a list of index arrays, one per region, holding the rows of ``descriptors`` that fall in
it: a descriptor may belong to several regions (a box inside the image is inside the whole image too), and a
descriptor in no listed region is not aggregated, so the whole image is a region the caller lists
(``[np.arange(n), *boxes]``). :func:`regions_from_counts` builds the list for the DELF layout, where every
region's descriptors were extracted from its crop and stored one region after the other.

Choices where the slides are silent or garbled, and why:

- ``gamma(X^r) = 1 / ||V(X^r)||``, the norm of the region's whole VLAD, as in the authors' code (R-ASMK is
  the unnormalised R-VLAD, renormalised per word); the slide writes ``gamma(Y^r_c)``, which would normalise
  each region's word separately. ``normalise_regions=False`` sums the regions' residuals unweighted.
- ``1/R`` is dropped from R-ASMK: the per-word normalisation cancels it. R-VLAD divides by the number of
  listed regions, empty ones included (as the authors' code); an empty region's VLAD is zero.
- The words of an aggregated image are those at least one of its descriptors is assigned to (the ``asmk``
  package; DELF drops a word whose residual sum is exactly zero, which only differs when residuals cancel).
- ``sigma`` keeps ``u > tau`` (the paper and DELF); the ``asmk`` package keeps ``u >= tau``. They differ only
  at ``u == tau``, where ``sigma`` is 0 anyway for ``tau = 0``.
- Image normalisation (:data:`NORMALISATIONS`), applied to ``S(q, x)``:

  ``"word_counts"``: divide by ``sqrt(|C_q| |C_x|)``, the numbers of words of the two aggregated images (for
  a query with multiple assignment, every word one of its descriptors went to). The ``asmk`` package's
  inverted file (``use_idf=False``) and DELF's ASMK/ASMK* comparisons (``use_l2_normalization: true``). It is
  the ASMK paper's ``gamma(q) gamma(x)`` with ``gamma(X) = (sum_c sigma(V_hat(X_c)^T V_hat(X_c)))^-1/2``,
  since ``sigma(1) = 1``.

  ``"none"``: the raw sum, as the slides write ``sim^R-ASMK`` and as the authors compare R-ASMK* (DELF's
  ``aggregation_config.proto``: "for regional aggregated kernels ... this should be set to false", and the
  released D2R index configuration). Use it to reproduce D2R's R-ASMK* numbers.

  The ``asmk`` package's optional idf weighting (``use_idf``, off by default) is not implemented.

VLAD and R-VLAD are dense ``float32 [K d]`` vectors compared by inner product (search them with
:func:`retrieval.search.knn`); at ``K = 65,536, d = 128`` one takes 32 MiB, so they are for small codebooks
and as references. ASMK and ASMK* images are :class:`AggregatedImage` and are searched with
:class:`retrieval.inverted_file.InvertedFile`; :func:`kernel_similarities` is the brute-force reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.compression import pack_bits
from retrieval.validation import as_float32_matrix

#: Image normalisations of the kernel similarity (see the module docstring).
NORMALISATIONS = ("word_counts", "none")
#: Selectivity exponent and threshold of D2R and the ``asmk`` package.
DEFAULT_ALPHA = 3.0
DEFAULT_THRESHOLD = 0.0

# Set bits of every byte value: the Hamming distance of packed codes is a table look-up per byte.
_BYTE_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class AggregatedImage:
    """One image's ASMK or ASMK* representation: one entry per visual word present.

    ``words``: ``int64 [m]``, ascending and unique. ``vectors``: ``float32 [m, d]`` unit-norm residual sums
    (ASMK, R-ASMK) or ``uint8 [m, d / 8]`` packed signs (ASMK*, R-ASMK*), row ``i`` for ``words[i]``.
    """

    words: np.ndarray
    vectors: np.ndarray

    def __post_init__(self):
        words = np.asarray(self.words)
        vectors = np.asarray(self.vectors)
        if words.ndim != 1 or not (np.issubdtype(words.dtype, np.integer) or words.size == 0):
            raise ValueError(f"aggregated words must be a 1-D integer array [m], got {words.dtype} {words.shape}")
        words = words.astype(np.int64, copy=False)
        if words.size and (words[0] < 0 or np.any(np.diff(words) <= 0)):
            raise ValueError("aggregated words must be non-negative, ascending and unique (one entry per word)")
        if vectors.ndim != 2 or vectors.shape[0] != words.shape[0]:
            raise ValueError(
                f"aggregated vectors must be [m, d] with one row per word (m = {words.shape[0]}), "
                f"got shape {vectors.shape}"
            )
        if vectors.dtype != np.uint8:
            if not np.issubdtype(vectors.dtype, np.floating):
                raise ValueError(
                    f"aggregated vectors must be float (ASMK) or uint8 packed bits (ASMK*), got {vectors.dtype}"
                )
            vectors = vectors.astype(np.float32, copy=False)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "vectors", vectors)

    @property
    def binary(self) -> bool:
        """ASMK* (packed signs) rather than ASMK (float vectors)."""
        return self.vectors.dtype == np.uint8

    @property
    def dim(self) -> int:
        """Descriptor dimension ``d``: bits per word for ASMK*."""
        return self.vectors.shape[1] * (8 if self.binary else 1)

    @property
    def num_words(self) -> int:
        return self.words.shape[0]


# Aggregation


def aggregate_vlad(descriptors, words, centroids) -> np.ndarray:
    """VLAD: ``float32 [K d]``, the residual sums of all words concatenated and L2-normalised (zero for an
    image without descriptors).

    Args:
        descriptors: float ``[n, d]``.
        words: int ``[n]`` or ``[n, a]``, each descriptor's visual word(s) (:meth:`Codebook.assign`); with
            ``a > 1`` a descriptor adds its residual to each of its words.
        centroids: float ``[K, d]``, the codebook (``Codebook.centroids``).
    """
    descriptors, words, centroids = _checked_inputs(descriptors, words, centroids)
    present, sums = _word_residual_sums(descriptors, words, centroids, None, normalise_regions=False)
    vector = _dense(present, sums, centroids.shape[0]).reshape(-1)
    return _unit(vector)


def aggregate_regional_vlad(descriptors, words, centroids, regions: Sequence) -> np.ndarray:
    """R-VLAD: ``float32 [K d]``, ``mean_r V(X^r) / ||V(X^r)||`` over the listed regions (not unit-norm).

    ``regions``: one int array per region with the rows of ``descriptors`` in it (module docstring);
    the other arguments as :func:`aggregate_vlad`.
    """
    descriptors, words, centroids = _checked_inputs(descriptors, words, centroids)
    regions = _checked_regions(regions, descriptors.shape[0])
    present, sums = _word_residual_sums(descriptors, words, centroids, regions, normalise_regions=True)
    return _dense(present, sums / len(regions), centroids.shape[0]).reshape(-1)


def aggregate_asmk(descriptors, words, centroids, binary: bool = False) -> AggregatedImage:
    """ASMK (``binary=False``: per-word unit residual sums) or ASMK* (``binary=True``: their signs, packed) of
    one image. Arguments as :func:`aggregate_vlad`; ASMK* needs ``d`` divisible by 8."""
    descriptors, words, centroids = _checked_inputs(descriptors, words, centroids, binary)
    present, sums = _word_residual_sums(descriptors, words, centroids, None, normalise_regions=False)
    return _aggregated_image(present, sums, binary)


def aggregate_regional_asmk(
    descriptors, words, centroids, regions: Sequence, binary: bool = False, normalise_regions: bool = True
) -> AggregatedImage:
    """R-ASMK (or R-ASMK* with ``binary=True``) of one image: per word, ``sum_r gamma(X^r) V(X^r_c)`` over
    the listed regions, then normalised per word (or binarised).

    ``gamma(X^r) = 1 / ||V(X^r)||`` (the region's whole VLAD norm, as the authors' code) with
    ``normalise_regions=True``, 1 otherwise. With the whole image as the only region this is ASMK.
    ``regions`` as :func:`aggregate_regional_vlad`, the other arguments as :func:`aggregate_asmk`.
    """
    descriptors, words, centroids = _checked_inputs(descriptors, words, centroids, binary)
    regions = _checked_regions(regions, descriptors.shape[0])
    present, sums = _word_residual_sums(descriptors, words, centroids, regions, normalise_regions)
    return _aggregated_image(present, sums, binary)


def regions_from_counts(counts) -> list[np.ndarray]:
    """Regions for descriptors stored one region after the other (DELF's ``num_features_per_region``):
    region ``r`` holds the next ``counts[r]`` rows."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise ValueError(f"region counts must be a 1-D array of non-negative integers, got {counts!r}")
    return np.split(np.arange(int(counts.sum()), dtype=np.int64), np.cumsum(counts)[:-1])


# Similarity


def selectivity(similarities, alpha: float = DEFAULT_ALPHA, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``sigma(u) = sign(u) |u|^alpha`` where ``u > threshold``, 0 elsewhere (``float64``, same shape)."""
    u = np.asarray(similarities, dtype=np.float64)
    return np.where(u > threshold, np.sign(u) * np.abs(u) ** alpha, 0.0)


def word_similarities(query_vectors: np.ndarray, image_vectors: np.ndarray) -> np.ndarray:
    """``float64 [m]``: ``u`` of row ``i`` of ``query_vectors`` with row ``i`` of ``image_vectors``.

    Float rows (ASMK): the inner product. Packed rows (ASMK*, ``uint8``): ``1 - 2 hamming / bits``, which is
    the inner product of the ``+-1`` sign vectors divided by the number of bits.
    """
    if query_vectors.shape != image_vectors.shape or query_vectors.dtype != image_vectors.dtype:
        raise ValueError(
            f"paired word vectors must match: query {query_vectors.dtype} {query_vectors.shape}, "
            f"image {image_vectors.dtype} {image_vectors.shape}"
        )
    if query_vectors.dtype == np.uint8:
        differing = _BYTE_POPCOUNT[np.bitwise_xor(query_vectors, image_vectors)].sum(axis=1, dtype=np.int64)
        return 1.0 - 2.0 * differing / (8 * query_vectors.shape[1])
    return np.einsum("ij,ij->i", query_vectors, image_vectors, dtype=np.float64)


def asmk_similarity(
    query: AggregatedImage,
    image: AggregatedImage,
    alpha: float = DEFAULT_ALPHA,
    threshold: float = DEFAULT_THRESHOLD,
    normalisation: str = "word_counts",
) -> float:
    """``S(query, image)``: ``sigma(u_c)`` summed over the words the two images share, then the image
    ``normalisation`` (:data:`NORMALISATIONS`, module docstring)."""
    check_normalisation(normalisation)
    check_compatible(query, image, "query", "database image")
    _, query_rows, image_rows = np.intersect1d(query.words, image.words, assume_unique=True, return_indices=True)
    u = word_similarities(query.vectors[query_rows], image.vectors[image_rows])
    total = selectivity(u, alpha, threshold).sum()
    return float(total * normalisation_factors(normalisation, query.num_words, image.num_words))


def kernel_similarities(
    queries: Sequence[AggregatedImage],
    database: Sequence[AggregatedImage],
    alpha: float = DEFAULT_ALPHA,
    threshold: float = DEFAULT_THRESHOLD,
    normalisation: str = "word_counts",
) -> np.ndarray:
    """``float64 [num_queries, num_database]``: :func:`asmk_similarity` of every pair, by brute force (the
    reference for :class:`retrieval.inverted_file.InvertedFile`; ``O(queries x database)`` pairs)."""
    scores = np.zeros((len(queries), len(database)), dtype=np.float64)
    for row, query in enumerate(queries):
        for column, image in enumerate(database):
            scores[row, column] = asmk_similarity(query, image, alpha, threshold, normalisation)
    return scores


def normalisation_factors(normalisation: str, query_words: int, image_words) -> np.ndarray:
    """What ``S(q, x)`` is multiplied by for a query of ``query_words`` words and images of ``image_words``
    words (an int or an array): ``1 / sqrt(|C_q| |C_x|)`` (0 where either has no word) or 1."""
    check_normalisation(normalisation)
    image_words = np.asarray(image_words, dtype=np.float64)
    if normalisation == "none":
        return np.ones_like(image_words)
    product = query_words * image_words
    return np.where(product > 0, 1.0 / np.sqrt(np.maximum(product, 1.0)), 0.0)


def check_normalisation(normalisation: str) -> None:
    """Refuse a normalisation name not in :data:`NORMALISATIONS`."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown image normalisation {normalisation!r}; expected one of {NORMALISATIONS}")


def check_compatible(first: AggregatedImage, second: AggregatedImage, first_name: str, second_name: str) -> None:
    """Refuse to compare an ASMK image with an ASMK* one, or images of different dimensions."""
    for name, image in ((first_name, first), (second_name, second)):
        if not isinstance(image, AggregatedImage):
            raise ValueError(f"{name} must be an AggregatedImage, got {type(image).__name__}")
    if first.binary != second.binary or first.dim != second.dim:
        raise ValueError(
            f"{first_name} ({_kind(first)}) and {second_name} ({_kind(second)}) are not comparable: "
            "both must be ASMK or both ASMK*, of the same dimension"
        )


# Internals


def _kind(image: AggregatedImage) -> str:
    return f"{'ASMK*' if image.binary else 'ASMK'}, d = {image.dim}"


def _checked_inputs(descriptors, words, centroids, binary: bool = False):
    descriptors = as_float32_matrix(descriptors, "descriptors")
    centroids = as_float32_matrix(centroids, "codebook centroids")
    if descriptors.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"descriptors [n, d] of dimension {descriptors.shape[1]} do not match codebook centroids [K, d] of "
            f"dimension {centroids.shape[1]}"
        )
    if binary and descriptors.shape[1] % 8:
        raise ValueError(f"ASMK* packs d / 8 bytes per word; the descriptor dimension {descriptors.shape[1]} is not")
    words = np.asarray(words)
    if words.ndim == 1:
        words = words[:, None]
    if words.ndim != 2 or words.shape[0] != descriptors.shape[0] or words.shape[1] < 1:
        raise ValueError(
            f"words must be [n] or [n, assignments] with n = {descriptors.shape[0]} descriptors, "
            f"got shape {np.shape(words)}"
        )
    if words.size and not np.issubdtype(words.dtype, np.integer):
        raise ValueError(f"words must be integer visual-word ids, got {words.dtype}")
    words = words.astype(np.int64, copy=False)
    if words.size and (words.min() < 0 or words.max() >= centroids.shape[0]):
        raise ValueError(
            f"words must be ids of the {centroids.shape[0]} codebook words, [0, {centroids.shape[0]}), "
            f"got values from {words.min()} to {words.max()}"
        )
    return descriptors, words, centroids


def _checked_regions(regions, num_descriptors: int) -> list[np.ndarray]:
    if isinstance(regions, np.ndarray) and regions.ndim < 2:
        raise ValueError(
            "regions must be a list of index arrays, one per region (rows of descriptors), "
            f"got a {regions.ndim}-D array"
        )
    checked = []
    for number, region in enumerate(regions):
        region = np.asarray(region)
        if region.size == 0:
            region = region.astype(np.int64).reshape(0)
        if region.ndim != 1 or not np.issubdtype(region.dtype, np.integer):
            raise ValueError(
                f"region {number} must be a 1-D integer array of descriptor rows, got {region.dtype} {region.shape}"
            )
        if region.size and (region.min() < 0 or region.max() >= num_descriptors):
            raise ValueError(
                f"region {number} lists descriptor rows from {region.min()} to {region.max()}; "
                f"expected rows in [0, {num_descriptors})"
            )
        if np.unique(region).size != region.size:
            raise ValueError(f"region {number} lists a descriptor row more than once")
        checked.append(region.astype(np.int64, copy=False))
    if not checked:
        raise ValueError("regions must list at least one region (e.g. the whole image, np.arange(n))")
    return checked


def _word_residual_sums(
    descriptors: np.ndarray,
    words: np.ndarray,
    centroids: np.ndarray,
    regions: list[np.ndarray] | None,
    normalise_regions: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(present words int64 [m] ascending, float32 [m, d])``: ``sum_r gamma_r V(X^r_c)`` for every word
    ``c`` assigned to a descriptor of a region (``regions=None``: one region, all rows, ``gamma = 1``)."""
    size, dim = centroids.shape
    if regions is None:
        rows = np.arange(descriptors.shape[0])
        region_of_row = np.zeros(rows.shape[0], dtype=np.int64)
    else:
        rows = np.concatenate(regions)
        region_of_row = np.repeat(np.arange(len(regions)), [len(region) for region in regions])
    assignments = words.shape[1]
    # One (descriptor, word) pair per assignment of a descriptor in a region: all residuals at once.
    pair_rows = np.repeat(rows, assignments)
    pair_words = words[rows].reshape(-1)
    if pair_rows.size == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
    residuals = descriptors[pair_rows] - centroids[pair_words]
    pair_regions = np.repeat(region_of_row, assignments)
    block_keys, block_sums = _grouped_sums(pair_regions * size + pair_words, residuals)
    if regions is None:
        return block_keys, block_sums
    block_regions, block_words = np.divmod(block_keys, size)
    if normalise_regions:
        squared = np.bincount(block_regions, weights=np.einsum("ij,ij->i", block_sums, block_sums, dtype=np.float64))
        norms = np.sqrt(squared)
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        block_sums = block_sums * inverse[block_regions, None].astype(np.float32)
    return _grouped_sums(block_words, block_sums)


def _grouped_sums(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``keys`` (ascending) and the sums of the ``values`` rows that share each key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return sorted_keys[starts], np.add.reduceat(values[order], starts, axis=0)


def _dense(present: np.ndarray, sums: np.ndarray, size: int) -> np.ndarray:
    dense = np.zeros((size, sums.shape[1]), dtype=np.float32)
    dense[present] = sums
    return dense


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def _aggregated_image(present: np.ndarray, sums: np.ndarray, binary: bool) -> AggregatedImage:
    if binary:
        return AggregatedImage(present, pack_bits(sums))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return AggregatedImage(present, sums / np.where(norms > 0, norms, 1.0).astype(np.float32))

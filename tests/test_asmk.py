"""Detect-to-Retrieve aggregation and search: codebook, VLAD / R-VLAD, ASMK(*) / R-ASMK(*), the selective
kernel, the inverted file against brute force, and (where installed) the ``asmk`` package as a reference."""

import numpy as np
import pytest

import retrieval.inverted_file as inverted_file_module
from retrieval.asmk import (
    NORMALISATIONS,
    AggregatedImage,
    aggregate_asmk,
    aggregate_regional_asmk,
    aggregate_regional_vlad,
    aggregate_vlad,
    asmk_similarity,
    kernel_similarities,
    regions_from_counts,
    selectivity,
    word_similarities,
)
from retrieval.codebook import Codebook
from retrieval.compression import pack_bits, unpack_bits
from retrieval.inverted_file import InvertedFile

# Hand case: two words on the x axis; descriptors 0 and 1 go to word 0, descriptor 2 to word 1.
HAND_CENTROIDS = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
HAND_DESCRIPTORS = np.array([[0.5, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)
HAND_WORDS = np.array([0, 0, 1])


def random_codebook(rng, size=12, dim=16):
    return Codebook(rng.standard_normal((size, dim)).astype(np.float32))


def random_descriptors(rng, count, dim=16):
    return rng.standard_normal((count, dim)).astype(np.float32)


def expected_order(scores: np.ndarray) -> np.ndarray:
    """Each row's ranking by descending score, equal scores by ascending index (the knn contract)."""
    indices = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((indices, -scores), axis=1)


# Selectivity and word similarities


def test_selectivity_is_the_thresholded_signed_power():
    u = np.array([-0.5, 0.0, 0.2, 0.5, 1.0])
    np.testing.assert_allclose(selectivity(u), [0.0, 0.0, 0.008, 0.125, 1.0])
    # A negative threshold lets negative similarities through with their sign: sign(u) |u|^3.
    np.testing.assert_allclose(selectivity(u, alpha=3.0, threshold=-0.6), [-0.125, 0.0, 0.008, 0.125, 1.0])
    # u must be strictly above the threshold.
    np.testing.assert_allclose(selectivity(u, alpha=1.0, threshold=0.2), [0.0, 0.0, 0.0, 0.5, 1.0])
    assert selectivity(0.5, alpha=2.0).item() == 0.25


def test_binary_word_similarity_is_one_minus_twice_the_normalised_hamming_distance():
    query = np.array([[0b11110000, 0b00000000]], dtype=np.uint8)
    image = np.array([[0b11000000, 0b00000001]], dtype=np.uint8)
    # 3 of 16 bits differ: u = 1 - 2 * 3 / 16.
    np.testing.assert_allclose(word_similarities(query, image), [1 - 6 / 16])
    np.testing.assert_allclose(word_similarities(query, query), [1.0])
    np.testing.assert_allclose(word_similarities(query, ~query), [-1.0])


def test_packed_similarity_equals_the_plus_minus_one_computation():
    rng = np.random.default_rng(0)
    signs_q = np.where(rng.random((40, 128)) > 0.5, 1.0, -1.0).astype(np.float32)
    signs_x = np.where(rng.random((40, 128)) > 0.5, 1.0, -1.0).astype(np.float32)
    packed_q, packed_x = pack_bits(signs_q), pack_bits(signs_x)
    assert packed_q.shape == (40, 16)  # 16 B per word at d = 128
    np.testing.assert_array_equal(word_similarities(packed_q, packed_x), (signs_q * signs_x).sum(axis=1) / 128)

    # Whole-image similarity: ASMK* images against ASMK images holding the +-1 vectors scaled to unit norm.
    words_q, words_x = np.sort(rng.choice(60, 40, replace=False)), np.sort(rng.choice(60, 40, replace=False))
    binary = asmk_similarity(AggregatedImage(words_q, packed_q), AggregatedImage(words_x, packed_x))
    unpacked = asmk_similarity(
        AggregatedImage(words_q, unpack_bits(packed_q) / np.sqrt(128)),
        AggregatedImage(words_x, unpack_bits(packed_x) / np.sqrt(128)),
    )
    assert binary > 0
    np.testing.assert_allclose(binary, unpacked, rtol=1e-6)


def test_image_similarity_on_hand_values():
    query = AggregatedImage(np.array([0, 2, 5]), np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    image = AggregatedImage(np.array([0, 1, 5]), np.array([[0.6, 0.8], [1.0, 0.0], [-0.6, -0.8]]))
    # Common words 0 (u = 0.6) and 5 (u = -1, below the threshold).
    assert asmk_similarity(query, image, normalisation="none") == pytest.approx(0.216)
    assert asmk_similarity(query, image, normalisation="word_counts") == pytest.approx(0.216 / 3)  # sqrt(3 * 3)
    assert asmk_similarity(query, image, threshold=-1.5, normalisation="none") == pytest.approx(0.216 - 1.0)
    assert asmk_similarity(query, image, alpha=1.0, normalisation="none") == pytest.approx(0.6)
    empty = AggregatedImage(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float32))
    assert asmk_similarity(query, empty) == 0.0


# Aggregation


def test_vlad_and_regional_vlad_on_a_hand_case():
    # V(X_0) = (0.5, 0) + (0, 1) = (0.5, 1), V(X_1) = (1, 0); ||V(X)|| = 1.5.
    vlad = aggregate_vlad(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS)
    np.testing.assert_allclose(vlad, [1 / 3, 2 / 3, 2 / 3, 0.0], rtol=1e-6)
    # Regions: the whole image and descriptor 2 alone, whose VLAD is (0, 0, 1, 0); R-VLAD is their mean.
    regions = [np.arange(3), np.array([2])]
    rvlad = aggregate_regional_vlad(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, regions)
    np.testing.assert_allclose(rvlad, [1 / 6, 1 / 3, 5 / 6, 0.0], rtol=1e-6)
    # An empty region counts in the mean with a zero VLAD (as the authors' code).
    rvlad = aggregate_regional_vlad(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, [*regions, []])
    np.testing.assert_allclose(rvlad, [1 / 9, 2 / 9, 5 / 9, 0.0], rtol=1e-6)
    # No descriptors: a zero vector, not NaN.
    empty = aggregate_vlad(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), HAND_CENTROIDS)
    np.testing.assert_array_equal(empty, np.zeros(4))


def test_asmk_on_a_hand_case():
    image = aggregate_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS)
    np.testing.assert_array_equal(image.words, [0, 1])
    np.testing.assert_allclose(image.vectors, [[1 / np.sqrt(5), 2 / np.sqrt(5)], [1.0, 0.0]], rtol=1e-6)
    assert image.vectors.dtype == np.float32 and not image.binary and image.dim == 2


def test_regional_asmk_on_a_hand_case():
    # Region A = rows 0, 1: V(X^A_0) = (0.5, 1), ||V(X^A)|| = sqrt(1.25).
    # Region B = rows 1, 2: V(X^B_0) = (0, 1), V(X^B_1) = (1, 0), ||V(X^B)|| = sqrt(2).
    regions = [np.array([0, 1]), np.array([1, 2])]
    image = aggregate_regional_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, regions)
    word_0 = np.array([0.5, 1.0]) / np.sqrt(1.25) + np.array([0.0, 1.0]) / np.sqrt(2)
    np.testing.assert_array_equal(image.words, [0, 1])
    np.testing.assert_allclose(image.vectors, [word_0 / np.linalg.norm(word_0), [1.0, 0.0]], rtol=1e-6)
    # Without the regions' VLAD normalisation the regions' residuals are summed as they are: (0.5, 2).
    plain = aggregate_regional_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, regions, normalise_regions=False)
    np.testing.assert_allclose(plain.vectors[0], np.array([0.5, 2.0]) / np.sqrt(4.25), rtol=1e-6)
    # A word present only in a region not listed is absent.
    only_a = aggregate_regional_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, [np.array([0, 1])])
    np.testing.assert_array_equal(only_a.words, [0])


@pytest.mark.parametrize("binary", [False, True])
def test_regional_asmk_with_the_whole_image_as_only_region_equals_asmk(binary):
    rng = np.random.default_rng(1)
    codebook = random_codebook(rng)
    descriptors = random_descriptors(rng, 50)
    for assignments in (1, 3):
        words = codebook.assign(descriptors, assignments)
        plain = aggregate_asmk(descriptors, words, codebook.centroids, binary)
        regional = aggregate_regional_asmk(descriptors, words, codebook.centroids, [np.arange(50)], binary)
        np.testing.assert_array_equal(regional.words, plain.words)
        if binary:
            np.testing.assert_array_equal(regional.vectors, plain.vectors)
        else:
            np.testing.assert_allclose(regional.vectors, plain.vectors, atol=1e-6)
    words = codebook.assign(descriptors)
    np.testing.assert_allclose(
        aggregate_regional_vlad(descriptors, words, codebook.centroids, [np.arange(50)]),
        aggregate_vlad(descriptors, words, codebook.centroids),
        atol=1e-6,
    )


def test_asmk_star_is_the_sign_of_asmk_packed():
    rng = np.random.default_rng(2)
    codebook = random_codebook(rng)
    descriptors = random_descriptors(rng, 40)
    words = codebook.assign(descriptors)
    regions = [np.arange(40), np.arange(10, 25), np.arange(30, 40)]
    for aggregate, extra in ((aggregate_asmk, ()), (aggregate_regional_asmk, (regions,))):
        real = aggregate(descriptors, words, codebook.centroids, *extra, binary=False)
        binary = aggregate(descriptors, words, codebook.centroids, *extra, binary=True)
        np.testing.assert_array_equal(binary.words, real.words)
        assert binary.binary and binary.vectors.dtype == np.uint8 and binary.vectors.shape == (real.num_words, 2)
        np.testing.assert_array_equal(binary.vectors, np.packbits(real.vectors > 0, axis=1))


def test_multiple_assignment():
    codebook = Codebook(np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]]))
    descriptors = np.array([[1.2, 0.0], [0.9, 0.3]], dtype=np.float32)
    # Squared distances of (1.2, 0): 1.44, 0.04, 3.24, 77.44; of (0.9, 0.3): 0.9, 0.1, 4.5, 83.7.
    np.testing.assert_array_equal(codebook.assign(descriptors, 3), [[1, 0, 2], [1, 0, 2]])
    np.testing.assert_array_equal(codebook.assign(descriptors), [[1], [1]])
    # Each descriptor adds its residual to each of its 2 words: V_0 = (1.2, 0) + (0.9, 0.3), V_1 = (0.2, 0) +
    # (-0.1, 0.3).
    words = codebook.assign(descriptors, 2)
    image = aggregate_asmk(descriptors, words, codebook.centroids)
    np.testing.assert_array_equal(image.words, [0, 1])
    expected = np.array([[2.1, 0.3], [0.1, 0.3]])
    np.testing.assert_allclose(image.vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5)
    vlad = aggregate_vlad(descriptors, words, codebook.centroids)
    np.testing.assert_allclose(vlad, np.r_[expected.ravel(), np.zeros(4)] / np.linalg.norm(expected), rtol=1e-5)


def test_regions_from_counts():
    regions = regions_from_counts([2, 0, 3])
    assert [region.tolist() for region in regions] == [[0, 1], [], [2, 3, 4]]


# Codebook


def test_codebook_training_is_seeded_and_round_trips_through_a_file(tmp_path):
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    descriptors = (np.repeat(centres, 30, axis=0) + 0.1 * rng.standard_normal((90, 2))).astype(np.float32)
    codebook = Codebook.train(descriptors, 3, iterations=10, seed=5)
    assert codebook.size == 3 and codebook.dim == 2
    # The three clusters are found (in some order): sort centroids by their first coordinate, then the second.
    found = codebook.centroids[np.lexsort(codebook.centroids.T[::-1])]
    np.testing.assert_allclose(found, centres[np.lexsort(centres.T[::-1])], atol=0.1)
    np.testing.assert_array_equal(Codebook.train(descriptors, 3, iterations=10, seed=5).centroids, codebook.centroids)

    path = tmp_path / "codebook.npy"
    codebook.save(path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["codebook.npy"]  # no temporary file left
    loaded = Codebook.load(path)
    np.testing.assert_array_equal(loaded.centroids, codebook.centroids)
    assert loaded.centroids.dtype == np.float32
    np.testing.assert_array_equal(loaded.assign(descriptors, 2), codebook.assign(descriptors, 2))


# Inverted file


def aggregated_set(rng, codebook, binary, count, assignments, regional):
    images = []
    for _ in range(count):
        n = int(rng.integers(0, 30))
        descriptors = random_descriptors(rng, n, codebook.dim)
        words = codebook.assign(descriptors, assignments)
        if regional and n:
            boxes = [np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False)) for _ in range(2)]
            regions = [np.arange(n), *boxes]
            images.append(aggregate_regional_asmk(descriptors, words, codebook.centroids, regions, binary))
        else:
            images.append(aggregate_asmk(descriptors, words, codebook.centroids, binary))
    return images


@pytest.mark.parametrize("binary", [False, True])
def test_inverted_file_returns_the_brute_force_ranking_and_scores(binary, monkeypatch):
    rng = np.random.default_rng(4)
    codebook = random_codebook(rng, size=10, dim=16)
    database = aggregated_set(rng, codebook, binary, 25, assignments=1, regional=True)
    queries = aggregated_set(rng, codebook, binary, 4, assignments=3, regional=False)
    index = InvertedFile(database)
    assert index.num_images == 25 and index.num_entries == sum(image.num_words for image in database)
    for normalisation in NORMALISATIONS:
        for threshold in (0.0, -0.3):
            reference = kernel_similarities(queries, database, threshold=threshold, normalisation=normalisation)
            scores, ids = index.search(queries, 10, threshold=threshold, normalisation=normalisation)
            assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (4, 10)
            np.testing.assert_array_equal(ids, expected_order(reference)[:, :10])
            np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, axis=1), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(
                index.query_scores(queries[0], threshold=threshold, normalisation=normalisation),
                reference[0],
                rtol=1e-9,
                atol=1e-12,
            )
    # A ranking deeper than the database is clipped to it; scanning one entry at a time gives the same.
    reference = kernel_similarities(queries, database)
    monkeypatch.setattr(inverted_file_module, "SEARCH_CHUNK_BYTES", 1)
    scores, ids = index.search(queries, 100)
    assert ids.shape == (4, 25)
    np.testing.assert_array_equal(ids, expected_order(reference))


def test_inverted_file_orders_ties_by_database_index():
    rng = np.random.default_rng(5)
    codebook = random_codebook(rng, size=6, dim=8)
    descriptors = random_descriptors(rng, 20, 8)
    image = aggregate_asmk(descriptors, codebook.assign(descriptors), codebook.centroids, binary=True)
    other = aggregate_asmk(-descriptors, codebook.assign(-descriptors), codebook.centroids, binary=True)
    index = InvertedFile([other, image, other, image, image])
    _, ids = index.search([image], 2)
    np.testing.assert_array_equal(ids, [[1, 3]])  # three equal best images: the lowest indices first
    # A query without words scores 0 everywhere: the database in index order.
    empty = AggregatedImage(np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.uint8))
    scores, ids = index.search([empty], 5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(scores, np.zeros((1, 5)))


def entry_by_entry_scores(index, query, threshold):
    """The inverted file's scan written plainly: every entry of the query's posting lists, word by word, its
    ``sigma(u)`` from :func:`word_similarities` added to its image's score."""
    scores = np.zeros(index.num_images)
    for row, word in enumerate(query.words):
        slot = np.searchsorted(index.posting_words, word)
        if slot < index.posting_words.size and index.posting_words[slot] == word:
            entries = np.arange(index.posting_offsets[slot], index.posting_offsets[slot + 1])
            u = word_similarities(
                np.repeat(query.vectors[row : row + 1], entries.size, 0), index.entry_vectors[entries]
            )
            np.add.at(scores, index.entry_images[entries], selectivity(u, threshold=threshold))
    return scores


@pytest.mark.parametrize("dim", [8, 24, 32, 128])
def test_inverted_file_scan_of_packed_codes_of_every_width(dim, monkeypatch):
    """ASMK* codes of 1, 3, 4 and 16 bytes (compared as uint8, uint8, uint32 and uint64 words), queries with
    multiple assignment, exact duplicates in the database (ties), the scan cut into steps of 1 entry, of 7
    (posting lists cut mid-way) or all at once, and the byte-table popcount of numpy < 2: always the scores of
    the plain entry-by-entry scan, bit for bit, and the brute-force ranking."""
    rng = np.random.default_rng(6)
    codebook = random_codebook(rng, size=10, dim=dim)
    database = aggregated_set(rng, codebook, True, 20, assignments=1, regional=True)
    database += database[:6]  # images 20-25 equal images 0-5
    queries = aggregated_set(rng, codebook, True, 3, assignments=3, regional=False)
    index = InvertedFile(database)
    for threshold in (0.0, -0.3):
        reference = kernel_similarities(queries, database, threshold=threshold, normalisation="none")
        plain = [entry_by_entry_scores(index, query, threshold) for query in queries]
        for chunk_entries in (1, 7, 10**6):
            monkeypatch.setattr(inverted_file_module, "SEARCH_CHUNK_BYTES", chunk_entries * (dim // 8) * 4)
            for native_popcount in (True, False):
                monkeypatch.setattr(inverted_file_module, "_HAS_BITWISE_COUNT", native_popcount)
                for query, expected in zip(queries, plain):
                    scores = index.query_scores(query, threshold=threshold, normalisation="none")
                    np.testing.assert_array_equal(scores, expected)
                    np.testing.assert_array_equal(scores[20:], scores[:6])
                _, ids = index.search(queries, 26, threshold=threshold, normalisation="none")
                np.testing.assert_array_equal(ids, expected_order(reference))
        np.testing.assert_allclose(plain, reference, rtol=1e-9, atol=1e-12)


def test_inverted_file_memory_per_image():
    words = [np.array([0, 3, 7]), np.array([3]), np.array([1, 3, 7, 9])]
    database = [AggregatedImage(w, np.zeros((w.size, 16), dtype=np.uint8)) for w in words]  # 128 bits per word
    index = InvertedFile(database)
    np.testing.assert_array_equal(index.posting_words, [0, 1, 3, 7, 9])
    np.testing.assert_array_equal(index.posting_offsets, [0, 1, 2, 5, 7, 8])
    np.testing.assert_array_equal(index.entry_images, [0, 2, 0, 1, 2, 0, 2, 2])
    # 8 entries of 16 B codes + 4 B image ids, 5 words and 6 offsets of 8 B, 3 word counts of 8 B.
    assert index.memory_bytes == 8 * (16 + 4) + 5 * 8 + 6 * 8 + 3 * 8
    assert index.bytes_per_image == pytest.approx(index.memory_bytes / 3)


# Errors


def test_clear_errors_on_bad_inputs():
    with pytest.raises(ValueError, match=r"descriptors must be a 2-D \[rows, dim\] array"):
        aggregate_asmk(np.zeros(4), [0], HAND_CENTROIDS)
    with pytest.raises(ValueError, match=r"words must be \[n\] or \[n, assignments\] with n = 3"):
        aggregate_asmk(HAND_DESCRIPTORS, [0, 1], HAND_CENTROIDS)
    with pytest.raises(ValueError, match=r"ids of the 2 codebook words, \[0, 2\), got values from 0 to 5"):
        aggregate_asmk(HAND_DESCRIPTORS, [0, 5, 1], HAND_CENTROIDS)
    with pytest.raises(ValueError, match="words must be integer"):
        aggregate_asmk(HAND_DESCRIPTORS, [0.0, 1.0, 1.0], HAND_CENTROIDS)
    with pytest.raises(ValueError, match="dimension 2 do not match codebook centroids"):
        aggregate_asmk(HAND_DESCRIPTORS, HAND_WORDS, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"ASMK\* packs d / 8 bytes per word"):
        aggregate_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, binary=True)
    with pytest.raises(ValueError, match=r"region 1 lists descriptor rows from 0 to 3; expected rows in \[0, 3\)"):
        aggregate_regional_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, [[0, 1], [0, 3]])
    with pytest.raises(ValueError, match="regions must be a list of index arrays"):
        aggregate_regional_asmk(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, np.arange(3))
    with pytest.raises(ValueError, match="region 0 lists a descriptor row more than once"):
        aggregate_regional_vlad(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, [[0, 0]])
    with pytest.raises(ValueError, match="at least one region"):
        aggregate_regional_vlad(HAND_DESCRIPTORS, HAND_WORDS, HAND_CENTROIDS, [])
    with_nan = HAND_DESCRIPTORS.copy()
    with_nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="descriptors: 1 of 3 rows contain NaN or Inf values"):
        aggregate_vlad(with_nan, HAND_WORDS, HAND_CENTROIDS)


def test_clear_errors_on_bad_codebooks_and_images(tmp_path):
    with pytest.raises(ValueError, match="needs at least one descriptor per word: 2 descriptors"):
        Codebook.train(np.zeros((2, 4)), 3)
    codebook = Codebook(HAND_CENTROIDS)
    with pytest.raises(ValueError, match=r"descriptors to assign must be \[N, 2\]"):
        codebook.assign(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="assignments must be between 1 and the codebook size 2, got 3"):
        codebook.assign(HAND_DESCRIPTORS, 3)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"expected float \[size, dim\] centroids"):
        Codebook.load(tmp_path / "flat.npy")

    with pytest.raises(ValueError, match="ascending and unique"):
        AggregatedImage(np.array([3, 1]), np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"one row per word \(m = 2\)"):
        AggregatedImage(np.array([1, 3]), np.zeros((3, 4), dtype=np.float32))
    real = AggregatedImage(np.array([1]), np.ones((1, 8), dtype=np.float32))
    binary = AggregatedImage(np.array([1]), np.ones((1, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"not comparable: both must be ASMK or both ASMK\*"):
        InvertedFile([real, binary])
    with pytest.raises(ValueError, match=r"query 0 \(ASMK, d = 8\) and the inverted file's images \(ASMK\*, d = 8\)"):
        InvertedFile([binary]).search([real], 1)
    with pytest.raises(ValueError, match="unknown image normalisation 'l2'"):
        asmk_similarity(real, real, normalisation="l2")


# The authors' group's package as a reference (a dev dependency)


@pytest.mark.parametrize("binary", [False, True])
def test_kernel_matches_the_asmk_package(binary):
    from asmk import codebook as asmk_codebook
    from asmk import index as asmk_index
    from asmk import inverted_file as asmk_inverted_file
    from asmk import kernel as asmk_kernel

    rng = np.random.default_rng(6)
    dim, size = 64, 16  # the package normalises Hamming distances by whole 32-bit words: d divisible by 32
    codebook = random_codebook(rng, size, dim)
    database_descriptors = [random_descriptors(rng, n, dim) for n in (12, 30, 7, 25, 18)]
    query_descriptors = [random_descriptors(rng, n, dim) for n in (20, 9)]

    package_codebook = asmk_codebook.Codebook(asmk_index.FaissL2Index(), size=size)
    package_codebook.index(codebook.centroids)
    kernel = asmk_kernel.ASMKKernel(package_codebook, binary=binary)
    package_index = asmk_inverted_file.IVF.initialize_empty(codebook_size=size, use_idf=False)
    image_ids = np.repeat(np.arange(5), [len(d) for d in database_descriptors])
    quantized = package_codebook.quantize(np.vstack(database_descriptors), image_ids, multiple_assignment=1)
    package_index.add(*kernel.aggregate(*quantized))

    database = [aggregate_asmk(d, codebook.assign(d), codebook.centroids, binary) for d in database_descriptors]
    index = InvertedFile(database)
    for descriptors in query_descriptors:
        query_vectors, query_words = kernel.aggregate_image(
            *package_codebook.quantize(descriptors, multiple_assignment=5)
        )
        ranks, package_scores = package_index.search(
            query_vectors,
            query_words,
            similarity_func=lambda *columns: kernel.similarity(*columns, alpha=3.0, similarity_threshold=0.0),
            topk=5,
        )
        query = aggregate_asmk(descriptors, codebook.assign(descriptors, 5), codebook.centroids, binary)
        np.testing.assert_array_equal(query.words, query_words)
        scores = index.query_scores(query, alpha=3.0, threshold=0.0, normalisation="word_counts")
        assert np.all(package_scores > 0)
        np.testing.assert_allclose(scores[ranks], package_scores, rtol=1e-5)
        np.testing.assert_allclose(kernel_similarities([query], database)[0][ranks], package_scores, rtol=1e-5)

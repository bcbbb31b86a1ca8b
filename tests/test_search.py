"""Exact search against brute force, on both search paths, with ties, leave-one-out and bad input."""

import numpy as np
import pytest
import torch

from retrieval import search
from retrieval.search import knn


def brute_force(queries, database, k):
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: lower index first
    return order


def assert_same_ranking(ids, reference, queries, database):
    """Equal rankings, except that items whose float32 scores differ by rounding only may swap places."""
    exact = queries.astype(np.float64) @ database.astype(np.float64).T
    np.testing.assert_allclose(
        np.take_along_axis(exact, ids, axis=1), np.take_along_axis(exact, reference, axis=1), atol=1e-5
    )
    assert (ids == reference).mean() > 0.999


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((57, 24)).astype(np.float32), rng.standard_normal((3000, 24)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_faiss_path_matches_brute_force(data, k):
    queries, database = data
    scores, ids = knn(queries, database, k, chunk_size=10)
    assert_same_ranking(ids, brute_force(queries, database, k), queries, database)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, ids, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1024, 2999, 3000, 5000])
def test_dense_path_matches_brute_force_and_the_faiss_path(data, k, monkeypatch):
    queries, database = data
    _, ids = knn(queries, database, k, chunk_size=8)
    assert ids.shape == (len(queries), min(k, len(database)))
    assert_same_ranking(ids, brute_force(queries, database, min(k, len(database))), queries, database)
    monkeypatch.setattr(search, "DENSE_SORT_MIN_K", 10**9)  # force faiss for the same k
    _, faiss_ids = knn(queries, database, min(k, 2048))
    assert_same_ranking(faiss_ids, ids[:, : faiss_ids.shape[1]], queries, database)


@pytest.mark.parametrize("dense", [False, True])
def test_ties_are_ordered_by_database_index(dense, monkeypatch):
    monkeypatch.setattr(search, "DENSE_SORT_MIN_K", 1 if dense else 10**9)
    database = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    _, ids = knn(queries, database, 5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    _, ids = knn(queries, database, 10)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]])


def test_exclude_self_drops_each_query_and_keeps_k_results(data):
    _, database = data
    _, ids = knn(database, database, 5, exclude_self=True)
    assert ids.shape == (len(database), 5)
    assert not (ids == np.arange(len(database))[:, None]).any()
    scores = database.astype(np.float64) @ database.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)
    reference = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(np.take_along_axis(scores, ids, 1), np.take_along_axis(scores, reference, 1), atol=1e-5)


def test_exclude_self_with_duplicate_rows_removes_the_query_not_its_twin():
    database = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    _, ids = knn(database, database, 2, exclude_self=True)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 2], [0, 1]])


def test_accepts_torch_tensors_and_float64(data):
    queries, database = data
    _, from_numpy = knn(queries, database, 5)
    _, from_torch = knn(torch.from_numpy(queries).double(), torch.from_numpy(database), 5)
    np.testing.assert_array_equal(from_numpy, from_torch)


def test_refuses_non_finite_rows_with_a_count(data):
    queries, database = data
    database = database.copy()
    database[[3, 10, 11]] = np.nan
    database[20, 0] = np.inf
    with pytest.raises(ValueError, match=r"database: 4 of 3000 rows contain NaN or Inf values \(rows 3, 10, 11, 20\)"):
        knn(queries, database, 5)


def test_refuses_mismatched_dimensions(data):
    queries, database = data
    with pytest.raises(ValueError, match="dimension 24 but the database has dimension 23"):
        knn(queries, database[:, :23], 5)


# ---- the full ranking's order at the list's end, the torch path, and places in the ranking --------------------


def full_ranking(queries, database):
    """Reference ranking of the whole database: score descending, then index ascending (exact float64 scores)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    return np.lexsort((np.broadcast_to(np.arange(len(database)), scores.shape), -scores), axis=1)


@pytest.fixture
def tied_data():
    """Small integer vectors: scores exact in float32, each value shared by hundreds of database items."""
    rng = np.random.default_rng(1)
    return rng.integers(-2, 3, (37, 4)).astype(np.float32), rng.integers(-2, 3, (3000, 4)).astype(np.float32)


@pytest.fixture
def dyadic_data():
    """Random vectors on a 1/16 grid: still exact in float32, with fewer ties."""
    rng = np.random.default_rng(2)
    grid = lambda rows: (np.round(rng.standard_normal((rows, 16)) * 16) / 16).astype(np.float32)  # noqa: E731
    return grid(37), grid(3000)


@pytest.mark.parametrize("path", ["faiss", "dense"])
def test_ties_across_the_end_of_the_list_keep_the_lowest_indices(path, tied_data, monkeypatch):
    # faiss' heap and argpartition keep an arbitrary subset of the items tied at the k-th score (faiss gets
    # most of these rows wrong for k >= 5); the ranking keeps those of lowest index.
    monkeypatch.setattr(search, "DENSE_SORT_MIN_K", 10**9 if path == "faiss" else 1)
    monkeypatch.setattr(search, "DENSE_CHUNK_BYTES", 20 * 3000 * 4)  # exact rows in chunks of 4 queries
    queries, database = tied_data
    reference = full_ranking(queries, database)
    for k in (1, 5, 100, 500):
        _, ids = knn(queries, database, k)
        np.testing.assert_array_equal(ids, reference[:, :k])


@pytest.mark.parametrize("dataset", ["tied_data", "dyadic_data"])
@pytest.mark.parametrize("k", [1, 5, 100, 1024, 2999, 3000])
def test_torch_path_gives_the_cpu_rankings_on_exact_scores(dataset, k, request):
    queries, database = request.getfixturevalue(dataset)
    scores, ids = knn(queries, database, k)
    torch_scores, torch_ids = knn(queries, database, k, device="cpu", chunk_size=8)
    np.testing.assert_array_equal(torch_ids, ids)
    np.testing.assert_array_equal(torch_scores, scores)
    np.testing.assert_array_equal(ids, full_ranking(queries, database)[:, :k])


@pytest.mark.parametrize("k", [5, 1500])
def test_torch_path_with_exclude_self_on_exact_scores(tied_data, k):
    _, database = tied_data
    database = database[:1600]
    _, ids = knn(database, database, k, exclude_self=True)
    _, torch_ids = knn(database, database, k, exclude_self=True, device=torch.device("cpu"), chunk_size=300)
    np.testing.assert_array_equal(torch_ids, ids)
    assert not (ids == np.arange(len(database))[:, None]).any()


@pytest.mark.parametrize("k", [10, 1024])
def test_torch_path_on_random_floats_matches_brute_force(data, k):
    queries, database = data
    _, ids = knn(queries, database, k, device="cpu")
    assert_same_ranking(ids, brute_force(queries, database, k), queries, database)


def test_ranking_keys_order_like_the_ranking_on_numpy_and_torch():
    # Larger key = ranked earlier: score descending, then index ascending; -0.0 ties with +0.0 (their bits
    # differ), subnormals and negative scores keep their order.
    scores = np.array([-0.0, 0.0, -1.0, 2.0, -0.0, -2.5, 1e-45, -1e-45, 2.0], dtype=np.float32)
    expected = [3, 8, 6, 0, 1, 4, 7, 2, 5]
    keys = search.ranking_keys(scores, np.arange(len(scores)))
    assert np.argsort(-keys, kind="stable").tolist() == expected
    torch_keys = search.ranking_keys(torch.from_numpy(scores), torch.arange(len(scores)))
    np.testing.assert_array_equal(torch_keys.numpy(), keys)


def test_ranking_positions_hand_computed():
    database = np.array([[3.0], [1.0], [3.0], [2.0], [1.0]], dtype=np.float32)
    # Ranking for query [1]: 0 (3), 2 (3), 3 (2), 1 (1), 4 (1); for query [-1] it is reversed by score.
    queries = np.array([[1.0], [-1.0]], dtype=np.float32)
    items = [np.array([4, 2, 1]), np.array([0, 1])]
    for device in (None, "cpu"):
        positions = search.ranking_positions(queries, database, items, device=device)
        assert [p.tolist() for p in positions] == [[4, 1, 3], [3, 0]]
    # Leave-one-out: query i's own item leaves its ranking; those behind it move up.
    for device in (None, "cpu"):
        items = [[0, 2, 1], [1, 4], [], [3, 0], [4]]
        positions = search.ranking_positions(database, database, items, exclude_self=True, device=device)
        assert [p.tolist() for p in positions] == [[-1, 0, 2], [-1, 3], [], [-1, 0], [-1]]


def test_ranking_positions_when_every_score_is_equal():
    database = np.ones((6, 3), dtype=np.float32)
    for device in (None, "cpu"):
        positions = search.ranking_positions(database[:1], database, [np.array([5, 0, 3])], device=device)
        assert positions[0].tolist() == [5, 0, 3]


@pytest.mark.parametrize("dataset", ["tied_data", "dyadic_data", "data"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_ranking_positions_equal_the_places_in_the_full_ranking(dataset, device, request):
    queries, database = request.getfixturevalue(dataset)
    rng = np.random.default_rng(3)
    items = [rng.choice(len(database), rng.integers(0, 300), replace=False) for _ in queries]
    # The same chunk of scores on both paths, so even float rounding is shared.
    _, ranking = knn(queries, database, len(database), chunk_size=len(queries), device=device)
    places = np.argsort(ranking, axis=1)
    positions = search.ranking_positions(queries, database, items, chunk_size=len(queries), device=device)
    for row in range(len(queries)):
        np.testing.assert_array_equal(positions[row], places[row, items[row]])


@pytest.mark.parametrize("device", [None, "cpu"])
def test_ranking_positions_with_exclude_self(tied_data, device):
    _, database = tied_data
    database = database[:1200]
    rng = np.random.default_rng(4)
    items = [np.append(rng.choice(len(database), 20, replace=False), i) for i in range(len(database))]
    _, ranking = knn(database, database, len(database) - 1, exclude_self=True)
    positions = search.ranking_positions(database, database, items, exclude_self=True, chunk_size=100, device=device)
    for row in range(len(database)):
        place = {item: column for column, item in enumerate(ranking[row])}
        assert positions[row].tolist() == [place.get(item, -1) for item in items[row]]


def test_ranking_positions_refuses_items_outside_the_database(data):
    queries, database = data
    message = r"items of query 1 must be database indices in \[0, 3000\), got values from 0 to 3000"
    with pytest.raises(ValueError, match=message):
        search.ranking_positions(queries[:2], database, [np.array([1]), np.array([0, 3000])])
    with pytest.raises(ValueError, match="1 item lists given for 2 queries"):
        search.ranking_positions(queries[:2], database, [np.array([1])])

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

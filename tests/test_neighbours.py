"""Neighbour files: written atomically with the stores' ids, read back checked, built from any list against any."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from retrieval.feature_store import FeatureStore, write_feature_store
from retrieval.neighbours import (
    NeighbourFileError,
    build_neighbour_file,
    build_neighbours,
    describe_neighbours,
    main,
    read_neighbours,
    write_neighbours,
)

REPOSITORY = Path(__file__).resolve().parents[1]


def integer_descriptors(rows, dim=6, seed=0):
    """Small integer vectors: exact float32 scores, so every search path ranks them identically."""
    return np.random.default_rng(seed).integers(-3, 4, size=(rows, dim)).astype(np.float32)


def brute_force(queries, database, m, exclude_self=False):
    scores = queries @ database.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(database)), scores.shape), -scores), axis=1)[:, :m]
    return np.take_along_axis(scores, order, axis=1), order


def ids(prefix, count):
    return [f"{prefix}/{i:03d}.jpg" for i in range(count)]


def test_round_trip_keeps_arrays_ids_and_attributes_and_leaves_no_temporary_file(tmp_path):
    scores, indices = brute_force(integer_descriptors(4), integer_descriptors(9, seed=1), 3)
    path = write_neighbours(
        tmp_path / "out/n.h5", scores, indices, ids("q", 4), ids("db", 9), query="q", database=["db", "1m"]
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["n.h5"]
    read = read_neighbours(path)
    assert np.array_equal(read.scores, scores) and np.array_equal(read.indices, indices)
    assert read.scores.dtype == np.float32 and read.indices.dtype == np.int64
    assert isinstance(read.scores, np.memmap)  # contiguous datasets are mapped, not loaded
    assert read.query_ids == ids("q", 4) and read.database_ids == ids("db", 9)
    assert (read.query, read.database, read.exclude_self, read.path) == ("q", ["db", "1m"], False, path)
    assert (read.num_queries, read.depth, read.database_size) == (4, 3, 9)
    assert not isinstance(read_neighbours(path, memory_map=False).scores, np.memmap)
    assert describe_neighbours(path) == f"{path} (top-3 neighbours of 4 queries among 9 database items)"


def test_check_against_accepts_the_stores_ids_and_names_the_first_difference(tmp_path):
    scores, indices = brute_force(integer_descriptors(4), integer_descriptors(9, seed=1), 3)
    neighbours = read_neighbours(write_neighbours(tmp_path / "n.h5", scores, indices, ids("q", 4), ids("db", 9)))
    neighbours.check_against(ids("q", 4), ids("db", 9))
    other = ids("db", 9)
    other[5] = "db/moved.jpg"
    with pytest.raises(NeighbourFileError, match=r"another database list .*db.h5.*row 5 is 'db/005.jpg'"):
        neighbours.check_against(ids("q", 4), other, path="db.h5")
    with pytest.raises(NeighbourFileError, match="4 query rows but the query list has 3 ids"):
        neighbours.check_against(ids("q", 3), ids("db", 9))
    with pytest.raises(NeighbourFileError, match="9 ids in the file, 10 given"):
        neighbours.check_against(ids("q", 4), ids("db", 10))
    with pytest.raises(NeighbourFileError, match="ranks a separate query list: pass its query_ids"):
        neighbours.check_against(None, ids("db", 9))


def test_leave_one_out_file_checks_against_the_database_alone(tmp_path):
    database = integer_descriptors(7)
    scores, indices = build_neighbours(database, database, 3, exclude_self=True)
    path = write_neighbours(tmp_path / "n.h5", scores, indices, ids("t", 7), ids("t", 7), exclude_self=True)
    neighbours = read_neighbours(path)
    assert neighbours.exclude_self and not (neighbours.indices == np.arange(7)[:, None]).any()
    neighbours.check_against(None, ids("t", 7))
    assert describe_neighbours(path).endswith("among 7 database items, leave-one-out)")


def test_files_without_ids_are_read_and_checked_only_on_request(tmp_path):
    # The layout the prediction writer wrote before neighbour files carried ids.
    path = tmp_path / "old_neighbours.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("scores", data=np.array([[0.9], [0.8]], dtype=np.float32))
        f.create_dataset("indices", data=np.array([[1], [0]], dtype=np.int64))
        f.attrs["query"] = ""
        f.attrs["database"] = '["train"]'
    neighbours = read_neighbours(path)
    assert neighbours.query_ids is None and neighbours.database_ids is None and neighbours.database_size is None
    assert neighbours.exclude_self  # an empty query meant the database itself
    assert neighbours.database == ["train"]
    with pytest.raises(NeighbourFileError, match="stores no query_ids/database_ids .* rebuild it"):
        neighbours.check_against(None, ["a", "b"])
    neighbours.check_against(["x", "y"], ["a", "b"], require_ids=False)
    with pytest.raises(NeighbourFileError, match="points at database row 1 but the database has 1 ids"):
        neighbours.check_against(["x", "y"], ["a"], require_ids=False)


def test_legacy_empty_query_means_leave_one_out_and_a_named_query_does_not(tmp_path):
    for query, expected in (("", True), ("roxford5k_query", False)):
        path = tmp_path / f"{query or 'loo'}.h5"
        with h5py.File(path, "w") as f:
            f["scores"] = np.ones((2, 1), dtype=np.float32)
            f["indices"] = np.array([[1], [0]])
            f.attrs["query"] = query
        assert read_neighbours(path).exclude_self is expected


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda f: f.__delitem__("indices"), r"has datasets \['database_ids', 'query_ids', 'scores'\]"),
        (lambda f: f.attrs.__setitem__("format", "something-else"), "format='something-else'"),
        (lambda f: f.attrs.__setitem__("format_version", 9), "newer than this code reads"),
        (lambda f: f.__delitem__("query_ids"), "only one of query_ids and database_ids"),
        (lambda f: _replace(f, "indices", np.zeros((3, 2), dtype=np.int64)), r"scores \(3, 3\) and indices \(3, 2\)"),
        (lambda f: _replace(f, "indices", np.full((3, 3), 5)), r"query row 0 holds indices outside \[-1, 5\)"),
        (lambda f: _replace(f, "indices", np.zeros((3, 3), dtype=np.float32)), "not integer"),
        (lambda f: _replace(f, "scores", np.full((3, 3), np.nan, dtype=np.float32)), "NaN or Inf scores"),
        (lambda f: _replace(f, "query_ids", np.array(["a", "b"], dtype=object)), "2 query_ids for 3 query rows"),
    ],
)
def test_malformed_files_are_refused_naming_the_file_and_the_layout(tmp_path, change, message):
    scores, indices = brute_force(integer_descriptors(3), integer_descriptors(5, seed=1), 3)
    path = write_neighbours(tmp_path / "n.h5", scores, indices, ids("q", 3), ids("db", 5))
    with h5py.File(path, "r+") as f:
        change(f)
    with pytest.raises(NeighbourFileError, match=message) as error:
        read_neighbours(path)
    assert str(path) in str(error.value)
    if "newer" not in message:
        assert "expected an HDF5 neighbour file" in str(error.value)


def _replace(f, name, values):
    del f[name]
    if values.dtype == object:
        f.create_dataset(name, data=values, dtype=h5py.string_dtype())
    else:
        f[name] = values


def test_missing_and_unreadable_files_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neighbour file .*none.h5 not found; expected an HDF5"):
        read_neighbours(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(NeighbourFileError, match="text.h5 is not a readable HDF5 file"):
        read_neighbours(tmp_path / "text.h5")


def test_writing_refuses_inconsistent_inputs_and_leaves_no_file(tmp_path):
    scores, indices = brute_force(integer_descriptors(3), integer_descriptors(5, seed=1), 2)
    with pytest.raises(NeighbourFileError, match="4 query_ids for 3 query rows"):
        write_neighbours(tmp_path / "n.h5", scores, indices, ids("q", 4), ids("db", 5))
    with pytest.raises(NeighbourFileError, match=r"outside \[-1, 4\)"):
        write_neighbours(tmp_path / "n.h5", scores, indices + 2, ids("q", 3), ids("db", 4))
    loo = np.array([[1, 2], [1, 2], [0, 1]])
    with pytest.raises(NeighbourFileError, match="leave-one-out, yet query row 1 lists itself"):
        write_neighbours(tmp_path / "n.h5", scores, loo, ids("q", 3), ids("q", 3), exclude_self=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device", [None, "cpu"])
def test_build_neighbours_is_the_exact_ranking_from_arrays_stores_and_parts(tmp_path, device):
    queries, database = integer_descriptors(5), integer_descriptors(12, seed=1)
    expected = brute_force(queries, database, 4)
    scores, indices = build_neighbours(queries, database, 4, device=device)
    assert np.array_equal(indices, expected[1]) and np.array_equal(scores, expected[0])
    write_feature_store(tmp_path / "q.h5", ids("q", 5), global_descriptors=queries)
    write_feature_store(tmp_path / "a.h5", ids("a", 7), global_descriptors=database[:7])
    write_feature_store(tmp_path / "b.h5", ids("b", 5), global_descriptors=database[7:], global_dtype="float16")
    parts = [FeatureStore(tmp_path / "a.h5"), tmp_path / "b.h5"]
    scores, indices = build_neighbours(FeatureStore(tmp_path / "q.h5"), parts, 4, device=device)
    assert np.array_equal(indices, expected[1])
    # Leave-one-out: the same object as queries and database, the row's own item never listed.
    scores, indices = build_neighbours(database, database, 20, exclude_self=True, device=device)
    assert indices.shape == (12, 11)  # clipped to the candidates
    assert np.array_equal(indices, brute_force(database, database, 11, exclude_self=True)[1])


def test_build_neighbour_file_from_stores_carries_their_ids(tmp_path):
    train = integer_descriptors(10)
    write_feature_store(tmp_path / "train.h5", ids("t", 10), global_descriptors=train, labels=np.arange(10) // 2)
    path = build_neighbour_file(tmp_path / "train_neighbours.h5", tmp_path / "train.h5", m=3)
    neighbours = read_neighbours(path)
    assert neighbours.exclude_self and neighbours.query == "" and neighbours.database == [str(tmp_path / "train.h5")]
    assert np.array_equal(neighbours.indices, brute_force(train, train, 3, exclude_self=True)[1])
    neighbours.check_against(None, FeatureStore(tmp_path / "train.h5").ids)

    queries = integer_descriptors(4, seed=2)
    write_feature_store(tmp_path / "query.h5", ids("q", 4), global_descriptors=queries)
    path = build_neighbour_file(tmp_path / "q_neighbours.h5", tmp_path / "query.h5", tmp_path / "train.h5", m=3)
    neighbours = read_neighbours(path)
    assert not neighbours.exclude_self and neighbours.query == str(tmp_path / "query.h5")
    assert neighbours.query_ids == ids("q", 4) and neighbours.database_ids == ids("t", 10)
    assert np.array_equal(neighbours.indices, brute_force(queries, train, 3)[1])


def test_command_line_writes_the_file_and_reports_errors_in_one_line(tmp_path, capsys):
    write_feature_store(tmp_path / "q.h5", ids("q", 4), global_descriptors=integer_descriptors(4))
    write_feature_store(tmp_path / "a.h5", ids("a", 6), global_descriptors=integer_descriptors(6, seed=1))
    write_feature_store(tmp_path / "b.h5", ids("b", 3), global_descriptors=integer_descriptors(3, seed=2))
    out = tmp_path / "out.h5"
    main(
        ["--queries", str(tmp_path / "q.h5"), "--database", str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
        + ["--m", "5", "--output", str(out)]
    )
    assert capsys.readouterr().out == f"wrote {out} (top-5 neighbours of 4 queries among 9 database items)\n"
    assert read_neighbours(out).database_ids == ids("a", 6) + ids("b", 3)
    with pytest.raises(SystemExit) as exit_code:
        main(["--queries", str(tmp_path / "missing.h5"), "--m", "5", "--output", str(out)])
    assert exit_code.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: feature store {tmp_path / 'missing.h5'} not found")


def test_module_runs_as_a_script(tmp_path):
    write_feature_store(tmp_path / "train.h5", ids("t", 8), global_descriptors=integer_descriptors(8))
    result = subprocess.run(
        [sys.executable, "-m", "retrieval.neighbours", "--queries", str(tmp_path / "train.h5"), "--m", "300"]
        + ["--output", str(tmp_path / "n.h5")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "top-7 neighbours of 8 queries among 8 database items, leave-one-out" in result.stdout

"""Neighbour files: the global top-``m`` database neighbours of every query, in one HDF5 file.

A re-ranker (AMES) starts from this shortlist at test time, and its training mines positives and negatives
among the neighbours of each training image (the training list against itself, leave-one-out).

Layout::

    scores        [Q, m]  float32  global similarities, best first
    indices       [Q, m]  int64    0-based rows of the database list (the ranking contract of
                                   :mod:`retrieval.search`; -1 = empty slot)
    query_ids     [Q]     strings  ids of the query list, as its feature store holds them
    database_ids  [N]     strings  ids of the database list (parts concatenated in order)
    attrs format          "retrieval-neighbours"
          format_version  1
          query           the query list (a list name or store path); "" = the database itself
          database        JSON list of the database parts (list names or store paths)
          exclude_self    whether the search was leave-one-out (query ``i`` is database row ``i``, never its
                          own neighbour)

The ids let a reader check that a file belongs to the stores it is used with: rows are positions, and a store
extracted again from another version of a list would silently shift them.

Files written before the ids were stored (``scores``, ``indices``, attrs ``query`` and ``database`` only) are
still read: their ids are ``None``, ``exclude_self`` is inferred from an empty ``query``, and
:meth:`Neighbours.check_against` then checks only the shapes, and refuses unless ``require_ids=False``.

Command line (top-``m`` of any list against any list, from stored global descriptors)::

    python -m retrieval.neighbours --queries A.h5 [--database B.h5 [C.h5 ...]] --m 300 --output out.h5

Without ``--database`` the query list is searched against itself, leave-one-out: the file that training
mines pairs from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from retrieval.feature_store import FeatureStore
from retrieval.files import check_format_attributes, replace_atomically
from retrieval.search import knn

FORMAT = "retrieval-neighbours"
FORMAT_VERSION = 1
EXPECTED_LAYOUT = (
    "an HDF5 neighbour file with datasets scores [Q, m] (float) and indices [Q, m] (integer, 0-based database "
    "rows, best first, -1 = empty), query_ids [Q] and database_ids [N] (strings), and attrs "
    "format='retrieval-neighbours', query, database, exclude_self"
)
# Rows validated at a time, so a memory-mapped file of millions of queries is never loaded whole.
_CHECK_ROWS = 65536


class NeighbourFileError(ValueError):
    """A neighbour file is missing pieces, does not follow the layout, or does not match the stores given."""


@dataclass
class Neighbours:
    """The contents of a neighbour file (see the module docstring).

    ``scores`` and ``indices`` may be memory-mapped (read-only) arrays. ``query_ids`` and ``database_ids`` are
    ``None`` for files written without ids. ``database_size`` is ``len(database_ids)`` when known.
    """

    scores: np.ndarray
    indices: np.ndarray
    query_ids: list[str] | None
    database_ids: list[str] | None
    exclude_self: bool
    query: str = ""
    database: list[str] | None = None
    path: Path | None = None

    @property
    def num_queries(self) -> int:
        return int(self.indices.shape[0])

    @property
    def depth(self) -> int:
        return int(self.indices.shape[1])

    @property
    def database_size(self) -> int | None:
        return None if self.database_ids is None else len(self.database_ids)

    def check_against(
        self,
        query_ids: Sequence | None,
        database_ids: Sequence,
        path: str | os.PathLike | None = None,
        require_ids: bool = True,
    ) -> None:
        """Raise :class:`NeighbourFileError` unless this file was built from lists with these ids, in this order.

        Args:
            query_ids: ids of the query list (e.g. ``FeatureStore.ids``); ``None`` for a leave-one-out file,
                whose queries are the database.
            database_ids: ids of the database list (parts concatenated in order).
            path: where those ids come from (a store path or a name), named in the error.
            require_ids: refuse a file without ids (the default: rows alone cannot prove they match); with
                ``False`` such a file passes if its shapes fit.
        """
        where = f" ({path})" if path is not None else ""
        if query_ids is None and not self.exclude_self:
            raise NeighbourFileError(f"{self._name()} ranks a separate query list: pass its query_ids")
        database_ids = [str(i) for i in database_ids]
        query_ids = database_ids if query_ids is None else [str(i) for i in query_ids]
        if len(query_ids) != self.num_queries:
            raise NeighbourFileError(
                f"{self._name()} has {self.num_queries} query rows but the query list{where} has {len(query_ids)} ids"
            )
        if self.database_ids is None:
            largest = int(self.indices.max(initial=-1)) if self.indices.size else -1
            if largest >= len(database_ids):
                raise NeighbourFileError(
                    f"{self._name()} points at database row {largest} but the database{where} has "
                    f"{len(database_ids)} ids"
                )
            if require_ids:
                raise NeighbourFileError(
                    f"{self._name()} stores no query_ids/database_ids (written before neighbour files carried "
                    "them), so it cannot be checked against the stores; rebuild it with "
                    "`python -m retrieval.neighbours`, or pass require_ids=False to trust its rows"
                )
            return
        for role, expected, stored in (
            ("query", query_ids, self.query_ids),
            ("database", database_ids, self.database_ids),
        ):
            if stored != expected:
                raise NeighbourFileError(
                    f"{self._name()} was built from another {role} list than the one given{where}: "
                    f"{_first_difference(stored, expected)}; rebuild it from these stores"
                )

    def _name(self) -> str:
        return f"neighbour file {self.path}" if self.path is not None else "the neighbours"


def write_neighbours(
    path: str | os.PathLike,
    scores,
    indices,
    query_ids: Sequence,
    database_ids: Sequence,
    query: str = "",
    database: str | Sequence[str] = (),
    exclude_self: bool = False,
) -> Path:
    """Write a neighbour file atomically (readers never see half a file); the layout is checked first.

    Args:
        scores, indices: ``[Q, m]`` as :func:`retrieval.search.knn` returns them.
        query_ids: the query list's ids (``[Q]``); for leave-one-out, the database's.
        database_ids: the database list's ids (``[N]``), parts concatenated in order.
        query: names the query list (list name or store path); ``""`` = the database itself.
        database: names the database parts (one name or several).
        exclude_self: the search was leave-one-out.
    """
    path = Path(path)
    scores = np.asarray(scores, dtype=np.float32)
    indices = np.asarray(indices)
    query_ids = [str(i) for i in query_ids]
    database_ids = [str(i) for i in database_ids]
    database = [database] if isinstance(database, (str, os.PathLike)) else [str(d) for d in database]
    _check_layout(str(path), scores, indices, query_ids, database_ids, exclude_self)
    with replace_atomically(path) as temporary:
        with h5py.File(temporary, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["query"] = str(query)
            f.attrs["database"] = json.dumps([str(d) for d in database])
            f.attrs["exclude_self"] = bool(exclude_self)
            # Contiguous (no chunks, no compression), so readers can memory-map them.
            f.create_dataset("scores", data=scores)
            f.create_dataset("indices", data=indices.astype(np.int64, copy=False))
            f.create_dataset("query_ids", data=np.array(query_ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("database_ids", data=np.array(database_ids, dtype=object), dtype=h5py.string_dtype())
    return path


def read_neighbours(path: str | os.PathLike, memory_map: bool = True) -> Neighbours:
    """Read and validate a neighbour file; ``memory_map`` maps ``scores`` and ``indices`` instead of reading them.

    Raises ``FileNotFoundError`` or :class:`NeighbourFileError`, naming the file and the expected layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"neighbour file {path} not found; expected {EXPECTED_LAYOUT}")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise NeighbourFileError(f"{path} is not a readable HDF5 file ({error}); expected {EXPECTED_LAYOUT}") from None
    with f:
        check_format_attributes(f.attrs, path, FORMAT, FORMAT_VERSION, EXPECTED_LAYOUT, NeighbourFileError)
        if not {"scores", "indices"} <= set(f.keys()):
            raise NeighbourFileError(f"{path} has datasets {sorted(f.keys())}; expected {EXPECTED_LAYOUT}")
        for name in ("scores", "indices", "query_ids", "database_ids"):
            if name in f and not isinstance(f[name], h5py.Dataset):
                raise NeighbourFileError(f"{path}: '{name}' must be a dataset; expected {EXPECTED_LAYOUT}")
        if ("query_ids" in f) != ("database_ids" in f):
            raise NeighbourFileError(f"{path} has only one of query_ids and database_ids; expected {EXPECTED_LAYOUT}")
        scores, indices = (_read_matrix(f[name], path, memory_map) for name in ("scores", "indices"))
        query_ids = _read_strings(f["query_ids"]) if "query_ids" in f else None
        database_ids = _read_strings(f["database_ids"]) if "database_ids" in f else None
        query = _as_str(f.attrs.get("query", ""))
        # Files without the attribute (written before it existed) were leave-one-out exactly when query was "".
        exclude_self = bool(f.attrs["exclude_self"]) if "exclude_self" in f.attrs else "query" in f.attrs and not query
        database = _read_database_names(f.attrs.get("database"))
    _check_layout(str(path), scores, indices, query_ids, database_ids, exclude_self)
    return Neighbours(
        scores=scores,
        indices=indices,
        query_ids=query_ids,
        database_ids=database_ids,
        exclude_self=exclude_self,
        query=query,
        database=database,
        path=path,
    )


def describe_neighbours(path: str | os.PathLike) -> str:
    """One line saying what a neighbour file holds, read from its header only."""
    with h5py.File(path, "r") as f:
        num_queries, depth = f["indices"].shape
        among = f" among {f['database_ids'].shape[0]} database items" if "database_ids" in f else ""
        query = _as_str(f.attrs.get("query", ""))
        leave_one_out = bool(f.attrs["exclude_self"]) if "exclude_self" in f.attrs else not query
    return (
        f"{path} (top-{depth} neighbours of {num_queries} queries{among}{', leave-one-out' if leave_one_out else ''})"
    )


def build_neighbours(queries, database, m: int, exclude_self: bool = False, device=None):
    """Exact top-``m`` global neighbours by inner product: ``(scores [Q, m] float32, indices [Q, m] int64)``.

    Args:
        queries: ``[Q, D]`` descriptors: an array, a memory map, a :class:`FeatureStore` (its globals), or a
            sequence of those (parts concatenated in order).
        database: the same kinds; pass the very same object as ``queries`` to search a list against itself
            (its descriptors are then read once).
        m: neighbours per query; clipped to the number of candidates, as :func:`retrieval.search.knn` does.
        exclude_self: leave-one-out (queries are the database; row ``i`` never lists ``i``).
        device: ``None`` searches on the CPU, a torch device (``"cuda"``) on that device.
    """
    database_descriptors = _descriptors(database)
    query_descriptors = database_descriptors if queries is database else _descriptors(queries)
    return knn(query_descriptors, database_descriptors, m, exclude_self=exclude_self, device=device)


def build_neighbour_file(
    path: str | os.PathLike,
    query_store,
    database_store=None,
    m: int = 300,
    device=None,
) -> Path:
    """Write the top-``m`` global neighbours of one stored list against another.

    Args:
        path: the neighbour file to write.
        query_store: a feature store (path or :class:`FeatureStore`) with global descriptors.
        database_store: a store, or several (parts concatenated in order); ``None`` searches the query list
            against itself, leave-one-out (training mines its pairs from train against train).
        m: neighbours per query (clipped to the number of candidates).
        device: as in :func:`build_neighbours`.
    """
    queries = _as_store(query_store)
    if database_store is None:
        database, exclude_self = [queries], True
    else:
        parts = [database_store] if isinstance(database_store, (str, os.PathLike, FeatureStore)) else database_store
        database, exclude_self = [_as_store(part) for part in parts], False
        if not database:
            raise ValueError("database_store: no store given (pass None to search the query list against itself)")
    scores, indices = build_neighbours(
        database if exclude_self else queries, database, m, exclude_self=exclude_self, device=device
    )
    database_ids = [i for store in database for i in store.ids]
    return write_neighbours(
        path,
        scores,
        indices,
        query_ids=queries.ids,
        database_ids=database_ids,
        query="" if exclude_self else str(queries.path),
        database=[str(store.path) for store in database],
        exclude_self=exclude_self,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.neighbours",
        description="Write the global top-m database neighbours of every query from stored global descriptors.",
    )
    parser.add_argument("--queries", required=True, help="feature store of the query list")
    parser.add_argument(
        "--database",
        nargs="+",
        help="feature store(s) of the database, concatenated in order; omitted: the query list against itself, "
        "leave-one-out",
    )
    parser.add_argument("--m", type=int, required=True, help="neighbours per query")
    parser.add_argument("--output", required=True, help="the neighbour file to write")
    parser.add_argument("--device", default=None, help="torch device to search on (e.g. cuda); default: CPU")
    args = parser.parse_args(argv)
    try:
        path = build_neighbour_file(args.output, args.queries, args.database, m=args.m, device=args.device)
        print(f"wrote {describe_neighbours(path)}")
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("RETRIEVAL_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _check_layout(name, scores, indices, query_ids, database_ids, exclude_self) -> None:
    def fail(problem: str):
        raise NeighbourFileError(f"{name}: {problem}; expected {EXPECTED_LAYOUT}")

    if scores.ndim != 2 or indices.ndim != 2 or scores.shape != indices.shape:
        fail(f"scores {tuple(scores.shape)} and indices {tuple(indices.shape)} must be 2-d arrays of the same shape")
    if not np.issubdtype(scores.dtype, np.floating):
        fail(f"scores have dtype {scores.dtype}, not float")
    if not np.issubdtype(indices.dtype, np.integer):
        fail(f"indices have dtype {indices.dtype}, not integer")
    num_queries = scores.shape[0]
    if query_ids is not None and len(query_ids) != num_queries:
        fail(f"{len(query_ids)} query_ids for {num_queries} query rows")
    if exclude_self and database_ids is not None and len(database_ids) != num_queries:
        fail(f"leave-one-out, yet {num_queries} query rows for {len(database_ids)} database ids")
    bound = len(database_ids) if database_ids is not None else None
    for start in range(0, num_queries, _CHECK_ROWS):
        rows = np.asarray(indices[start : start + _CHECK_ROWS])
        row_scores = np.asarray(scores[start : start + _CHECK_ROWS])
        if rows.size == 0:
            continue
        outside = (rows < -1) | (rows >= bound if bound is not None else False)
        if outside.any():
            at = start + int(np.flatnonzero(outside.any(1))[0])
            fail(f"query row {at} holds indices outside [-1, {bound if bound is not None else 'N'})")
        bad = ~np.isfinite(row_scores) & (rows >= 0)
        if bad.any():
            fail(f"{int(bad.any(1).sum())} query rows from row {start} hold NaN or Inf scores")
        if exclude_self:
            own = rows == np.arange(start, start + len(rows))[:, None]
            if own.any():
                fail(f"leave-one-out, yet query row {start + int(np.flatnonzero(own.any(1))[0])} lists itself")


def _read_matrix(dataset: h5py.Dataset, path: Path, memory_map: bool) -> np.ndarray:
    offset = None if dataset.is_virtual else dataset.id.get_offset()
    if memory_map and offset is not None and dataset.chunks is None and dataset.compression is None:
        return np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    return dataset[()]


def _read_strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in dataset[()]]


def _read_database_names(value) -> list[str] | None:
    if value is None:
        return None
    text = _as_str(value)
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        return [text]  # a plain name written by hand
    return [str(n) for n in names] if isinstance(names, list) else [str(names)]


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_difference(stored: list[str], expected: list[str]) -> str:
    if len(stored) != len(expected):
        return f"{len(stored)} ids in the file, {len(expected)} given"
    row = next(i for i, (a, b) in enumerate(zip(stored, expected)) if a != b)
    return f"row {row} is {stored[row]!r} in the file but {expected[row]!r} given"


def _as_store(store) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore(store)


def _descriptors(source):
    """Global descriptors of an array, a store, or a sequence of them (concatenated)."""
    if isinstance(source, (FeatureStore, str, os.PathLike)):
        return _as_store(source).global_descriptors()
    if isinstance(source, (list, tuple)):
        parts = [_descriptors(part) for part in source]
        if not parts:
            raise ValueError("no descriptors given (an empty list of parts)")
        return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(part) for part in parts])
    return source


if __name__ == "__main__":
    main()

"""Feature stores: descriptors of one (backbone, dataset, split) in one HDF5 file.

Layout (the minimal store, e.g. written with plain ``h5py``, needs only ``ids`` and ``global`` or ``local``)::

    ids      [N]            image ids: strings (UTF-8 or bytes) or integers, one per image, in dataset order
    global   [N, D]         global descriptors, any float dtype (float32 or float16 as written by extraction);
                            stored contiguously, it is memory-mapped when read
    local    [N, L, 5 + D]  optional local descriptors, columns x, y, scale, pad (1 = padding), weight,
                            descriptor..., sorted by weight (the layout the AMES authors publish)
    labels   [N]            optional integer labels (class / landmark id)
    attrs    format         optional; if present, "retrieval-feature-store"
             format_version optional; 1
             num_images     optional; N (derived from ``ids`` when absent)
             config         optional JSON of the extraction configuration (``{}`` when absent)

A store holds ``global``, ``local`` or both. Image ids and labels are datasets rather than attributes because
HDF5 attributes are limited to 64 KiB.

Writing is streaming and resumable: :class:`FeatureStoreWriter` fills ``<name>.partial`` in any order and
renames it to ``<name>`` only when every row is written, so a file under the final name is always complete.
It opens the file only for the duration of each call, so no open handle (and no HDF5 file lock) is ever
inherited by a forked process such as a dataloader worker.

:func:`write_virtual_store` joins stores holding consecutive blocks of rows (the shards of a multi-process
extraction) into one store without copying descriptors: ``global`` and ``local`` are HDF5 virtual datasets
pointing at the shards (by paths relative to the joined file), which stay in place. The same reader reads both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from retrieval.files import replace_atomically
from retrieval.validation import check_finite_rows

FORMAT = "retrieval-feature-store"
FORMAT_VERSION = 1
LOCAL_COLUMNS = ("x", "y", "scale", "pad", "weight")
EXPECTED_LAYOUT = (
    "an HDF5 feature store with datasets ids [N] (strings or integers), global [N, D] and/or local "
    "[N, L, 5 + D] (x, y, scale, pad, weight, descriptor...), optionally labels [N] (integers), and optional "
    "attrs format='retrieval-feature-store', num_images=N, config=<json>"
)
_FINITE_CHECK_ROWS = 65536


class FeatureStoreError(ValueError):
    """A feature store file is missing pieces or does not follow the layout."""


class FeatureStore:
    """Read access to a complete feature store; the layout is validated when opened, ids and labels are read
    when first used."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" ({partial.name} exists: its writing was interrupted; resume it)" if partial.exists() else ""
            raise FileNotFoundError(f"feature store {self.path} not found{hint}; expected {EXPECTED_LAYOUT}")
        try:
            with h5py.File(self.path, "r") as f:
                self._read_header(f)
        except OSError as error:
            raise FeatureStoreError(f"{self.path} is not a readable HDF5 file ({error}); expected {EXPECTED_LAYOUT}")

    def _read_header(self, f: h5py.File) -> None:
        # A store written by hand may omit every attribute; one that names another format is refused.
        if "format" in f.attrs and _as_str(f.attrs["format"]) != FORMAT:
            raise FeatureStoreError(
                f"{self.path} has format={_as_str(f.attrs['format'])!r}, not '{FORMAT}'; expected {EXPECTED_LAYOUT}"
            )
        if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise FeatureStoreError(
                f"{self.path} has format_version {f.attrs['format_version']}, newer than this code reads "
                f"({FORMAT_VERSION}); update the package"
            )
        if "ids" not in f or not ({"global", "local"} & set(f.keys())):
            raise FeatureStoreError(f"{self.path} has datasets {sorted(f.keys())}; expected {EXPECTED_LAYOUT}")
        for name, ndim in (("ids", 1), ("global", 2), ("local", 3), ("labels", 1)):
            if name in f and (not isinstance(f[name], h5py.Dataset) or f[name].ndim != ndim):
                raise FeatureStoreError(f"{self.path}: '{name}' must be a {ndim}-d dataset; expected {EXPECTED_LAYOUT}")
        self.num_images = int(f.attrs["num_images"]) if "num_images" in f.attrs else int(f["ids"].shape[0])
        try:
            self.config = json.loads(_as_str(f.attrs.get("config", "{}")) or "{}")
        except json.JSONDecodeError as error:
            raise FeatureStoreError(f"{self.path}: attribute 'config' is not JSON ({error})") from None
        for name in ("ids", "global", "local", "labels"):
            if name in f and f[name].shape[0] != self.num_images:
                raise FeatureStoreError(
                    f"{self.path}: dataset '{name}' has {f[name].shape[0]} rows but num_images is {self.num_images}"
                )
        self.global_dim = int(f["global"].shape[1]) if "global" in f else None
        self.local_shape = tuple(int(s) for s in f["local"].shape[1:]) if "local" in f else None
        if self.local_shape is not None and self.local_shape[1] <= len(LOCAL_COLUMNS):
            raise FeatureStoreError(
                f"{self.path}: local descriptors have {self.local_shape[1]} columns; expected 5 + D "
                f"({', '.join(LOCAL_COLUMNS)}, descriptor...)"
            )
        #: Shard files a joined store reads through (empty for an ordinary store).
        self.sources = sorted(
            {
                self.path.parent / source.file_name
                for name in ("global", "local")
                if name in f and f[name].is_virtual
                for source in f[name].virtual_sources()
            }
        )
        missing = [str(source) for source in self.sources if not source.is_file()]
        if missing:
            raise FeatureStoreError(
                f"{self.path} joins shards that are missing: {', '.join(missing)}; keep the shards next to it "
                "(the joined file only points at them), or extract again"
            )

    @cached_property
    def ids(self) -> list[str]:
        with h5py.File(self.path, "r") as f:
            return _read_ids(f)

    @cached_property
    def labels(self) -> np.ndarray | None:
        with h5py.File(self.path, "r") as f:
            return f["labels"][()] if "labels" in f else None

    @property
    def has_global(self) -> bool:
        return self.global_dim is not None

    @property
    def has_local(self) -> bool:
        return self.local_shape is not None

    def global_descriptors(self, memory_map: bool = True) -> np.ndarray | RowBlocks:
        """``[N, D]`` global descriptors (stored dtype), memory-mapped when the file allows it (a joined store:
        its shards memory-mapped, as :class:`RowBlocks`; ``memory_map=False`` reads an array).

        Rows with NaN or Inf are refused with a count, naming the file.
        """
        if not self.has_global:
            raise FeatureStoreError(f"{self.path} holds no global descriptors; expected {EXPECTED_LAYOUT}")
        with h5py.File(self.path, "r") as f:
            dataset = f["global"]
            if dataset.is_virtual and memory_map:
                # A joined store: each shard memory-mapped (and checked) on its own, in row order, so 1M joined
                # rows are not read into memory by every process that opens them.
                sources = sorted(dataset.virtual_sources(), key=lambda s: s.vspace.get_select_bounds()[0][0])
                return RowBlocks([FeatureStore(self.path.parent / s.file_name).global_descriptors() for s in sources])
            offset = None if dataset.is_virtual else dataset.id.get_offset()
            mappable = memory_map and offset is not None and dataset.chunks is None and dataset.compression is None
            if mappable:
                array = np.memmap(self.path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
            else:
                array = dataset[()]
        for start in range(0, len(array), _FINITE_CHECK_ROWS):
            check_finite_rows(
                np.asarray(array[start : start + _FINITE_CHECK_ROWS]), f"{self.path} (global, from row {start})"
            )
        return array

    def local_descriptors(self, rows: Sequence[int] | slice) -> np.ndarray:
        """``[len(rows), L, 5 + D]`` local descriptors of the given rows."""
        if not self.has_local:
            raise FeatureStoreError(f"{self.path} holds no local descriptors; expected {EXPECTED_LAYOUT}")
        with h5py.File(self.path, "r") as f:
            if isinstance(rows, slice):
                return f["local"][rows]
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(rows) == 0:
                return np.empty((0, *self.local_shape), dtype=f["local"].dtype)
            # HDF5 reads increasing, distinct rows: read those once, then expand to the order asked for.
            unique, inverse = np.unique(rows, return_inverse=True)
            return f["local"][unique][inverse]


class FeatureStoreWriter:
    """Streaming, resumable writer of a feature store.

    Rows may arrive in any order (e.g. a bucketed dataloader, or several processes' shards). Opening a writer
    whose ``<path>.partial`` exists continues it, provided ids, shapes and config match; :meth:`missing_rows`
    tells what is left. :meth:`finalize` (also called on leaving a ``with`` block without error) checks
    that every row is written and atomically renames the file. The file is open only within each call (see
    the module docstring: a handle held across calls would be inherited, with its lock, by forked workers).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        ids: Sequence[str],
        global_dim: int | None = None,
        local_shape: tuple[int, int] | None = None,
        labels: Sequence[int] | None = None,
        config: dict | None = None,
        global_dtype: str = "float32",
        local_dtype: str = "float16",
    ):
        if global_dim is None and local_shape is None:
            raise ValueError("a feature store holds global descriptors, local descriptors or both")
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.num_images = len(ids)
        self.global_dim = global_dim
        self.local_shape = tuple(local_shape) if local_shape is not None else None
        config_json = json.dumps(config or {}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial_path.exists():
            try:
                f = h5py.File(self.partial_path, "r")
            except OSError as error:
                raise FeatureStoreError(
                    f"cannot resume {self.partial_path}: it is unreadable ({error}), e.g. the writing process was "
                    "killed while HDF5 was updating it; delete it to start over"
                ) from error
            with f:
                self._check_resumable(f, ids, labels, config_json, global_dtype, local_dtype)
        else:
            try:
                with h5py.File(self.partial_path, "w") as f:
                    self._create(f, ids, labels, config_json, global_dtype, local_dtype)
            except BaseException:
                self.partial_path.unlink(missing_ok=True)
                raise

    def _create(self, f: h5py.File, ids, labels, config_json, global_dtype, local_dtype) -> None:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_images"] = self.num_images
        f.attrs["config"] = config_json
        f.create_dataset("ids", data=np.array([str(i) for i in ids], dtype=object), dtype=h5py.string_dtype())
        if labels is not None:
            if len(labels) != self.num_images:
                raise ValueError(f"{len(labels)} labels for {self.num_images} images")
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        if self.global_dim is not None:
            # Contiguous and uncompressed, so readers can memory-map it.
            f.create_dataset("global", shape=(self.num_images, self.global_dim), dtype=global_dtype)
        if self.local_shape is not None:
            f.create_dataset(
                "local", shape=(self.num_images, *self.local_shape), dtype=local_dtype, chunks=(1, *self.local_shape)
            )
        f.create_dataset("written", shape=(self.num_images,), dtype=bool, fillvalue=False)

    def _check_resumable(self, f: h5py.File, ids, labels, config_json, global_dtype, local_dtype) -> None:
        problems = []
        if _read_ids(f) != [str(i) for i in ids]:
            problems.append("image ids differ")
        if f.attrs.get("config") != config_json:
            problems.append("extraction config differs")
        stored_labels = f["labels"][()] if "labels" in f else None
        if (labels is None) != (stored_labels is None) or (
            labels is not None and not np.array_equal(np.asarray(labels, dtype=np.int64), stored_labels)
        ):
            problems.append("labels differ")
        for name, expected, dtype in (
            ("global", self.global_dim, global_dtype),
            ("local", self.local_shape, local_dtype),
        ):
            if (expected is None) != (name not in f):
                problems.append(f"{name} descriptors were {'not ' if expected is not None else ''}declared before")
            elif expected is not None:
                shape = f[name].shape[1] if name == "global" else tuple(f[name].shape[1:])
                if shape != expected or f[name].dtype != np.dtype(dtype):
                    problems.append(f"{name} descriptor shape or dtype differs")
        if problems:
            raise FeatureStoreError(
                f"cannot resume {self.partial_path}: {', '.join(problems)}; delete it to start over"
            )

    def missing_rows(self) -> np.ndarray:
        return partial_missing_rows(self.path)

    def write(self, rows, global_descriptors=None, local_descriptors=None) -> None:
        """Write descriptors of the given row indices (any order, no repeats)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        order = np.argsort(rows)
        rows = rows[order]
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.num_images or np.any(rows[1:] == rows[:-1])):
            raise ValueError(f"rows must be distinct indices in [0, {self.num_images})")
        selection = _as_selection(rows)
        # Closed again at the end of the call, which also flushes it: a process killed between calls leaves a
        # file that resumes.
        with h5py.File(self.partial_path, "r+") as f:
            for name, values, expected in (
                ("global", global_descriptors, self.global_dim),
                ("local", local_descriptors, self.local_shape),
            ):
                if expected is None:
                    if values is not None:
                        raise ValueError(f"this store was declared without {name} descriptors")
                    continue
                if values is None:
                    raise ValueError(f"{name} descriptors are missing for rows {rows[:5].tolist()}...")
                values = _to_numpy(values)
                if len(values) != len(rows):
                    raise ValueError(f"{len(values)} rows of {name} descriptors given for {len(rows)} row indices")
                # Checked in the stored dtype: a value that overflows float16 becomes Inf there.
                with np.errstate(over="ignore"):  # an overflow becomes Inf, refused just below
                    values = values[order].astype(f[name].dtype, copy=False)
                check_finite_rows(values, f"{name} descriptors for {self.path.name}")
                f[name][selection] = values
            f["written"][selection] = True

    def finalize(self) -> Path:
        return finalize_partial(self.path)

    def close(self) -> None:
        """Leave the ``.partial`` file for a later resume (nothing is held open between calls)."""

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()


def partial_missing_rows(path: str | os.PathLike) -> np.ndarray | None:
    """Rows not yet written in the ``.partial`` file of the store ``path``; ``None`` if there is none."""
    partial = Path(path).with_name(Path(path).name + ".partial")
    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r") as f:
            return np.flatnonzero(~f["written"][()])
    except (OSError, KeyError) as error:
        raise FeatureStoreError(
            f"cannot resume {partial}: it is unreadable ({error}); delete it to start over"
        ) from error


def finalize_partial(path: str | os.PathLike) -> Path:
    """Check that every row of ``<path>.partial`` is written, then atomically rename it to ``path``."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "r+") as f:
        missing = np.flatnonzero(~f["written"][()])
        if len(missing):
            raise FeatureStoreError(
                f"{partial}: {len(missing)} of {len(missing) + int(f['written'][()].sum())} rows were never written "
                f"(first: {missing[:5].tolist()}); the file is kept so the writing can resume"
            )
        del f["written"]
    os.replace(partial, path)
    return path


class RowBlocks:
    """Consecutive ``[n_i, D]`` arrays (e.g. memory-mapped shards) read as one ``[N, D]`` array: indexing by an
    integer, a slice or an index array returns numpy rows, ``np.asarray`` the whole."""

    def __init__(self, blocks: Sequence[np.ndarray]):
        self.blocks = list(blocks)
        self.starts = np.cumsum([0] + [len(block) for block in self.blocks])
        self.shape = (int(self.starts[-1]), *self.blocks[0].shape[1:])
        self.dtype = self.blocks[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.blocks)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + (len(self) if rows < 0 else 0)
            block = int(np.searchsorted(self.starts, row, side="right")) - 1
            return self.blocks[block][row - self.starts[block]]
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        block_of = np.searchsorted(self.starts, rows, side="right") - 1
        for block in np.unique(block_of):
            chosen = block_of == block
            out[chosen] = self.blocks[block][rows[chosen] - self.starts[block]]
        return out


def write_virtual_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    shards: Sequence[tuple[int, str | os.PathLike]],
    labels: Sequence[int] | None = None,
    config: dict | None = None,
) -> Path:
    """Join complete stores holding consecutive rows into the store ``path`` without copying descriptors.

    ``shards``: ``(first row, store path)`` in row order; each store holds the rows from its first row to the
    next one's (the last to ``len(ids)``), with the same descriptor shapes. ``global`` and ``local`` of the
    joined file are virtual datasets reading the shards through paths relative to ``path``, so the directory can
    be moved as a whole. Written to a temporary name and renamed, like every store.
    """
    path = Path(path)
    stores = [FeatureStore(shard) for _, shard in shards]
    starts = [int(start) for start, _ in shards] + [len(ids)]
    for store, start, stop in zip(stores, starts, starts[1:]):
        if store.num_images != stop - start:
            raise FeatureStoreError(f"{store.path} holds {store.num_images} rows, expected rows {start}..{stop - 1}")
        if (store.global_dim, store.local_shape) != (stores[0].global_dim, stores[0].local_shape):
            raise FeatureStoreError(f"{store.path}: descriptor shapes differ from {stores[0].path}")
    if starts[0] != 0:
        raise FeatureStoreError(f"the first shard starts at row {starts[0]}, not 0")
    with replace_atomically(path) as temporary:
        with h5py.File(temporary, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["num_images"] = len(ids)
            f.attrs["config"] = json.dumps(config or {}, sort_keys=True)
            f.create_dataset("ids", data=np.array([str(i) for i in ids], dtype=object), dtype=h5py.string_dtype())
            if labels is not None:
                f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            for name in ("global", "local"):
                with h5py.File(stores[0].path, "r") as first:
                    if name not in first:
                        continue
                    row_shape, dtype = first[name].shape[1:], first[name].dtype
                layout = h5py.VirtualLayout(shape=(len(ids), *row_shape), dtype=dtype)
                for store, start, stop in zip(stores, starts, starts[1:]):
                    source = os.path.relpath(store.path, path.parent)
                    layout[start:stop] = h5py.VirtualSource(source, name, shape=(stop - start, *row_shape))
                f.create_virtual_dataset(name, layout)
    return path


def write_feature_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    global_descriptors=None,
    local_descriptors=None,
    labels=None,
    config: dict | None = None,
    global_dtype: str = "float32",
) -> Path:
    """Write a whole feature store at once (atomically)."""
    global_descriptors = None if global_descriptors is None else _to_numpy(global_descriptors)
    local_descriptors = None if local_descriptors is None else _to_numpy(local_descriptors)
    partial = Path(path).with_name(Path(path).name + ".partial")
    if partial.exists():
        partial.unlink()  # a one-shot write has nothing to resume
    with FeatureStoreWriter(
        path,
        ids,
        global_dim=None if global_descriptors is None else global_descriptors.shape[1],
        local_shape=None if local_descriptors is None else local_descriptors.shape[1:],
        labels=labels,
        config=config,
        global_dtype=global_dtype,
    ) as writer:
        writer.write(np.arange(len(ids)), global_descriptors, local_descriptors)
    return Path(path)


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_ids(f: h5py.File) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else str(i) for i in f["ids"][()]]


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _as_selection(sorted_rows: np.ndarray):
    """A slice when the rows are one contiguous run (much faster in HDF5), else the index array."""
    if len(sorted_rows) and sorted_rows[-1] - sorted_rows[0] + 1 == len(sorted_rows):
        return slice(int(sorted_rows[0]), int(sorted_rows[-1]) + 1)
    return sorted_rows

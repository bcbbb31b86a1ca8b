"""Feature stores: descriptors of one (backbone, dataset, split) in one HDF5 file.

Layout (the minimal store, e.g. written with plain ``h5py``, needs only ``ids`` and ``global`` or ``local``)::

    ids      [N]            image ids: strings (UTF-8 or bytes) or integers, one per image, in dataset order
    global   [N, D]         global descriptors, any float dtype (float32 or float16 as written by extraction);
                            stored contiguously, it is memory-mapped when read
    local    [N, L, 5 + D]  optional local descriptors, columns x, y, scale, pad (1 = padding), weight,
                            descriptor..., sorted by weight (the layout the AMES authors publish)
    labels   [N]            optional integer labels (class / landmark id)
    attrs    format         optional; if present, "retrieval-feature-store"
             format_version optional; 1, or 2 for a store holding compressed datasets (below)
             num_images     optional; N (derived from ``ids`` when absent)
             config         optional JSON of the extraction configuration (``{}`` when absent)

A store holds global descriptors, local descriptors or both. Image ids and labels are datasets rather than
attributes because HDF5 attributes are limited to 64 KiB.

Compressed stores (format version 2, written by :func:`compress_feature_store` or :func:`write_compressed_store`)
hold database descriptors the way AMES stores them, in place of ``global`` / ``local``::

    global_pq            [N, M] uint8             product-quantisation codes, one byte per sub-space (with, or
                                                  instead of, ``global``)
    global_pq_centroids  [M, 256, sub_dim] float32  the codebook, ``D = M * sub_dim``
    local_bits           [N, L, bits / 8] uint8   packed binary local descriptors (``retrieval.compression``'s
                                                  bit order), instead of ``local``
    local_meta           [N, L, 5] float16        their x, y, scale, pad, weight columns
    attrs    local_bits     the number of bits per local descriptor (128 in AMES)
             compression    JSON: how the store was compressed (source, PQ training, bits, locals kept)

Readers see one layout whatever the storage: :meth:`FeatureStore.local_descriptors` returns ``[n, L, 5 + D]``
(for binary locals: the metadata columns, then the ±1 codes, ``D = bits``) and
:meth:`FeatureStore.global_descriptors` the PQ reconstruction when codes are stored;
``global_encoding`` / ``local_encoding`` tell which storage the values come from.

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

from retrieval.compression import PQ_CENTROIDS, ProductQuantizer, binary_codes, pack_bits, unpack_bits
from retrieval.files import check_format_attributes, replace_atomically
from retrieval.validation import check_finite_rows

FORMAT = "retrieval-feature-store"
#: The newest layout this code reads. Stores without compressed datasets are written as version 1, so code that
#: knows only version 1 still reads them.
FORMAT_VERSION = 2
FLOAT_FORMAT_VERSION = 1
LOCAL_COLUMNS = ("x", "y", "scale", "pad", "weight")
EXPECTED_LAYOUT = (
    "an HDF5 feature store with datasets ids [N] (strings or integers), global [N, D] and/or local "
    "[N, L, 5 + D] (x, y, scale, pad, weight, descriptor...), optionally labels [N] (integers), and optional "
    "attrs format='retrieval-feature-store', num_images=N, config=<json>; compressed, global_pq [N, M] uint8 "
    "with global_pq_centroids [M, 256, sub_dim] in place of global, and local_bits [N, L, bits/8] uint8 with "
    "local_meta [N, L, 5] and attr local_bits=<bits> in place of local"
)
_DESCRIPTOR_DATASETS = ("global", "local", "global_pq", "local_bits")
_DATASET_NDIMS = {
    "ids": 1,
    "global": 2,
    "local": 3,
    "labels": 1,
    "global_pq": 2,
    "global_pq_centroids": 3,
    "local_bits": 3,
    "local_meta": 3,
}
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
        check_format_attributes(f.attrs, self.path, FORMAT, FORMAT_VERSION, EXPECTED_LAYOUT, FeatureStoreError)
        if "ids" not in f or not (set(_DESCRIPTOR_DATASETS) & set(f.keys())):
            raise FeatureStoreError(f"{self.path} has datasets {sorted(f.keys())}; expected {EXPECTED_LAYOUT}")
        for name, ndim in _DATASET_NDIMS.items():
            if name in f and (not isinstance(f[name], h5py.Dataset) or f[name].ndim != ndim):
                raise FeatureStoreError(f"{self.path}: '{name}' must be a {ndim}-d dataset; expected {EXPECTED_LAYOUT}")
        self.num_images = int(f.attrs["num_images"]) if "num_images" in f.attrs else int(f["ids"].shape[0])
        try:
            self.config = json.loads(_as_str(f.attrs.get("config", "{}")) or "{}")
        except json.JSONDecodeError as error:
            raise FeatureStoreError(f"{self.path}: attribute 'config' is not JSON ({error})") from None
        for name in ("ids", "labels", *_DESCRIPTOR_DATASETS, "local_meta"):
            if name in f and f[name].shape[0] != self.num_images:
                raise FeatureStoreError(
                    f"{self.path}: dataset '{name}' has {f[name].shape[0]} rows but num_images is {self.num_images}"
                )
        self._read_global_layout(f)
        self._read_local_layout(f)
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

    def _read_global_layout(self, f: h5py.File) -> None:
        #: "pq" when product-quantisation codes are stored (then they are what is read), "float", or None.
        self.global_encoding = "pq" if "global_pq" in f else "float" if "global" in f else None
        self.global_dim = int(f["global"].shape[1]) if "global" in f else None
        if self.global_encoding != "pq":
            return
        codes = f["global_pq"]
        centroids = f.get("global_pq_centroids")
        if centroids is None or codes.dtype != np.uint8 or centroids.shape[:2] != (codes.shape[1], PQ_CENTROIDS):
            raise FeatureStoreError(
                f"{self.path}: global_pq {codes.dtype} {codes.shape} needs uint8 codes [N, M] and "
                f"global_pq_centroids [M, {PQ_CENTROIDS}, sub_dim], got "
                f"{'none' if centroids is None else tuple(centroids.shape)}; expected {EXPECTED_LAYOUT}"
            )
        pq_dim = int(centroids.shape[0] * centroids.shape[2])
        if self.global_dim is not None and self.global_dim != pq_dim:
            raise FeatureStoreError(
                f"{self.path}: global has {self.global_dim} dimensions but its PQ codebook {pq_dim}"
            )
        self.global_dim = pq_dim

    def _read_local_layout(self, f: h5py.File) -> None:
        #: "binary" when packed binary codes are stored (read as ±1 values), "float", or None.
        self.local_encoding = "binary" if "local_bits" in f else "float" if "local" in f else None
        self.local_shape = tuple(int(s) for s in f["local"].shape[1:]) if "local" in f else None
        if self.local_shape is not None and self.local_shape[1] <= len(LOCAL_COLUMNS):
            raise FeatureStoreError(
                f"{self.path}: local descriptors have {self.local_shape[1]} columns; expected 5 + D "
                f"({', '.join(LOCAL_COLUMNS)}, descriptor...)"
            )
        if self.local_encoding != "binary":
            return
        if "local" in f:
            raise FeatureStoreError(
                f"{self.path} holds both 'local' and 'local_bits'; a store keeps its local descriptors one way. "
                f"Expected {EXPECTED_LAYOUT}"
            )
        packed, meta = f["local_bits"], f.get("local_meta")
        bits = int(f.attrs.get("local_bits", 0))
        expected_meta = (*packed.shape[:2], len(LOCAL_COLUMNS))
        if packed.dtype != np.uint8 or bits <= 0 or -(-bits // 8) != packed.shape[2]:
            raise FeatureStoreError(
                f"{self.path}: local_bits {packed.dtype} {packed.shape} with attr local_bits={bits or 'missing'}; "
                "expected uint8 [N, L, bits/8] and the number of bits as attr local_bits"
            )
        if meta is None or meta.shape != expected_meta:
            raise FeatureStoreError(
                f"{self.path}: local_bits needs local_meta {list(expected_meta)} ({', '.join(LOCAL_COLUMNS)}), got "
                f"{'none' if meta is None else list(meta.shape)}; expected {EXPECTED_LAYOUT}"
            )
        self.local_shape = (int(packed.shape[1]), len(LOCAL_COLUMNS) + bits)

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

    def global_descriptors(
        self, memory_map: bool = True, quantized: bool | None = None
    ) -> np.ndarray | RowBlocks | QuantizedRows:
        """``[N, D]`` global descriptors (stored dtype), memory-mapped when the file allows it (a joined store:
        its shards memory-mapped, as :class:`RowBlocks`; ``memory_map=False`` reads an array).

        A store with PQ codes gives their float32 reconstruction (what a search over the compressed database
        sees), decoded as rows are read (:class:`QuantizedRows`; ``memory_map=False``: decoded at once).
        ``quantized=False`` reads the float ``global`` dataset kept beside the codes, ``True`` insists on codes.

        Rows with NaN or Inf are refused with a count, naming the file.
        """
        if not self.has_global:
            raise FeatureStoreError(f"{self.path} holds no global descriptors; expected {EXPECTED_LAYOUT}")
        if quantized is None:
            quantized = self.global_encoding == "pq"
        with h5py.File(self.path, "r") as f:
            name = "global_pq" if quantized else "global"
            if name not in f:
                raise FeatureStoreError(
                    f"{self.path} holds no {'PQ codes' if quantized else 'float'} global descriptors ('{name}'); "
                    f"expected {EXPECTED_LAYOUT}"
                )
            if quantized:
                quantizer = self._read_quantizer(f)
                codes = _memory_map(self.path, f[name]) if memory_map else None
                codes = f[name][()] if codes is None else codes
                return QuantizedRows(codes, quantizer) if memory_map else quantizer.decode(codes)
            dataset = f["global"]
            if dataset.is_virtual and memory_map:
                # A joined store: each shard memory-mapped (and checked) on its own, in row order, so 1M joined
                # rows are not read into memory by every process that opens them.
                sources = sorted(dataset.virtual_sources(), key=lambda s: s.vspace.get_select_bounds()[0][0])
                return RowBlocks([FeatureStore(self.path.parent / s.file_name).global_descriptors() for s in sources])
            array = _memory_map(self.path, dataset) if memory_map else None
            array = dataset[()] if array is None else array
        for start in range(0, len(array), _FINITE_CHECK_ROWS):
            check_finite_rows(
                np.asarray(array[start : start + _FINITE_CHECK_ROWS]), f"{self.path} (global, from row {start})"
            )
        return array

    def local_descriptors(self, rows: Sequence[int] | slice) -> np.ndarray:
        """``[len(rows), L, 5 + D]`` local descriptors of the given rows.

        Binary locals (``local_encoding == "binary"``) come in the same layout, float16: the five metadata
        columns, then the ±1 codes (``D`` = bits), so consumers read one layout and a model can tell from
        ``local_encoding`` that its inputs are already binary codes.
        """
        if not self.has_local:
            raise FeatureStoreError(f"{self.path} holds no local descriptors; expected {EXPECTED_LAYOUT}")
        with h5py.File(self.path, "r") as f:
            if self.local_encoding == "float":
                return _read_rows(f["local"], rows)
            meta = _read_rows(f["local_meta"], rows)
            codes = unpack_bits(_read_rows(f["local_bits"], rows), self.local_shape[1] - len(LOCAL_COLUMNS))
            return np.concatenate([meta, codes.astype(meta.dtype)], axis=-1)

    def local_sets(self, rows: Sequence[int] | None = None, count: int | None = None, block: int = 1024):
        """Per row (all rows by default), its non-padding local descriptors as ``float32 [n_i, D]`` (the first
        ``count`` stored rows of each, the strongest), read ``block`` rows at a time. Refuses a store without
        locals or with binary codes, which are not descriptors (a codebook or an aggregation needs descriptors)."""
        if not self.has_local:
            raise FeatureStoreError(
                f"{self.path} holds no local descriptors (a 'local' [N, L, 5 + D] dataset, e.g. extracted with "
                f"num_local > 0); expected {EXPECTED_LAYOUT}"
            )
        if self.local_encoding != "float":
            raise FeatureStoreError(
                f"{self.path} stores its local descriptors as {self.local_encoding} codes, not descriptors; use the "
                "uncompressed store"
            )
        pad, first = LOCAL_COLUMNS.index("pad"), len(LOCAL_COLUMNS)
        rows = np.arange(self.num_images) if rows is None else np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), block):
            for local in self.local_descriptors(rows[start : start + block])[:, :count]:
                yield np.ascontiguousarray(local[local[:, pad] < 0.5, first:], dtype=np.float32)

    def global_quantizer(self) -> ProductQuantizer | None:
        """The PQ codebook of the stored global codes (``None`` without codes), e.g. to encode queries alike."""
        if self.global_encoding != "pq":
            return None
        with h5py.File(self.path, "r") as f:
            return self._read_quantizer(f)

    def _read_quantizer(self, f: h5py.File) -> ProductQuantizer:
        try:
            return ProductQuantizer(f["global_pq_centroids"][()])
        except ValueError as error:
            raise FeatureStoreError(f"{self.path}: {error}") from None

    def stored_bytes_per_image(self, num_locals: int | None = None) -> int:
        """Bytes one image's descriptors take as stored: the global (dimension x dtype size, or one byte per PQ
        sub-space; a float copy kept beside PQ codes is not counted) plus ``num_locals`` (default: all ``L``)
        local descriptors (packed bits, or dimension x dtype size).

        Only descriptors are counted, not the five metadata columns (position, scale, pad, weight) nor the PQ
        codebook, as in the AMES paper's memory figures (see ``retrieval.compression``).
        """
        with h5py.File(self.path, "r") as f:
            if self.global_encoding == "pq":
                global_part = f["global_pq"].shape[1] * f["global_pq"].dtype.itemsize
            elif self.global_encoding == "float":
                global_part = f["global"].shape[1] * f["global"].dtype.itemsize
            else:
                global_part = 0
            if self.local_encoding == "binary":
                per_local = f["local_bits"].shape[2]
            elif self.local_encoding == "float":
                per_local = (f["local"].shape[2] - len(LOCAL_COLUMNS)) * f["local"].dtype.itemsize
            else:
                per_local = 0
        stored_locals = self.local_shape[0] if self.has_local else 0
        num_locals = stored_locals if num_locals is None else num_locals
        if not 0 <= num_locals <= stored_locals:
            raise ValueError(f"{num_locals} local descriptors per image asked, {self.path} stores {stored_locals}")
        return global_part + num_locals * per_local


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
        _write_header(f, ids, labels, config_json, FLOAT_FORMAT_VERSION)
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
    compressed = [str(s.path) for s in stores if s.global_encoding == "pq" or s.local_encoding == "binary"]
    if compressed:
        raise FeatureStoreError(
            f"joining compressed stores is not supported ({', '.join(compressed)}); join the float shards, then "
            "compress the joined store"
        )
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
            _write_header(f, ids, labels, json.dumps(config or {}, sort_keys=True), FLOAT_FORMAT_VERSION)
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


class QuantizedRows:
    """``[N, D]`` global descriptors stored as PQ codes, decoded (float32) as rows are read: indexing by an
    integer, a slice or an index array returns numpy rows, ``np.asarray`` the whole. The codes stay on disk
    (memory-mapped): a million 2048-d descriptors are 256 MB of PQ8 codes but 8 GB reconstructed."""

    def __init__(self, codes: np.ndarray, quantizer: ProductQuantizer):
        self.codes = codes
        self.quantizer = quantizer
        self.shape = (len(codes), quantizer.dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.quantizer.decode(np.asarray(self.codes))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, rows):
        if isinstance(rows, tuple):  # rows, then columns of the decoded rows
            decoded = self[rows[0]]
            return decoded[rows[1:]] if decoded.ndim == 1 else decoded[(slice(None), *rows[1:])]
        if isinstance(rows, (int, np.integer)):
            return self.quantizer.decode(np.asarray(self.codes[rows]).reshape(1, -1))[0]
        return self.quantizer.decode(np.asarray(self.codes[rows]).reshape(-1, self.quantizer.num_subspaces))


def write_compressed_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    *,
    global_descriptors=None,
    global_quantizer: ProductQuantizer | None = None,
    keep_float_global: bool = False,
    local_codes=None,
    local_meta=None,
    local_descriptors=None,
    labels=None,
    config: dict | None = None,
    compression: dict | None = None,
) -> Path:
    """Write a whole store at once (atomically), its descriptors compressed where asked.

    Global: ``global_descriptors [N, D]``, stored as the PQ codes of ``global_quantizer`` (and also as float32
    with ``keep_float_global``), or as float32 without a quantizer. Local: ``local_codes [N, L, bits]`` (±1,
    {0, 1} or boolean; ``bits`` a multiple of 8), packed, with their metadata ``local_meta [N, L, 5]``; or float
    ``local_descriptors [N, L, 5 + D]`` (stored float16). ``compression`` is recorded as a JSON attribute.
    """
    global_descriptors = None if global_descriptors is None else _to_numpy(global_descriptors)
    if (local_codes is None) != (local_meta is None):
        raise ValueError("binary local descriptors need both local_codes [N, L, bits] and local_meta [N, L, 5]")
    if local_codes is not None and local_descriptors is not None:
        raise ValueError("give binary local_codes or float local_descriptors, not both")
    if global_quantizer is None and keep_float_global:
        raise ValueError("keep_float_global keeps float descriptors beside PQ codes: it needs a global_quantizer")
    if global_quantizer is not None and global_descriptors is None:
        raise ValueError("a global_quantizer needs the global_descriptors to encode")
    local_codes = None if local_codes is None else _to_numpy(local_codes)
    local_meta = None if local_meta is None else _to_numpy(local_meta)
    local_descriptors = None if local_descriptors is None else _to_numpy(local_descriptors)
    if local_codes is not None and local_meta.shape != (*local_codes.shape[:2], len(LOCAL_COLUMNS)):
        raise ValueError(
            f"local_meta must be [N, L, 5] for local_codes {list(local_codes.shape)}, got {local_meta.shape}"
        )
    layout = _CompressedLayout(
        len(ids),
        quantizer=global_quantizer,
        float_global_dim=None
        if global_descriptors is None or (global_quantizer is not None and not keep_float_global)
        else global_descriptors.shape[1],
        num_locals=next((a.shape[1] for a in (local_codes, local_descriptors) if a is not None), None),
        local_bits=None if local_codes is None else local_codes.shape[2],
        float_local_dim=None if local_descriptors is None else local_descriptors.shape[2] - len(LOCAL_COLUMNS),
    )
    with replace_atomically(path) as temporary:
        with h5py.File(temporary, "w") as f:
            layout.create(f, ids, labels, config, compression)
            layout.write(f, 0, global_descriptors, local_meta, local_codes, local_descriptors)
    return Path(path)


def compress_feature_store(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    global_pq_sub_dim: int | None = 8,
    global_quantizer: ProductQuantizer | None = None,
    pq_training=None,
    pq_training_rows: int = 65536,
    local_projection: np.ndarray | None = None,
    num_locals: int | None = None,
    keep_float_global: bool = False,
    rows_per_block: int = 256,
    seed: int = 0,
) -> Path:
    """Write ``output``, the float store ``source`` compressed the AMES way, block by block and atomically.

    Global descriptors become PQ codes of ``global_quantizer`` or, without one, of a codebook trained with
    ``global_pq_sub_dim`` dimensions per byte (``None``: globals copied as they are) on ``pq_training``
    ``[n, D]``, or, without it, on up to ``pq_training_rows`` random rows of the source itself. Train on
    training images where there are some (or share one quantizer between the parts of a database): a codebook
    fitted to the very database it encodes flatters its reconstruction.

    Local descriptors become ``sign(x W)`` codes of ``local_projection`` ``W [D, bits]`` (e.g. from
    :func:`retrieval.compression.itq_projection` or a trained model), packed, with their metadata as float16;
    without a projection they are copied as they are. ``num_locals`` keeps the first (strongest) ones.
    Ids, labels and the extraction config are copied; how the store was compressed is recorded.
    """
    store = FeatureStore(source)
    if store.global_encoding == "pq" or store.local_encoding == "binary":
        raise FeatureStoreError(f"{store.path} is already compressed; compress the float store it came from")
    source_globals = store.global_descriptors() if store.has_global else None
    quantizer = None
    training = None
    if store.has_global and (global_quantizer is not None or global_pq_sub_dim is not None):
        if global_quantizer is not None:
            quantizer, training = global_quantizer, "given quantizer"
        elif pq_training is not None:
            quantizer = ProductQuantizer.train(pq_training, global_pq_sub_dim, seed=seed)
            training = f"given array ({len(pq_training)} vectors)"
        else:
            sample = np.random.default_rng(seed).permutation(store.num_images)[:pq_training_rows]
            quantizer = ProductQuantizer.train(
                np.asarray(source_globals[np.sort(sample)]), global_pq_sub_dim, seed=seed
            )
            training = f"source store ({len(sample)} rows)"
        if quantizer.dim != store.global_dim:
            raise ValueError(
                f"PQ codebook of dimension {quantizer.dim} for {store.global_dim}-d globals of {store.path}"
            )
    stored_locals = store.local_shape[0] if store.has_local else 0
    if num_locals is not None and not 0 < num_locals <= stored_locals:
        raise ValueError(f"num_locals={num_locals}: {store.path} stores {stored_locals} local descriptors per image")
    kept_locals = stored_locals if num_locals is None else num_locals
    local_dim = store.local_shape[1] - len(LOCAL_COLUMNS) if store.has_local else None
    if local_projection is not None:
        local_projection = np.asarray(local_projection, dtype=np.float32)
        if not store.has_local or local_projection.ndim != 2 or local_projection.shape[0] != local_dim:
            raise ValueError(
                f"local_projection of shape {local_projection.shape} does not apply to {store.path}, whose local "
                f"descriptors are {local_dim}-d; expected [D, bits]"
            )
    with h5py.File(store.path, "r") as f:
        float_local_dtype = f["local"].dtype if store.has_local else None
        float_global_dtype = f["global"].dtype if store.has_global else None
    layout = _CompressedLayout(
        store.num_images,
        quantizer=quantizer,
        float_global_dim=store.global_dim if store.has_global and (quantizer is None or keep_float_global) else None,
        float_global_dtype=float_global_dtype,
        num_locals=kept_locals if store.has_local else None,
        local_bits=None if local_projection is None else local_projection.shape[1],
        float_local_dim=local_dim if local_projection is None else None,
        float_local_dtype=float_local_dtype,
    )
    compression = {
        "source": store.path.name,
        "global_pq_sub_dim": None if quantizer is None else quantizer.sub_dim,
        "global_pq_training": training,
        "local_bits": None if local_projection is None else int(local_projection.shape[1]),
        "num_locals": kept_locals if store.has_local else None,
    }
    with replace_atomically(output) as temporary:
        with h5py.File(temporary, "w") as f:
            layout.create(f, store.ids, store.labels, store.config, compression)
            for start in range(0, store.num_images, rows_per_block):
                stop = min(start + rows_per_block, store.num_images)
                global_rows = None if source_globals is None else np.asarray(source_globals[start:stop])
                local_rows = store.local_descriptors(slice(start, stop))[:, :kept_locals] if store.has_local else None
                if local_projection is None:
                    layout.write(f, start, global_rows, local_rows=local_rows)
                else:
                    codes = binary_codes(local_rows[..., len(LOCAL_COLUMNS) :], local_projection)
                    layout.write(f, start, global_rows, local_rows[..., : len(LOCAL_COLUMNS)], codes)
    return Path(output)


class _CompressedLayout:
    """The datasets of a store that may hold compressed descriptors, created in an open file and filled by
    blocks of consecutive rows."""

    def __init__(
        self,
        num_images: int,
        quantizer: ProductQuantizer | None = None,
        float_global_dim: int | None = None,
        float_global_dtype="float32",
        num_locals: int | None = None,
        local_bits: int | None = None,
        float_local_dim: int | None = None,
        float_local_dtype="float16",
    ):
        if local_bits is not None and (local_bits <= 0 or local_bits % 8):
            raise ValueError(f"binary local descriptors need a positive multiple of 8 bits, got {local_bits}")
        if quantizer is None and float_global_dim is None and num_locals is None:
            raise ValueError("a feature store holds global descriptors, local descriptors or both")
        self.num_images = num_images
        self.quantizer = quantizer
        self.float_global_dim = float_global_dim
        self.float_global_dtype = float_global_dtype
        self.num_locals = num_locals
        self.local_bits = local_bits
        self.float_local_dim = float_local_dim
        self.float_local_dtype = float_local_dtype

    def create(self, f: h5py.File, ids, labels, config: dict | None, compression: dict | None) -> None:
        compressed = self.quantizer is not None or self.local_bits is not None
        version = FORMAT_VERSION if compressed else FLOAT_FORMAT_VERSION
        _write_header(f, ids, labels, json.dumps(config or {}, sort_keys=True), version)
        if compression is not None:
            f.attrs["compression"] = json.dumps(compression, sort_keys=True)
        n = self.num_images
        # Globals contiguous (memory-mapped when read), locals one chunk per image (read by rows).
        if self.quantizer is not None:
            f.create_dataset("global_pq", shape=(n, self.quantizer.num_subspaces), dtype=np.uint8)
            f.create_dataset("global_pq_centroids", data=self.quantizer.centroids)
        if self.float_global_dim is not None:
            f.create_dataset("global", shape=(n, self.float_global_dim), dtype=self.float_global_dtype)
        if self.local_bits is not None:
            bits_shape, meta_shape = (self.num_locals, self.local_bits // 8), (self.num_locals, len(LOCAL_COLUMNS))
            f.create_dataset("local_bits", shape=(n, *bits_shape), dtype=np.uint8, chunks=(1, *bits_shape))
            f.create_dataset("local_meta", shape=(n, *meta_shape), dtype=np.float16, chunks=(1, *meta_shape))
            f.attrs["local_bits"] = self.local_bits
        elif self.num_locals is not None:
            shape = (self.num_locals, len(LOCAL_COLUMNS) + self.float_local_dim)
            f.create_dataset("local", shape=(n, *shape), dtype=self.float_local_dtype, chunks=(1, *shape))

    def write(self, f: h5py.File, start: int, global_rows=None, local_meta=None, local_codes=None, local_rows=None):
        """Rows ``start, start + 1, ...`` of every declared dataset (each must be given)."""
        counts = {len(a) for a in (global_rows, local_meta, local_codes, local_rows) if a is not None}
        if len(counts) != 1:
            raise ValueError(f"blocks of different lengths {sorted(counts)} (or none) given for rows from {start}")
        rows = slice(start, start + counts.pop())
        if rows.stop > self.num_images:
            raise ValueError(f"rows {rows.start}..{rows.stop - 1} are past the {self.num_images} images")
        if (self.quantizer is not None or self.float_global_dim is not None) != (global_rows is not None):
            raise ValueError("global descriptors must be given exactly when the store holds them")
        if global_rows is not None:
            with np.errstate(over="ignore"):  # an overflow becomes Inf, refused just below
                global_rows = global_rows.astype(self.float_global_dtype if self.float_global_dim else np.float32)
            check_finite_rows(global_rows, f"global descriptors for {f.filename} (from row {start})")
            if self.quantizer is not None:
                f["global_pq"][rows] = self.quantizer.encode(global_rows)
            if self.float_global_dim is not None:
                f["global"][rows] = global_rows
        if self.local_bits is not None:
            if local_codes is None or local_codes.shape[1:] != (self.num_locals, self.local_bits):
                raise ValueError(
                    f"local codes must be [n, {self.num_locals}, {self.local_bits}], got "
                    f"{None if local_codes is None else list(local_codes.shape)}"
                )
            with np.errstate(over="ignore"):
                local_meta = local_meta.astype(np.float16)
            check_finite_rows(local_meta, f"local metadata for {f.filename} (from row {start})")
            f["local_bits"][rows] = pack_bits(local_codes)
            f["local_meta"][rows] = local_meta
        elif self.num_locals is not None:
            with np.errstate(over="ignore"):
                local_rows = local_rows.astype(self.float_local_dtype)
            check_finite_rows(local_rows, f"local descriptors for {f.filename} (from row {start})")
            f["local"][rows] = local_rows


def _write_header(f: h5py.File, ids: Sequence[str], labels, config_json: str, version: int) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = version
    f.attrs["num_images"] = len(ids)
    f.attrs["config"] = config_json
    f.create_dataset("ids", data=np.array([str(i) for i in ids], dtype=object), dtype=h5py.string_dtype())
    if labels is not None:
        if len(labels) != len(ids):
            raise ValueError(f"{len(labels)} labels for {len(ids)} images")
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))


def _memory_map(path: Path, dataset: h5py.Dataset) -> np.memmap | None:
    """The dataset memory-mapped, or ``None`` where its storage does not allow it (virtual, chunked,
    compressed, or never written)."""
    if dataset.is_virtual or dataset.chunks is not None or dataset.compression is not None:
        return None
    offset = dataset.id.get_offset()
    if offset is None:
        return None
    return np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)


def _read_rows(dataset: h5py.Dataset, rows: Sequence[int] | slice) -> np.ndarray:
    if isinstance(rows, slice):
        return dataset[rows]
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
    # HDF5 reads increasing, distinct rows: read those once, then expand to the order asked for.
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique][inverse]


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

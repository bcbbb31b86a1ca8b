"""Images of a benchmark read from a Hugging Face ``datasets`` dataset instead of image files.

The published lists and ground truth still come from the dataset root; only the pixels come from the HF
dataset. Each row holds one image (an ``Image`` feature, or raw encoded bytes) and its id: the image's path
relative to the root, exactly as the benchmark lists it. Rows are matched by id, so their order does not
matter and extra rows are ignored; images are decoded one row at a time with PIL, as from files. One source
serves every list of the benchmark, so its split must hold all the images used (e.g. for SOP those of both
``Ebay_train.txt`` and ``Ebay_test.txt``); :meth:`HFImageSource.missing` finds those it lacks.

``path`` is, in this order: a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
a parquet file, a directory of parquet files or a glob (``Dataset.to_parquet``); a local directory with
``data_files`` (parquet files relative to it); otherwise a Hub repository id (cached, or downloaded when
online; with ``data_files``, files of that repository). Make such a dataset with e.g.::

    ds = datasets.Dataset.from_dict({"path": ids, "image": files}).cast_column("image", datasets.Image())
    ds.save_to_disk("data/sop_hf")          # or ds.to_parquet("data/sop_hf/train.parquet")

Stanford Online Products: ids are the ``path`` field of ``Ebay_{train,test}.txt``
(``bicycle_final/111085122871_0.JPG``)::

    data:
      class_path: datamodules.sop.StanfordOnlineProducts
      init_args:
        root: data/Stanford_Online_Products        # the Ebay_*.txt lists
        hf_images: {path: data/sop_hf, split: train, id_column: path, image_column: image}

Pittsburgh30k: ids are the database paths of the ``.mat`` files (``000/000000_pitch1_yaw1.jpg``) and the
query paths prefixed ``queries_real/`` (``queries_real/000/000000_pitch1_yaw1.jpg``); with
``layout: folders``, ``images/test/database/@...@.jpg``::

    data:
      class_path: datamodules.pittsburgh.Pittsburgh30k
      init_args:
        root: data/pittsburgh                       # datasets/pitts30k_*.mat
        hf_images: {path: data/pitts30k_hf/*.parquet}

Google Landmarks v2: ids are ``<split>/<a>/<b>/<c>/<id>.jpg`` (``test/0/1/2/0123abcd.jpg``, ``index/...``,
``train/...``)::

    data:
      class_path: datamodules.gldv2.GoogleLandmarksV2
      init_args:
        root: data/gldv2                            # the csv files
        hf_images: {path: your-name/gldv2-images, split: train, image_column: jpg}   # a Hub dataset repo

Revisited Oxford/Paris: ids are ``<dataset>/jpg/<name>.jpg`` (``roxford5k/jpg/all_souls_000013.jpg``), the
distractors ``revisitop1m/jpg/<entry of revisitop1m.txt>``::

    data:
      class_path: datamodules.revisited.RevisitedOxfordParis
      init_args:
        root: data/revisited                        # gnd_*.pkl, revisitop1m.txt
        hf_images: {path: data/revisited_hf, data_files: [roxford5k.parquet, rparis6k.parquet, revisitop1m/*.parquet]}

Offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) or with the Hub unreachable, a Hub id must be in
the local cache; otherwise :class:`HFImagesUnavailableError` says how to pass the data locally.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from PIL import Image

from datamodules.layout import DatasetFormatError, DatasetLayoutError

if TYPE_CHECKING:
    import datasets

_TRUE = {"1", "ON", "YES", "TRUE"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_ARGS = ("path", "split", "id_column", "image_column", "data_files", "revision")


class HFImagesUnavailableError(RuntimeError):
    """A Hub dataset that is neither cached nor downloadable (offline, or the Hub unreachable)."""


def _offline_reason() -> str | None:
    """Why the Hub must not be contacted, read from ``os.environ`` now (the libraries read it at import)."""
    for name in _OFFLINE_VARS:
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    import datasets.config

    return "offline mode of the datasets library" if datasets.config.HF_HUB_OFFLINE else None


def _unreachable_reason() -> str | None:
    """A quick TCP check of the Hub endpoint (skipped behind a proxy), instead of minutes of retries."""
    if any(os.environ.get(name) for name in _PROXY_VARS):
        return None
    import datasets.config

    url = urlparse(datasets.config.HF_ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        return f"{host}:{port}, {type(error).__name__}"
    return None


@contextmanager
def _library_offline() -> Iterator[None]:
    """Put ``datasets`` and ``huggingface_hub`` in offline mode (cache only, no request) for a call."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _looks_like_repo_id(path: str) -> bool:
    """The test ``datasets`` uses: a relative name with at most one slash (``owner/name``)."""
    relative = bool(path) and not os.path.isabs(path) and not path.startswith(".")
    return relative and path.count("/") <= 1 and not path.endswith(".parquet")


class HFImageSource:
    """Images of a benchmark read from a Hugging Face `datasets` dataset, matched to the benchmark's image
    lists by an id column.

    Args:
        path: a ``save_to_disk`` directory, a parquet file / directory of parquet files / glob, or a Hub
            repository id (see the module docstring).
        split: the split to read (needed when a ``DatasetDict`` or Hub dataset has several; parquet files
            form one split, named ``split`` or ``train``).
        id_column: the column holding each image's path relative to the benchmark root.
        image_column: an ``Image`` feature (decoded or not) or raw encoded bytes.
        data_files: parquet files (paths or globs) relative to ``path`` when it is a local directory; with a
            Hub id, files of that repository.
        revision: the Hub revision (branch, tag or commit).

    Picklable: a copy (e.g. in a DataLoader worker) opens the memory-mapped Arrow files again, lazily.
    """

    def __init__(
        self,
        path: str,
        split: str | None = None,
        id_column: str = "path",
        image_column: str = "image",
        data_files: str | list[str] | None = None,
        revision: str | None = None,
    ):
        self.path, self.split, self.id_column, self.image_column = str(path), split, id_column, image_column
        self.data_files = [data_files] if isinstance(data_files, str) else (list(data_files) if data_files else None)
        self.revision = revision
        self._reset()
        self._arrow_files: list[str] | None = None  # where the rows are, to re-open without the Hub

    def _reset(self) -> None:
        self._rows: Any = None  # the dataset in arrow format (one image column), opened in this process
        self._index: dict[str, int] | None = None
        self._pid: int | None = None

    # ---- public -----------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return f"HF dataset '{self.path}'" + (f" (split {self.split})" if self.split else "")

    def open(self, image_id: str) -> Image.Image:
        """The RGB image of the row whose ``id_column`` is ``image_id``."""
        row = self.index.get(image_id)
        if row is None:
            raise DatasetLayoutError(f"{self.source}: no image with {self.id_column} '{image_id}'")
        value = self._dataset()[row].column(self.image_column)[0].as_py()
        if isinstance(value, dict):  # an Image feature: {"bytes", "path"}
            data, file = value.get("bytes"), value.get("path")
            if data is None and file:
                try:
                    data = Path(file).read_bytes()
                except OSError as error:
                    raise DatasetLayoutError(
                        f"{self.source}: image '{image_id}' refers to {file}, which cannot be read ({error})"
                    ) from None
        else:
            data = value
        if not data:
            raise DatasetFormatError(f"{self.source}: image '{image_id}' is empty")
        try:
            with Image.open(io.BytesIO(data)) as opened:
                return opened.convert("RGB")  # decodes fully: truncated bytes fail here
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetFormatError(
                f"{self.source}: image '{image_id}' cannot be decoded ({error}); expected complete JPEG/PNG bytes"
            ) from error

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def missing(self, image_ids: list[str]) -> list[str]:
        """The ids of ``image_ids`` that have no row (for a check at setup)."""
        index = self.index
        return [i for i in image_ids if i not in index]

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in _ARGS if getattr(self, name) is not None)
        return f"HFImageSource({args})"

    @property
    def index(self) -> dict[str, int]:
        """id -> row, built once per process from the id column alone."""
        if self._index is None or self._pid != os.getpid():
            rows = self._dataset()
            ids = rows.dataset.select_columns([self.id_column]).with_format("arrow")[:].column(0).to_pylist()
            index: dict[str, int] = {}
            for row, image_id in enumerate(ids):
                if image_id is None:
                    raise DatasetFormatError(f"{self.source}: row {row} has no {self.id_column}")
                image_id = str(image_id)
                if image_id in index:
                    raise DatasetFormatError(
                        f"{self.source}: duplicate {self.id_column} '{image_id}' (rows {index[image_id]} and {row})"
                    )
                index[image_id] = row
            self._index = index
        return self._index

    # ---- pickling: the arguments (and the Arrow files), never the open dataset ----------------------------
    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in (*_ARGS, "_arrow_files")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ---- loading ----------------------------------------------------------------------------------------
    def _dataset(self) -> _Rows:
        if self._rows is None or self._pid != os.getpid():
            dataset = self._reopen() if self._arrow_files else None
            if dataset is None:
                dataset = self._load()
                self._check_columns(dataset)
                files = [f["filename"] for f in dataset.cache_files]
                self._arrow_files = files if files and dataset._indices is None else None
            self._rows, self._index, self._pid = _Rows(dataset, self.image_column), None, os.getpid()
        return self._rows

    def _reopen(self) -> datasets.Dataset | None:
        """The rows from the Arrow files found by the first load (memory-mapped, no Hub request)."""
        import datasets

        if not all(os.path.isfile(f) for f in self._arrow_files):
            return None
        parts = [datasets.Dataset.from_file(f, in_memory=False) for f in self._arrow_files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def _check_columns(self, dataset: datasets.Dataset) -> None:
        import datasets

        columns = list(dataset.column_names)
        for role, column in (("id_column", self.id_column), ("image_column", self.image_column)):
            if column not in columns:
                raise DatasetFormatError(f"{self.source}: {role} '{column}' not found; its columns are {columns}")
        feature = dataset.features[self.image_column]
        binary = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
        if not (isinstance(feature, datasets.Image) or binary):
            raise DatasetFormatError(
                f"{self.source}: image_column '{self.image_column}' is {feature}; expected an Image feature or bytes"
            )

    def _load(self) -> datasets.Dataset:
        import datasets

        local = Path(self.path)
        if local.is_dir() and any((local / name).is_file() for name in ("dataset_dict.json", "state.json")):
            return self._pick_split(datasets.load_from_disk(str(local)))
        if self.data_files is not None and local.is_dir():
            files = [f if os.path.isabs(f) else str(local / f) for f in self.data_files]
            return self._load_parquet(files)
        if local.is_file():
            return self._load_parquet([str(local)])
        if local.is_dir():
            files = sorted(str(f) for f in local.rglob("*.parquet"))
            if not files:
                raise DatasetLayoutError(
                    f"{self.source}: {local} is neither a directory written by save_to_disk (dataset_dict.json or "
                    "state.json) nor a directory of parquet files"
                )
            return self._load_parquet(files)
        if _is_glob(self.path):
            return self._load_parquet([self.path])
        if not _looks_like_repo_id(self.path):
            raise DatasetLayoutError(
                f"{self.source}: {local} not found (expected a save_to_disk directory, parquet files or a Hub id)"
            )
        return self._load_hub()

    def _load_parquet(self, files: list[str]) -> datasets.Dataset:
        import datasets

        name = self.split or "train"
        try:
            return datasets.load_dataset("parquet", data_files={name: files}, split=name)
        except FileNotFoundError as error:
            raise DatasetLayoutError(f"{self.source}: no parquet files found at {files} ({error})") from None

    def _load_hub(self) -> datasets.Dataset:
        import datasets

        offline = _offline_reason()
        unreachable = None if offline else _unreachable_reason()
        kwargs = {"split": self.split, "revision": self.revision, "data_files": self.data_files}
        if not (offline or unreachable):
            try:
                return self._pick_split(datasets.load_dataset(self.path, **kwargs))
            except ConnectionError as error:
                unreachable = type(error).__name__
        try:
            with _library_offline():  # the local cache only, at once
                return self._pick_split(datasets.load_dataset(self.path, **kwargs))
        except (OSError, datasets.exceptions.DatasetNotFoundError) as error:
            state = f"the machine is offline ({offline})" if offline else f"the Hub is unreachable ({unreachable})"
            raise HFImagesUnavailableError(
                f"{self.source}: this Hub dataset is not in the local cache and {state} [{type(error).__name__}], "
                f"and no local path '{self.path}' exists. Provide the images locally "
                "through the same argument instead: a directory written by Dataset.save_to_disk "
                "(hf_images: {path: data/my_images_hf}) or parquet files (hf_images: {path: data/my_images/*.parquet})"
            ) from None

    def _pick_split(self, dataset: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
        import datasets

        if not isinstance(dataset, datasets.DatasetDict):
            return dataset
        splits = list(dataset)
        if self.split is None:
            if len(splits) == 1:
                return dataset[splits[0]]
            raise ValueError(f"{self.source} has splits {splits}: choose one with split")
        if self.split not in dataset:
            raise DatasetLayoutError(f"{self.source}: no split '{self.split}'; its splits are {splits}")
        return dataset[self.split]


class _Rows:
    """Row access reading one column as Arrow: nothing is decoded but the requested image."""

    def __init__(self, dataset: datasets.Dataset, image_column: str):
        self.dataset = dataset
        self._images = dataset.select_columns([image_column]).with_format("arrow")

    def __getitem__(self, row: int):
        return self._images[row]

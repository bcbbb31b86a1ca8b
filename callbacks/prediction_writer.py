"""``predict``: stream every predicted dataset to a feature store, resumably, with any number of processes.

For each dataset of the datamodule's ``predict_datasets()`` (e.g. the image lists of a benchmark), the
global descriptors (``embeddings``) and, when the module returns them, the local descriptors (``local``)
are written to ``<output_dir>/<name>.h5`` (layout: :mod:`retrieval.feature_store`).

* **Bounded memory**: each batch is written as it arrives; nothing is kept in memory.
* **Processes**: process ``r`` of ``w`` predicts indices ``r, r + w, ...`` and writes them to its shard
  ``<output_dir>/.shards/<name>.rank<r>of<w>.h5``; when all are done, rank 0 merges the shards in index
  order into the final file and deletes them. With one process the shard is the final file.
* **Resume**: a ``.partial`` file records which rows are written; running the same command again predicts
  only the missing rows (the datamodule's ``predict_indices``), and a completed file is not redone. A
  resumed writer refuses a file written with another configuration.
* **Neighbours**: with ``neighbours=m``, rank 0 also writes, per evaluation set of the datamodule whose
  lists are all stored, the global top-``m`` database neighbours of every query
  (``<output_dir>/<eval set>_neighbours.h5``: ``scores`` and ``indices`` ``[num_queries, m]``), the
  shortlist a re-ranker such as AMES starts from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from retrieval.feature_store import FeatureStore, FeatureStoreWriter, finalize_partial, partial_missing_rows
from retrieval.files import replace_atomically
from retrieval.search import knn

MERGE_CHUNK_ROWS = 4096
SHARD_DIR = ".shards"


class PredictionWriter(pl.Callback):
    """Write ``predict`` outputs as feature stores (see the module docstring).

    Args:
        output_dir: where the stores go; default ``<run dir>/embeddings``. Set it to a fixed directory
            (the extraction configs use ``features/<backbone>/<dataset>``) so that re-running resumes.
        neighbours: write the global top-``neighbours`` file of each evaluation set (0: none).
    """

    def __init__(self, output_dir: str | None = None, neighbours: int = 0):
        self.output_dir = output_dir
        self.neighbours = neighbours
        self._writers: dict[str, FeatureStoreWriter] = {}

    # ---- where each process starts ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        self._dir = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "embeddings"
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._datasets = datamodule.predict_datasets()
        self._names = list(self._datasets)
        self._config = _jsonable(
            {
                "model": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                "hparams": dict(pl_module.hparams),
                "datamodule": type(datamodule).__name__,
                "transform": vars(datamodule.transform) if hasattr(datamodule, "transform") else None,
                # Multi-size methods: the global columns [start, stop) that form the embedding of each size.
                "size_columns": {size: [c.start, c.stop] for size, c in (pl_module.size_views() or {}).items()},
            }
        )
        self._writers, self._images, self._start = {}, 0, time.perf_counter()
        todo = {}
        for name, dataset in self._datasets.items():
            mine = np.arange(self._rank, len(dataset), self._world)
            if (self._dir / f"{name}.h5").is_file() or self._shard_path(name).is_file():
                todo[name] = []  # already complete
                continue
            missing = partial_missing_rows(self._shard_path(name))
            todo[name] = (mine if missing is None else mine[missing]).tolist()
        datamodule.predict_indices = todo
        remaining = sum(len(v) for v in todo.values())
        total = sum(len(range(self._rank, len(d), self._world)) for d in self._datasets.values())
        if remaining < total:
            rank_zero_info(f"resuming extraction: {total - remaining} of {total} images already written in {self._dir}")

    def _shard_path(self, name: str) -> Path:
        if self._world == 1:
            return self._dir / f"{name}.h5"
        return self._dir / SHARD_DIR / f"{name}.rank{self._rank}of{self._world}.h5"

    # ---- streaming -------------------------------------------------------------------------------------------
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        name = self._names[dataloader_idx]
        index = outputs["index"].detach().cpu().numpy()
        embeddings = outputs["embeddings"].detach().float().cpu().numpy()
        local = outputs.get("local")
        local = None if local is None else local.detach().float().cpu().numpy()
        writer = self._writers.get(name)
        if writer is None:
            writer = self._writers[name] = self._open_shard(name, embeddings.shape[1], local)
        # Row of index i in this process's shard: i // w (indices r, r + w, ... in order).
        writer.write(index // self._world, embeddings, local)
        self._images += len(index)
        self._show_speed(trainer)

    def _open_shard(self, name: str, global_dim: int, local) -> FeatureStoreWriter:
        dataset = self._datasets[name]
        ids = _ids(dataset)[self._rank :: self._world]
        labels = getattr(dataset, "labels", None)
        return FeatureStoreWriter(
            self._shard_path(name),
            ids,
            global_dim=global_dim,
            local_shape=None if local is None else local.shape[1:],
            labels=None if labels is None else np.asarray(labels)[self._rank :: self._world],
            config={**self._config, "list": name},
        )

    def _show_speed(self, trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled and getattr(bar, "_predict_progress_bar", None):
            rate = self._images / max(time.perf_counter() - self._start, 1e-9)
            bar.predict_progress_bar.set_postfix({"images/s": f"{rate:.1f}"})

    # ---- completion ------------------------------------------------------------------------------------------
    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        for writer in self._writers.values():
            writer.finalize()
        self._writers = {}
        for name in self._names:  # complete before an interruption, but not yet renamed
            shard = self._shard_path(name)
            if not shard.is_file() and partial_missing_rows(shard) is not None:
                finalize_partial(shard)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            for name in self._names:
                if self._world > 1:
                    self._merge(name)
                store = FeatureStore(self._dir / f"{name}.h5")
                rank_zero_info(f"{store.path}: {store.num_images} images (global {store.global_dim}, local {store.local_shape})")
            if self.neighbours:
                self._write_neighbours(trainer.datamodule)
        trainer.strategy.barrier()

    def on_exception(self, trainer, pl_module, exception) -> None:
        for writer in self._writers.values():
            writer.close()  # keeps the .partial files for the resume
        self._writers = {}

    def _merge(self, name: str) -> None:
        final = self._dir / f"{name}.h5"
        if final.is_file():
            return
        dataset = self._datasets[name]
        # Ranks beyond the number of images have no shard.
        shards = [self._dir / SHARD_DIR / f"{name}.rank{r}of{self._world}.h5" for r in range(min(self._world, len(dataset)))]
        stores = [FeatureStore(path) for path in shards]
        with FeatureStoreWriter(
            final,
            _ids(dataset),
            global_dim=stores[0].global_dim,
            local_shape=stores[0].local_shape,
            labels=getattr(dataset, "labels", None),
            config=stores[0].config,
        ) as writer:
            for rank, store in enumerate(stores):
                with h5py.File(store.path, "r") as f:
                    for start in range(0, store.num_images, MERGE_CHUNK_ROWS):
                        rows = slice(start, min(start + MERGE_CHUNK_ROWS, store.num_images))
                        indices = rank + self._world * np.arange(rows.start, rows.stop)
                        writer.write(
                            indices,
                            f["global"][rows] if "global" in f else None,
                            f["local"][rows] if "local" in f else None,
                        )
        for path in shards:
            path.unlink()
        if not any((self._dir / SHARD_DIR).iterdir()):
            (self._dir / SHARD_DIR).rmdir()

    def _write_neighbours(self, datamodule) -> None:
        eval_specs = getattr(datamodule, "eval_specs", None)
        if eval_specs is None:
            return
        for spec in eval_specs("test"):
            paths = {name: self._dir / f"{name}.h5" for name in spec.lists}
            if not all(p.is_file() for p in paths.values()):
                continue
            database = np.concatenate([FeatureStore(paths[n]).global_descriptors() for n in spec.database])
            queries = FeatureStore(paths[spec.query]).global_descriptors() if spec.query else database
            scores, indices = knn(queries, database, self.neighbours, exclude_self=spec.query is None)
            path = self._dir / f"{spec.name}_neighbours.h5"
            with replace_atomically(path) as partial:
                with h5py.File(partial, "w") as f:
                    f.create_dataset("scores", data=scores.astype(np.float32))
                    f.create_dataset("indices", data=indices.astype(np.int64))
                    f.attrs["query"] = spec.query or ""
                    f.attrs["database"] = json.dumps(list(spec.database))
            rank_zero_info(f"{path}: top-{indices.shape[1]} neighbours of {len(indices)} queries")


def _ids(dataset) -> list[str]:
    ids = getattr(dataset, "ids", None)
    return list(ids) if ids is not None else [str(i) for i in range(len(dataset))]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

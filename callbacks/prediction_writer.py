"""``predict``: stream every predicted dataset to a feature store, resumably, with any number of processes.

For each dataset of the datamodule's ``predict_datasets()`` (e.g. the image lists of a benchmark), the
global descriptors (``embeddings``) and, when the module returns them, the local descriptors (``local``)
are written to ``<output_dir>/<name>.h5`` (layout: :mod:`retrieval.feature_store`).

* **Bounded memory**: each batch is written as it arrives, in whatever order it comes (e.g. bucketed by
  image shape); nothing is kept in memory.
* **Processes**: process ``r`` of ``w`` predicts one contiguous block of indices
  (:func:`datamodules.sampling.contiguous_block`) and writes it to its shard
  ``<output_dir>/.shards/<name>.rank<r>of<w>.h5``. When all are done, rank 0 writes the final file as a join
  of the shards (:func:`retrieval.feature_store.write_virtual_store`): ids, labels and HDF5 virtual datasets
  pointing at the shards, which stay where they are. Nothing is copied, so the join takes the same
  fraction of a second for 1M images with 400 local descriptors as for ten. With one process the shard is the
  final file.
* **Several nodes**: shards are named by the global rank and world size (nodes x processes per node), and
  rank 0 joins them, so ``output_dir`` must be on a filesystem every node mounts at the same path; this is
  checked before anything is extracted (a marker written by rank 0 that every process must see).
* **Resume**: a ``.partial`` file records which rows are written; running the same command again predicts
  only the missing rows (the datamodule's ``predict_indices``), and a completed file is not redone. A
  resumed writer refuses a file written with another configuration. Finishing (renaming complete shards,
  joining them, neighbours) runs at the end of every successful ``predict``, also when nothing was left
  to predict, so a command that exits 0 leaves every store complete; a shard that is still incomplete
  then is an error.
* **Boxes**: a module that predicts boxes (``{"index", "boxes", "scores"}``: per example ``[n, 4]`` ``ymin xmin
  ymax xmax`` normalised to the image and ``[n]`` scores, the landmark detector) gets
  ``<output_dir>/<name>.boxes.csv`` (``id,box,score``, :func:`datamodules.landmark_boxes.write_scored_boxes`),
  gathered by index on rank 0 and written atomically once all are predicted (not resumable: boxes are cheap
  next to descriptors). A module with ``writes_feature_stores = False`` writes no feature store.
* **Neighbours**: with ``neighbours=m``, rank 0 also writes, per evaluation set of the datamodule whose
  lists are all stored, the global top-``m`` database neighbours of every query
  (``<output_dir>/<eval set>_neighbours.h5``: ``scores`` and ``indices`` ``[num_queries, m]`` with the
  stores' ``query_ids`` and ``database_ids``; layout: :mod:`retrieval.neighbours`), the shortlist a re-ranker
  such as AMES starts from.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from datamodules.landmark_boxes import write_scored_boxes
from datamodules.sampling import contiguous_block
from lightning_modules.base import sum_over_processes
from retrieval.feature_store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    finalize_partial,
    partial_missing_rows,
    write_virtual_store,
)
from retrieval.neighbours import build_neighbours, describe_neighbours, write_neighbours

SHARD_DIR = ".shards"
BOXES_SUFFIX = ".boxes.csv"


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
        self._blocks = {name: contiguous_block(len(d), self._rank, self._world) for name, d in self._datasets.items()}
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
        self._stores = getattr(pl_module, "writes_feature_stores", True)
        if self._world > 1 and self._stores:  # boxes alone are gathered by collectives, stores through the disk
            _check_shared_directory(trainer, self._dir)
        self._boxes: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in self._names}
        todo = {}
        for name, block in self._blocks.items():
            if not self._stores:
                todo[name] = list(block)  # boxes only: predicted whole every time
                continue
            if (self._dir / f"{name}.h5").is_file() or self._shard_path(name).is_file():
                todo[name] = []  # already complete
                continue
            missing = partial_missing_rows(self._shard_path(name))
            todo[name] = list(block) if missing is None else (block.start + missing).tolist()
        datamodule.predict_indices = todo
        counts = [sum(len(v) for v in todo.values()), sum(len(b) for b in self._blocks.values())]
        remaining, total = (int(c) for c in _sum_over_processes(trainer, counts))
        if remaining < total:
            rank_zero_info(f"resuming extraction: {total - remaining} of {total} images already written in {self._dir}")

    def _shard_path(self, name: str, rank: int | None = None) -> Path:
        if self._world == 1:
            return self._dir / f"{name}.h5"
        rank = self._rank if rank is None else rank
        return self._dir / SHARD_DIR / f"{name}.rank{rank}of{self._world}.h5"

    # ---- streaming -------------------------------------------------------------------------------------------
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        name = self._names[dataloader_idx]
        index = outputs["index"].detach().cpu().numpy()
        if "boxes" in outputs:
            for i, boxes, scores in zip(index.tolist(), outputs["boxes"], outputs["scores"]):
                self._boxes[name][i] = (_numpy(boxes).reshape(-1, 4), _numpy(scores).reshape(-1))
        if not self._stores or "embeddings" not in outputs:
            self._images += len(index)
            self._show_speed(trainer)
            return
        embeddings = outputs["embeddings"].detach().float().cpu().numpy()
        local = outputs.get("local")
        local = None if local is None else local.detach().float().cpu().numpy()
        writer = self._writers.get(name)
        if writer is None:
            writer = self._writers[name] = self._open_shard(name, embeddings.shape[1], local)
        writer.write(index - self._blocks[name].start, embeddings, local)  # rows of this process's block
        self._images += len(index)
        self._show_speed(trainer)

    def _open_shard(self, name: str, global_dim: int, local) -> FeatureStoreWriter:
        dataset, block = self._datasets[name], self._blocks[name]
        labels = getattr(dataset, "labels", None)
        return FeatureStoreWriter(
            self._shard_path(name),
            _ids(dataset)[block.start : block.stop],
            global_dim=global_dim,
            local_shape=None if local is None else local.shape[1:],
            labels=None if labels is None else np.asarray(labels)[block.start : block.stop],
            config={**self._config, "list": name},
        )

    def _show_speed(self, trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled and getattr(bar, "_predict_progress_bar", None):
            rate = self._images / max(time.perf_counter() - self._start, 1e-9)
            bar.predict_progress_bar.set_postfix({"images/s": f"{rate:.1f}"})

    # ---- completion ------------------------------------------------------------------------------------------
    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Not on_predict_epoch_end: Lightning skips the whole loop, hooks included, on a process with nothing
        # left to predict (a resume after the last batch was written), while teardown runs after every
        # successful predict on every process.
        if stage != "predict":
            return
        self._writers = {}
        # Decided together: every process joins the gathering, also one that predicted nothing.
        if not self._stores or _sum_over_processes(trainer, [any(self._boxes.values())])[0]:
            self._write_boxes(trainer)
        if not self._stores:
            return
        # Each step runs on every process, then all learn whether any failed, so none waits for the others forever.
        _on_every_process(trainer, self._finish_own_shards)
        _on_every_process(trainer, lambda: self._join_and_report(trainer) if trainer.is_global_zero else None)

    def _write_boxes(self, trainer) -> None:
        """Gather every process's boxes on rank 0 and write ``<name>.boxes.csv`` per predicted dataset."""
        boxes = self._boxes
        if self._world > 1:
            everyone = [None] * self._world if trainer.is_global_zero else None
            dist.gather_object(boxes, everyone, dst=0)
            if trainer.is_global_zero:
                boxes = {name: {i: v for part in everyone for i, v in part[name].items()} for name in self._names}
        _on_every_process(trainer, lambda: self._write_box_files(boxes) if trainer.is_global_zero else None)

    def _write_box_files(self, boxes: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]) -> None:
        lines = []
        for name in self._names:
            dataset, found = self._datasets[name], boxes[name]
            if len(found) != len(dataset):
                raise RuntimeError(
                    f"predict: boxes of {len(found)} of the {len(dataset)} images of '{name}' were predicted; every "
                    "image must be predicted once (do not limit predict batches, e.g. limit_predict_batches)"
                )
            ids = _ids(dataset)
            path = self._dir / f"{name}{BOXES_SUFFIX}"
            rows = write_scored_boxes(path, [(ids[i], *found[i]) for i in range(len(dataset))])
            with_boxes = sum(1 for b, _ in found.values() if len(b))
            lines.append(f"  {path} ({rows} boxes on {with_boxes} of {len(dataset)} images)")
        rank_zero_info("predict wrote:\n" + "\n".join(lines))

    def _finish_own_shards(self) -> None:
        """Rename this process's complete shards (rows written now or before an interruption)."""
        for name in self._names:
            shard = self._shard_path(name)
            if len(self._blocks[name]) and not shard.is_file() and not (self._dir / f"{name}.h5").is_file():
                finalize_partial(shard)  # an incomplete shard is an error naming it

    def _join_and_report(self, trainer) -> None:
        for name in self._names:
            if self._world > 1 and not (self._dir / f"{name}.h5").is_file():
                self._join(name)
        written = [FeatureStore(self._dir / f"{name}.h5") for name in self._names]
        if self.neighbours:
            # On rank 0's accelerator when it has one (the same rankings as the CPU's): at GLDv2 scale the exact
            # top-m of 117k queries among 761k images would keep the other processes waiting on the CPU for longer
            # than the default 30-minute collective timeout.
            device = trainer.strategy.root_device if trainer.strategy.root_device.type != "cpu" else None
            written += self._write_neighbours(trainer.datamodule, device)
        rank_zero_info("predict wrote:\n" + "\n".join(f"  {_describe(item)}" for item in written))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._writers = {}  # the .partial files stay for the resume

    def _join(self, name: str) -> None:
        dataset = self._datasets[name]
        blocks = [contiguous_block(len(dataset), rank, self._world) for rank in range(self._world)]
        shards = [(block.start, self._shard_path(name, rank)) for rank, block in enumerate(blocks) if len(block)]
        write_virtual_store(
            self._dir / f"{name}.h5",
            _ids(dataset),
            shards,
            labels=getattr(dataset, "labels", None),
            config=FeatureStore(shards[0][1]).config,
        )

    def _write_neighbours(self, datamodule, device=None) -> list[Path]:
        eval_specs = getattr(datamodule, "eval_specs", None)
        if eval_specs is None:
            return []
        written = []
        for spec in eval_specs("test"):
            paths = {name: self._dir / f"{name}.h5" for name in spec.lists}
            if not all(p.is_file() for p in paths.values()):
                continue
            stores = {name: FeatureStore(path) for name, path in paths.items()}
            database = [stores[name] for name in spec.database]
            leave_one_out = spec.query is None
            queries = database if leave_one_out else stores[spec.query]
            scores, indices = build_neighbours(
                queries, database, self.neighbours, exclude_self=leave_one_out, device=device
            )
            # The stores' ids go into the file, so a reader can check it against the stores it is used with.
            database_ids = [i for store in database for i in store.ids]
            written.append(
                write_neighbours(
                    self._dir / f"{spec.name}_neighbours.h5",
                    scores,
                    indices,
                    query_ids=database_ids if leave_one_out else queries.ids,
                    database_ids=database_ids,
                    query=spec.query or "",
                    database=list(spec.database),
                    exclude_self=leave_one_out,
                )
            )
        return written


def _check_shared_directory(trainer, directory: Path) -> None:
    """Refuse, before anything is extracted, an output directory that some processes do not share with rank 0
    (e.g. a node-local disk, or a relative path from different working directories on several nodes): rank 0
    joins the shards every process writes there, and would otherwise find them missing only at the very end."""
    token = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.is_global_zero else None, src=0)
    marker = directory / SHARD_DIR / f".shared-check-{token}"
    if trainer.is_global_zero:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    _sum_over_processes(trainer, [0])  # a barrier: the marker exists before any process looks for it
    blind = _sum_over_processes(trainer, [not marker.is_file()])[0]  # every process has looked once this returns
    if trainer.is_global_zero:
        marker.unlink(missing_ok=True)
    if blind:
        raise FeatureStoreError(
            f"predict: {blind} of {trainer.world_size} processes do not see the output directory {directory} "
            f"(resolved here to {directory.resolve()}) that rank 0 writes to; with several nodes it must be on a "
            "filesystem they all mount, at a path that names the same directory on every node (an absolute "
            "--predictions.output_dir, or the same working directory)"
        )


def _on_every_process(trainer, step) -> None:
    """Run ``step`` here, then raise on every process if it failed on any (its own error where it failed)."""
    error = None
    try:
        step()
    except Exception as caught:
        error = caught
    failed = _sum_over_processes(trainer, [error is not None])[0]
    if error is not None:
        raise error
    if failed:
        raise FeatureStoreError(f"predict: finishing the stores failed on {failed} other process(es) (see their error)")


def _sum_over_processes(trainer, values: list) -> list[int]:
    return sum_over_processes(trainer.strategy)(torch.tensor([int(v) for v in values], dtype=torch.int64)).tolist()


def _describe(item) -> str:
    if isinstance(item, FeatureStore):
        parts = [f"{item.num_images} images"]
        if item.has_global:
            parts.append(f"global {item.global_dim}")
        if item.has_local:
            parts.append(f"local {item.local_shape[0]} x {item.local_shape[1] - 5}")
        if item.sources:
            parts.append(f"joined from {len(item.sources)} shards in {SHARD_DIR}/")
        return f"{item.path} ({', '.join(parts)})"
    return describe_neighbours(item)


def _numpy(value) -> np.ndarray:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)


def _ids(dataset) -> list[str]:
    ids = getattr(dataset, "ids", None)
    return list(ids) if ids is not None else [str(i) for i in range(len(dataset))]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

"""The evaluation callback: one path from embeddings to logged metrics for every method and benchmark.

During validation and test it collects each process's ``{"index", "embeddings"}`` step outputs, gathers
them on rank 0 by global index (dropping the padding repeats and sorting), has rank 0 search and
score every evaluation set with its ground truth, shares the numbers with all processes and logs them as
``<stage>/<eval set>/<metric>``. Because the gathered embeddings are the same whatever the number of
processes, 1 and N processes log the same metrics. Metrics that are not retrieval metrics (the landmark
detector's box mAP: :meth:`RetrievalModule.evaluation_metrics`) are logged and recorded with them.

For a method with embeddings of several sizes (:meth:`RetrievalModule.size_views`) every size is scored
from the same gathered embeddings and logged as ``<stage>/<eval set>/<metric>@d<size>``.

At the end of ``fit``, ``validate`` and ``test`` it prints a table of the stage's metrics, saying which
checkpoint they come from, and records them in ``metrics.json`` in the run directory with that checkpoint
(every evaluation is kept: :mod:`reporting.metrics_record`); with several sizes it also draws metric against
size into ``size_curves_<stage>.png`` there and logs the same table and line plots to W&B.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from callbacks.reranking_stage import ms_per_query, rerank_eval_sets
from datamodules.base import RetrievalDataModule
from lightning_modules.base import method_name
from lightning_modules.reranking import PairReranker
from lightning_modules.run_directory import LAST_CHECKPOINT, best_checkpoint, record_fit_result
from reporting.metrics_record import (
    BYTES_KEY,
    METHOD_KEY,
    METRICS_FILE,
    QUERY_TIME,
    SIZE_KEY,
    add_evaluations,
    describe,
    evaluation,
    select_evaluation,
)
from reporting.size_curves import curves_from_metrics, plot_size_curves
from reporting.tables import format_table
from retrieval.approximate_search import IVFPQSettings
from retrieval.diagnostics import cosine_similarity_variance
from retrieval.evaluation import evaluate_embeddings
from retrieval.files import write_text_atomic

# Rows per gather call, so gathering a large database never holds it whole on an accelerator.
GATHER_CHUNK_ROWS = 32768


class RetrievalEvaluation(pl.Callback):
    """Gather embeddings, search, score, log; print and save the metrics when a stage ends.

    Args:
        progress: show a progress bar while searching large evaluation sets.
        metrics_file: name of the JSON file of final metrics written into the run directory.
        cosine_variance: also log ``cos_var``, the variance of cosine similarities of random database
            pairs (the quantity AE-SVC minimises; ideal ``1/dim``).
        approximate_search: search a faiss IVF-PQ index instead of exactly (``--evaluation.approximate_search
            '{"nlist": 1024, "m": 64, "nprobe": 32}'``, the fields of
            :class:`~retrieval.approximate_search.IVFPQSettings`; on the CPU), for databases of 1M+: the metrics
            are the approximate ranking's, and ``<stage>/<set>/ann_recall@<k>`` is the recall of the exact
            top-``k`` on ``recall_sample`` random queries. Not for re-ranking methods.
    """

    def __init__(
        self,
        progress: bool = True,
        metrics_file: str = "metrics.json",
        cosine_variance: bool = False,
        approximate_search: IVFPQSettings | None = None,
    ):
        self.approximate_search = approximate_search
        self.progress = progress
        self.cosine_variance = cosine_variance
        self.metrics_file = metrics_file
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._fit_validations: dict[int, tuple[int, dict[str, float]]] = {}  # step -> (epoch, metrics)
        self.last_timing: dict[str, dict[str, float]] = {}  # stage -> query times (rank 0), not metrics
        #: On rank 0, while the ``evaluation_metrics`` hooks run: every evaluation part's gathered embeddings by part
        #: name (what was scored), so a hook (the retrieval gallery) ranks from them; empty otherwise.
        self.gathered: dict[str, np.ndarray] = {}

    # ---- collection -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._outputs.clear()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not outputs or "embeddings" not in outputs:
            return  # no embeddings: a module scored by its own evaluation_metrics (the landmark detector)
        self._outputs[dataloader_idx].append((outputs["index"].detach().cpu(), outputs["embeddings"].detach().cpu()))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._evaluate_collected(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._evaluate_collected(trainer, pl_module, "test")

    def _evaluate_collected(self, trainer, pl_module, stage: str) -> None:
        datamodule = _retrieval_datamodule(trainer)
        outputs = dict(self._outputs)
        self._outputs.clear()
        self.last_timing[stage] = {}
        metrics = score_eval_sets(
            trainer,
            datamodule,
            stage,
            lambda i: outputs.get(i, []),
            self.progress,
            self.cosine_variance,
            pl_module.size_views(),
            reranker=pl_module if isinstance(pl_module, PairReranker) else None,
            timing=self.last_timing[stage],
            keep_gathered=self.gathered,
            approximate=self.approximate_search,
        )
        # Other callbacks add their metrics to the same evaluation (e.g. the localisation check); every process
        # calls them and gets the same metrics back.
        for callback in trainer.callbacks:
            if hasattr(callback, "evaluation_metrics"):
                metrics.update(callback.evaluation_metrics(trainer, pl_module, stage))
        # And the module's own non-retrieval metrics (e.g. the landmark detector's box mAP).
        metrics.update(pl_module.evaluation_metrics(stage))
        self.gathered = {}  # released: held only for the hooks above
        for key, value in metrics.items():
            # Values are identical on all processes; sync_dist only keeps Lightning's epoch logging consistent.
            pl_module.log(key, value, sync_dist=True)
        self.last_metrics[stage] = metrics

    # ---- reporting ------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            monitor = getattr(trainer.checkpoint_callback, "monitor", None)
            record_fit_result(Path(trainer.default_root_dir), best_and_last(trainer)[0], monitor)
        self._report(trainer, pl_module, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")
        elif trainer.state.fn == "fit" and not trainer.sanity_checking and "val" in self.last_metrics:
            # Every validation of this fit by step, so that the end of fit can report the best checkpoint's.
            self._fit_validations[trainer.global_step] = (trainer.current_epoch, dict(self.last_metrics["val"]))

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer, pl_module, stage: str) -> None:
        """Print the metrics with the checkpoint they come from, record them in ``metrics.json`` (every
        evaluation kept, :mod:`reporting.metrics_record`), draw the size curves and log them to W&B."""
        metrics = self.last_metrics.get(stage)
        if not metrics or not trainer.is_global_zero:
            return
        run_directory = Path(trainer.default_root_dir)
        subcommand = getattr(trainer.state.fn, "value", trainer.state.fn)
        if subcommand == "fit":
            entries, notes = fit_evaluations(trainer, run_directory, self._fit_validations)
            self._fit_validations = {}
        else:
            checkpoint, notes = trainer.ckpt_path, []
            roles = checkpoint_roles(run_directory, checkpoint)
            entries = [evaluation(stage, subcommand, run_relative(checkpoint, run_directory), roles, metrics)]
        if not entries:  # a fit that ran no validation in this process (e.g. resuming a finished run)
            return
        method = method_name(pl_module)
        dim = pl_module.retrieval_dim
        fields = {METHOD_KEY: method, SIZE_KEY: dim, BYTES_KEY: None if dim is None else 4 * dim}  # searched as float32
        record = add_evaluations(run_directory / self.metrics_file, entries, self.last_timing.get(stage), **fields)
        shown = select_evaluation(record, stage) if subcommand == "fit" else entries[0]
        title = f"{stage} metrics of the {describe(shown)}"
        print(format_table(["metric", "value"], [[k, v] for k, v in shown["metrics"].items()], title=title))
        for note in notes:
            print(note)
        curves = curves_from_metrics(shown["metrics"], stage)
        if curves:
            plot_size_curves({method: curves}, run_directory / f"size_curves_{stage}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_size_curves_to_wandb(logger.experiment, method, curves, stage)
                keep_in_wandb_run(logger.experiment, run_directory / self.metrics_file, pl_module.retrieval_dim)


def fit_evaluations(trainer, run_directory: Path, validations: dict[int, tuple[int, dict]]) -> tuple[list, list]:
    """The ``metrics.json`` entries of a finished fit, and notes to print.

    The best checkpoint (:func:`best_and_last`) and the end of training are recorded with the metrics of the
    validation at their step.
    """
    best, last = best_and_last(trainer)
    steps = {path: checkpoint_step(path) for path in (best, last) if path is not None and path.is_file()}
    if not validations:
        return [], []
    final_step = max(validations)
    entries, notes = [], []
    for step in sorted({final_step, *(s for s in steps.values() if s in validations)}):
        epoch, metrics = validations[step]
        roles = [role for role, path in (("best", best), ("last", last)) if path in steps and steps[path] == step]
        file = best if "best" in roles else last if "last" in roles else None
        entries.append(evaluation("val", "fit", run_relative(file, run_directory), roles, metrics, epoch, step))
    if len(entries) > 1:
        notes.append(f"{METRICS_FILE} also records the {describe(entries[-1])}")
    if best is not None and steps.get(best) not in validations:
        notes.append(
            f"the best checkpoint {best} was not validated in this process (e.g. before a resume): "
            f"`validate --ckpt_path {best}` scores it"
        )
    return entries, notes


def best_and_last(trainer) -> tuple[Path | None, Path | None]:
    """The checkpoint callback's best checkpoint (without a monitor: its newest; with no top-k checkpoint
    kept: the last) and its last checkpoint. ``run.json`` records the best, which ``validate`` / ``test``
    without ``--ckpt_path`` and teacher resolution use."""
    callback = trainer.checkpoint_callback
    best = Path(callback.best_model_path) if callback is not None and callback.best_model_path else None
    last = Path(callback.last_model_path) if callback is not None and callback.last_model_path else None
    return best or last, last


def checkpoint_step(path: Path) -> int | None:
    """The global step a Lightning checkpoint was saved at (memory-mapped: the weights are not read)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step")


def checkpoint_roles(run_directory: Path, checkpoint: str | None) -> list[str]:
    """What ``checkpoint`` is to the run: its ``best`` (as recorded in ``run.json``) and/or its ``last``."""
    if not checkpoint:
        return []
    path, roles = Path(checkpoint).resolve(), []
    best = best_checkpoint(run_directory)
    if best is not None and best.resolve() == path:
        roles.append("best")
    if path == (run_directory / LAST_CHECKPOINT).resolve():
        roles.append("last")
    return roles


def run_relative(checkpoint: str | Path | None, run_directory: Path) -> str | None:
    """``checkpoint`` relative to the run directory when inside it, else absolute."""
    if not checkpoint:
        return None
    path = Path(checkpoint).resolve()
    try:
        return str(path.relative_to(run_directory.resolve()))
    except ValueError:
        return str(path)


def keep_in_wandb_run(experiment, metrics_file: Path, embedding_size: int | None) -> None:
    """A copy of ``metrics.json`` among the W&B run's files (uploaded with them; read back by ``compare``)."""
    experiment.summary[SIZE_KEY] = embedding_size
    if getattr(experiment, "disabled", False) or not getattr(experiment, "dir", None):
        return
    write_text_atomic(Path(experiment.dir) / METRICS_FILE, metrics_file.read_text())


def log_size_curves_to_wandb(experiment, method: str, curves: dict[str, dict[int, float]], stage: str) -> None:
    """The method's name in the run summary; with per-size metrics, a table and a line plot of each against size."""
    import wandb

    experiment.summary[METHOD_KEY] = method
    if not curves:
        return
    metrics = list(curves)
    sizes = sorted({size for by_size in curves.values() for size in by_size})
    table = wandb.Table(columns=["size", *metrics], data=[[s, *(curves[m].get(s) for m in metrics)] for s in sizes])
    plots = {
        f"{stage}/size_curve/{m}": wandb.plot.line(table, "size", m, title=f"{m} vs embedding size") for m in metrics
    }
    experiment.log({f"{stage}/size_table": table, **plots})


def score_eval_sets(
    trainer,
    datamodule: RetrievalDataModule,
    stage: str,
    outputs_of,
    progress: bool = False,
    cosine_variance: bool = False,
    size_views: dict[int, slice] | None = None,
    reranker=None,
    keep_gathered: dict | None = None,
    timing: dict[str, float] | None = None,
    approximate: IVFPQSettings | None = None,
) -> dict[str, float]:
    """Metrics of every evaluation set of ``stage`` from per-dataloader ``[(index, embeddings), ...]``.

    ``outputs_of(dataloader_idx)`` returns this process's outputs for that dataloader. All processes must
    call this (it gathers); rank 0 scores and shares the result. ``cosine_variance`` adds ``cos_var``, the
    variance of the cosine similarity of random database pairs (ideal ``1/dim``). With ``size_views``
    (:meth:`RetrievalModule.size_views`) every size is scored from the same gathered embeddings and logged as
    ``<stage>/<set>/<metric>@d<size>``; the unsuffixed keys repeat the largest size. With a ``reranker``
    (:class:`~lightning_modules.reranking.PairReranker`) the global ranking's shortlists are re-ranked
    (:mod:`callbacks.reranking_stage`): the plain keys are the re-ranked ranking's, ``<stage>/<set>/global/...``
    the global one's. ``keep_gathered``: a dict that receives every part's gathered embeddings (rank 0).
    ``timing``: a dict that receives (on rank 0) the milliseconds per query of each set's search and scoring,
    ``<stage>/<set>/ms_per_query`` with the same suffixes as the metrics (kept apart: they are not metrics).
    ``approximate``: IVF-PQ settings to search with instead of exact search (:func:`evaluate_embeddings`).
    """
    # Each part once, even when several evaluation sets share it (e.g. the 1M distractors of Oxford and Paris).
    gathered = {
        name: gather_by_index(trainer, outputs_of(loader_idx), len(dataset), name)
        for loader_idx, (name, dataset) in enumerate(datamodule.eval_parts(stage).items())
    }
    if keep_gathered is not None:
        keep_gathered.update(gathered)
    metrics: dict[str, float] = {}
    # Search where the evaluation runs: on its GPU when it has one (same rankings as the CPU path).
    device = trainer.strategy.root_device if trainer.strategy.root_device.type != "cpu" else None
    if reranker is not None and approximate is not None:
        raise ValueError("approximate_search is for global-embedding evaluation; re-ranking methods search exactly")
    if reranker is not None:
        metrics = rerank_eval_sets(trainer, reranker, datamodule.eval_sets(stage), stage, gathered, device, timing)
        if trainer.is_global_zero:
            metrics.update(datamodule.summary_metrics(stage, metrics))
        return trainer.strategy.broadcast(metrics, src=0)
    if trainer.is_global_zero:
        for eval_set in datamodule.eval_sets(stage):
            name = eval_set.name
            all_queries = _concatenate([gathered[part] for part in eval_set.query_parts])
            all_database = _concatenate([gathered[part] for part in eval_set.database_parts])
            for suffix, columns in _size_columns(size_views):
                queries, database = _unit_rows(all_queries, columns), _unit_rows(all_database, columns)
                started = time.perf_counter()
                scores = evaluate_embeddings(
                    queries, database, eval_set.ground_truth, progress=progress, device=device, approximate=approximate
                )
                if timing is not None:
                    timing[f"{stage}/{name}/{QUERY_TIME}{suffix}"] = ms_per_query(started, eval_set)
                if cosine_variance:
                    scores["cos_var"] = cosine_similarity_variance(database)
                metrics.update({f"{stage}/{name}/{metric}{suffix}": value for metric, value in scores.items()})
            if size_views:  # the plain keys are the largest size's, so monitors and sweeps work for every method
                prefix, largest = f"{stage}/{name}/", f"@d{max(size_views)}"
                of_largest = {k: v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(largest)}
                metrics.update({k.removesuffix(largest): v for k, v in of_largest.items()})
                if timing is not None:
                    timing[f"{prefix}{QUERY_TIME}"] = timing[f"{prefix}{QUERY_TIME}{largest}"]
        metrics.update(datamodule.summary_metrics(stage, metrics))
    return trainer.strategy.broadcast(metrics, src=0)


def _concatenate(parts: list[np.ndarray]) -> np.ndarray | None:
    """The rows of consecutive parts as one array (no copy for a single part); ``None`` for no parts."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _size_columns(size_views: dict[int, slice] | None) -> list[tuple[str, slice | None]]:
    """``(metric key suffix, columns)`` of every size to evaluate; one unsuffixed entry for a single size."""
    if not size_views:
        return [("", None)]
    return [(f"@d{size}", columns) for size, columns in sorted(size_views.items())]


def _unit_rows(embeddings: np.ndarray | None, columns: slice | None) -> np.ndarray | None:
    """The embedding of one size: its columns, L2-normalised again (a prefix of a unit vector is not one)."""
    if embeddings is None or columns is None:
        return embeddings
    part = embeddings[:, columns]
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def gather_by_index(trainer, outputs: list[tuple[torch.Tensor, torch.Tensor]], expected: int, what: str) -> np.ndarray:
    """All processes' ``(index, embeddings)`` as one ``float32 [expected, dim]`` array in index order.

    Repeats (the padding of uneven shards) are dropped; a missing index is an error, not a silent gap.
    """
    indices = torch.cat([i for i, _ in outputs]) if outputs else torch.zeros(0, dtype=torch.long)
    embeddings = torch.cat([e for _, e in outputs]).float() if outputs else torch.zeros(0, 0)
    if trainer.world_size > 1:
        indices, embeddings = _gather_rows_to_rank_zero(trainer, indices, embeddings)
    if not trainer.is_global_zero:
        return np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0), dtype=np.float32)
    indices = indices.numpy()
    unique, first = np.unique(indices, return_index=True)
    if len(unique) != expected or (expected and (unique[0] != 0 or unique[-1] != expected - 1)):
        raise RuntimeError(
            f"evaluation received {len(unique)} distinct {what} embeddings, expected {expected}: every example "
            "must be embedded once (do not limit evaluation batches, e.g. limit_val_batches, for retrieval metrics)"
        )
    return embeddings.numpy()[first]


def _gather_rows_to_rank_zero(trainer, indices: torch.Tensor, embeddings: torch.Tensor):
    """Every process's rows on rank 0 (other ranks get nothing), in chunks of ``GATHER_CHUNK_ROWS``."""
    device = trainer.strategy.root_device
    counts = trainer.strategy.all_gather(torch.tensor([len(indices)], device=device)).reshape(-1).cpu()
    dims = trainer.strategy.all_gather(torch.tensor([embeddings.shape[1] if len(indices) else -1], device=device))
    dim = int(dims.max())
    if len(indices) == 0:
        embeddings = torch.zeros(0, dim)
    is_zero = trainer.is_global_zero
    gathered_indices, gathered_embeddings = [], []
    for start in range(0, int(counts.max()), GATHER_CHUNK_ROWS):
        rows = min(GATHER_CHUNK_ROWS, int(counts.max()) - start)
        chunk_indices = torch.full((rows,), -1, dtype=torch.long)
        chunk_embeddings = torch.zeros(rows, dim)
        local = indices[start : start + rows]
        chunk_indices[: len(local)] = local
        chunk_embeddings[: len(local)] = embeddings[start : start + rows]
        for chunk, out in ((chunk_indices, gathered_indices), (chunk_embeddings, gathered_embeddings)):
            chunk = chunk.to(device)
            targets = [torch.empty_like(chunk) for _ in range(trainer.world_size)] if is_zero else None
            dist.gather(chunk, targets, dst=0)
            if is_zero:
                out.extend(t.cpu() for t in targets)
    if not is_zero:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dim)
    all_indices = torch.cat(gathered_indices) if gathered_indices else torch.zeros(0, dtype=torch.long)
    all_embeddings = torch.cat(gathered_embeddings) if gathered_embeddings else torch.zeros(0, dim)
    valid = all_indices >= 0
    return all_indices[valid], all_embeddings[valid]


def _retrieval_datamodule(trainer) -> RetrievalDataModule:
    datamodule = trainer.datamodule
    if not isinstance(datamodule, RetrievalDataModule):
        raise TypeError(
            f"RetrievalEvaluation needs a RetrievalDataModule (it tells what each dataloader holds), got "
            f"{type(datamodule).__name__}"
        )
    return datamodule

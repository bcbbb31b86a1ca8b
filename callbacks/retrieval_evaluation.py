"""The evaluation callback: one path from embeddings to logged metrics for every method and benchmark.

During validation and test it collects each process's ``{"index", "embeddings"}`` step outputs, gathers
them on rank 0 by global index (dropping the padding repeats and sorting), has rank 0 search and
score every evaluation set with its ground truth, shares the numbers with all processes and logs them as
``<stage>/<eval set>/<metric>``. Because the gathered embeddings are the same whatever the number of
processes, 1 and N processes log the same metrics.

For a method with embeddings of several sizes (:meth:`RetrievalModule.size_views`) every size is scored
from the same gathered embeddings and logged as ``<stage>/<eval set>/<metric>@d<size>``.

At the end of ``fit``, ``validate`` and ``test`` it prints a table of the stage's metrics and writes
``metrics.json`` (with the method's name) into the run directory; with several sizes it also draws metric
against size into ``size_curves_<stage>.png`` there and logs the same table and line plots to W&B.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from datamodules.base import EvalSet, RetrievalDataModule
from lightning_modules.base import method_name
from retrieval.diagnostics import cosine_similarity_variance
from retrieval.evaluation import evaluate_embeddings
from retrieval.files import write_text_atomic
from retrieval.run_results import METHOD_KEY
from retrieval.size_curves import curves_from_metrics, plot_size_curves

# Rows per gather call, so gathering a large database never holds it whole on an accelerator.
GATHER_CHUNK_ROWS = 32768


class RetrievalEvaluation(pl.Callback):
    """Gather embeddings, search, score, log; print and save the metrics when a stage ends.

    Args:
        progress: show a progress bar while searching large evaluation sets.
        metrics_file: name of the JSON file of final metrics written into the run directory.
        cosine_variance: also log ``cos_var``, the variance of cosine similarities of random database
            pairs (the quantity AE-SVC minimises; ideal ``1/dim``).
    """

    def __init__(self, progress: bool = True, metrics_file: str = "metrics.json", cosine_variance: bool = False):
        self.progress = progress
        self.cosine_variance = cosine_variance
        self.metrics_file = metrics_file
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.last_metrics: dict[str, dict[str, float]] = {}

    # ---- collection -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._outputs.clear()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
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
        metrics = score_eval_sets(
            trainer,
            datamodule,
            stage,
            lambda i: outputs.get(i, []),
            self.progress,
            self.cosine_variance,
            pl_module.size_views(),
        )
        for key, value in metrics.items():
            # Values are identical on all processes; sync_dist only keeps Lightning's epoch logging consistent.
            pl_module.log(key, value, sync_dist=True)
        self.last_metrics[stage] = metrics

    # ---- reporting ------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer, pl_module, stage: str) -> None:
        metrics = self.last_metrics.get(stage)
        if not metrics or not trainer.is_global_zero:
            return
        print(format_table(["metric", "value"], [[k, v] for k, v in metrics.items()], title=f"{stage} metrics"))
        run_directory = Path(trainer.default_root_dir)
        path = run_directory / self.metrics_file
        saved = json.loads(path.read_text()) if path.is_file() else {}
        saved.update(metrics)
        saved[METHOD_KEY] = method_name(pl_module)  # names the run's line in `compare`
        write_text_atomic(path, json.dumps(saved, indent=2, sort_keys=True) + "\n")
        curves = curves_from_metrics(metrics, stage)
        if curves:
            plot_size_curves({method_name(pl_module): curves}, run_directory / f"size_curves_{stage}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_size_curves_to_wandb(logger.experiment, method_name(pl_module), curves, stage)


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
) -> dict[str, float]:
    """Metrics of every evaluation set of ``stage`` from per-dataloader ``[(index, embeddings), ...]``.

    ``outputs_of(dataloader_idx)`` returns this process's outputs for that dataloader. All processes must
    call this (it gathers); rank 0 scores and shares the result. ``cosine_variance`` adds ``cos_var``, the
    variance of the cosine similarity of random database pairs (ideal ``1/dim``). With ``size_views``
    (:meth:`RetrievalModule.size_views`) every size is scored from the same gathered embeddings and logged as
    ``<stage>/<set>/<metric>@d<size>``; the unsuffixed keys repeat the largest size.
    """
    gathered: dict[tuple[str, str], np.ndarray] = {}
    eval_sets: dict[str, EvalSet] = {}
    for loader_idx, (eval_set, role) in enumerate(datamodule.eval_loader_roles(stage)):
        expected = eval_set.ground_truth.num_database if role == "database" else eval_set.ground_truth.num_queries
        gathered[(eval_set.name, role)] = gather_by_index(trainer, outputs_of(loader_idx), expected, f"{eval_set.name} {role}")
        eval_sets[eval_set.name] = eval_set
    metrics: dict[str, float] = {}
    if trainer.is_global_zero:
        for name, eval_set in eval_sets.items():
            for suffix, columns in _size_columns(size_views):
                queries, database = (_unit_rows(gathered.get((name, role)), columns) for role in ("query", "database"))
                scores = evaluate_embeddings(queries, database, eval_set.ground_truth, progress=progress)
                if cosine_variance:
                    scores["cos_var"] = cosine_similarity_variance(database)
                metrics.update({f"{stage}/{name}/{metric}{suffix}": value for metric, value in scores.items()})
            if size_views:  # the plain keys are the largest size's, so monitors and sweeps work for every method
                prefix, largest = f"{stage}/{name}/", f"@d{max(size_views)}"
                of_largest = {k: v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(largest)}
                metrics.update({k.removesuffix(largest): v for k, v in of_largest.items()})
        metrics.update(datamodule.summary_metrics(stage, metrics))
    return trainer.strategy.broadcast(metrics, src=0)


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


def format_table(header: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table; floats shown with 4 decimals."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = "+".join("-" * (w + 2) for w in widths)
    render = lambda row: " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    out = ([title] if title else []) + [render(header), line] + [render(r) for r in cells]
    return "\n".join(out)

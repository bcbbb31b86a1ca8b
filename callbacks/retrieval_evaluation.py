"""The evaluation callback: one path from embeddings to logged metrics for every method and benchmark.

During validation and test it collects each process's ``{"index", "embeddings"}`` step outputs, gathers
them on rank 0 by global index (dropping the padding repeats and sorting), has rank 0 search and
score every evaluation set with its ground truth, shares the numbers with all processes and logs them as
``<stage>/<eval set>/<metric>``. Because the gathered embeddings are the same whatever the number of
processes, 1 and N processes log the same metrics.

At the end of ``fit``, ``validate`` and ``test`` it prints a table of the stage's metrics and writes
``metrics.json`` into the run directory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from datamodules.base import EvalSet, RetrievalDataModule
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
            trainer, datamodule, stage, lambda i: outputs.get(i, []), self.progress, self.cosine_variance
        )
        for key, value in metrics.items():
            # Values are identical on all processes; sync_dist only keeps Lightning's epoch logging consistent.
            pl_module.log(key, value, sync_dist=True)
        self.last_metrics[stage] = metrics

    # ---- reporting ------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test")

    def _report(self, trainer, stage: str) -> None:
        metrics = self.last_metrics.get(stage)
        if not metrics or not trainer.is_global_zero:
            return
        print(format_table(["metric", "value"], [[k, v] for k, v in metrics.items()], title=f"{stage} metrics"))
        path = Path(trainer.default_root_dir) / self.metrics_file
        saved = json.loads(path.read_text()) if path.is_file() else {}
        saved.update(metrics)
        write_text_atomic(path, json.dumps(saved, indent=2, sort_keys=True) + "\n")


def score_eval_sets(
    trainer,
    datamodule: RetrievalDataModule,
    stage: str,
    outputs_of,
    progress: bool = False,
    cosine_variance: bool = False,
) -> dict[str, float]:
    """Metrics of every evaluation set of ``stage`` from per-dataloader ``[(index, embeddings), ...]``.

    ``outputs_of(dataloader_idx)`` returns this process's outputs for that dataloader. All processes must
    call this (it gathers); rank 0 scores and shares the result. ``cosine_variance`` adds ``cos_var``, the
    variance of the cosine similarity of random database pairs (ideal ``1/dim``).
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
            scores = evaluate_embeddings(
                gathered.get((name, "query")), gathered[(name, "database")], eval_set.ground_truth, progress=progress
            )
            if cosine_variance:
                scores["cos_var"] = cosine_similarity_variance(gathered[(name, "database")])
            metrics.update({f"{stage}/{name}/{metric}": value for metric, value in scores.items()})
        metrics.update(datamodule.summary_metrics(stage, metrics))
    return trainer.strategy.broadcast(metrics, src=0)


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

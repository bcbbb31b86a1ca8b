"""Side-by-side comparison of a trained method with closed-form baselines, through the same evaluation path.

At the end of training every baseline is fitted on the same training dataloader the method trained on
(:class:`~lightning_modules.base.ClosedFormModule`: one pass of statistics, then a closed-form solve,
exactly what ``fit`` does for that baseline on its own), and the baselines and the trained method are
embedded and scored on the same evaluation sets by :func:`~callbacks.retrieval_evaluation.score_eval_sets`.
The table is printed, written to ``comparison.json`` in the run directory and logged as a W&B table.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import WandbLogger

from callbacks.retrieval_evaluation import _retrieval_datamodule, score_eval_sets
from lightning_modules.base import ClosedFormModule, RetrievalModule, method_name, sum_over_processes
from reporting.tables import format_table
from retrieval.files import write_text_atomic


class BaselineComparison(pl.Callback):
    """Compare the trained method with ``baselines`` at the end of training.

    Args:
        baselines: closed-form methods (e.g. ``RawEmbedding``, ``PCAProjection``), fitted here; a baseline
            whose ``dim`` is unset gets the trained method's embedding size.
        stage: which evaluation sets to score (``"val"`` or ``"test"``).
    """

    def __init__(self, baselines: list[ClosedFormModule], stage: str = "val"):
        for baseline in baselines:
            if not isinstance(baseline, ClosedFormModule):
                raise TypeError(f"baselines must be closed-form methods, got {type(baseline).__name__}")
        self.baselines = baselines
        self.stage = stage
        self.rows: list[dict] = []

    # At train end the model is still on its device (Lightning moves it to the CPU before on_fit_end).
    def on_train_end(self, trainer, pl_module) -> None:
        datamodule = _retrieval_datamodule(trainer)
        self.rows = []
        for module in [*self.baselines, pl_module]:
            if module is not pl_module:
                if "dim" in module.hparams and module.hparams.dim is None:
                    module.hparams.dim = pl_module.retrieval_dim  # "at the same size"
                module.to(pl_module.device)
                fit_closed_form(trainer, module, datamodule.train_dataloader())
            metrics = evaluate_module(trainer, module, datamodule, self.stage)
            self.rows.append({"method": method_name(module), "dim": module.retrieval_dim, **metrics})
        if trainer.is_global_zero:
            self._report(trainer, method_name(pl_module))

    def _report(self, trainer, method: str) -> None:
        columns = list(self.rows[0].keys())
        table = [[row.get(c) for c in columns] for row in self.rows]
        # The trained method as training left it, which need not be its best checkpoint on the monitor.
        title = (
            f"comparison on the {self.stage} sets, same evaluation path "
            f"({method} at the end of training, step {trainer.global_step})"
        )
        print(format_table(columns, table, title=title))
        write_text_atomic(Path(trainer.default_root_dir) / "comparison.json", json.dumps(self.rows, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.stage}/comparison", columns=columns, data=table)


def _prepare(trainer, batch, device):
    """A batch as the training loop hands it to a module: on its device, in the run's precision."""
    return trainer.precision_plugin.convert_input(move_data_to_device(batch, device))


@torch.no_grad()
def fit_closed_form(trainer, module: ClosedFormModule, loader) -> None:
    """One pass of :meth:`ClosedFormModule.observe` over ``loader``, then a solve summed over processes."""
    module.reset_statistics()
    for batch in loader:
        module.observe(_prepare(trainer, batch, module.device))
    module.solve(sum_over_processes(trainer.strategy))


@torch.no_grad()
def evaluate_module(trainer, module: RetrievalModule, datamodule, stage: str) -> dict[str, float]:
    """Embed the evaluation sets of ``stage`` with ``module`` and score them (all processes call this)."""
    was_training = module.training
    module.eval()
    outputs = {}
    with trainer.precision_plugin.forward_context():
        for loader_idx, loader in enumerate(datamodule.eval_dataloaders(stage)):
            outputs[loader_idx] = [
                (batch["index"], module.embed(_prepare(trainer, batch, module.device)).float().cpu())
                for batch in loader
            ]
    module.train(was_training)
    metrics = score_eval_sets(
        trainer, datamodule, stage, lambda i: outputs[i], cosine_variance=True, size_views=module.size_views()
    )
    prefix = f"{stage}/"
    return {key.removeprefix(prefix): value for key, value in metrics.items()}

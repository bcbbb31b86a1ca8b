"""What a run does for the sweep it may belong to (always present in the CLI; a no-op outside sweeps).

* **Best, not last.** W&B ranks a sweep's runs by the summary of its metric, which is the last logged value
  unless a run says otherwise. After every validation of ``fit`` the W&B summary of the sweep metric is set to
  its best value so far (by the checkpoint callback's mode), so a sweep compares runs by their best checkpoint
  (the one the run keeps as best), also for a run stopped early.
* **The real run id.** Inside a W&B sweep the agent chooses the run id (``WANDB_RUN_ID``); ``run.json``
  records the id the W&B run actually has, and the sweep's id, so ``compare`` and a resumed run find it.
* **Progress for the offline runner** (:mod:`lightning_modules.sweep`): with ``RETRIEVAL_SWEEP_PROGRESS`` set,
  every validation appends ``{"validation", "epoch", "step", "value"}`` to that JSON-lines file, which the runner
  reads to report to Optuna and to stop unpromising trials; in a runner's own process
  (``--in-process``) a stop is asked through :data:`stop_requested`.

The metric is ``RETRIEVAL_SWEEP_METRIC`` when set (the offline runner sets it from the sweep file), else the
checkpoint monitor, which every shipped sweep uses as its metric (checked by the tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from lightning_modules.run_directory import current_run

PROGRESS_ENV = "RETRIEVAL_SWEEP_PROGRESS"
METRIC_ENV = "RETRIEVAL_SWEEP_METRIC"
GOAL_ENV = "RETRIEVAL_SWEEP_GOAL"
#: Set by a runner that runs trials in its own process: called with (validation number, value, whether it is the
#: last epoch's) after each validation; ``True`` stops the fit at the end of the epoch (an early-terminated trial).
stop_requested: Callable[[int, float, bool], bool] | None = None


class SweepMetric(pl.Callback):
    def __init__(self):
        self.best: float | None = None
        self.validations = 0

    def metric_and_goal(self, trainer) -> tuple[str | None, str]:
        checkpoint = trainer.checkpoint_callback
        metric = os.environ.get(METRIC_ENV) or getattr(checkpoint, "monitor", None)
        goal = os.environ.get(GOAL_ENV) or ("minimize" if getattr(checkpoint, "mode", "max") == "min" else "maximize")
        return metric, goal

    def on_fit_start(self, trainer, pl_module) -> None:
        self.best, self.validations = None, 0
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    record_wandb_run(logger.experiment)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        metric, goal = self.metric_and_goal(trainer)
        if metric is None or metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[metric])
        self.validations += 1
        if self.best is None or (value > self.best if goal == "maximize" else value < self.best):
            self.best = value
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False):
                    logger.experiment.summary[metric] = self.best
            progress = os.environ.get(PROGRESS_ENV)
            if progress:
                line = {"validation": self.validations, "epoch": trainer.current_epoch, "step": trainer.global_step}
                with open(progress, "a") as file:  # one short line per validation: appended, never rewritten
                    file.write(json.dumps({**line, "metric": metric, "value": value}) + "\n")
        final = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        stop = stop_requested is not None and stop_requested(self.validations, value, final)
        if trainer.world_size > 1:
            stop = trainer.strategy.broadcast(stop, src=0)
        if stop:
            trainer.should_stop = True


def record_wandb_run(experiment) -> None:
    """Record the W&B run's real id (and its sweep's) in the current run's ``run.json``."""
    info = current_run()
    run_id = getattr(experiment, "id", None)
    if info is None or not isinstance(run_id, str) or getattr(experiment, "disabled", False):
        return
    sweep_id = getattr(experiment, "sweep_id", None) or os.environ.get("WANDB_SWEEP_ID")
    if info.wandb_id != run_id or info.wandb_sweep_id != sweep_id:
        info.wandb_id, info.wandb_sweep_id = run_id, sweep_id
        info.directory = str(Path(info.directory))
        info.save()

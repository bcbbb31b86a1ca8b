"""Test-only callbacks, importable by command-line runs started from the tests."""

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL the process right after optimisation step ``step``: a crash, with no clean-up at all."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtPredictBatch(pl.Callback):
    """SIGKILL the process when ``predict`` is about to start its ``batches``-th batch (counted over all
    dataloaders): every earlier batch has been handed to the other callbacks."""

    def __init__(self, batches: int):
        self.batches = batches
        self.started = 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.started >= self.batches:
            os.kill(os.getpid(), signal.SIGKILL)
        self.started += 1


class FailAtPredictEnd(pl.Callback):
    """Raise once every batch of ``predict`` has been handed to the other callbacks, on every process: a crash
    between the last written row and the finishing of the stores."""

    def on_predict_end(self, trainer, pl_module) -> None:
        raise RuntimeError("simulated crash after the last predicted batch")

"""What every method module provides to the shared evaluation path."""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch

LRSchedule = Literal["constant", "cosine"]
OptimizerName = Literal["adamw", "sgd"]
# Checkpoint entry naming the module's class, so the CLI can rebuild it from a checkpoint alone.
MODEL_CLASS_KEY = "model_class_path"


class RetrievalModule(pl.LightningModule):
    """Base of every method.

    A method implements :meth:`embed`: a batch of examples in, L2-normalised retrieval embeddings out.
    Validation, test and predict steps return ``{"index", "embeddings"}``; the evaluation callback gathers
    them, searches and computes the benchmark's metrics, so no method computes its own.
    """

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def retrieval_dim(self) -> int | None:
        """Size of the retrieval embedding, for reports; ``None`` when not known yet."""
        return None

    def size_views(self) -> dict[int, slice] | None:
        """For a method with embeddings of several sizes: the columns of :meth:`embed`'s output that form the
        embedding of each size (each is L2-normalised and evaluated on its own, logged with ``@d<size>``).
        ``None``: one size, the whole output."""
        return None

    def input_embeddings(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's stored embeddings, L2-normalised when the method's ``normalize_input`` is set."""
        x = batch["embedding"]
        return torch.nn.functional.normalize(x, dim=-1) if self.hparams.get("normalize_input", False) else x

    #: Whether ``predict`` writes the ``embeddings`` (and ``local``) outputs as feature stores. A module whose
    #: predictions are something else (the landmark detector's boxes) sets it to ``False``.
    writes_feature_stores: bool = True

    def evaluation_metrics(self, stage: str) -> dict[str, float]:
        """Metrics the module scores from its own outputs of the ``stage`` just run, which are not retrieval
        metrics (e.g. the landmark detector's box mAP), added to the evaluation's ``<stage>/<set>/<metric>``
        keys. Every process calls it and must return the same values. Retrieval methods have none: their
        metrics come from the shared evaluation path."""
        return {}

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "embeddings": self.embed(batch)}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ---- helpers for subclasses ---------------------------------------------------------------------------
    def data_embedding_dim(self) -> int:
        """Size of the input embeddings, read from the datamodule (for models built lazily)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dim = getattr(datamodule, "embedding_dim", None)
        if dim is None:
            raise ValueError(
                f"{type(self).__name__}: input_dim is not set and the datamodule does not tell its embedding size; "
                "set model.init_args.input_dim"
            )
        return int(dim)

    def build_for_data(self, built: bool) -> None:
        """For networks sized by the input: ``self._build(dim)`` with the datamodule's embedding size unless
        ``built``; when built (``input_dim`` given or loaded), check the datamodule gives that size."""
        if not built:
            self._build(self.data_embedding_dim())
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_dim = getattr(datamodule, "embedding_dim", None)
        if data_dim is not None and data_dim != self.hparams.input_dim:
            raise ValueError(
                f"{type(self).__name__} was built for {self.hparams.input_dim}-d inputs but the datamodule gives "
                f"{data_dim}-d embeddings; set model.init_args.input_dim to match (or leave it unset)"
            )

    def stop_if_not_finite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Stop training with a clear message when the loss is NaN/Inf on any process.

        The decision is shared by all processes, so none is left waiting in a collective.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            values = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items())
            raise FloatingPointError(
                f"{type(self).__name__}: the loss became non-finite at epoch {self.current_epoch}, "
                f"step {self.global_step} ({values}). Lower the learning rate or check the input embeddings."
            )

    def build_optimizer(
        self,
        lr: float,
        weight_decay: float,
        schedule: LRSchedule,
        params=None,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.9,
        warmup_steps: int = 0,
    ):
        """AdamW (or SGD with ``momentum``, Nesterov off: ``optimizer="sgd"``) over ``params`` (default: all
        parameters; or parameter groups with their own ``lr``), optionally with a per-step cosine decay over the
        whole run and a linear warm-up from ``lr / 1000`` over the first ``warmup_steps`` steps."""
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
        params = self.parameters() if params is None else params
        if optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if schedule == "constant" and not warmup_steps:
            return optimizer
        schedulers, milestones = [], []
        if warmup_steps:
            schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, total_iters=warmup_steps))
        if schedule == "cosine":
            total_steps = max(1, int(self.trainer.estimated_stepping_batches) - warmup_steps)
            if schedulers:
                milestones.append(warmup_steps)
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps))
        scheduler = (
            schedulers[0]
            if len(schedulers) == 1
            else torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones=milestones)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


#: Where :class:`ClassifiesTrainingLabels` keeps its label map in a state dict.
LABEL_MAP_PREFIX = "label_map."


class ClassifiesTrainingLabels:
    """Mixin (before the module class) for a method trained with a classifier over the training labels.

    At ``fit`` it maps the datamodule's training labels to the contiguous classes ``0..n-1``
    (``self.label_map``, a :class:`~lightning_modules.nn.margin_heads.ContiguousLabels`, saved in checkpoints) and
    calls ``self._build_head(label_map)``, which builds the classifier(s) and sets ``hparams.num_classes``; loading a
    checkpoint rebuilds them from its saved map before its weights are loaded. A map already built (given
    ``num_classes``, or loaded) is kept.
    """

    # ``self.label_map`` is set by the module (``None`` until built): a class attribute here would shadow the
    # submodule that nn.Module keeps out of the instance dict.
    def _build_head(self, label_map) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or getattr(self, "label_map", None) is not None:
            return
        from lightning_modules.nn.margin_heads import ContiguousLabels

        datamodule = self.trainer.datamodule
        labels = getattr(datamodule.train_dataset(), "labels", None)
        if labels is None:
            raise ValueError(
                f"{type(self).__name__} trains a classifier on the training labels, but "
                f"{type(datamodule).__name__}'s training list has none"
            )
        self._build_head(ContiguousLabels(torch.as_tensor(labels)))
        self.to(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        from lightning_modules.nn.margin_heads import ContiguousLabels

        state = checkpoint.get("state_dict", {})
        if f"{LABEL_MAP_PREFIX}dataset_labels" in state:
            saved = ContiguousLabels.from_state_dict(state, LABEL_MAP_PREFIX)
            current = getattr(self, "label_map", None)
            if current is None or not torch.equal(current.dataset_labels.cpu(), saved.dataset_labels):
                self._build_head(saved)


class MultiSizeEmbedding:
    """Mixin (before the module class) for a method with an embedding at every size in ``self.sizes``: nested
    (``nested = True``: prefixes of one output) or one output per size, concatenated (``nested = False``)."""

    nested: bool = True

    @property
    def retrieval_dim(self) -> int:
        return self.sizes[-1]

    def size_views(self) -> dict[int, slice]:
        return nested_views(self.sizes) if self.nested else concatenated_views(self.sizes)

    def unit_by_size(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` with the embedding of every size L2-normalised (nested: the whole, largest one)."""
        if self.nested:
            return torch.nn.functional.normalize(output, dim=-1)
        parts = [torch.nn.functional.normalize(output[:, view], dim=-1) for view in self.size_views().values()]
        return torch.cat(parts, dim=-1)


def method_name(module: RetrievalModule) -> str:
    """The display name of a method (its ``method_name``, else its class name)."""
    return getattr(module, "method_name", type(module).__name__)


def nested_views(sizes) -> dict[int, slice]:
    """Sizes that are prefixes of one embedding: size ``m`` is its first ``m`` columns."""
    return {size: slice(0, size) for size in sizes}


def concatenated_views(sizes) -> dict[int, slice]:
    """Independent embeddings of each size, concatenated in the order of ``sizes``."""
    return {size: slice(end - size, end) for size, end in zip(sizes, itertools.accumulate(sizes))}


def load_frozen_module(checkpoint_path: str | os.PathLike, what: str = "checkpoint") -> RetrievalModule:
    """A method rebuilt from a checkpoint written by this framework, in eval mode with gradients off.

    The file is only read. ``what`` names the checkpoint's role in error messages (e.g. ``teacher_checkpoint``).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (expected a .ckpt file written by `fit`)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{what} {path} is not a readable PyTorch checkpoint: {error}") from None
    class_path = checkpoint.get(MODEL_CLASS_KEY) if isinstance(checkpoint, dict) else None
    if not class_path or "state_dict" not in checkpoint:
        raise ValueError(
            f"{what} {path} is not a checkpoint of this framework: it has no '{MODEL_CLASS_KEY}' and 'state_dict' "
            "entries (expected a .ckpt written by `python -m lightning_modules.cli fit`)"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(**checkpoint.get("hyper_parameters", {}))
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval().requires_grad_(False)


def sum_over_processes(strategy):
    """``tensor -> tensor`` summed over all processes of ``strategy`` (on its device, returned on the CPU)."""
    return lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="sum").cpu()


class ClosedFormModule(RetrievalModule):
    """A method fitted in closed form from statistics of one pass over the training set (no optimiser).

    :meth:`observe` accumulates statistics of a batch, :meth:`solve` turns the statistics summed over all
    processes into parameters. ``fit`` observes every training batch of an epoch and solves before the
    epoch's validation; the comparison callback calls the same two methods over the same training dataloader.
    """

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self._unsolved = False
        # DistributedDataParallel refuses to wrap a module without a trainable parameter, so multi-GPU ``fit``
        # needs one. It is never used: no backward pass runs, so DDP has nothing to synchronise.
        self.ddp_placeholder = torch.nn.Parameter(torch.zeros(()))

    def observe(self, batch: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def solve(self, all_reduce_sum=None) -> None:
        """Compute the parameters; ``all_reduce_sum(tensor)`` sums a statistic over processes."""
        raise NotImplementedError

    def reset_statistics(self) -> None:
        pass

    def training_step(self, batch, batch_idx: int) -> None:
        self.observe(batch)
        self._unsolved = True

    def on_train_epoch_start(self) -> None:
        self.reset_statistics()

    # Lightning validates at the end of an epoch *before* on_train_epoch_end, so solve at whichever comes first.
    def on_validation_epoch_start(self) -> None:
        self._solve_observed()

    def on_train_epoch_end(self) -> None:
        self._solve_observed()

    def _solve_observed(self) -> None:
        if self._unsolved:
            self.solve(sum_over_processes(self.trainer.strategy))
            self._unsolved = False

    def configure_optimizers(self):
        return None

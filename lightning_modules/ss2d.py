"""(SS)2D and SSD: similarity-space distillation into embeddings of several sizes.

Omama, Li, Chinchali, "Exploiting Distribution Constraints for Scalable and Efficient Image Retrieval",
ICLR 2025. A student network on the frozen foundation embedding learns to reproduce, at every size ``m`` in
``sizes``, the teacher's cosine-similarity structure of the batch (see
:mod:`lightning_modules.nn.similarity_distillation`). The teacher is a trained AE-SVC (``teacher_checkpoint``)
or any stored embedding aligned with the training set (``teacher_embeddings``); it is only used in training.
At test time only the student runs: foundation embedding -> student -> first ``m`` dimensions.

* :class:`SS2D`, single-shot: ONE student whose nested prefixes are the embeddings of every size, so a user
  picks the size at deployment by truncation, without another forward.
* :class:`SSD`: the same loss with one separate student per size (no nesting), trained in one run; the
  paper's upper bound for (SS)2D.

Choices where the paper is silent (all configurable): a linear student; temperature 0.05 (cosine
similarities lie in [-1, 1], so tau = 1 gives nearly uniform rows; of 0.02, 0.05 and 0.1, 0.05 did best at
the small sizes on the embedded benchmark's validation set); the diagonal left out of the softmax;
weights 1 for every size; similarity matrices over the *global* batch (gathered across processes, so 1 and N
GPUs optimise the same loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import LRSchedule, MultiSizeEmbedding, RetrievalModule, load_frozen_module
from lightning_modules.nn import gather_with_grad
from lightning_modules.nn.multi_size import DEFAULT_SIZES, NestedEmbedding, SeparateEmbeddings, check_sizes
from lightning_modules.nn.similarity_distillation import DiagonalHandling, multi_size_distillation_losses
from lightning_modules.run_directory import RUN_FILE, best_checkpoint, newest_finished_run, record_input
from retrieval.feature_store import FeatureStore


class SS2D(MultiSizeEmbedding, RetrievalModule):
    """(SS)2D: one student, nested sizes.

    Args:
        sizes: the nested embedding sizes, increasing; the student outputs ``max(sizes)`` dimensions.
        size_weights: loss weight of each size (default 1 each).
        teacher_checkpoint: a checkpoint of a trained method (e.g. AE-SVC) whose embedding is the teacher; a run
            directory stands for its best checkpoint, a root of run directories (``runs/aesvc/sop``) for that
            of its newest finished run (:func:`resolve_checkpoint`).
            Only read, never trained or saved in this model's checkpoints.
        teacher_embeddings: instead, a feature store whose global descriptors are the teacher embedding of
            every training example, row for row (same ids as the training set).
        input_dim: size of the foundation embeddings; ``None`` reads it from the datamodule.
        hidden_dims: student hidden widths; ``[]`` is a linear student.
        temperature: softmax temperature ``tau`` of both similarity distributions.
        diagonal: ``mask`` leaves each example's similarity with itself out of its row, ``keep`` keeps it.
        normalize_input: L2-normalise the foundation embeddings before the student.
        lr, weight_decay, lr_schedule: AdamW settings.
    """

    method_name = "(SS)2D"
    nested = True

    def __init__(
        self,
        sizes: Sequence[int] = DEFAULT_SIZES,
        size_weights: Sequence[float] | None = None,
        teacher_checkpoint: str | None = None,
        teacher_embeddings: str | None = None,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] = (),
        temperature: float = 0.05,
        diagonal: DiagonalHandling = "mask",
        normalize_input: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sizes = check_sizes(sizes)
        if size_weights is not None and len(size_weights) != len(self.sizes):
            raise ValueError(f"size_weights has {len(size_weights)} entries for {len(self.sizes)} sizes {self.sizes}")
        self.size_weights = [float(w) for w in size_weights] if size_weights is not None else [1.0] * len(self.sizes)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if (teacher_checkpoint is None) == (teacher_embeddings is None):
            raise ValueError(f"{type(self).__name__}: set exactly one of teacher_checkpoint and teacher_embeddings")
        self.student: NestedEmbedding | SeparateEmbeddings | None = None
        # The teacher is kept outside the module tree: not a parameter, not in checkpoints, not wrapped by DDP.
        self._teacher: list = []
        if input_dim is not None:
            self._build(input_dim)

    def _build(self, input_dim: int) -> None:
        kind = NestedEmbedding if self.nested else SeparateEmbeddings
        self.student = kind(input_dim, self.sizes, self.hparams.hidden_dims)
        self.hparams["input_dim"] = input_dim

    def configure_model(self) -> None:
        self.build_for_data(self.student is not None)

    def embed(self, batch) -> torch.Tensor:
        return self.unit_by_size(self.student(self.input_embeddings(batch)))

    # ---- teacher ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._teacher:
            self._teacher.append(self._load_teacher())

    def _load_teacher(self):
        hp = self.hparams
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        data_dim = getattr(datamodule, "embedding_dim", None) or hp.input_dim
        if hp.teacher_checkpoint is not None:
            path = resolve_checkpoint(hp.teacher_checkpoint)
            teacher = load_frozen_module(path, "teacher_checkpoint")
            teacher_input = teacher.hparams.get("input_dim")
            if teacher_input is not None and data_dim is not None and int(teacher_input) != int(data_dim):
                raise ValueError(
                    f"teacher_checkpoint {path} was trained on {teacher_input}-d embeddings but the datamodule gives "
                    f"{data_dim}-d embeddings: the teacher must have been trained on the same foundation embeddings"
                )
            return teacher
        return StoredTeacher(hp.teacher_embeddings, datamodule.train_dataset() if datamodule is not None else None)

    def teacher_embeddings_of(self, batch) -> torch.Tensor:
        """The teacher's embeddings of the batch, on the batch's device and in its precision."""
        teacher, x = self._teacher[0], batch["embedding"]
        if isinstance(teacher, StoredTeacher):
            return teacher.rows(batch["index"]).to(x)
        teacher.to(device=x.device, dtype=x.dtype)  # follows the run's device and precision (no-op once there)
        with torch.no_grad():
            return teacher.embed(batch)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        teacher = gather_with_grad(self.teacher_embeddings_of(batch))
        student = gather_with_grad(self.student(self.input_embeddings(batch)))
        losses = multi_size_distillation_losses(teacher, self.student.by_size(student), hp.temperature, hp.diagonal)
        loss = sum(w * losses[size] for w, size in zip(self.size_weights, self.sizes))
        terms = {"loss": loss, **{f"kl@d{size}": value for size, value in losses.items()}}
        self.stop_if_not_finite(loss, terms)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True)  # global batch: identical on every process
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule)


class SSD(SS2D):
    """SSD: the (SS)2D loss with one separate student per size, all trained in one run (the upper bound)."""

    method_name = "SSD"
    nested = False


def resolve_checkpoint(path: str) -> Path:
    """The teacher's checkpoint file: a run directory stands for its best checkpoint (as its finished ``fit``
    recorded it in ``run.json``), a root of run directories for the best checkpoint of its newest *finished*
    run, never a run still training. The resolved path and its SHA-256 are printed and recorded in this run's
    ``run.json`` (``inputs.teacher_checkpoint``)."""
    candidate = Path(path)
    if candidate.is_dir():
        run = candidate if (candidate / RUN_FILE).is_file() else newest_finished_run(candidate)
        best = best_checkpoint(run) if run is not None else None
        if best is None:
            where = f"run {candidate} has not finished" if run is not None else f"{candidate} holds no finished run"
            raise FileNotFoundError(
                f"teacher_checkpoint: {where} (no best checkpoint recorded in {RUN_FILE}); expected a .ckpt file, "
                "a finished run directory, or a root of run directories"
            )
        candidate = best
    if candidate.is_file():
        digest = record_input("teacher_checkpoint", candidate)
        rank_zero_info(f"teacher: {candidate.resolve()} (sha256 {digest})")
    return candidate


class StoredTeacher:
    """Teacher embeddings read from a feature store, one row per training example (matched by ids)."""

    def __init__(self, path: str, train_dataset=None):
        store = FeatureStore(path)
        self.embeddings = store.global_descriptors()
        if train_dataset is None:
            return
        if len(store.ids) != len(train_dataset):
            raise ValueError(
                f"teacher_embeddings {path} has {len(store.ids)} rows but the training set has {len(train_dataset)} "
                "examples: the store must hold the teacher embedding of every training example, in its order"
            )
        ids = getattr(train_dataset, "ids", None)
        if ids is not None and list(ids) != store.ids:
            row = next(i for i, (a, b) in enumerate(zip(ids, store.ids)) if a != b)
            raise ValueError(
                f"teacher_embeddings {path}: row {row} is {store.ids[row]!r} but training example {row} is "
                f"{ids[row]!r}; the store must list the training examples in the training set's order"
            )

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.embeddings[index.cpu().numpy()], dtype=np.float32))

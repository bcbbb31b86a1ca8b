"""AE-SVC: autoencoder with strong variance constraints on frozen foundation-model embeddings.

Omama, Li, Chinchali, "Exploiting Distribution Constraints for Scalable and Efficient Image Retrieval",
ICLR 2025. An autoencoder projects frozen embeddings to a ``latent_dim`` latent that is pushed to be
decorrelated, unit-variance and centred (see :mod:`lightning_modules.nn.variance_constraints`), which
minimises the variance of cosine similarities between unrelated images. The retrieval embedding is the
L2-normalised latent. Unsupervised: labels are never used.

Choices where the paper is silent (all configurable): loss weights 25 / 1 / 15 / 1 for reconstruction /
covariance / variance / mean and an MLP encoder with a mirrored decoder follow the public reproduction;
reconstruction is the mean squared error; the constraints use population statistics of the *global* batch
(gathered across processes, so 1 and N GPUs optimise the same loss).

The covariance term is by default that of the public reproduction: ``||C - I||_F^2`` of the batch, summed
over its ``k^2`` entries while the other terms are means. A batch of ``n`` latents misses even a perfectly
whitened encoder by about ``k(k+1)/n`` (the noise floor, logged as ``train/covariance_floor``), which for
``k = 64``, ``n = 500`` is two thirds of the objective: training then stops far from decorrelated (measured
in ``benchmarks/aesvc_objective.py``), so the batch must be large against the latent (a global batch smaller
than the latent is refused; the quickstart uses 2,000). Options kept next to that form:
``covariance_reduction="mean"`` (the mean over the entries, so the balance of the terms and the floor's
weight do not depend on ``k``; for the per-size baseline it scored worse at 128 and 256 dimensions than the
sum, which stays) and ``constraint_estimator="split_halves"`` (an unbiased estimate of the population terms,
without the floor; it did not train better on the embedded benchmark). See the README's AE-SVC section for
what the objective does and does not select.

Variants for embeddings of several sizes, evaluated at every size by the same evaluation:
:class:`AESVCPerSize` (one independent AE-SVC per size, trained side by side in one run: with separate
parameters, the summed loss gives each the updates of its own run) and :class:`MatryoshkaAESVC` (our own
variant: one AE-SVC whose latent prefixes each reconstruct the input and satisfy the constraints).
``AESVC(prefix_sizes=...)`` evaluates a single AE-SVC truncated to smaller sizes (the paper's baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_modules.base import LRSchedule, MultiSizeEmbedding, RetrievalModule, nested_views
from lightning_modules.nn import gather_with_grad, mlp, variance_constraint_losses
from lightning_modules.nn.multi_size import DEFAULT_SIZES, NestedEmbedding, SeparateEmbeddings, check_sizes, sizes_below
from lightning_modules.nn.variance_constraints import (
    ConstraintEstimator,
    CovarianceReduction,
    CovarianceTarget,
    covariance_noise_floor,
)
from retrieval.diagnostics import RunningMoments, constraint_errors, cosine_similarities_of_pairs


class AESVC(RetrievalModule):
    """AE-SVC on stored embeddings.

    Args:
        latent_dim: size of the retrieval embedding.
        input_dim: size of the input embeddings; ``None`` reads it from the datamodule.
        hidden_dims: encoder hidden widths; the decoder mirrors them unless ``decoder_hidden_dims`` is given.
        decoder_hidden_dims: decoder hidden widths.
        reconstruction_weight, covariance_weight, variance_weight, mean_weight: loss weights.
        covariance_target: ``"full"`` pulls the whole covariance to identity, ``"off_diagonal"`` only
            decorrelates (the variance term then alone sets the diagonal).
        covariance_reduction: ``"sum"`` (the reproduction's) or ``"mean"`` of the covariance term's ``k^2`` entries.
        constraint_estimator: ``"batch"`` (the reproduction's) or ``"split_halves"`` (see
            :func:`~lightning_modules.nn.variance_constraints.variance_constraint_losses`).
        normalize_input: L2-normalise the input embeddings before encoding.
        lr, weight_decay, lr_schedule: AdamW settings.
        prefix_sizes: also evaluate the latent truncated to each of these sizes (logged with ``@d<size>``);
            sizes at or above ``latent_dim`` are dropped with a note.
    """

    method_name = "AE-SVC"

    def __init__(
        self,
        latent_dim: int = 256,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] = (1024, 512),
        decoder_hidden_dims: Sequence[int] | None = None,
        reconstruction_weight: float = 25.0,
        covariance_weight: float = 1.0,
        variance_weight: float = 15.0,
        mean_weight: float = 1.0,
        covariance_target: CovarianceTarget = "full",
        covariance_reduction: CovarianceReduction = "sum",
        constraint_estimator: ConstraintEstimator = "batch",
        normalize_input: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
        prefix_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if prefix_sizes is not None:
            # A size at or above the latent is dropped, so sweeping latent_dim needs no other change.
            kept, dropped = sizes_below(prefix_sizes, latent_dim, "prefix_sizes")
            if dropped:
                rank_zero_info(
                    f"{type(self).__name__}: prefix_sizes {dropped} are not smaller than latent_dim={latent_dim} and "
                    f"are dropped (the latent itself is evaluated); evaluating prefixes {kept}"
                )
            self.hparams["prefix_sizes"] = kept or None
        self.encoder: torch.nn.Module | None = None
        self.decoder: torch.nn.Module | None = None
        self._moments = RunningMoments(latent_dim)
        self._cosine_sums = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
        if input_dim is not None:
            self._build(input_dim)

    def _build(self, input_dim: int) -> None:
        hp = self.hparams
        decoder_hidden = hp.decoder_hidden_dims if hp.decoder_hidden_dims is not None else list(hp.hidden_dims)[::-1]
        self.encoder = mlp(input_dim, hp.hidden_dims, hp.latent_dim)
        self.decoder = mlp(hp.latent_dim, decoder_hidden, input_dim)
        # Recorded so checkpoints rebuild the same network without a datamodule.
        self.hparams["input_dim"] = input_dim

    def configure_model(self) -> None:
        self.build_for_data(self.encoder is not None)

    @property
    def retrieval_dim(self) -> int:
        return self.hparams.latent_dim

    def size_views(self) -> dict[int, slice] | None:
        sizes = self.hparams.get("prefix_sizes")
        return nested_views(sorted({*sizes, self.hparams.latent_dim})) if sizes else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent before normalisation (the quantity the constraints act on)."""
        return self.encoder(x)

    def embed(self, batch) -> torch.Tensor:
        return F.normalize(self.encode(self.input_embeddings(batch)), dim=-1)

    def latents_by_size(self, z: torch.Tensor) -> dict[int, torch.Tensor]:
        """The latent of every trained size (one here)."""
        return {self.hparams.latent_dim: z}

    def decode(self, size: int, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def on_fit_start(self) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch_size is not None:
            self.check_batch_size(int(batch_size))

    def check_batch_size(self, global_batch_size: int) -> None:
        """Refuse a global batch smaller than the latent: its covariance cannot be the identity (rank < k)."""
        if global_batch_size < self.retrieval_dim:
            raise ValueError(
                f"{type(self).__name__}: the global batch of {global_batch_size} examples is smaller than the "
                f"{self.retrieval_dim}-d latent, so the covariance constraint cannot be met; set "
                f"data.init_args.batch_size well above it (the covariance term's noise floor is k(k+1)/batch)"
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self.input_embeddings(batch)
        z = self.encode(x)
        parts = self.latents_by_size(z)
        loss, terms = 0.0, {}
        for size, z_part in parts.items():
            part_loss, part_terms, z_global = self._part_loss(x, z_part, self.decode(size, z_part))
            loss = loss + part_loss
            # What the batch's covariance term scores even for latents whose true covariance is I.
            part_terms["covariance_floor"] = torch.tensor(self.covariance_floor(len(z_global), size))
            suffix = f"@d{size}" if len(parts) > 1 else ""
            terms.update({f"{name}{suffix}": value for name, value in part_terms.items()})
        terms = {"loss": loss, **terms}
        self.stop_if_not_finite(loss, terms)
        for name, value in terms.items():
            # The reconstruction is per-process, the constraint terms are global: averaging is right for both.
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, sync_dist=True)
        if len(parts) == 1:
            self._observe_latents(z_global.detach())
        return loss

    def _part_loss(self, x: torch.Tensor, z: torch.Tensor, reconstruction: torch.Tensor):
        """The AE-SVC loss of one latent and its reconstruction, its terms, and the latent of the global batch."""
        z_global = gather_with_grad(z)
        self.check_batch_size(len(z_global))
        terms = self.objective_terms(x, z_global, reconstruction)
        return terms.pop("objective"), terms, z_global

    def objective_terms(
        self, x: torch.Tensor, z: torch.Tensor, reconstruction: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms of the AE-SVC objective and their weighted sum (``"objective"``).

        ``x``: the input, ``reconstruction``: its decoding, ``z``: the latents of the (global) batch.
        """
        hp = self.hparams
        terms = {
            "reconstruction": F.mse_loss(reconstruction, x),
            **variance_constraint_losses(z, hp.covariance_target, hp.covariance_reduction, hp.constraint_estimator),
        }
        weights = self.objective_weights()
        terms["objective"] = sum(weights[name] * terms[name] for name in weights)
        return terms

    def objective_weights(self) -> dict[str, float]:
        hp = self.hparams
        return {
            "reconstruction": hp.reconstruction_weight,
            "covariance": hp.covariance_weight,
            "variance": hp.variance_weight,
            "mean": hp.mean_weight,
        }

    def covariance_floor(self, batch_size: int, latent_dim: int | None = None) -> float:
        """What the covariance term of a batch of ``batch_size`` latents of size ``latent_dim`` (default: the
        largest) scores with no fault of the encoder (see
        :func:`~lightning_modules.nn.variance_constraints.covariance_noise_floor`)."""
        hp = self.hparams
        k = latent_dim if latent_dim is not None else self.retrieval_dim
        return covariance_noise_floor(
            batch_size, k, hp.covariance_target, hp.covariance_reduction, hp.constraint_estimator
        )

    # ---- per-epoch diagnostics of the latent distribution --------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._moments.reset()
        self._cosine_sums.zero_()

    def _observe_latents(self, z: torch.Tensor) -> None:
        # z is the global batch, identical on every process: no reduction needed at the end.
        self._moments.update(z)
        cosines = cosine_similarities_of_pairs(z)
        sums = torch.stack([torch.ones_like(cosines).sum(), cosines.sum(), (cosines**2).sum()])
        self._cosine_sums = self._cosine_sums.to(sums.device) + sums

    # The epoch's running statistics travel with checkpoints, so a resumed epoch reports the same diagnostics.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["latent_statistics"] = [*self._moments.tensors(), self._cosine_sums]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "latent_statistics" in checkpoint:
            *moments, self._cosine_sums = checkpoint["latent_statistics"]
            self._moments.load_tensors(moments)

    def on_train_epoch_end(self) -> None:
        count, total, squares = self._cosine_sums.tolist()  # once per epoch
        if count < 2:
            return
        diagnostics = constraint_errors(self._moments)
        mean = total / count
        diagnostics["cos_var"] = (squares - count * mean**2) / (count - 1)
        diagnostics["cos_var_ideal"] = 1.0 / self._moments.dim
        for name, value in diagnostics.items():
            self.log(f"train/{name}", value, sync_dist=True)  # identical on every process

    def configure_optimizers(self):
        hp = self.hparams
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule)


class AESVCPerSize(MultiSizeEmbedding, AESVC):
    """One independent AE-SVC per size in ``sizes``, trained side by side in one run (a baseline of (SS)2D).

    The networks share nothing, so the summed loss gives each one the gradient, and with AdamW the updates,
    of its own run on the same batches. Other arguments: as :class:`AESVC`.
    """

    method_name = "AE-SVC per size"
    nested = False

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, **kwargs):
        if kwargs.get("prefix_sizes"):
            raise ValueError(f"{type(self).__name__} is scored at every size in `sizes`; prefix_sizes does not apply")
        super().__init__(latent_dim=check_sizes(sizes)[-1], **kwargs)
        self._hparams.pop("latent_dim")  # the sizes say it all
        self._hparams.pop("prefix_sizes")

    @property
    def sizes(self) -> list[int]:
        return check_sizes(self.hparams.sizes)

    def _build(self, input_dim: int) -> None:
        hp = self.hparams
        decoder_hidden = hp.decoder_hidden_dims if hp.decoder_hidden_dims is not None else list(hp.hidden_dims)[::-1]
        kind = NestedEmbedding if self.nested else SeparateEmbeddings
        self.encoder = kind(input_dim, self.sizes, hp.hidden_dims)
        decoder_inputs = [self.sizes[-1]] if self.nested else self.sizes
        self.decoder = torch.nn.ModuleList(mlp(size, decoder_hidden, input_dim) for size in decoder_inputs)
        self.hparams["input_dim"] = input_dim

    def embed(self, batch) -> torch.Tensor:
        return self.unit_by_size(self.encode(self.input_embeddings(batch)))

    def latents_by_size(self, z: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.encoder.by_size(z)

    def decode(self, size: int, z: torch.Tensor) -> torch.Tensor:
        return self.decoder[self.sizes.index(size)](z)


class MatryoshkaAESVC(AESVCPerSize):
    """Our own variant: ONE AE-SVC whose latent prefix of every size in ``sizes`` reconstructs the input and
    satisfies the three constraints (the loss sums the AE-SVC loss of every prefix, as Matryoshka
    representation learning sums its task loss over nested sizes).

    A prefix is decoded by the one decoder with the later latent dimensions set to zero, their target mean.
    (Constraints on the full latent alone would already hold on every prefix, since a prefix's covariance is a
    block of the full one; the prefix terms weight the leading dimensions more.) On the embedded benchmark it
    beats a 256-d AE-SVC truncated to 8-64 dimensions but plateaus from 32 on; the prefix constraints cause the
    plateau (reconstructing from the full latent only gives the same curve).
    """

    method_name = "Matryoshka AE-SVC"
    nested = True

    def decode(self, size: int, z: torch.Tensor) -> torch.Tensor:
        return self.decoder[0](F.pad(z, (0, self.sizes[-1] - size)))

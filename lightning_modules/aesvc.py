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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_modules.base import LRSchedule, RetrievalModule
from lightning_modules.nn import gather_with_grad, mlp, variance_constraint_losses
from lightning_modules.nn.variance_constraints import CovarianceTarget
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
        normalize_input: L2-normalise the input embeddings before encoding.
        lr, weight_decay, lr_schedule: AdamW settings.
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
        normalize_input: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
    ):
        super().__init__()
        self.save_hyperparameters()
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
        if self.encoder is None:
            self._build(self.data_embedding_dim())
        elif self._trainer is not None and getattr(self.trainer.datamodule, "embedding_dim", None) is not None:
            data_dim = self.trainer.datamodule.embedding_dim
            if data_dim != self.hparams.input_dim:
                raise ValueError(
                    f"AESVC was built for {self.hparams.input_dim}-d inputs but the datamodule gives {data_dim}-d "
                    "embeddings; set model.init_args.input_dim to match (or leave it unset)"
                )

    @property
    def retrieval_dim(self) -> int:
        return self.hparams.latent_dim

    def _inputs(self, batch) -> torch.Tensor:
        x = batch["embedding"]
        return F.normalize(x, dim=-1) if self.hparams.normalize_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent before normalisation (the quantity the constraints act on)."""
        return self.encoder(x)

    def embed(self, batch) -> torch.Tensor:
        return F.normalize(self.encode(self._inputs(batch)), dim=-1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = self._inputs(batch)
        z = self.encode(x)
        reconstruction = F.mse_loss(self.decoder(z), x)
        z_global = gather_with_grad(z)
        constraints = variance_constraint_losses(z_global, hp.covariance_target)
        loss = (
            hp.reconstruction_weight * reconstruction
            + hp.covariance_weight * constraints["covariance"]
            + hp.variance_weight * constraints["variance"]
            + hp.mean_weight * constraints["mean"]
        )
        terms = {"loss": loss, "reconstruction": reconstruction, **constraints}
        self.stop_if_not_finite(loss, terms)
        for name, value in terms.items():
            # The reconstruction is per-process, the constraint terms are global: averaging is right for both.
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, sync_dist=True)
        self._observe_latents(z_global.detach())
        return loss

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
        diagnostics["cos_var_ideal"] = 1.0 / self.hparams.latent_dim
        for name, value in diagnostics.items():
            self.log(f"train/{name}", value, sync_dist=True)  # identical on every process

    def configure_optimizers(self):
        hp = self.hparams
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule)

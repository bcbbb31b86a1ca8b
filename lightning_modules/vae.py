"""A variational autoencoder per embedding size: the VAE baseline of (SS)2D (Omama, Li, Chinchali, ICLR 2025).

For each size ``m`` an independent VAE (Kingma & Welling) with a Gaussian posterior ``N(mu, diag(sigma^2))``
and a standard normal prior encodes the frozen embedding; the retrieval embedding of size ``m`` is the
L2-normalised posterior mean ``mu``. All sizes train side by side in one run (independent parameters: each
gets the updates of its own run).

Choices where the paper is silent (configurable): the loss per example is the summed squared reconstruction
error (a Gaussian decoder of variance 1/2) plus ``beta`` times the KL divergence to the prior; encoder and
decoder are MLPs as in AE-SVC. ``beta = 1`` is the textbook VAE, but with this decoder a direction of the data
whose variance is below 1/2 is not worth encoding, so on embeddings whose class information lies in
low-variance directions the posterior collapses (on the embedded benchmark: KL -> 0, chance-level retrieval);
the shipped configs use ``beta = 0.01``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_modules.base import LRSchedule, MultiSizeEmbedding, RetrievalModule
from lightning_modules.nn import mlp
from lightning_modules.nn.multi_size import DEFAULT_SIZES, check_sizes


class VAEPerSize(MultiSizeEmbedding, RetrievalModule):
    """One VAE per size; embedding = posterior mean.

    Args:
        sizes: the latent sizes, one VAE each.
        input_dim: size of the input embeddings; ``None`` reads it from the datamodule.
        hidden_dims: encoder hidden widths; the decoder mirrors them unless ``decoder_hidden_dims`` is given.
        decoder_hidden_dims: decoder hidden widths.
        beta: weight of the KL term.
        normalize_input: L2-normalise the input embeddings before encoding.
        lr, weight_decay, lr_schedule: AdamW settings.
    """

    method_name = "VAE"
    nested = False

    def __init__(
        self,
        sizes: Sequence[int] = DEFAULT_SIZES,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] = (1024, 512),
        decoder_hidden_dims: Sequence[int] | None = None,
        beta: float = 1.0,
        normalize_input: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: LRSchedule = "constant",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sizes = check_sizes(sizes)
        self.encoders: torch.nn.ModuleList | None = None
        self.decoders: torch.nn.ModuleList | None = None
        if input_dim is not None:
            self._build(input_dim)

    def _build(self, input_dim: int) -> None:
        hp = self.hparams
        decoder_hidden = hp.decoder_hidden_dims if hp.decoder_hidden_dims is not None else list(hp.hidden_dims)[::-1]
        # Each encoder outputs the posterior mean and log-variance side by side.
        self.encoders = torch.nn.ModuleList(mlp(input_dim, hp.hidden_dims, 2 * size) for size in self.sizes)
        self.decoders = torch.nn.ModuleList(mlp(size, decoder_hidden, input_dim) for size in self.sizes)
        self.hparams["input_dim"] = input_dim

    def configure_model(self) -> None:
        self.build_for_data(self.encoders is not None)

    def posteriors(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(mu, log_variance)`` of every size."""
        return [encoder(x).chunk(2, dim=-1) for encoder in self.encoders]

    def embed(self, batch) -> torch.Tensor:
        return self.unit_by_size(torch.cat([mu for mu, _ in self.posteriors(self.input_embeddings(batch))], dim=-1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = self.input_embeddings(batch)
        loss, terms = 0.0, {}
        for size, (mu, log_variance), decoder in zip(self.sizes, self.posteriors(x), self.decoders):
            z = mu + torch.randn_like(mu) * (0.5 * log_variance).exp()
            reconstruction = ((decoder(z) - x) ** 2).sum(dim=-1).mean()
            kl = 0.5 * (mu**2 + log_variance.exp() - 1 - log_variance).sum(dim=-1).mean()
            loss = loss + reconstruction + self.hparams.beta * kl
            terms.update({f"reconstruction@d{size}": reconstruction, f"kl@d{size}": kl})
        terms = {"loss": loss, **terms}
        self.stop_if_not_finite(loss, terms)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule)

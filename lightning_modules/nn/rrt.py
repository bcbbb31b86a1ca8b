"""Reranking Transformer (RRT; Tan, Yuan and Ordonez, ICCV 2021): a similarity of two images from their global
and local descriptors, the re-ranker AMES compares with.

One transformer encoder reads the concatenated token sequence of the pair::

    [CLS, g_q, l_q1 ... l_qLq, SEP, g_x, l_x1 ... l_xLx]

and a linear classifier on the output CLS token gives the logit of "the two images match". Defaults are the
paper's: 6 post-norm layers, model width 128, 4 heads, feed-forward 1024, ReLU, no final LayerNorm.

Choices the paper leaves open, taken from the authors' released model unless said otherwise:

- Global descriptors are projected to the model width by a linear layer, then L2-normalised. Local descriptors
  get a linear projection of their own (the release feeds 128-d DELG locals in unprojected; AMES trains RRT with
  a projection at its input, like its own model, so any local dimension and binary codes fit), then are
  L2-normalised. Inputs are not normalised before the projections.
- Every token gets a learned *token-type* embedding: CLS, SEP, query global, query local, database global,
  database local (the paper's segment embedding, refined so global and local tokens differ); CLS and SEP are
  their type embeddings alone.
- Local tokens add a learned scale embedding indexed by the descriptor's scale index (the extraction scale,
  0 = smallest); indices outside ``[0, num_scales - 1]`` are clipped to it, and a float index is rounded.
  Global tokens have no scale: their own type embedding plays that role.
- No positional embedding (the released model uses none).
- Padding locals are masked as attention keys; CLS, SEP and the globals never are, so no attention row is
  ever fully masked, even for an image with no locals.
- Weights of every matrix (and the embeddings) are Xavier-uniform initialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLS, SEP, QUERY_GLOBAL, QUERY_LOCAL, DATABASE_GLOBAL, DATABASE_LOCAL = range(6)


class RerankingTransformer(nn.Module):
    """The RRT similarity: ``forward(query..., database...) -> [B]`` logits (sigmoid: match probability)."""

    def __init__(
        self,
        local_dim: int,
        global_dim: int,
        model_dim: int = 128,
        num_layers: int = 6,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        num_scales: int = 7,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_scales = num_scales
        self.global_projection = nn.Linear(global_dim, model_dim)
        self.local_projection = nn.Linear(local_dim, model_dim)
        self.scale_embedding = nn.Embedding(num_scales, model_dim)
        self.token_type_embedding = nn.Embedding(6, model_dim)
        layer = nn.TransformerEncoderLayer(
            model_dim, num_heads, ffn_dim, dropout, activation="relu", batch_first=True, norm_first=False
        )
        # Nested tensors would drop padded positions from the output; only CLS is read, but keeping shapes plain
        # avoids a warning and a different code path between training and evaluation.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(model_dim, 1)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self,
        query_global: torch.Tensor,
        query_local: torch.Tensor,
        query_scale: torch.Tensor | None,
        query_pad: torch.Tensor | None,
        database_global: torch.Tensor,
        database_local: torch.Tensor,
        database_scale: torch.Tensor | None,
        database_pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits ``[B]`` for pairs of globals ``[B, Dg]`` and locals ``[B, L, D]`` (``Lq`` and ``Lx`` may
        differ), with scale indices ``[B, L]`` (``None``: all 0) and padding flags ``[B, L]`` (True = padding;
        ``None``: none)."""
        batch = query_global.shape[0]
        query_pad = _pad_or_none(query_pad, query_local)
        database_pad = _pad_or_none(database_pad, database_local)
        tokens = torch.cat(
            [
                self._type_token(CLS, batch, query_global),
                self._global_token(query_global, QUERY_GLOBAL),
                self._local_tokens(query_local, query_scale, QUERY_LOCAL),
                self._type_token(SEP, batch, query_global),
                self._global_token(database_global, DATABASE_GLOBAL),
                self._local_tokens(database_local, database_scale, DATABASE_LOCAL),
            ],
            dim=1,
        )
        never_masked = query_pad.new_zeros((batch, 2))
        padding = torch.cat([never_masked, query_pad, never_masked, database_pad], dim=1)
        encoded = self.encoder(tokens, src_key_padding_mask=padding)
        return self.classifier(encoded[:, 0]).squeeze(-1)

    def _type_token(self, token_type: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        index = torch.full((batch, 1), token_type, dtype=torch.long, device=like.device)
        return self.token_type_embedding(index)

    def _global_token(self, descriptor: torch.Tensor, token_type: int) -> torch.Tensor:
        projected = F.normalize(self.global_projection(descriptor), dim=-1)
        return projected.unsqueeze(1) + self._type_token(token_type, len(descriptor), descriptor)

    def _local_tokens(self, descriptors: torch.Tensor, scale: torch.Tensor | None, token_type: int) -> torch.Tensor:
        projected = F.normalize(self.local_projection(descriptors), dim=-1)
        if scale is None:
            scale = torch.zeros(descriptors.shape[:2], dtype=torch.long, device=descriptors.device)
        elif scale.is_floating_point():
            scale = scale.round()
        scale = scale.long().clamp(0, self.num_scales - 1)
        return projected + self.scale_embedding(scale) + self.token_type_embedding.weight[token_type]


def _pad_or_none(pad: torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    if pad is None:
        return torch.zeros(local.shape[:2], dtype=torch.bool, device=local.device)
    return pad.bool()

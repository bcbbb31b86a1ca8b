"""A reference AMES network built from ``nn.MultiheadAttention``, in the layout of the authors' model files.

The same network as :class:`lightning_modules.nn.ames.AMESTransformer`, written the way the authors structure it:
two ``nn.MultiheadAttention`` per layer over the whole ``[token, Q, X]`` sequence, called with a boolean
``attn_mask`` and a ``key_padding_mask`` built on every call (``need_weights`` left at its default, as they call
it). Its state-dict keys and shapes are those of the authors' released files, so it is a source of
published-format state dicts for tests, and the baseline of ``benchmarks/ames_rerank_benchmark.py``.

One difference from the authors' binary remap: a projection exactly zero (a zero descriptor, i.e. padding) gives
``torch.sign``'s 0 there and +1 in ``AMESTransformer``; it only changes padded positions, which are never attended.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.ames import (
    AMESTransformer,
    ames_state_dict_to_published,
    published_config,
    published_state_dict_to_ames,
    round_to_fp16,
)


class ReferenceBinarization(nn.Module):
    """L2-normalise, project with ``W``, relax (training) or take the sign (eval)."""

    def __init__(self, local_dim: int, bits: int, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.W = nn.Parameter(torch.randn(local_dim, bits) / math.sqrt(local_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(x, dim=-1) @ self.W
        return torch.erf(x / math.sqrt(2 * self.sigma)) if self.training else torch.sign(x)


class ReferenceLayer(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.self_attn = nn.MultiheadAttention(model_dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(model_dim, num_heads, batch_first=True)
        self.linear1 = nn.Linear(model_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, model_dim)
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)
        self.norm3 = nn.LayerNorm(model_dim)

    def forward(self, x: Tensor, sa_mask: Tensor, ca_mask: Tensor, key_padding_mask: Tensor) -> Tensor:
        attended = self.self_attn(
            x, x, x, attn_mask=sa_mask, key_padding_mask=key_padding_mask, need_weights=self.need_weights
        )[0]
        x = self.norm1(x + attended)
        attended = self.cross_attn(
            x, x, x, attn_mask=ca_mask, key_padding_mask=key_padding_mask, need_weights=self.need_weights
        )[0]
        x = self.norm2(x + attended)
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class ReferenceDecoder(nn.Module):
    def __init__(self, layers: list[ReferenceLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class AMESReference(nn.Module):
    """The reference network; ``forward`` takes the same arguments as ``AMESTransformer.forward``."""

    def __init__(
        self,
        local_dim: int,
        model_dim: int = 128,
        num_layers: int = 5,
        num_heads: int = 2,
        ffn_dim: int = 1024,
        binary: bool = False,
        sigma: float = 1e-6,
        round_database_fp16: bool = True,
        need_weights: bool = True,
    ):
        super().__init__()
        self.binary = binary
        self.round_database_fp16 = round_database_fp16
        self.mtc_token = nn.Parameter(torch.randn(model_dim) * 0.02)
        if binary:
            self.remap_local = nn.Sequential(
                ReferenceBinarization(local_dim, model_dim, sigma),
                nn.Linear(model_dim, model_dim),
                nn.LayerNorm(model_dim),
            )
        else:
            self.remap_local = nn.Sequential(nn.Linear(local_dim, model_dim), nn.LayerNorm(model_dim))
        self.decoder = ReferenceDecoder(
            [ReferenceLayer(model_dim, num_heads, ffn_dim, need_weights) for _ in range(num_layers)]
        )
        self.classifier = nn.Linear(model_dim, 1)

    def forward(
        self, query: Tensor, query_pad: Tensor, database: Tensor, database_pad: Tensor, return_tokens: bool = False
    ):
        query_tokens = self.remap_local(F.normalize(query, dim=-1))
        database_tokens = self.remap_local(F.normalize(database, dim=-1))
        if self.round_database_fp16 and not self.binary and not self.training:
            database_tokens = round_to_fp16(database_tokens)
        batch, query_len, model_dim = query_tokens.shape
        database_len = database_tokens.shape[1]
        length = 1 + query_len + database_len
        x = torch.cat([self.mtc_token.expand(batch, 1, model_dim), query_tokens, database_tokens], 1)
        key_padding_mask = torch.cat([query_pad.new_zeros(batch, 1), query_pad, database_pad], 1)
        # True = not allowed: self-attention never crosses images, cross-attention never stays within one.
        sa_mask = torch.zeros(length, length, dtype=torch.bool, device=x.device)
        sa_mask[1 : 1 + query_len, 1 + query_len :] = True
        sa_mask[1 + query_len :, 1 : 1 + query_len] = True
        ca_mask = torch.zeros(length, length, dtype=torch.bool, device=x.device)
        ca_mask[1 : 1 + query_len, 1 : 1 + query_len] = True
        ca_mask[1 + query_len :, 1 + query_len :] = True
        for layer in self.decoder.layers:
            x = layer(x, sa_mask, ca_mask, key_padding_mask)
        logits = self.classifier(x[:, 0]).view(-1)
        return (logits, x) if return_tokens else logits


def reference_to_ames(reference: AMESReference, **kwargs) -> AMESTransformer:
    """An ``AMESTransformer`` with the reference's weights and settings (in the reference's train/eval mode)."""
    state = reference.state_dict()
    if reference.binary:
        kwargs.setdefault("sigma", reference.remap_local[0].sigma)
    model = AMESTransformer(
        **published_config(state),
        num_heads=reference.decoder.layers[0].self_attn.num_heads,
        round_database_fp16=reference.round_database_fp16,
        **kwargs,
    )
    model.load_state_dict(published_state_dict_to_ames(state))
    return model.train(reference.training)


def ames_to_reference(model: AMESTransformer, need_weights: bool = True) -> AMESReference:
    """An ``AMESReference`` with the model's weights and settings (in the model's train/eval mode)."""
    state = ames_state_dict_to_published(model.state_dict())
    reference = AMESReference(
        **published_config(state),
        num_heads=model.blocks[0].self_attention.num_heads,
        sigma=model.remap.sigma if model.binary else 1e-6,
        round_database_fp16=model.round_database_fp16,
        need_weights=need_weights,
    )
    reference.load_state_dict(state)
    return reference.train(model.training)

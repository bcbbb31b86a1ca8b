"""The AMES re-ranking transformer (Suma et al., ECCV 2024) as plain torch blocks.

AMES scores a pair of images from their local descriptors. Each descriptor is mapped to a ``model_dim`` token
(:class:`LocalRemap`, or :class:`BinaryLocalRemap` for 128-bit codes), a learnable matching token is put in front
of the query's and the database image's tokens, ``[token, f(Q), f(X)]``, and a stack of post-norm blocks
alternates self-attention restricted to the same image and cross-attention restricted to the other image (the
token attends to, and is attended by, everything). A linear head on the token gives a raw logit.

Both attentions run over the whole sequence with a mask, as the authors do, instead of separate modules per
image: the masks (structure combined with key padding) are built once per forward and shared by every block,
and attention is :func:`torch.nn.functional.scaled_dot_product_attention`, so fused kernels apply.

Storage, as in the paper: full-precision database tokens are kept in fp16 (simulated in eval mode by rounding
after the remap, ``round_database_fp16``); binary models keep 128-bit codes (16 bytes per descriptor,
:func:`pack_codes`) and re-enter them with :meth:`AMESTransformer.tokens_from_codes`.

The authors' released model files load with :func:`load_published_ames`; the key mapping is documented at
:func:`published_state_dict_to_ames`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Column layout of a stored local-feature row: x, y, scale, pad (1 = padding), detector weight, descriptor...
LOCAL_METADATA_COLUMNS = 5
PAD_COLUMN = 3


def split_local_columns(local: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L, 5 + D]`` stored local features -> (descriptors ``[B, L, D]`` float32, padding ``[B, L]`` bool).

    Stores hold fp16; the model runs in float32, so descriptors are converted here once.
    """
    if local.shape[-1] <= LOCAL_METADATA_COLUMNS:
        raise ValueError(f"local features need {LOCAL_METADATA_COLUMNS} metadata columns and a descriptor")
    return local[..., LOCAL_METADATA_COLUMNS:].float(), local[..., PAD_COLUMN] > 0.5


def round_to_fp16(tokens: Tensor) -> Tensor:
    """Round through fp16 and back: what storing tokens in fp16 does to them."""
    return tokens.half().to(tokens.dtype)


def pack_codes(codes: Tensor) -> Tensor:
    """±1 codes ``[..., bits]`` -> ``uint8 [..., bits / 8]``, bit order of ``numpy.packbits`` (first bit high)."""
    bits = codes.shape[-1]
    if bits % 8:
        raise ValueError(f"the number of bits must be a multiple of 8, got {bits}")
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=codes.device)
    ones = (codes > 0).reshape(*codes.shape[:-1], bits // 8, 8).to(torch.int32)
    return (ones * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``uint8 [..., n]`` from :func:`pack_codes` or ``numpy.packbits`` -> ±1 codes ``[..., 8 n]``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    ones = (packed.to(torch.uint8)[..., None] >> shifts) & 1
    return (ones.reshape(*packed.shape[:-1], -1).to(dtype) * 2 - 1).to(dtype)


class LocalRemap(nn.Module):
    """Full-precision descriptor -> token: L2-normalise, ``Linear(local_dim, model_dim)``, LayerNorm."""

    def __init__(self, local_dim: int, model_dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(local_dim, model_dim)
        self.norm = nn.LayerNorm(model_dim)

    def forward(self, descriptors: Tensor) -> Tensor:
        return self.norm(self.linear(F.normalize(descriptors, dim=-1)))


class BinaryLocalRemap(nn.Module):
    """Binary descriptor -> token: L2-normalise, project with ``W``, binarise, ``Linear(bits, model_dim)``, LayerNorm.

    ``W`` (``[local_dim, bits]``) is trained; :meth:`init_projection` starts it from ITQ. In training the sign is
    relaxed to ``erf(x / sqrt(2 * sigma))`` (the authors' expression) so gradients reach ``W``; in eval the code is
    ``sign(x)`` with exact zeros sent to +1, so codes are always ±1 and survive packing to bits.
    """

    def __init__(self, local_dim: int, model_dim: int = 128, bits: int = 128, sigma: float = 1e-6):
        super().__init__()
        self.sigma = sigma
        self.projection = nn.Parameter(torch.empty(local_dim, bits))
        # Orthonormal columns: a random rotation, ITQ's own starting point, until init_projection is called.
        nn.init.orthogonal_(self.projection)
        self.linear = nn.Linear(bits, model_dim)
        self.norm = nn.LayerNorm(model_dim)

    @property
    def bits(self) -> int:
        return self.projection.shape[1]

    @torch.no_grad()
    def init_projection(self, projection: Tensor | np.ndarray) -> None:
        """Start ``W`` from a given ``[local_dim, bits]`` projection (e.g. ITQ's)."""
        projection = torch.as_tensor(projection)
        if projection.shape != self.projection.shape:
            raise ValueError(f"projection must be {tuple(self.projection.shape)}, got {tuple(projection.shape)}")
        self.projection.copy_(projection)

    def project(self, descriptors: Tensor) -> Tensor:
        return F.normalize(descriptors, dim=-1) @ self.projection

    def binarize(self, descriptors: Tensor) -> Tensor:
        """±1 codes ``[..., bits]`` (the eval path; no gradient reaches ``W`` through a sign)."""
        projected = self.project(descriptors)
        return torch.where(projected >= 0, 1.0, -1.0).to(projected.dtype)

    def from_codes(self, codes: Tensor) -> Tensor:
        return self.norm(self.linear(codes))

    def forward(self, descriptors: Tensor) -> Tensor:
        if self.training:
            return self.from_codes(torch.erf(self.project(descriptors) / math.sqrt(2 * self.sigma)))
        return self.from_codes(self.binarize(descriptors))


class MaskedAttention(nn.Module):
    """Multi-head attention over one sequence with a given mask, laid out like ``nn.MultiheadAttention``.

    One packed ``in_proj`` (query, key and value rows, in that order) and ``out_proj``, so published
    ``in_proj_weight``/``in_proj_bias``/``out_proj`` tensors load as they are.
    """

    def __init__(self, model_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if model_dim % num_heads:
            raise ValueError(f"model_dim ({model_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(model_dim, 3 * model_dim)
        self.out_proj = nn.Linear(model_dim, model_dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x [B, S, d]``; ``mask`` additive ``[B or 1, 1, S, S]`` (see :func:`attention_masks`)."""
        batch, length, dim = x.shape
        q, k, v = self.in_proj(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class AMESBlock(nn.Module):
    """Post-norm block: ``x = norm(x + SA(x)); x = norm(x + CA(x)); x = norm(x + FFN(x))``, ReLU FFN."""

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attention = MaskedAttention(model_dim, num_heads, dropout)
        self.cross_attention = MaskedAttention(model_dim, num_heads, dropout)
        self.feedforward_in = nn.Linear(model_dim, ffn_dim)
        self.feedforward_out = nn.Linear(ffn_dim, model_dim)
        self.self_attention_norm = nn.LayerNorm(model_dim)
        self.cross_attention_norm = nn.LayerNorm(model_dim)
        self.feedforward_norm = nn.LayerNorm(model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, self_mask: Tensor | None, cross_mask: Tensor | None) -> Tensor:
        x = self.self_attention_norm(x + self.dropout(self.self_attention(x, self_mask)))
        x = self.cross_attention_norm(x + self.dropout(self.cross_attention(x, cross_mask)))
        # In place: the Linear's output is not needed for its backward, so this saves a [B, S, ffn] buffer.
        feedforward = self.feedforward_out(self.dropout(F.relu(self.feedforward_in(x), inplace=True)))
        return self.feedforward_norm(x + self.dropout(feedforward))


def attention_masks(
    query_pad: Tensor | None,
    database_pad: Tensor | None,
    query_len: int,
    database_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Additive masks (0 = may attend, -inf = may not) for self- and cross-attention over ``[token, Q, X]``.

    Self-attention stays within an image, cross-attention goes only to the other image; the token's row and
    column are always open, so no row is ever fully masked (a padded position still attends the token), and
    padded positions are never attended as keys. Shapes ``[B, 1, S, S]`` (``[1, 1, S, S]`` without padding),
    broadcast over heads. Additive rather than boolean: the fused CPU kernel turns a boolean mask into this on
    every call, and the masks serve every block.
    """
    image = torch.cat(
        [
            torch.zeros(1, dtype=torch.int8, device=device),
            torch.ones(query_len, dtype=torch.int8, device=device),
            torch.full((database_len,), 2, dtype=torch.int8, device=device),
        ]
    )
    same_image = image[:, None] == image[None, :]
    token = image == 0
    token_row_or_column = token[:, None] | token[None, :]
    self_allowed = (same_image | token_row_or_column)[None, None]
    cross_allowed = (~same_image | token_row_or_column)[None, None]
    if query_pad is not None or database_pad is not None:
        batch = (query_pad if query_pad is not None else database_pad).shape[0]
        if query_pad is None:
            query_pad = torch.zeros(batch, query_len, dtype=torch.bool, device=device)
        if database_pad is None:
            database_pad = torch.zeros(batch, database_len, dtype=torch.bool, device=device)
        token_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        key_valid = torch.cat([token_valid, ~query_pad.bool(), ~database_pad.bool()], 1)[:, None, None, :]
        self_allowed, cross_allowed = self_allowed & key_valid, cross_allowed & key_valid
    blocked = torch.tensor(float("-inf"), dtype=dtype, device=device)
    zero = torch.tensor(0.0, dtype=dtype, device=device)
    return torch.where(self_allowed, zero, blocked), torch.where(cross_allowed, zero, blocked)


def trim_tokens(tokens: Tensor, query_len: int, database_len: int, new_query_len: int, new_database_len: int) -> Tensor:
    """Tokens ``[B, 1 + query_len + database_len, d]`` at the positions of a pair made of the first
    ``new_query_len`` query and ``new_database_len`` database descriptors: the token, then those of each image.

    Used to compare a teacher that saw whole sets with a student that saw their leading subsets.
    """
    if tokens.shape[1] != 1 + query_len + database_len:
        raise ValueError(f"tokens have length {tokens.shape[1]}, expected 1 + {query_len} + {database_len}")
    if not (0 <= new_query_len <= query_len and 0 <= new_database_len <= database_len):
        raise ValueError("a trimmed set cannot be longer than the original")
    return torch.cat(
        [tokens[:, : 1 + new_query_len], tokens[:, 1 + query_len : 1 + query_len + new_database_len]], dim=1
    )


def _init_like_authors(module: nn.Module) -> None:
    # Linear weights trunc_normal(.02), zero biases, LayerNorm ones. The authors' attention in-projection is
    # nn.MultiheadAttention's own parameter (not a Linear), which keeps its xavier_uniform init: done separately.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AMESTransformer(nn.Module):
    """AMES pair scorer: local descriptors of a query and a database image -> a raw logit per pair.

    Inputs are descriptor columns only (see :func:`split_local_columns`) with padding flags (True = padding).
    The model is symmetric in (query, database) except that in eval mode a full-precision model rounds database
    tokens to fp16 (``round_database_fp16``, the authors' simulation of fp16 storage).
    """

    def __init__(
        self,
        local_dim: int,
        model_dim: int = 128,
        num_layers: int = 5,
        num_heads: int = 2,
        ffn_dim: int = 1024,
        binary: bool = False,
        sigma: float = 1e-6,
        dropout: float = 0.0,
        round_database_fp16: bool = True,
    ):
        super().__init__()
        self.local_dim = local_dim
        self.model_dim = model_dim
        self.binary = binary
        self.round_database_fp16 = round_database_fp16
        self.matching_token = nn.Parameter(torch.empty(model_dim))
        self.remap = (
            BinaryLocalRemap(local_dim, model_dim, bits=model_dim, sigma=sigma)
            if binary
            else LocalRemap(local_dim, model_dim)
        )
        self.blocks = nn.ModuleList(AMESBlock(model_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.score_head = nn.Linear(model_dim, 1)
        self.apply(_init_like_authors)
        for block in self.blocks:
            for attention in (block.self_attention, block.cross_attention):
                nn.init.xavier_uniform_(attention.in_proj.weight)
        nn.init.trunc_normal_(self.matching_token, std=0.02)

    # -- descriptors -> tokens -------------------------------------------------------------------------------
    def encode(self, descriptors: Tensor, pad: Tensor | None = None) -> Tensor:
        """Descriptors ``[B, L, local_dim]`` -> tokens ``[B, L, model_dim]`` (the query side).

        ``pad`` is accepted for symmetry with :meth:`score_tokens` and not needed: a token depends on its own
        descriptor only, and padded tokens are kept out of attention by the masks.
        """
        return self.remap(descriptors)

    def encode_database(self, descriptors: Tensor, pad: Tensor | None = None) -> Tensor:
        """Tokens of the database side: as :meth:`encode`, rounded to fp16 where the model stores them so."""
        tokens = self.encode(descriptors)
        if self.round_database_fp16 and not self.binary and not self.training:
            tokens = round_to_fp16(tokens)
        return tokens

    def init_projection(self, projection: Tensor | np.ndarray) -> None:
        """Start a binary model's projection ``W`` (``[local_dim, model_dim]``) from e.g. ITQ's."""
        if not self.binary:
            raise ValueError("init_projection needs a binary model (binary=True)")
        self.remap.init_projection(projection)

    def binarize(self, descriptors: Tensor) -> Tensor:
        """±1 codes ``[B, L, model_dim]`` of a binary model, to store (packed by :func:`pack_codes`)."""
        if not self.binary:
            raise ValueError("binarize needs a binary model (binary=True)")
        return self.remap.binarize(descriptors)

    def tokens_from_codes(self, codes: Tensor) -> Tensor:
        """Tokens from ±1 codes (e.g. :func:`unpack_codes` of stored bits), as in eval-mode :meth:`encode`."""
        if not self.binary:
            raise ValueError("tokens_from_codes needs a binary model (binary=True)")
        return self.remap.from_codes(codes)

    # -- scoring ---------------------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        query_pad: Tensor | None,
        database: Tensor,
        database_pad: Tensor | None,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B]`` of pairs of descriptor sets ``[B, Lq, D]`` and ``[B, Lx, D]`` (pads ``[B, L]``, True =
        padding); with ``return_tokens`` also the last block's output ``[B, 1 + Lq + Lx, model_dim]``."""
        return self.score_tokens(
            self.encode(query), query_pad, self.encode_database(database), database_pad, return_tokens
        )

    def score_tokens(
        self,
        query_tokens: Tensor,
        query_pad: Tensor | None,
        database_tokens: Tensor,
        database_pad: Tensor | None,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """As :meth:`forward`, from already encoded tokens (database tokens are used as given)."""
        batch = query_tokens.shape[0]
        if database_tokens.shape[0] != batch:
            raise ValueError(f"query and database batches differ: {batch} vs {database_tokens.shape[0]}")
        self_mask, cross_mask = attention_masks(
            query_pad,
            database_pad,
            query_tokens.shape[1],
            database_tokens.shape[1],
            query_tokens.dtype,
            query_tokens.device,
        )
        token = self.matching_token.to(query_tokens.dtype).expand(batch, 1, -1)
        x = torch.cat([token, query_tokens, database_tokens.to(query_tokens.dtype)], dim=1)
        for block in self.blocks:
            x = block(x, self_mask, cross_mask)
        logits = self.score_head(x[:, 0]).squeeze(-1)
        return (logits, x) if return_tokens else logits


# -- the authors' released model files ---------------------------------------------------------------------------
#
# Their files are ``torch.save({'state': model.state_dict(), ...})`` of the ``AMES`` class in
# ``src/models/matcher.py`` (loaded by ``src/evaluate.py`` as ``checkpoint['state']``, strict), whose layers are
# ``TransformerDecoderLayer`` in ``src/models/transformer_dec.py`` (two ``nn.MultiheadAttention``, post-norm) and
# whose binary remap starts with ``BinarizationLayer`` (``src/models/binarization_layer.py``, parameter ``W``).
#
#   published key (i = block)                       this module                                  shape
#   mtc_token                                       matching_token                               [d]
#   remap_local.0.weight / .bias       (fp)         remap.linear.weight / .bias                  [d, D] / [d]
#   remap_local.1.weight / .bias       (fp)         remap.norm.weight / .bias                    [d]
#   remap_local.0.W                    (binary)     remap.projection                             [D, bits]
#   remap_local.1.weight / .bias       (binary)     remap.linear.weight / .bias                  [d, bits] / [d]
#   remap_local.2.weight / .bias       (binary)     remap.norm.weight / .bias                    [d]
#   decoder.layers.i.self_attn.in_proj_weight       blocks.i.self_attention.in_proj.weight       [3d, d]
#   decoder.layers.i.self_attn.in_proj_bias         blocks.i.self_attention.in_proj.bias         [3d]
#   decoder.layers.i.self_attn.out_proj.weight/bias blocks.i.self_attention.out_proj.weight/bias [d, d] / [d]
#   decoder.layers.i.cross_attn.*                   blocks.i.cross_attention.* (as self_attn)
#   decoder.layers.i.linear1.weight / .bias         blocks.i.feedforward_in.weight / .bias       [ffn, d] / [ffn]
#   decoder.layers.i.linear2.weight / .bias         blocks.i.feedforward_out.weight / .bias      [d, ffn] / [d]
#   decoder.layers.i.norm1 / norm2 / norm3 .*       blocks.i.{self_attention,cross_attention,feedforward}_norm.*
#   classifier.weight / .bias                       score_head.weight / .bias                    [1, d] / [1]
#
# ``decoder.norm.*`` exists only in their pre-norm variant (``normalize_before``), which was not released and is not
# supported here. The number of heads is not in the file (2 in their configuration).

_FIXED_KEYS = {
    "mtc_token": "matching_token",
    "classifier.weight": "score_head.weight",
    "classifier.bias": "score_head.bias",
}
_REMAP_KEYS = {
    False: {
        "remap_local.0.weight": "remap.linear.weight",
        "remap_local.0.bias": "remap.linear.bias",
        "remap_local.1.weight": "remap.norm.weight",
        "remap_local.1.bias": "remap.norm.bias",
    },
    True: {
        "remap_local.0.W": "remap.projection",
        "remap_local.1.weight": "remap.linear.weight",
        "remap_local.1.bias": "remap.linear.bias",
        "remap_local.2.weight": "remap.norm.weight",
        "remap_local.2.bias": "remap.norm.bias",
    },
}
_BLOCK_KEYS = {
    "self_attn.in_proj_weight": "self_attention.in_proj.weight",
    "self_attn.in_proj_bias": "self_attention.in_proj.bias",
    "self_attn.out_proj.weight": "self_attention.out_proj.weight",
    "self_attn.out_proj.bias": "self_attention.out_proj.bias",
    "cross_attn.in_proj_weight": "cross_attention.in_proj.weight",
    "cross_attn.in_proj_bias": "cross_attention.in_proj.bias",
    "cross_attn.out_proj.weight": "cross_attention.out_proj.weight",
    "cross_attn.out_proj.bias": "cross_attention.out_proj.bias",
    "linear1.weight": "feedforward_in.weight",
    "linear1.bias": "feedforward_in.bias",
    "linear2.weight": "feedforward_out.weight",
    "linear2.bias": "feedforward_out.bias",
    "norm1.weight": "self_attention_norm.weight",
    "norm1.bias": "self_attention_norm.bias",
    "norm2.weight": "cross_attention_norm.weight",
    "norm2.bias": "cross_attention_norm.bias",
    "norm3.weight": "feedforward_norm.weight",
    "norm3.bias": "feedforward_norm.bias",
}
_WRAPPER_KEYS = ("state", "state_dict", "model")
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def _published_key_map(binary: bool, num_layers: int) -> dict[str, str]:
    """Every published key of a model with these properties -> its name here."""
    mapping = {**_FIXED_KEYS, **_REMAP_KEYS[binary]}
    for layer in range(num_layers):
        for published, ours in _BLOCK_KEYS.items():
            mapping[f"decoder.layers.{layer}.{published}"] = f"blocks.{layer}.{ours}"
    return mapping


def _unwrap_published(checkpoint: Mapping, source: str) -> dict[str, Tensor]:
    """The model's state dict inside a saved file: under ``state`` (the authors' files), ``state_dict`` or
    ``model`` if wrapped, with a ``module.`` prefix (DataParallel/DDP) removed."""
    state = checkpoint
    while not any(isinstance(value, Tensor) for value in state.values()):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if wrapper is None:
            raise ValueError(
                f"{source}: no AMES state dict found; expected tensors such as 'mtc_token', possibly under one of "
                f"{list(_WRAPPER_KEYS)}, got keys {sorted(state)[:10]}"
            )
        state = state[wrapper]
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def published_config(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict:
    """Constructor arguments of :class:`AMESTransformer` read from the shapes of a published state dict."""
    state_dict = _unwrap_published(state_dict, source)
    binary = "remap_local.0.W" in state_dict
    remap_key = "remap_local.0.W" if binary else "remap_local.0.weight"
    for key in ("mtc_token", remap_key, "decoder.layers.0.linear1.weight"):
        if key not in state_dict:
            raise ValueError(
                f"{source}: missing key {key!r}; an AMES model file has 'mtc_token', 'remap_local.0.weight' "
                f"(or 'remap_local.0.W' when binary), 'decoder.layers.<i>.*' and 'classifier.*'"
            )
    layers = {int(match.group(1)) for key in state_dict if (match := _LAYER_KEY.fullmatch(key))}
    remap = state_dict[remap_key]
    return {
        "local_dim": remap.shape[0] if binary else remap.shape[1],
        "model_dim": state_dict["mtc_token"].shape[0],
        "num_layers": max(layers) + 1,
        "ffn_dim": state_dict["decoder.layers.0.linear1.weight"].shape[0],
        "binary": binary,
    }


def published_state_dict_to_ames(state_dict: Mapping, source: str = "state dict") -> dict[str, Tensor]:
    """The authors' state dict (or the saved file's dict wrapping it) -> a state dict of :class:`AMESTransformer`.

    Raises ``ValueError`` naming ``source`` and the keys when any expected key is missing or any is unexpected.
    """
    state_dict = _unwrap_published(state_dict, source)
    config = published_config(state_dict, source)
    mapping = _published_key_map(config["binary"], config["num_layers"])
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        hint = (
            " ('decoder.norm' belongs to the pre-norm variant, not supported)"
            if "decoder.norm.weight" in unexpected
            else ""
        )
        raise ValueError(
            f"{source}: not an AMES model file of the expected layout{hint}; missing keys {missing}, unexpected "
            f"keys {unexpected}; expected keys: {sorted(mapping)}"
        )
    return {mapping[key]: value for key, value in state_dict.items()}


def ames_state_dict_to_published(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`published_state_dict_to_ames`: this module's state dict in the authors' key names."""
    binary = "remap.projection" in state_dict
    layers = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    inverse = {ours: published for published, ours in _published_key_map(binary, len(layers)).items()}
    return {inverse[key]: value for key, value in state_dict.items()}


def load_published_ames(
    path_or_state_dict: str | os.PathLike | Mapping,
    num_heads: int = 2,
    round_database_fp16: bool = True,
    weights_only: bool = True,
    **kwargs,
) -> AMESTransformer:
    """An :class:`AMESTransformer` (in eval mode) with the weights of one of the authors' released model files.

    ``local_dim``, ``model_dim``, ``num_layers``, ``ffn_dim`` and ``binary`` are read from the weights; the number
    of heads is not stored (2 in the authors' configuration). ``weights_only=False`` unpickles arbitrary objects:
    only for trusted files that hold more than tensors. ``kwargs`` go to the constructor (e.g. ``sigma``).
    """
    if isinstance(path_or_state_dict, Mapping):
        source, checkpoint = "state dict", path_or_state_dict
    else:
        source = os.fspath(path_or_state_dict)
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=weights_only)
        except Exception as error:
            if not weights_only or "weights_only" not in str(error):
                raise
            raise ValueError(
                f"{source}: the file holds objects other than tensors; if you trust it, load it with weights_only=False"
            ) from error
    state_dict = published_state_dict_to_ames(checkpoint, source)
    model = AMESTransformer(
        **published_config(checkpoint, source), num_heads=num_heads, round_database_fp16=round_database_fp16, **kwargs
    )
    model.load_state_dict(state_dict)
    return model.eval()

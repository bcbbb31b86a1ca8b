"""DELF local features (Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local Features", ICCV 2017),
as Detect-to-Retrieve (Teichmann et al., CVPR 2019) extracts them: plain torch, no Lightning.

* :class:`DelfAttention`: the attention head on a ResNet's conv4_x map, two 1x1 convolutions (512 channels, ReLU,
  then 1) and a softplus, so every score is positive. ``batch_norm=True`` adds the batch normalisation after the
  first convolution of the TF2 DELF training code; the paper's (v1) head has none.
* :func:`attention_pool`: the attention-weighted pooling the attention is trained through: the mean over the map
  of ``score x L2-normalised feature`` (the official code's default, ``use_l2_normalized_feature`` and
  ``reduce_mean``; the paper writes an unnormalised sum, which differs by the constant cell count).
* :func:`multiscale_local_features`: DELF's extraction. The image pyramid (:data:`DELF_SCALES`, seven scales in
  sqrt(2) steps from 0.25 to 2), a feature map and attention scores per scale, every cell a candidate at its
  receptive-field centre (:func:`receptive_field_centres`) in original-image pixels; candidates scoring below a
  threshold are dropped and the ``num_local`` of highest score over all scales are kept, L2-normalised, as rows
  ``x, y, scale, pad, weight, desc...`` sorted by score (the feature-store layout; ``scale`` is the index of the
  pyramid scale, ``weight`` the attention score, missing rows padding with ``pad = 1``).
* :class:`LocalPCA`: DELF's post-processing of the kept descriptors: PCA learnt on L2-normalised training
  descriptors, optionally whitened, to ``projection_dim``, then L2-normalised again.

DELF's released extraction config for Detect-to-Retrieve (``delf_gld_config.pbtxt``) keeps 1000 features over the
seven scales above an attention score of 100 and projects them by PCA to 128 dimensions *without* whitening
(``use_whitening: false``); both are options here. The threshold of 100 is a value for that trained model's score
range, not a constant to copy to another model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nn.backbones import resize_by, top_weighted
from retrieval.diagnostics import RunningMoments

#: DELF's image pyramid: 0.25 to 2.0 in steps of sqrt(2).
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


class DelfAttention(nn.Module):
    """Attention scores ``[B, h, w]`` (softplus, > 0) of a feature map ``[B, C, h, w]``.

    Args:
        in_channels: channels of the feature map.
        hidden_channels: channels of the first convolution (DELF: 512).
        kernel_size: of both convolutions (DELF: 1).
        batch_norm: batch normalisation after the first convolution (TF2 DELF), none in the paper's head.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 512, kernel_size: int = 1, batch_norm: bool = False):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(hidden_channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(hidden_channels, 1, kernel_size, padding=padding)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.norm(self.conv1(features)))
        return F.softplus(self.conv2(hidden))[:, 0]


def attention_pool(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: the mean over the map of ``scores [B, h, w]`` times the L2-normalised ``features [B, C, h, w]``."""
    return (F.normalize(features, dim=1) * scores[:, None]).mean(dim=(2, 3))


def receptive_field_centres(
    grid_h: int, grid_w: int, stride: int, first_centre: float = 0.5, device=None
) -> torch.Tensor:
    """``[grid_h * grid_w, 2]`` (x, y) centres of the cells' receptive fields in the input's pixels, row-major as
    the flattened map: ``stride * j + first_centre`` along each side.

    Pixel ``i`` covers ``[i, i + 1)``. For CNNs whose convolutions and poolings pad ``(k - 1) / 2`` on each side
    (timm's ResNets), the receptive field of cell ``j`` is centred on pixel ``stride * j``, i.e. at
    ``stride * j + 0.5`` (``first_centre``), whatever the image size (checked by gradients in the tests). DELF's
    ``CalculateReceptiveBoxes`` (receptive field 291, padding 145 for its TF ResNet-50's block3) gives the same
    ``stride * j`` in its pixel-index convention.
    """
    ys = torch.arange(grid_h, device=device, dtype=torch.float32) * stride + first_centre
    xs = torch.arange(grid_w, device=device, dtype=torch.float32) * stride + first_centre
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def local_candidates(
    features: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, scale_index: int
) -> torch.Tensor:
    """Every cell of ``features [B, C, h, w]`` as a row ``x, y, scale_index, 0, score, L2-normalised feature``
    (``[B, h * w, 5 + C]``, float32 whatever the input's precision: the coordinates need it), with ``positions``
    ``[B or 1, h * w, 2]`` and ``scores`` ``[B, h, w]``."""
    batch = len(features)
    weights = scores.reshape(batch, -1, 1).float()
    descriptors = F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)
    return torch.cat(
        [
            positions.float().expand(batch, -1, -1),
            torch.full_like(weights, float(scale_index)),
            torch.zeros_like(weights),
            weights,
            descriptors,
        ],
        dim=-1,
    )


def select_local_features(candidates: torch.Tensor, num_local: int, threshold: float | None = None) -> torch.Tensor:
    """The ``num_local`` candidate rows ``[B, M, 5 + D]`` of highest weight (column 4) at or above ``threshold``,
    sorted by weight; padding rows (``pad = 1``) among the candidates never compete. Missing rows (fewer
    candidates, or fewer above the threshold) are padding: zeros with ``pad = 1``."""
    weights = candidates[..., 4]
    excluded = candidates[..., 3] > 0
    if threshold is not None:
        excluded = excluded | (weights < threshold)
    if bool(excluded.any()):
        candidates = candidates.clone()
        candidates[..., 4] = weights.masked_fill(excluded, -torch.inf)
    top = top_weighted(candidates, num_local)
    dropped = top[..., 4] == -torch.inf
    if bool(dropped.any()):
        top = top.masked_fill(dropped[..., None], 0.0)
        top[..., 3] = torch.where(dropped, torch.ones_like(top[..., 3]), top[..., 3])
    return top


FeaturesAndScores = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def multiscale_local_features(
    pixels: torch.Tensor,
    features_and_scores: FeaturesAndScores,
    scales: Sequence[float],
    stride: int,
    num_local: int,
    threshold: float | None = None,
    to_original: torch.Tensor | None = None,
    first_centre: float = 0.5,
) -> torch.Tensor:
    """DELF's local features of images ``[B, 3, H, W]``: ``[B, num_local, 5 + C]`` rows (see the module docstring).

    ``features_and_scores(images)`` gives the feature map ``[B, C, h, w]`` and the attention scores
    ``[B, h, w]`` of the images at one scale (resized by :func:`~lightning_modules.nn.backbones.resize_by`).
    Positions are receptive-field centres (``stride``, ``first_centre``: :func:`receptive_field_centres`), mapped
    back to the input's pixels and, with ``to_original`` ``[B, 4]`` (scale_x, scale_y, offset_x, offset_y), to the
    original image's. Each scale keeps its own best ``num_local`` before they compete, which selects the same rows
    as ranking all candidates at once, in less memory.
    """
    height, width = pixels.shape[2:]
    kept = []
    for scale_index, scale in enumerate(scales):
        resized = resize_by(pixels, scale)
        features, scores = features_and_scores(resized)
        grid_h, grid_w = features.shape[2:]
        centres = receptive_field_centres(grid_h, grid_w, stride, first_centre, pixels.device)
        positions = (centres * centres.new_tensor([width / resized.shape[3], height / resized.shape[2]]))[None]
        if to_original is not None:
            positions = positions * to_original[:, None, :2] + to_original[:, None, 2:]
        candidates = local_candidates(features, scores, positions, scale_index)
        kept.append(select_local_features(candidates, num_local, threshold))
    return select_local_features(torch.cat(kept, dim=1), num_local)


class LocalPCA(nn.Module):
    """DELF's post-processing of local descriptors: ``L2(PCA(L2(x)))``, the PCA (optionally whitened) learnt on
    L2-normalised training descriptors by :meth:`fit`.

    The mean, the components and the eigenvalues are buffers of fixed size, saved in checkpoints; ``fitted`` says
    whether :meth:`fit` ran.

    Args:
        in_dim: descriptor dimension before the projection; out_dim: after.
        whiten: divide each component by its standard deviation (DELF's ``use_whitening``).
        eps: added to the eigenvalues before whitening.
    """

    def __init__(self, in_dim: int, out_dim: int, whiten: bool = False, eps: float = 1e-8):
        super().__init__()
        if not 1 <= out_dim <= in_dim:
            raise ValueError(f"the projection keeps between 1 and {in_dim} dimensions, got {out_dim}")
        self.in_dim, self.out_dim, self.whiten, self.eps = in_dim, out_dim, whiten, eps
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("components", torch.zeros(in_dim, out_dim))
        self.register_buffer("eigenvalues", torch.zeros(out_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, moments: RunningMoments) -> None:
        """Fit on the moments of L2-normalised descriptors (e.g. summed over processes). The buffers are replaced,
        not written in place, so a fit under inference mode leaves no tensor that later in-place loads refuse."""
        mean, components, eigenvalues = moments.principal_components(self.out_dim, self.whiten, self.eps)
        device = self.mean.device
        self.mean = mean.float().to(device)
        self.components = components.float().to(device)
        self.eigenvalues = eigenvalues.float().to(device)
        self.fitted = torch.ones((), dtype=torch.bool, device=device)

    def project(self, descriptors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[..., out_dim]`` projections of ``descriptors [..., in_dim]`` (L2-normalised first), L2-normalised
        unless ``normalize=False``."""
        if not bool(self.fitted):
            raise RuntimeError("the local PCA is not fitted: fit it on training descriptors first")
        projected = (F.normalize(descriptors, dim=-1) - self.mean.to(descriptors.dtype)) @ self.components.to(
            descriptors.dtype
        )
        return F.normalize(projected, dim=-1) if normalize else projected

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """Rows ``[B, L, 5 + in_dim]`` -> ``[B, L, 5 + out_dim]``: descriptors projected, padding rows left zero."""
        meta, descriptors = local[..., :5], local[..., 5:]
        projected = self.project(descriptors) * (1 - meta[..., 3:4])
        return torch.cat([meta, projected], dim=-1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, whiten={self.whiten}"

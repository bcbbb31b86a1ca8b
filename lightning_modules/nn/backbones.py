"""Frozen timm backbones as descriptor extractors: a global descriptor and weighted local descriptors per image.

:func:`create_backbone` builds a timm model by short name or timm name, with weights from the timm hub
(``pretrained=True``), from a local file (``checkpoint_path``, loaded through timm's own pretrained-weights
path so the same conversions apply), or random (``pretrained=False``, for tests).

:class:`DescriptorExtractor` turns images in ``[0, 1]`` into

* a global descriptor: the CLS token (ViTs) or GeM over the patch tokens / feature map, L2-normalised;
* local descriptors: the L2-normalised patch tokens (ViTs) or feature-map cells (CNNs), each with its
  position in the image and a weight. Without a trained detector the weight is, as configured, the CLS
  token's attention to the patch in the last block, averaged over heads (ViTs; the DINO saliency), or the
  descriptor's norm before normalisation (any backbone, the DELF-style attention-free score).

Several scales: the image is resized by each factor, global descriptors are averaged over scales and
renormalised, local descriptors of all scales compete for the top-L by weight (``scale`` column = index of
the scale factor).

:class:`FeatureMapBackbone` is the trainable counterpart for image-level methods: images in ``[0, 1]`` ->
feature map ``[B, C, H, W]`` (CNN or ViT), with the first stages optionally frozen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Short names of the supported backbones -> timm model names with their pretrained tag.
BACKBONES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_224.openai",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "vit_b16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "resnet50": "resnet50.a1_in1k",
    "resnet101": "resnet101.a1h_in1k",
}
GlobalPool = Literal["cls", "gem"]
LocalWeight = Literal["cls_attention", "norm"]


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (offline, not cached, no local file)."""


def create_backbone(
    name: str, pretrained: bool = True, checkpoint_path: str | None = None, model_kwargs: dict | None = None
) -> nn.Module:
    """A timm backbone without classifier; ViTs accept any image size (multiples of the patch size)."""
    import timm

    timm_name = BACKBONES.get(name, name)
    kwargs = {"num_classes": 0, **(model_kwargs or {})}
    if "vit" in timm_name.split(".")[0]:
        kwargs.setdefault("dynamic_img_size", True)
    else:
        kwargs.setdefault("global_pool", "")  # keep the feature map
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"backbone checkpoint_path {checkpoint_path} not found")
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": checkpoint_path}, **kwargs)
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as error:  # hub errors come as many types (OSError, HTTP, LocalEntryNotFound, ...)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") and " (HF_HUB_OFFLINE is set)" or ""
        raise PretrainedWeightsUnavailable(
            f"cannot load pretrained weights of {timm_name}{offline}: {type(error).__name__}. Run once online to "
            f"cache them, or download them (huggingface-cli download timm/{timm_name}) and set "
            "model.init_args.checkpoint_path to the weights file"
        ) from None


def gem(features: torch.Tensor, p: float = 3.0, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling (Radenovic et al.): ``mean(x^p)^(1/p)`` over ``dim``, on values clamped to eps."""
    return features.clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


class DescriptorExtractor(nn.Module):
    """Global and local descriptors of a frozen timm backbone (see the module docstring).

    Args:
        backbone: a timm ViT (``VisionTransformer``) or CNN with ``forward_features``.
        global_pool: ``cls`` (ViTs) or ``gem``.
        gem_p: GeM exponent.
        num_local: local descriptors kept per image (0: none).
        local_weight: ``cls_attention`` (ViTs) or ``norm``.
        scales: image scale factors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        global_pool: GlobalPool = "cls",
        gem_p: float = 3.0,
        num_local: int = 0,
        local_weight: LocalWeight = "cls_attention",
        scales: Sequence[float] = (1.0,),
    ):
        super().__init__()
        import timm

        self.backbone = backbone.eval().requires_grad_(False)
        self.is_vit = hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")
        if global_pool not in ("cls", "gem"):
            raise ValueError(f"global_pool must be 'cls' or 'gem', got {global_pool!r}")
        if local_weight not in ("cls_attention", "norm"):
            raise ValueError(f"local_weight must be 'cls_attention' or 'norm', got {local_weight!r}")
        if not self.is_vit and (global_pool == "cls" or (num_local and local_weight == "cls_attention")):
            raise ValueError(
                f"{type(backbone).__name__} has no CLS token: use global_pool='gem' and local_weight='norm'"
            )
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive factors, got {list(scales)}")
        self.global_pool, self.gem_p = global_pool, gem_p
        self.num_local, self.local_weight, self.scales = num_local, local_weight, tuple(scales)
        config = timm.data.resolve_model_data_config(backbone)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.patch_size = int(backbone.patch_embed.patch_size[0]) if self.is_vit else 32
        self._attention_input: torch.Tensor | None = None
        if self.is_vit and num_local and local_weight == "cls_attention":
            backbone.blocks[-1].attn.register_forward_pre_hook(self._keep_attention_input)

    @property
    def dim(self) -> int:
        return int(self.backbone.num_features)

    def _keep_attention_input(self, module, args) -> None:
        self._attention_input = args[0]

    def _cls_attention(self) -> torch.Tensor:
        """``[B, tokens]`` attention of the CLS query in the last block, averaged over heads."""
        attention = self.backbone.blocks[-1].attn
        x = self._attention_input
        batch, tokens, _ = x.shape
        qkv = attention.qkv(x).reshape(batch, tokens, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
        logits = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # [B, heads, 1, tokens]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]

    def _one_scale(self, pixels: torch.Tensor):
        """Global descriptor, local descriptors ``[B, N, D]``, weights ``[B, N]`` and the grid (h, w)."""
        x = (pixels - self.mean) / self.std
        if self.is_vit:
            tokens = self.backbone.forward_features(x)
            prefix = self.backbone.num_prefix_tokens
            patches = tokens[:, prefix:]
            grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
            cls = tokens[:, 0]
        else:
            feature_map = self.backbone.forward_features(x)
            grid = tuple(feature_map.shape[2:])
            patches = feature_map.flatten(2).transpose(1, 2)
            cls = None
        global_descriptor = cls if self.global_pool == "cls" else gem(patches, self.gem_p)
        weights = None
        if self.num_local:
            if self.local_weight == "cls_attention":
                weights = self._cls_attention()[:, self.backbone.num_prefix_tokens :]
            else:
                weights = patches.norm(dim=-1)
        return F.normalize(global_descriptor, dim=-1), patches, weights, grid

    def _resize(self, pixels: torch.Tensor, scale: float) -> torch.Tensor:
        return resize_by(pixels, scale, self.patch_size if self.is_vit else 1)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, to_original: torch.Tensor | None = None):
        """``(global [B, D], local [B, L, 5 + D] or None)`` for images ``[B, 3, H, W]`` in ``[0, 1]``.

        ``to_original`` ``[B, 4]`` (scale_x, scale_y, offset_x, offset_y) maps input pixels to the original
        image's, where the local descriptors' ``x, y`` are given.
        """
        height, width = pixels.shape[2:]
        global_sum, candidates = 0.0, []
        for scale_index, scale in enumerate(self.scales):
            resized = self._resize(pixels, scale)
            global_descriptor, patches, weights, (grid_h, grid_w) = self._one_scale(resized)
            global_sum = global_sum + global_descriptor
            if not self.num_local:
                continue
            # Cell centres in input pixels, row-major as the tokens.
            # Cell size in resized pixels (a ViT's grid drops a side's remainder beyond the last whole patch),
            # then back to input pixels.
            resized_h, resized_w = resized.shape[2:]
            cell_h, cell_w = (
                (self.patch_size, self.patch_size) if self.is_vit else (resized_h / grid_h, resized_w / grid_w)
            )
            ys = (torch.arange(grid_h, device=pixels.device) + 0.5) * (cell_h * height / resized_h)
            xs = (torch.arange(grid_w, device=pixels.device) + 0.5) * (cell_w * width / resized_w)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            positions = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1).expand(len(pixels), -1, -1)
            if to_original is not None:
                positions = positions * to_original[:, None, :2] + to_original[:, None, 2:]
            columns = torch.cat(
                [
                    positions,
                    torch.full_like(weights[..., None], float(scale_index)),
                    torch.zeros_like(weights[..., None]),
                    weights[..., None],
                    F.normalize(patches, dim=-1),
                ],
                dim=-1,
            )
            candidates.append(columns)
        global_descriptor = F.normalize(global_sum, dim=-1)
        if not self.num_local:
            return global_descriptor, None
        return global_descriptor, top_weighted(torch.cat(candidates, dim=1), self.num_local)


def resize_by(pixels: torch.Tensor, scale: float, multiple: int = 1) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` resized by ``scale`` (bilinear, antialiased), each side rounded to a multiple of
    ``multiple`` (at least one multiple); unchanged at scale 1."""
    if scale == 1.0:
        return pixels
    size = [max(multiple, round(side * scale / multiple) * multiple) for side in pixels.shape[2:]]
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)


def top_weighted(local: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` rows of highest weight (column 4) per image, sorted by weight; missing rows are padding
    (zeros with ``pad = 1``)."""
    batch, available, columns = local.shape
    keep = min(count, available)
    order = local[..., 4].argsort(dim=1, descending=True, stable=True)[:, :keep]
    top = local.gather(1, order[..., None].expand(-1, -1, columns))
    if keep < count:
        padding = local.new_zeros(batch, count - keep, columns)
        padding[..., 3] = 1.0
        top = torch.cat([top, padding], dim=1)
    return top


class FeatureMapBackbone(nn.Module):
    """A trainable timm backbone as a feature-map extractor: images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, C, h, w]``.

    The timm normalisation of the model (mean and std from ``timm.data.resolve_model_data_config``) is applied
    inside. CNNs give their last feature map (``forward_features``); ViTs their patch tokens (prefix tokens -
    CLS and registers - removed, after the final norm) reshaped to the patch grid (image sides must then be
    multiples of the patch size; a remainder is cut by the patch embedding).

    Args:
        backbone: a timm model from :func:`create_backbone` (CNNs built there keep their feature map), or a
            short/timm name given to :func:`create_backbone` with ``pretrained``, ``checkpoint_path`` and
            ``model_kwargs``.
        freeze_blocks: 0 trains everything; ``n >= 1`` freezes the stem and the first ``n`` stages (CNNs: the
            stages timm lists in ``feature_info``, each with everything before it, e.g. ResNet ``layer1..4``)
            or blocks (ViTs: ``patch_embed``, the CLS/register tokens, ``pos_embed`` and ``blocks[:n]``).
            Frozen parameters get ``requires_grad=False`` and frozen modules stay in eval mode when the
            module is put in training mode, so their BatchNorm statistics and drop paths are frozen too.
        channels_last: convert the model and its input to the channels-last memory format (faster convolutions
            with mixed precision on recent GPUs).
        grad_checkpointing: recompute activations in the backward pass (timm ``set_grad_checkpointing``), to
            train large images or batches in less memory.
        feature_layer: CNNs only: end the network at this stage of timm's ``feature_info`` (its module name,
            e.g. ``layer3``, ResNet's conv4_x at stride 16, as DELF uses; or its index there), dropping the later
            stages and the head (timm ``prune_intermediate_layers``); ``None``: the whole network.
    """

    def __init__(
        self,
        backbone: nn.Module | str,
        freeze_blocks: int = 0,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        feature_layer: str | int | None = None,
    ):
        super().__init__()
        import timm

        if isinstance(backbone, str):
            backbone = create_backbone(backbone, pretrained, checkpoint_path, model_kwargs)
        self.backbone = backbone
        self.is_vit = hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")
        if not hasattr(backbone, "forward_features"):
            raise ValueError(f"{type(backbone).__name__} is not a timm model: it has no forward_features")
        self._stride = None if self.is_vit else int(backbone.feature_info[-1]["reduction"])
        self._channels: int | None = None
        if feature_layer is not None:
            self._stride = self._cut_at(feature_layer)
        config = timm.data.resolve_model_data_config(backbone)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        #: Names (within ``backbone``) of the modules kept in eval mode.
        self.frozen_modules: list[str] = []
        self.freeze(freeze_blocks)

    def _cut_at(self, feature_layer: str | int) -> int:
        """Drop the stages after ``feature_layer``; its stride."""
        if self.is_vit or not hasattr(self.backbone, "prune_intermediate_layers"):
            raise ValueError(
                f"feature_layer needs a timm CNN with prune_intermediate_layers, not {type(self.backbone).__name__}"
            )
        infos = list(self.backbone.feature_info)
        names = [info["module"] for info in infos]
        index = names.index(feature_layer) if feature_layer in names else feature_layer
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(infos):
            raise ValueError(
                f"feature_layer must be one of {names} or an index below {len(infos)}, got {feature_layer!r}"
            )
        self.backbone.prune_intermediate_layers([index], prune_head=True)
        # From feature_info: timm before 1.0.30 keeps the whole network's num_features after pruning.
        self._channels = int(infos[index]["num_chs"])
        return int(infos[index]["reduction"])

    @property
    def out_channels(self) -> int:
        return self._channels or int(self.backbone.num_features)

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell along a side (the patch size of a ViT)."""
        if self.is_vit:
            return int(self.backbone.patch_embed.patch_size[0])
        return self._stride

    def stage_names(self) -> list[str]:
        """The freezable stages / blocks in forward order (``freeze_blocks`` counts them)."""
        if self.is_vit:
            return [f"blocks.{i}" for i in range(len(self.backbone.blocks))]
        feature_info = getattr(self.backbone, "feature_info", None)
        if not feature_info:
            raise ValueError(f"{type(self.backbone).__name__} has no timm feature_info to find its stages in")
        stateful = {name for name, _ in self._state_entries()}
        # Entries without parameters or buffers of their own are stem outputs (e.g. ResNet's act1), not stages.
        return [
            info["module"] for info in feature_info if any(entry.startswith(f"{info['module']}.") for entry in stateful)
        ]

    def _state_entries(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers of the backbone in registration order, which timm models follow in forward."""
        return list(self.backbone.state_dict(keep_vars=True).items())

    def freeze(self, freeze_blocks: int) -> None:
        """Freeze the stem and the first ``freeze_blocks`` stages (see the class docstring; ``len(stage_names())``
        freezes everything). Frozen parameters stay frozen: a later call with a smaller count unfreezes nothing."""
        self.freeze_blocks = freeze_blocks
        self.frozen_modules = list(dict.fromkeys(self.frozen_modules + self._freeze(freeze_blocks)))
        self.train(self.training)

    def _freeze(self, freeze_blocks: int) -> list[str]:
        if isinstance(freeze_blocks, bool) or not isinstance(freeze_blocks, int) or freeze_blocks < 0:
            raise ValueError(f"freeze_blocks must be an integer >= 0, got {freeze_blocks!r}")
        if freeze_blocks == 0:
            return []
        stages = self.stage_names()
        if freeze_blocks > len(stages):
            raise ValueError(
                f"freeze_blocks = {freeze_blocks}, but {type(self.backbone).__name__} has {len(stages)} stages: "
                f"{stages}"
            )
        entries = self._state_entries()
        last_stage = stages[freeze_blocks - 1]
        # Everything registered up to the last entry of the n-th stage: the stem (and, for ViTs, the tokens and
        # position embeddings, registered on the model itself) and the first n stages.
        end = max(i for i, (name, _) in enumerate(entries) if name.startswith(f"{last_stage}."))
        frozen = {name for name, _ in entries[: end + 1]}
        for name, parameter in self.backbone.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        # The modules whose parameters and buffers are all frozen, outermost only (eval() recurses).
        frozen_modules: list[str] = []
        for name, module in self.backbone.named_modules():
            if not name or any(name.startswith(f"{outer}.") for outer in frozen_modules):
                continue
            own = [f"{name}.{entry}" for entry in module.state_dict(keep_vars=True)]
            if own and all(entry in frozen for entry in own):
                frozen_modules.append(name)
        return frozen_modules

    def train(self, mode: bool = True) -> FeatureMapBackbone:
        super().train(mode)
        if mode:
            modules = dict(self.backbone.named_modules())
            for name in self.frozen_modules:
                modules[name].eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` feature map of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        x = (pixels - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.is_vit:
            return self.backbone.forward_features(x)
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        grid_h, grid_w = x.shape[2] // self.stride, x.shape[3] // self.stride
        if grid_h * grid_w != patches.shape[1]:
            raise ValueError(
                f"{patches.shape[1]} patch tokens for a {grid_h} x {grid_w} grid of {self.stride}-pixel patches "
                f"of a {x.shape[2]} x {x.shape[3]} image"
            )
        return patches.transpose(1, 2).reshape(len(x), -1, grid_h, grid_w)

"""Spatial-context global descriptors ("Improving Spatial Context of Global Descriptors for Image Retrieval"):
a backbone trained end to end on images, learnable smoothing and GCN refinement of its feature map before GeM
pooling, whitening and L2 normalisation, trained with a margin-softmax (ArcFace) loss on the landmark labels.

The module is thin: the blocks are :class:`lightning_modules.nn.backbones.FeatureMapBackbone`,
:class:`lightning_modules.nn.spatial_context.SpatialContextPooling` and the heads of
:mod:`lightning_modules.nn.margin_heads`. The ablations of the slides are configurations of ``pooling``:
plain GeM (``smoothing: none, refinement: none``), average-pool smoothing (``smoothing: average``), learnable
smoothing only, GCN only (``refinement: gcn``), both (the default).

Evaluation goes through the shared path (:meth:`embed` -> search -> the benchmark's metrics); ``predict``
writes the global descriptors to feature stores, so every embedding-level method (AE-SVC, (SS)2D, AMES's
first-stage ranking) runs on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.base import ClassifiesTrainingLabels, LRSchedule, RetrievalModule
from lightning_modules.nn.backbones import FeatureMapBackbone
from lightning_modules.nn.margin_heads import ArcFace, ContiguousLabels, CosFace
from lightning_modules.nn.spatial_context import PoolingSettings, SpatialContextPooling

MarginHead = Literal["arcface", "cosface"]
#: The slides' ablations as ``pooling`` settings, by name (the benchmarks train and time each of them).
ABLATIONS = {
    "plain_gem": {"smoothing": "none", "refinement": "none"},
    "average_smoothing": {"smoothing": "average", "refinement": "none"},
    "learnable_smoothing": {"smoothing": "learnable", "refinement": "none"},
    "gcn": {"smoothing": "none", "refinement": "gcn"},
    "learnable_smoothing_gcn": {"smoothing": "learnable", "refinement": "gcn"},
}


class SpatialContextRetrieval(ClassifiesTrainingLabels, RetrievalModule):
    """A trainable backbone + spatial-context pooling, trained with a margin-softmax head.

    Args:
        backbone: a timm model name or short name (see :data:`lightning_modules.nn.backbones.BACKBONES`).
        pretrained, checkpoint_path, model_kwargs: where the backbone's weights come from (the timm hub, a
            local file, or random with ``pretrained: false``; ``model_kwargs`` e.g. a small depth for tests).
        freeze_blocks, channels_last, grad_checkpointing: see :class:`~lightning_modules.nn.backbones.FeatureMapBackbone`.
        embedding_dim: size of the global descriptor (the whitening layer's output).
        pooling: the arguments of :class:`~lightning_modules.nn.spatial_context.SpatialContextPooling` (the
            ablation is chosen here: ``smoothing``, ``refinement``, ``kernel_size``, ``num_nodes``, ...).
        head: ``arcface`` (the slides) or ``cosface``; margin, scale: its margin and logit scale.
        num_classes: set from the training labels at ``fit`` (and saved); needed only to rebuild a module
            without its checkpoint.
        lr, weight_decay, lr_schedule: AdamW and its schedule; ``head_lr_scale`` multiplies the learning rate
            of the pooling and the classifier (new layers) against the backbone's.
    """

    method_name = "Spatial context"

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        freeze_blocks: int = 0,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        embedding_dim: int = 512,
        pooling: PoolingSettings | None = None,
        head: MarginHead = "arcface",
        margin: float = 0.15,
        scale: float = 30.0,
        num_classes: int | None = None,
        lr: float = 1e-4,
        head_lr_scale: float = 10.0,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "cosine",
    ):
        super().__init__()
        if head not in ("arcface", "cosface"):
            raise ValueError(f"head must be 'arcface' or 'cosface', got {head!r}")
        self.save_hyperparameters()
        self.backbone = FeatureMapBackbone(
            backbone,
            freeze_blocks=freeze_blocks,
            channels_last=channels_last,
            grad_checkpointing=grad_checkpointing,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            model_kwargs=model_kwargs,
        )
        self.pooling = SpatialContextPooling(self.backbone.out_channels, embedding_dim, **(pooling or {}))
        # Built from the training labels at fit, or from a checkpoint's state dict when loading.
        self.label_map: ContiguousLabels | None = None
        self.classifier: ArcFace | CosFace | None = None
        if num_classes is not None:
            self._build_head(ContiguousLabels(torch.arange(num_classes)))

    @property
    def retrieval_dim(self) -> int:
        return self.hparams.embedding_dim

    def _build_head(self, label_map: ContiguousLabels) -> None:
        self.label_map = label_map
        head = ArcFace if self.hparams.head == "arcface" else CosFace
        self.classifier = head(
            self.hparams.embedding_dim, label_map.num_classes, self.hparams.scale, self.hparams.margin
        )
        self.hparams.num_classes = label_map.num_classes

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.pooling(self.backbone(batch["image"]))

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps ``[B, C, H, W]`` the localisation check reads (:mod:`callbacks.localisation_check`): the
        backbone's, after smoothing (when configured) and after the GCN's write-back (when configured)."""
        backbone = self.backbone(images)
        details = self.pooling.forward_details(backbone)
        maps = {"backbone": backbone}
        if not isinstance(self.pooling.smoothing, torch.nn.Identity):
            maps["smoothed"] = details.smoothed
        if details.graph is not None and details.graph.features.dim() == 4:  # "pool" output has no map
            maps["refined"] = details.graph.features
        return maps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        descriptors = self.embed(batch)
        classes = self.label_map.encode(batch["label"])
        logits = self.classifier(descriptors, classes)
        loss = F.cross_entropy(logits, classes)
        self.stop_if_not_finite(loss, {"loss": loss})
        accuracy = (logits.argmax(dim=1) == classes).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, batch_size=len(classes))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        new_layers = [p for m in (self.pooling, self.classifier) for p in m.parameters() if p.requires_grad]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": backbone, "lr": hp.lr}, {"params": new_layers, "lr": hp.lr * hp.head_lr_scale}]
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule, [g for g in groups if g["params"]])

"""Descriptor extraction with a frozen foundation-model backbone.

``predict`` with this module writes a feature store per image list (see :mod:`callbacks.prediction_writer`);
``validate`` / ``test`` evaluate the backbone's global descriptors off the shelf through the shared
evaluation. There is nothing to train: ``fit`` refuses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_modules.base import RetrievalModule
from lightning_modules.nn.backbones import DescriptorExtractor, GlobalPool, LocalWeight, create_backbone


class FeatureExtractor(RetrievalModule):
    """Global (and optionally local) descriptors of a frozen timm backbone.

    Args:
        backbone: a short name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ``clip_vitb16``, ``dino_vitb16``,
            ``vit_b16``, ``resnet50``, ...; see :data:`lightning_modules.nn.backbones.BACKBONES`) or any timm name.
        pretrained: load the pretrained weights from the timm hub (cached after the first download).
        checkpoint_path: load the weights from this local file instead.
        model_kwargs: extra arguments of ``timm.create_model`` (e.g. a small ``depth`` for tests).
        global_pool: ``cls`` or ``gem``; gem_p: the GeM exponent.
        num_local: local descriptors per image (0: global only); local_weight: ``cls_attention`` or ``norm``.
        scales: image scale factors for multi-scale extraction (e.g. ``[0.7071, 1.0, 1.4142]``).
    """

    method_name = "extraction"

    def __init__(
        self,
        backbone: str = "dinov2_vits14",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        global_pool: GlobalPool = "cls",
        gem_p: float = 3.0,
        num_local: int = 0,
        local_weight: LocalWeight = "cls_attention",
        scales: Sequence[float] = (1.0,),
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone_name = backbone
        self.extractor = DescriptorExtractor(
            create_backbone(backbone, pretrained, checkpoint_path, model_kwargs),
            global_pool=global_pool,
            gem_p=gem_p,
            num_local=num_local,
            local_weight=local_weight,
            scales=scales,
        )

    @property
    def retrieval_dim(self) -> int:
        return self.extractor.dim

    @property
    def patch_size(self) -> int:
        return self.extractor.patch_size

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.extractor(batch["image"], batch.get("to_original"))[0]

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        global_descriptors, local_descriptors = self.extractor(batch["image"], batch.get("to_original"))
        outputs = {"index": batch["index"], "embeddings": global_descriptors}
        if local_descriptors is not None:
            outputs["local"] = local_descriptors
        return outputs

    def training_step(self, batch, batch_idx: int):
        raise RuntimeError("FeatureExtractor has nothing to train: use predict (extraction), validate or test")

    def configure_optimizers(self):
        return None

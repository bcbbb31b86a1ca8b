"""Detect-to-Retrieve's landmark detector (Teichmann et al., CVPR 2019): a Faster R-CNN trained on the Google
Landmark Boxes to find the landmark in an image; its boxes (score >= 0.1 in the paper) become the database
regions of regional aggregation (R-ASMK).

* ``fit`` on :class:`datamodules.landmark_boxes.LandmarkBoxes` (or ``GeneratedLandmarkBoxes``): the torchvision
  detector's summed losses (RPN objectness and box regression, box classifier and regression), logged as
  ``train/loss`` and its terms;
* validation: COCO box mAP of the detections on the validation boxes, ``val/<datamodule name>/box_mAP``
  (IoU 0.5:0.95) and ``box_mAP@0.5`` (:func:`retrieval.detection.box_average_precision`), printed, recorded in
  ``metrics.json`` and monitorable by the checkpoint callback. Each process keeps its detections by example
  index; rank 0 gathers them, drops the padding repeats, scores the images in index order and shares the numbers,
  so 1 and N processes give the same mAP;
* ``predict`` on any image datamodule (e.g. ``RevisitedOxfordParis`` with ``predict_lists``): per image, the
  boxes with a score of at least ``min_score`` (at most ``max_boxes_per_image``, best first), normalised to the
  image as ``ymin xmin ymax xmax``, written by the prediction writer to ``<output_dir>/<list>.boxes.csv``
  (``id,box,score``; read with :func:`datamodules.landmark_boxes.read_scored_boxes`). Boxes are normalised by the
  size of the image the datamodule gives (the whole image with ``resize: longer_side`` or ``square``; with
  ``center_crop``, or for Revisited queries cropped to their ``bbx``, relative to that crop). The image
  datamodules' pixels are in [0, 1], not normalised; the detector normalises them itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from lightning_modules.base import LRSchedule, OptimizerName, RetrievalModule
from lightning_modules.nn.detection import Architecture, build_faster_rcnn
from retrieval.detection import box_average_precision
from retrieval.localisation import pixels_to_gld_box

#: The metric keys' set name when the datamodule has no ``name``.
DEFAULT_SET_NAME = "landmark_boxes"


class LandmarkDetector(RetrievalModule):
    """A 2-class torchvision Faster R-CNN (background, landmark); see the module docstring.

    Args:
        architecture: ``resnet50_fpn`` (the paper's ResNet-50) or ``mobilenet_v3_large_fpn`` (light, for CPUs).
        weights: ``none`` (random), ``coco`` (the COCO detector, new 2-class box classifier), ``imagenet`` (the
            backbone), any torchvision weights name, or a local file (a detector state dict or a checkpoint of this
            module); see :mod:`lightning_modules.nn.detection`.
        trainable_backbone_layers: backbone stages trained, from the last, when starting from torchvision weights.
        min_size, max_size: torchvision's resizing of the images (shorter side, longer side at most).
        detections_per_image, score_threshold: what the detector returns per image for validation (COCO's 100, the
            torchvision default 0.05).
        detector_options: further keywords of torchvision's ``FasterRCNN``, e.g. fewer proposals and sampled
            regions for small images (``rpn_pre_nms_top_n_train`` / ``_test``, ``rpn_post_nms_top_n_train`` /
            ``_test``, ``box_batch_size_per_image``).
        min_score, max_boxes_per_image: the boxes ``predict`` writes (the paper: score >= 0.1; ``None``: all).
        optimizer, lr, momentum, weight_decay, lr_schedule, warmup_steps: see
            :meth:`~lightning_modules.base.RetrievalModule.build_optimizer`.
    """

    method_name = "D2R landmark detector"
    writes_feature_stores = False

    def __init__(
        self,
        architecture: Architecture = "resnet50_fpn",
        weights: str | None = "coco",
        trainable_backbone_layers: int | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        detections_per_image: int = 100,
        score_threshold: float = 0.05,
        detector_options: dict | None = None,
        min_score: float = 0.1,
        max_boxes_per_image: int | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: int = 0,
    ):
        super().__init__()
        if max_boxes_per_image is not None and max_boxes_per_image < 1:
            raise ValueError(f"max_boxes_per_image must be positive or null, got {max_boxes_per_image}")
        self.save_hyperparameters()
        self.detector = build_faster_rcnn(
            architecture,
            weights,
            trainable_backbone_layers,
            min_size,
            max_size,
            detections_per_image,
            score_threshold,
            detector_options,
        )
        # This process's (index, detections, targets) of the running evaluation, as numpy arrays on the CPU.
        self._evaluated: list[tuple[int, dict, dict]] = []

    def forward(self, images) -> list[dict[str, torch.Tensor]]:
        """Detections per image (``boxes`` x1 y1 x2 y2 in its pixels, ``scores``, ``labels``), best first."""
        return self.detector(_image_list(images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        targets = _targets(batch, type(self).__name__)
        losses = self.detector(_image_list(batch["image"]), targets)
        loss = sum(losses.values())
        self.stop_if_not_finite(loss, losses)
        size = len(targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=size)
        return loss

    # ---- evaluation: box mAP ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._evaluated = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        targets = _targets(batch, type(self).__name__)
        detections = self(batch["image"])
        for index, found, target in zip(batch["index"].tolist(), detections, targets):
            kept = {k: found[k].detach().float().cpu().numpy() for k in ("boxes", "scores")}
            kept["labels"] = found["labels"].cpu().numpy()
            truth = {"boxes": target["boxes"].float().cpu().numpy(), "labels": target["labels"].cpu().numpy()}
            self._evaluated.append((index, kept, truth))
        return {"index": batch["index"]}

    def evaluation_metrics(self, stage: str) -> dict[str, float]:
        """``<stage>/<set>/box_mAP`` and ``box_mAP@0.5`` of this evaluation's images, each scored once (see the
        module docstring); every process calls it and gets the same numbers."""
        evaluated, self._evaluated = self._evaluated, []
        trainer = self.trainer
        if trainer.world_size > 1:
            everyone = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(evaluated, everyone, dst=0)
            evaluated = [item for part in everyone for item in part] if trainer.is_global_zero else []
        metrics: dict[str, float] = {}
        if trainer.is_global_zero and evaluated:
            by_index = {index: (found, truth) for index, found, truth in evaluated}  # padding repeats: once
            ordered = [by_index[i] for i in sorted(by_index)]
            scores = box_average_precision(
                [{k: torch.from_numpy(v) for k, v in found.items()} for found, _ in ordered],
                [{k: torch.from_numpy(v) for k, v in truth.items()} for _, truth in ordered],
            )
            set_name = getattr(trainer.datamodule, "name", None) or DEFAULT_SET_NAME
            metrics = {f"{stage}/{set_name}/{metric}": value for metric, value in scores.items()}
        return trainer.strategy.broadcast(metrics, src=0)

    # ---- predict: boxes ------------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"index", "boxes": [n, 4] ymin xmin ymax xmax normalised per image, "scores": [n] per image}``."""
        images = _image_list(batch["image"])
        detections = self(images)
        limit = self.hparams.max_boxes_per_image
        boxes, scores = [], []
        for image, found in zip(images, detections):
            keep = found["scores"] >= self.hparams.min_score  # sorted by score already
            kept_scores = found["scores"][keep][:limit].float().cpu()
            kept_boxes = found["boxes"][keep][:limit].float().cpu().numpy()
            height, width = image.shape[-2:]
            boxes.append(
                torch.from_numpy(np.clip(pixels_to_gld_box(kept_boxes.reshape(-1, 4), width, height), 0.0, 1.0)).float()
            )
            scores.append(kept_scores)
        return {"index": batch["index"], "boxes": boxes, "scores": scores}

    def configure_optimizers(self):
        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        return self.build_optimizer(
            hp.lr, hp.weight_decay, hp.lr_schedule, trainable, hp.optimizer, hp.momentum, hp.warmup_steps
        )


def _image_list(images) -> list[torch.Tensor]:
    """A batch of images as torchvision's detectors take them: a list of ``[3, H, W]`` tensors."""
    return list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)


def _targets(batch: Mapping, module: str) -> list[dict[str, torch.Tensor]]:
    targets = batch.get("targets")
    if targets is None:
        raise ValueError(
            f"{module} trains and validates on landmark boxes (datamodules.landmark_boxes.LandmarkBoxes or "
            "GeneratedLandmarkBoxes); this datamodule's batches have no 'targets'. Image datamodules work for "
            "predict (boxes of their images)"
        )
    return targets

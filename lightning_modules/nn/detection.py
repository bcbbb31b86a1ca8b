"""torchvision Faster R-CNN as the landmark detector of Detect-to-Retrieve (background + one class, "landmark").

:func:`build_faster_rcnn` builds ``fasterrcnn_resnet50_fpn`` (the paper's ResNet-50 Faster R-CNN) or
``fasterrcnn_mobilenet_v3_large_fpn`` (light, for CPUs) with its weights from

* nowhere (``weights=None`` / ``"none"``: random initialisation, what tests use);
* torchvision, through its normal API (downloaded once into ``torch.hub.get_dir()/checkpoints``, then cached):
  ``"coco"`` (the detector trained on COCO, its box classifier replaced by a 2-class one), ``"imagenet"`` (the
  backbone trained on ImageNet, detection layers random), or any torchvision weights name such as
  ``"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``;
* a local file: a detector state dict (torchvision's, or ``{"model": state_dict}`` as its reference scripts save
  it), or a checkpoint written by ``fit`` with :class:`lightning_modules.d2r.LandmarkDetector`. Its parameters
  are loaded into the model built as with ``weights=None``; tensors whose shape differs (the box classifier of
  a COCO detector) are skipped and named.

The model takes a list of ``[3, H, W]`` float images in [0, 1] of any sizes: it normalises them (ImageNet mean
and std) and resizes them so that the shorter side is ``min_size`` and the longer at most ``max_size``, and
returns boxes in pixels of the images it was given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Architecture = Literal["resnet50_fpn", "mobilenet_v3_large_fpn"]
#: Background and landmark.
NUM_CLASSES = 2
#: ``weights`` short names -> the torchvision weights of each architecture (detector on COCO, backbone on ImageNet).
WEIGHT_NAMES = {
    "resnet50_fpn": {"coco": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "imagenet": "ResNet50_Weights.IMAGENET1K_V1"},
    "mobilenet_v3_large_fpn": {
        "coco": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
        "imagenet": "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
    },
}
# Prefix of the detector's parameters in a LandmarkDetector checkpoint's state dict.
CHECKPOINT_PREFIX = "detector."


class PretrainedWeightsUnavailable(RuntimeError):
    """torchvision weights could not be downloaded (offline and not cached)."""


def _builder(architecture: str):
    from torchvision.models import detection

    builders = {
        "resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
        "mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    }
    if architecture not in builders:
        raise ValueError(f"architecture must be one of {sorted(builders)}, got {architecture!r}")
    return builders[architecture]


def is_local_file(weights: str | None) -> bool:
    """Whether ``weights`` names a file rather than torchvision weights (a path, or a checkpoint's suffix)."""
    if weights is None:
        return False
    return os.sep in weights or "/" in weights or weights.endswith((".pth", ".pt", ".ckpt")) or Path(weights).is_file()


def build_faster_rcnn(
    architecture: Architecture = "resnet50_fpn",
    weights: str | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    detections_per_image: int = 100,
    score_threshold: float = 0.05,
    options: dict | None = None,
) -> nn.Module:
    """A 2-class torchvision Faster R-CNN (see the module docstring for ``weights``).

    ``trainable_backbone_layers``: backbone stages trained from the last (torchvision's meaning; default 3) when
    starting from pretrained weights (whose batch norms are then frozen); a random or local-file start trains
    every layer. ``min_size`` / ``max_size``: torchvision's resizing. ``detections_per_image`` and
    ``score_threshold``: what the model returns per image (all classes' boxes above the threshold, best first).
    ``options``: further keywords of torchvision's ``FasterRCNN`` (e.g. fewer proposals for small images:
    ``rpn_post_nms_top_n_test``, ``box_batch_size_per_image``).
    """
    from torchvision.models import get_weight
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    builder = _builder(architecture)
    options = {
        "min_size": min_size,
        "max_size": max_size,
        "box_detections_per_img": detections_per_image,
        "box_score_thresh": score_threshold,
        **(options or {}),
    }
    name = None if weights is None or weights.lower() == "none" else weights
    if name is None or is_local_file(name):
        model = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **options)
        if name is not None:
            load_detector_weights(model, name)
        return model
    full_name = WEIGHT_NAMES[architecture].get(name.lower(), name)
    try:
        pretrained = get_weight(full_name)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(
            f"weights {weights!r} is neither 'none', 'coco', 'imagenet', a torchvision weights name (e.g. "
            f"{WEIGHT_NAMES[architecture]['coco']}) nor a file"
        ) from None
    is_detector = type(pretrained).__name__.startswith("FasterRCNN")
    try:
        if is_detector:
            model = builder(weights=pretrained, trainable_backbone_layers=trainable_backbone_layers, **options)
        else:
            model = builder(
                weights=None,
                weights_backbone=pretrained,
                num_classes=NUM_CLASSES,
                trainable_backbone_layers=trainable_backbone_layers,
                **options,
            )
    except OSError as error:  # urllib's URLError (offline) is an OSError
        raise PretrainedWeightsUnavailable(
            f"cannot download the torchvision weights {full_name} ({type(error).__name__}): run once online to cache "
            f"them in {torch.hub.get_dir()}/checkpoints/, or put the file {pretrained.url.rsplit('/', 1)[-1]} "
            f"(from {pretrained.url}) there"
        ) from None
    if is_detector:  # the COCO classifier (91 classes) -> background + landmark
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, NUM_CLASSES)
    return model


def load_detector_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local detector state dict or ``LandmarkDetector`` checkpoint into ``model`` (see the module
    docstring). Tensors of another shape are skipped with a note; a missing or unexpected tensor is an error
    naming it (batch-norm step counters aside: frozen batch norms have none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"detector weights {path} not found (expected a torchvision Faster R-CNN state dict, or a .ckpt written "
            "by `fit` with LandmarkDetector)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"detector weights {path} are not a readable PyTorch file: {error}") from None
    state = loaded.get("state_dict", loaded.get("model", loaded)) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"detector weights {path}: expected a state dict, got {type(loaded).__name__}")
    if any(key.startswith(CHECKPOINT_PREFIX) for key in state):
        state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in skipped]
    if missing or unexpected:
        raise ValueError(
            f"detector weights {path} do not fit this architecture: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); is it another architecture?"
        )
    if skipped:
        print(f"detector weights {path}: kept the model's own {', '.join(skipped)} (other shape in the file)")

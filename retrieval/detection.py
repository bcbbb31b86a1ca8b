"""Boxes and their evaluation for the landmark detector (Detect-to-Retrieve), without Lightning.

Two box conventions meet here:

* files (the Google Landmark Boxes CSVs and the detector's predictions): ``ymin xmin ymax xmax`` normalised to
  [0, 1] by the image's height and width, so a box does not depend on how the image was resized;
* detectors (torchvision) and COCO evaluation: ``x1 y1 x2 y2`` in pixels of the image the detector was given;

converted by :func:`retrieval.localisation.gld_box_to_pixels` and :func:`~retrieval.localisation.pixels_to_gld_box`.

:func:`box_average_precision` is the COCO box mAP (torchmetrics' ``MeanAveragePrecision`` with the pycocotools
backend): ``box_mAP`` over IoU thresholds 0.5:0.05:0.95 and ``box_mAP@0.5``, up to 100 detections per image, the
101-point interpolated precision of the COCO evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def flip_horizontally(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, 4]`` ``x1 y1 x2 y2`` pixel boxes of an image of ``width`` pixels, mirrored left to right."""
    flipped = boxes.clone()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return flipped


def box_average_precision(
    predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """COCO box mAP of per-image ``predictions`` (``boxes [n, 4]`` x1 y1 x2 y2, ``scores [n]``, ``labels [n]``)
    against per-image ``targets`` (``boxes``, ``labels``), images in the same order in both.

    Returns ``{"box_mAP": mAP@[.5:.95], "box_mAP@0.5": mAP at IoU 0.5}``, fractions in [0, 1]. Computed in this
    process only (no synchronisation): gather the images first.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(predictions) != len(targets):
        raise ValueError(f"box mAP: {len(predictions)} predictions for {len(targets)} images")
    if not any(len(t["boxes"]) for t in targets):
        raise ValueError("box mAP: no ground-truth box in any image; nothing to score")
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", backend="pycocotools", sync_on_compute=False)

    def cpu(example: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = {key: torch.as_tensor(example[key]).detach().cpu() for key in keys}
        out["boxes"] = out["boxes"].float().reshape(-1, 4)
        out["labels"] = out["labels"].long()
        return out

    metric.update(
        [cpu(p, ("boxes", "scores", "labels")) for p in predictions], [cpu(t, ("boxes", "labels")) for t in targets]
    )
    result = metric.compute()
    return {"box_mAP": float(result["map"]), "box_mAP@0.5": float(result["map_50"])}

"""Image regions for regional aggregation (Detect-to-Retrieve): the whole image plus detected boxes or a fixed
grid, one row per (image, region), and the ids that tie every stored region back to its image.

A regional feature store has one row per region, in image order, each image's whole-image region (number 0)
first, then its boxes by decreasing score; its id is ``<image id>#<region number>`` (:func:`region_id`), so
every local descriptor knows its image and its region, and :func:`group_regions` recovers the images and their
regions' rows from the ids alone. Boxes are ``ymin xmin ymax xmax`` normalised to [0, 1] by the image's height
and width, as in the Google Landmark Boxes files, so they do not depend on how images were resized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

#: Separates an image id from its region number in a regional store's ids.
REGION_SEPARATOR = "#"
#: The whole image as a normalised box.
WHOLE_IMAGE = np.array([0.0, 0.0, 1.0, 1.0])


@dataclass(frozen=True)
class RegionRows:
    """The regions of a list of images, one row per region, image by image.

    ``image``: ``int64 [R]`` row of the region's image in the list; ``number``: ``int64 [R]`` region number
    within its image (0 = whole image when included); ``boxes``: ``float64 [R, 4]`` ``ymin xmin ymax xmax``
    normalised; ``scores``: ``float64 [R]`` detector scores (1 for the whole image and grid cells)."""

    image: np.ndarray
    number: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.image)

    def ids(self, image_ids: Sequence[str]) -> list[str]:
        """Store ids of the rows: ``<image id>#<region number>``."""
        return [region_id(image_ids[i], n) for i, n in zip(self.image.tolist(), self.number.tolist())]


def region_id(image_id: str, number: int) -> str:
    return f"{image_id}{REGION_SEPARATOR}{int(number)}"


def split_region_id(stored_id: str) -> tuple[str, int]:
    """``(image id, region number)`` of a regional store id; errors name the expected form."""
    image_id, separator, number = stored_id.rpartition(REGION_SEPARATOR)
    if not separator or not image_id or not number.isdigit():
        raise ValueError(
            f"{stored_id!r} is not a regional id; expected '<image id>{REGION_SEPARATOR}<region number>' "
            "(a store extracted with the datamodule's regions option)"
        )
    return image_id, int(number)


def group_regions(stored_ids: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """Images of a regional store in order of first appearance, and for each the store rows of its regions.
    Refuses ids that are not regional or an image whose regions are not stored contiguously."""
    image_ids: list[str] = []
    starts: list[int] = []
    seen: set[str] = set()
    for row, stored in enumerate(stored_ids):
        image_id, _ = split_region_id(stored)
        if not image_ids or image_ids[-1] != image_id:
            if image_id in seen:
                raise ValueError(f"the regions of image {image_id!r} are not stored one after the other (row {row})")
            seen.add(image_id)
            image_ids.append(image_id)
            starts.append(row)
    bounds = starts + [len(stored_ids)]
    return image_ids, [np.arange(start, stop) for start, stop in zip(bounds, bounds[1:])]


def grid_boxes(levels: Sequence[int] = (2,)) -> np.ndarray:
    """``[n, 4]`` normalised boxes of a fixed grid: at level ``l``, ``l x l`` square-ish cells of side
    ``2 / (l + 1)`` of the image overlapping by half (R-MAC-like regions without a detector)."""
    boxes = []
    for level in levels:
        if int(level) < 1:
            raise ValueError(f"grid levels must be at least 1, got {level}")
        level = int(level)
        side = 2.0 / (level + 1)
        starts = [i * side / 2 for i in range(level)]
        boxes += [[y, x, y + side, x + side] for y in starts for x in starts]
    return np.clip(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)


def region_rows(
    image_ids: Sequence[str],
    boxes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    grid: Sequence[int] | None = None,
    min_score: float = 0.1,
    max_regions: int | None = None,
    whole_image: bool = True,
) -> RegionRows:
    """The regions of every image: the whole image (``whole_image``), then either its ``boxes`` (``{id: (boxes
    [n, 4], scores [n])}``, keyed by the image id or by its file name without extension, as in the Google
    Landmark Boxes files) with a score of at least ``min_score``, by decreasing score, at most ``max_regions``
    of them; or the cells of a fixed ``grid`` (:func:`grid_boxes`). Images without boxes keep the whole image."""
    if (boxes is None) == (grid is None):
        raise ValueError("regions come from detected boxes or from a fixed grid: give exactly one of them")
    if max_regions is not None and max_regions < 0:
        raise ValueError(f"max_regions must be at least 0, got {max_regions}")
    if not whole_image and grid is None and max_regions == 0:
        raise ValueError("no region left: whole_image is off and max_regions is 0")
    cells = grid_boxes(grid) if grid is not None else None
    image, number, kept_boxes, scores = [], [], [], []
    for row, image_id in enumerate(image_ids):
        if cells is not None:
            own, own_scores = cells, np.ones(len(cells))
        else:
            own, own_scores = _boxes_of(image_id, boxes)
            keep = np.flatnonzero(own_scores >= min_score)
            keep = keep[np.argsort(-own_scores[keep], kind="stable")]
            own, own_scores = own[keep], own_scores[keep]
        if max_regions is not None:
            own, own_scores = own[:max_regions], own_scores[:max_regions]
        if whole_image:
            own = np.concatenate([WHOLE_IMAGE[None], own])
            own_scores = np.concatenate([[1.0], own_scores])
        start = 0 if whole_image else 1
        image += [row] * len(own)
        number += list(range(start, start + len(own)))
        kept_boxes.append(own)
        scores.append(own_scores)
    return RegionRows(
        np.array(image, dtype=np.int64),
        np.array(number, dtype=np.int64),
        np.concatenate(kept_boxes).reshape(-1, 4) if kept_boxes else np.zeros((0, 4)),
        np.concatenate(scores) if scores else np.zeros(0),
    )


def _boxes_of(image_id: str, boxes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    found = boxes.get(image_id)
    if found is None:
        found = boxes.get(PurePosixPath(image_id).stem)
    if found is None:
        return np.zeros((0, 4)), np.zeros(0)
    own, own_scores = (np.asarray(v, dtype=np.float64) for v in found)
    return own.reshape(-1, 4), own_scores.reshape(-1)

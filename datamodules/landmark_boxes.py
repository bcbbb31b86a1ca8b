"""Google Landmark Boxes (Detect-to-Retrieve, Teichmann et al., CVPR 2019): landmark bounding boxes on Google
Landmarks training images, to train and validate the landmark detector (:class:`lightning_modules.d2r.LandmarkDetector`).

Layout (``train_boxes`` / ``val_boxes`` relative to ``root`` or absolute)::

    <root>/train/<a>/<b>/<c>/<id>.jpg    Google Landmarks (v1 or v2) training images, a/b/c = the id's first
                                         three characters
    boxes_split1.csv                     training boxes: header id,box; one row per box, several rows per image
    boxes_split2.csv                     allowed; box = 'ymin xmin ymax xmax' normalised to [0, 1] by the image's
                                         height and width (validation: images of other landmarks)

The detector's predictions are written in the same format with a score column (``id,box,score``, score with 4
decimals; :func:`write_scored_boxes`, read back with :func:`read_scored_boxes`, which also reads the published
files without scores). :func:`read_landmark_boxes` reads a boxes file as ``{id: boxes}``; errors name the file
and the line.

:class:`LandmarkBoxes` gives batches of variable-size images, each resized so that its longer side is
``image_size`` (aspect ratio kept): ``{"index": int64 [B], "image": [3, H, W] float in [0, 1] per example,
"targets": {"boxes": float [n, 4] x1 y1 x2 y2 in pixels of the resized image, "labels": int64 [n] all 1}
per example}`` (torchvision's detectors normalise and resize on their own). Training images are flipped left to
right with ``flip_probability``, boxes with them. Data placement is the project's (:mod:`datamodules.sampling`):
the same global training batches with 1 or N processes; validation is sharded, and the detector gathers its
detections by index, so 1 and N processes score the same images once each. It has no retrieval evaluation sets:
the detector's validation metric is its box mAP on ``val_boxes``
(:meth:`lightning_modules.d2r.LandmarkDetector.evaluation_metrics`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import EvalSet, EvalStage, RetrievalDataModule
from datamodules.gldv2 import image_path
from datamodules.images import ImageTransform, load_image
from datamodules.layout import DatasetFormatError, DatasetLayoutError, read_csv_rows, require_file
from retrieval.detection import flip_horizontally
from retrieval.files import replace_atomically
from retrieval.localisation import gld_box_to_pixels

BOXES_HEADER = ["id", "box"]
SCORED_BOXES_HEADER = ["id", "box", "score"]
BOXES_FORMAT = "header id,box; box = 'ymin xmin ymax xmax' normalised to [0, 1] by the image height and width"
SCORED_BOXES_FORMAT = f"{BOXES_FORMAT}; optional third column score (header id,box,score)"
BOX_FILES = ("boxes_split1.csv", "boxes_split2.csv", "boxes_eval.csv")
EXPECTED_TREE = """<root>/train/<a>/<b>/<c>/<id>.jpg   (a, b, c: the id's first three characters)
boxes_split1.csv, boxes_split2.csv  (header id,box; box = 'ymin xmin ymax xmax' normalised to [0, 1])"""


# ---- files -----------------------------------------------------------------------------------------------------------


def _parse_box(path: Path, line: int, text: str, expected: str) -> list[float]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise DatasetFormatError(f"{path}:{line}: box {text!r} is not four numbers; expected {expected}")
    ymin, xmin, ymax, xmax = values
    if not (0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1):
        raise DatasetFormatError(
            f"{path}:{line}: box {text!r} is not inside [0, 1] with ymin < ymax and xmin < xmax; expected {expected}"
        )
    return values


def read_landmark_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """A Google-Landmark-Boxes-style CSV (header ``id,box``; ``box`` = ``ymin xmin ymax xmax`` normalised to [0, 1];
    one row per box) as ``{id: [n, 4] float64}``, rows of an id in file order. Errors name the file and the line."""
    path = require_file(path, "Landmark boxes", f"{path}: {BOXES_FORMAT}")
    boxes: dict[str, list[list[float]]] = {}
    for line, row in read_csv_rows(path, BOXES_HEADER, "Landmark boxes"):
        image_id = row["id"].strip()
        if not image_id:
            raise DatasetFormatError(f"{path}:{line}: empty id; expected {BOXES_FORMAT}")
        boxes.setdefault(image_id, []).append(_parse_box(path, line, row["box"], BOXES_FORMAT))
    return {image_id: np.array(rows, dtype=np.float64) for image_id, rows in boxes.items()}


def read_scored_boxes(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A boxes CSV with or without scores (``id,box,score`` as ``predict`` with the detector writes it, or the
    published ``id,box``) as ``{id: (boxes [n, 4] float64 ymin xmin ymax xmax, scores [n] float64)}``, rows of an
    id in file order; a file without scores gives every box the score 1. Errors name the file and the line."""
    path = require_file(path, "Landmark boxes", f"{path}: {SCORED_BOXES_FORMAT}")
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    columns = SCORED_BOXES_HEADER if header is not None and len(header) == 3 else BOXES_HEADER
    found: dict[str, tuple[list, list]] = {}
    for line, row in read_csv_rows(path, columns, "Landmark boxes"):
        image_id = row["id"].strip()
        if not image_id:
            raise DatasetFormatError(f"{path}:{line}: empty id; expected {SCORED_BOXES_FORMAT}")
        box = _parse_box(path, line, row["box"], SCORED_BOXES_FORMAT)
        try:
            score = float(row.get("score", 1.0))
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DatasetFormatError(
                f"{path}:{line}: score {row['score']!r} is not a number; expected {SCORED_BOXES_FORMAT}"
            )
        boxes, scores = found.setdefault(image_id, ([], []))
        boxes.append(box)
        scores.append(score)
    return {
        image_id: (np.array(boxes, dtype=np.float64), np.array(scores, dtype=np.float64))
        for image_id, (boxes, scores) in found.items()
    }


def write_scored_boxes(path: str | Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> int:
    """Write ``(id, boxes [n, 4] ymin xmin ymax xmax normalised, scores [n])`` per image as ``id,box,score`` (box
    with 6 decimals, score with 4), atomically; an image without boxes has no row, and a box that rounds to
    nothing is left out. Returns the number of rows written."""
    count = 0
    with replace_atomically(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SCORED_BOXES_HEADER)
        for image_id, boxes, scores in rows:
            for box, score in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores).reshape(-1)):
                ymin, xmin, ymax, xmax = (round(float(v), 6) for v in box)
                if ymin < ymax and xmin < xmax:
                    writer.writerow([image_id, f"{ymin:.6f} {xmin:.6f} {ymax:.6f} {xmax:.6f}", f"{float(score):.4f}"])
                    count += 1
    return count


# ---- dataset -----------------------------------------------------------------------------------------------------------


class LandmarkBoxDataset(Dataset):
    """The images of ``boxes`` (``{id: [n, 4] normalised}``, from :func:`read_landmark_boxes`) under ``root``'s
    ``train/a/b/c/<id>.jpg``, resized to a longer side of ``image_size`` (``None``: as stored), with their boxes
    in pixels, flipped with ``flip_probability`` (torch's global generator, seeded per worker)."""

    def __init__(
        self,
        root: str | Path,
        boxes: Mapping[str, np.ndarray],
        image_size: int | None = None,
        flip_probability: float = 0.0,
    ):
        self.root = Path(root)
        self.boxes = dict(boxes)
        self._ids = list(self.boxes)
        self.transform = ImageTransform(image_size, "longer_side") if image_size else None
        self.flip_probability = flip_probability

    @property
    def ids(self) -> list[str]:
        return self._ids

    def path(self, index: int) -> Path:
        return self.root / image_path("train", self._ids[index])

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self._ids[index]
        image = load_image(self.path(index))  # a missing or undecodable file raises, naming it
        if self.transform is not None:
            pixels, _ = self.transform(image)
        else:
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        height, width = pixels.shape[1:]
        boxes = torch.from_numpy(gld_box_to_pixels(self.boxes[image_id], width, height)).float()
        if self.flip_probability and float(torch.rand(())) < self.flip_probability:
            pixels, boxes = pixels.flip(-1), flip_horizontally(boxes, width)
        targets = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return {"index": index, "image": pixels, "targets": targets}


def collate_boxes(examples: list[dict]) -> dict:
    """Images of different sizes stay a list: ``{"index": int64 [B], "image": [...], "targets": [...]}``."""
    return {
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.int64),
        "image": [e["image"] for e in examples],
        "targets": [e["targets"] for e in examples],
    }


# ---- datamodule -------------------------------------------------------------------------------------------------------


class LandmarkBoxes(RetrievalDataModule):
    """Google Landmark Boxes for training and validating the landmark detector (see the module docstring).

    Args:
        root: a Google Landmarks training image directory (``<root>/train/<a>/<b>/<c>/<id>.jpg``).
        train_boxes, val_boxes: the boxes CSVs, relative to ``root`` or absolute (published: ``boxes_split1.csv``
            for training, ``boxes_split2.csv`` for validation).
        image_size: the longer side images are resized to, aspect ratio kept (``None``: as stored). The
            detector resizes again to its ``min_size`` / ``max_size``; this only bounds decoding and transfer.
        flip_probability: horizontal flip of training images and their boxes.
        check_files: check on ``setup`` that every image of the boxes files exists (one ``stat`` per image).
        batch_size: the global training batch (images), split across processes; ``eval_batch_size`` per process.
        num_workers, shuffle_seed: see :class:`~datamodules.base.RetrievalDataModule`.

    ``predict`` runs over the validation images (named after ``val_boxes``, e.g. ``boxes_split2``).
    """

    name = "landmark_boxes"

    def __init__(
        self,
        root: str,
        train_boxes: str = "boxes_split1.csv",
        val_boxes: str = "boxes_split2.csv",
        image_size: int | None = 1024,
        flip_probability: float = 0.5,
        check_files: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        if image_size is not None and image_size < 1:
            raise ValueError(f"{type(self).__name__}: image_size must be positive or null, got {image_size}")
        if not 0 <= flip_probability <= 1:
            raise ValueError(f"{type(self).__name__}: flip_probability must be in [0, 1], got {flip_probability}")
        self.root = Path(root)
        self.train_boxes, self.val_boxes = train_boxes, val_boxes
        self.image_size = image_size
        self.flip_probability = flip_probability
        self.check_files = check_files
        self._boxes: dict[str, dict[str, np.ndarray]] = {}

    def boxes_path(self, which: str) -> Path:
        """The ``train`` or ``val`` boxes file, resolved against ``root`` when relative."""
        path = Path(self.train_boxes if which == "train" else self.val_boxes)
        return path if path.is_absolute() else self.root / path

    def boxes(self, which: str) -> dict[str, np.ndarray]:
        """``{id: [n, 4] normalised}`` of the ``train`` or ``val`` boxes file (read once)."""
        if which not in self._boxes:
            self._boxes[which] = read_landmark_boxes(self.boxes_path(which))
        return self._boxes[which]

    def setup(self, stage: str | None = None) -> None:
        used = {"fit": ["train", "val"], "validate": ["val"], "predict": ["val"]}.get(stage, [])
        for which in used:
            boxes = self.boxes(which)
            if self.check_files:
                self._check_images_exist(which, boxes)

    def _check_images_exist(self, which: str, boxes: Mapping[str, np.ndarray]) -> None:
        missing = [i for i in boxes if not (self.root / image_path("train", i)).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{type(self).__name__}: {len(missing)} of {len(boxes)} images of {self.boxes_path(which)} are "
                f"missing under {self.root}, e.g. {self.root / image_path('train', missing[0])}\n"
                f"Expected layout:\n{EXPECTED_TREE}"
            )

    def dataset(self, which: str) -> LandmarkBoxDataset:
        flip = self.flip_probability if which == "train" else 0.0
        return LandmarkBoxDataset(self.root, self.boxes(which), self.image_size, flip)

    def train_dataset(self) -> Dataset:
        return self.dataset("train")

    def build_eval_sets(self, stage: EvalStage) -> list[EvalSet]:
        return []  # no retrieval evaluation: the detector scores its boxes (box mAP on val_boxes)

    def val_dataloader(self) -> list[DataLoader]:
        """The validation images, sharded over processes (padding repeats are dropped by index when scoring)."""
        return [self.sharded_dataloader(self.dataset("val"))]

    def predict_datasets(self) -> dict[str, Dataset]:
        return {Path(self.val_boxes).stem: self.dataset("val")}

    def collate_fn(self):
        return collate_boxes

"""Revisited Oxford and Paris (Radenovic et al., CVPR 2018), with the optional 1M distractors.

Layout (as the ``revisitop`` code expects it)::

    <root>/roxford5k/gnd_roxford5k.pkl        imlist, qimlist, gnd[{bbx, easy, hard, junk}] (0-based)
    <root>/roxford5k/jpg/<imlist[i]>.jpg      database images; queries are <qimlist[j]>.jpg in the same folder
    <root>/rparis6k/gnd_rparis6k.pkl, <root>/rparis6k/jpg/...
    <root>/revisitop1m/revisitop1m.txt        one relative image path per line
    <root>/revisitop1m/jpg/<path>

Real sizes: ROxford5k 4,993 database images and 70 queries, RParis6k 6,322 and 70, R1M 1,001,001
distractors. Queries are cropped to their ``bbx`` (x1, y1, x2, y2 in pixels) as in the published code.
Protocol: mAP and mP@{1, 5, 10} for the easy, medium and hard setups (:func:`retrieval.metrics.revisited_map`);
the distractors are appended after the database, so the ground-truth indices do not change.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from datamodules.layout import DatasetFormatError, require_file
from retrieval.ground_truth import RevisitedGroundTruth

NAMES = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"
EXPECTED_TREE = """\
<root>/
  roxford5k/gnd_roxford5k.pkl   roxford5k/jpg/all_souls_000000.jpg ...
  rparis6k/gnd_rparis6k.pkl     rparis6k/jpg/paris_defense_000000.jpg ...
  revisitop1m/revisitop1m.txt   revisitop1m/jpg/...   (optional 1M distractors)
"""


@dataclass
class RevisitedDataset:
    name: str
    database_paths: list[str]  # relative to the root
    query_paths: list[str]
    query_boxes: np.ndarray  # [num_queries, 4] x1, y1, x2, y2 in pixels
    gnd: list[dict]

    def ground_truth(self, kappas=(1, 5, 10)) -> RevisitedGroundTruth:
        return RevisitedGroundTruth(self.gnd, len(self.database_paths), kappas)

    def with_distractors(self, distractor_paths: list[str]) -> RevisitedDataset:
        """The database extended by distractors at the end (ground-truth indices unchanged)."""
        return replace(self, name=f"{self.name}+1m", database_paths=self.database_paths + list(distractor_paths))


def read_revisited(root: str | Path, name: str) -> RevisitedDataset:
    if name not in NAMES:
        raise ValueError(f"Revisited datasets are {NAMES}, got {name!r}")
    path = require_file(Path(root) / name / f"gnd_{name}.pkl", "Revisited Oxford/Paris", EXPECTED_TREE)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
        imlist, qimlist, gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise DatasetFormatError(
            f"{path} is not a Revisited ground-truth pickle ({type(error).__name__}: {error}); expected a dict with "
            "imlist, qimlist and gnd (per query: bbx, easy, hard, junk)"
        ) from error
    if len(gnd) != len(qimlist):
        raise DatasetFormatError(f"{path}: {len(qimlist)} queries in qimlist but {len(gnd)} entries in gnd")
    boxes = []
    for q, entry in enumerate(gnd):
        missing = {"bbx", "easy", "hard", "junk"} - set(entry)
        if missing:
            raise DatasetFormatError(f"{path}: gnd[{q}] lacks {sorted(missing)}")
        for key in ("easy", "hard", "junk"):
            indices = np.asarray(entry[key], dtype=np.int64)
            if len(indices) and (indices.min() < 0 or indices.max() >= len(imlist)):
                raise DatasetFormatError(f"{path}: gnd[{q}]['{key}'] indexes outside imlist (0..{len(imlist) - 1})")
        box = np.asarray(entry["bbx"], dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not (box[0] < box[2] and box[1] < box[3]):
            raise DatasetFormatError(f"{path}: gnd[{q}]['bbx'] = {entry['bbx']}; expected [x1, y1, x2, y2], x1 < x2, y1 < y2")
        boxes.append(box)
    return RevisitedDataset(
        name=name,
        database_paths=[f"{name}/jpg/{image}.jpg" for image in imlist],
        query_paths=[f"{name}/jpg/{image}.jpg" for image in qimlist],
        query_boxes=np.stack(boxes) if boxes else np.zeros((0, 4)),
        gnd=[{k: list(entry[k]) for k in ("easy", "hard", "junk")} for entry in gnd],
    )


def read_distractors(root: str | Path) -> list[str]:
    """Paths (relative to the root) of the 1M distractors listed in ``revisitop1m/revisitop1m.txt``."""
    path = require_file(Path(root) / DISTRACTORS / f"{DISTRACTORS}.txt", "Revisited 1M distractors", EXPECTED_TREE)
    return [f"{DISTRACTORS}/jpg/{line.strip()}" for line in path.read_text().splitlines() if line.strip()]

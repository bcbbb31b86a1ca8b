"""Stanford Online Products (Song et al., CVPR 2016): the published layout and protocol.

Layout (as distributed)::

    <root>/Ebay_train.txt      header "image_id class_id super_class_id path", one image per line
    <root>/Ebay_test.txt
    <root>/<super_class>_final/<class>_<n>.JPG   the paths listed in the two files

Real sizes: 59,551 training images of classes 1-11,318 and 60,502 test images of classes 11,319-22,634
(12 super classes). Protocol: every test image is a query against all the others, itself excluded
(leave-one-out); Recall@{1, 10, 100, 1000}, and mAP@k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.images import EvalSpec, ImageBenchmark, ImageList
from datamodules.layout import DatasetFormatError, require_file
from retrieval.ground_truth import LabelGroundTruth

HEADER = ["image_id", "class_id", "super_class_id", "path"]
EXPECTED_TREE = """\
<root>/
  Ebay_train.txt   image_id class_id super_class_id path
  Ebay_test.txt
  bicycle_final/111085122871_0.JPG ...
"""
RECALL_KS = (1, 10, 100, 1000)


@dataclass
class SOPSplit:
    paths: list[str]  # relative to the root
    class_ids: np.ndarray
    super_class_ids: np.ndarray


def read_sop_split(root: str | Path, split: str) -> SOPSplit:
    """Read ``Ebay_train.txt`` (``split="train"``) or ``Ebay_test.txt`` (``split="test"``)."""
    if split not in ("train", "test"):
        raise ValueError(f"SOP splits are 'train' and 'test', got {split!r}")
    path = require_file(Path(root) / f"Ebay_{split}.txt", "Stanford Online Products", EXPECTED_TREE)
    lines = path.read_text().splitlines()
    if not lines or lines[0].split() != HEADER:
        raise DatasetFormatError(f"{path}:1 should be the header '{' '.join(HEADER)}', got {lines[:1]}")
    paths, classes, super_classes = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
            raise DatasetFormatError(f"{path}:{number}: expected 'image_id class_id super_class_id path', got {line!r}")
        classes.append(int(fields[1]))
        super_classes.append(int(fields[2]))
        paths.append(fields[3])
    return SOPSplit(paths, np.asarray(classes, dtype=np.int64), np.asarray(super_classes, dtype=np.int64))


def sop_ground_truth(split: SOPSplit, recall_ks=RECALL_KS, map_ks=(100,)) -> LabelGroundTruth:
    """Leave-one-out: same class = relevant, the query itself excluded."""
    return LabelGroundTruth(split.class_ids, None, recall_ks=recall_ks, map_ks=map_ks)


class StanfordOnlineProducts(ImageBenchmark):
    """Stanford Online Products from its published layout (see the module docstring for layout and sizes).

    Lists: ``train`` (``Ebay_train.txt``) and ``test`` (``Ebay_test.txt``), labelled by class. SOP has no
    validation split; validation evaluates the test split, as the metric-learning literature does.

    Args:
        root: the ``Stanford_Online_Products`` directory.
        recall_ks, map_ks: cut-offs of Recall@k and mAP@k.
        **kwargs: images or stored features, batch sizes, ... (:class:`~datamodules.images.ImageBenchmark`).
    """

    name = "sop"
    expected_tree = EXPECTED_TREE

    def __init__(self, root: str, recall_ks: tuple[int, ...] = RECALL_KS, map_ks: tuple[int, ...] = (100,), **kwargs):
        super().__init__(root, **kwargs)
        self.recall_ks, self.map_ks = tuple(recall_ks), tuple(map_ks)

    def read_lists(self) -> dict[str, ImageList]:
        self.splits = {split: read_sop_split(self.root, split) for split in ("train", "test")}
        return {split: ImageList(s.paths, labels=s.class_ids) for split, s in self.splits.items()}

    def train_list(self) -> str:
        return "train"

    def eval_specs(self, stage) -> list[EvalSpec]:
        self.lists  # noqa: B018 - reads the splits
        ground_truth = sop_ground_truth(self.splits["test"], self.recall_ks, self.map_ks)
        return [EvalSpec("sop", ground_truth, database=["test"])]

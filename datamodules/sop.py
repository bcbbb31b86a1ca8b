"""Stanford Online Products (Song et al., CVPR 2016): the published layout and protocol.

Layout (as distributed)::

    <root>/Ebay_train.txt      header "image_id class_id super_class_id path", one image per line
    <root>/Ebay_test.txt
    <root>/<super_class>_final/<class>_<n>.JPG   the paths listed in the two files

Real sizes: 59,551 training images of classes 1-11,318 and 60,502 test images of classes 11,319-22,634
(12 super classes). Protocol: every test image is a query against all the others, itself excluded
(leave-one-out); Recall@{1, 10, 100, 1000}, and mAP@k (mAP@4 is the AE-SVC paper's metric; definition in
:func:`retrieval.metrics.map_at_k`).

SOP publishes no validation split, and selecting on the test split would be selection on test data, so a
validation split is held out from the *training classes*: ``val_fraction`` of them (default 10%: 1,132 of
11,318 classes, about 5,950 images), drawn with ``val_seed``, scored leave-one-out like the test split; training
uses the other classes. The published lists stay whole (features are extracted per list), the split is a
subset of ``train``.
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
MAP_KS = (4, 100)


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


def sop_ground_truth(class_ids, recall_ks=RECALL_KS, map_ks=MAP_KS) -> LabelGroundTruth:
    """Leave-one-out: same class = relevant, the query itself excluded."""
    return LabelGroundTruth(class_ids, None, recall_ks=recall_ks, map_ks=map_ks)


def held_out_classes(class_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded choice of ``round(fraction * #classes)`` (at least one when ``fraction > 0``) of the distinct
    ``class_ids`` (sorted)."""
    classes = np.unique(class_ids)
    count = max(int(round(fraction * len(classes))), int(fraction > 0))
    return np.sort(np.random.default_rng(seed).choice(classes, size=count, replace=False))


class StanfordOnlineProducts(ImageBenchmark):
    """Stanford Online Products from its published layout (see the module docstring for layout and sizes).

    Lists: ``train`` (``Ebay_train.txt``) and ``test`` (``Ebay_test.txt``), labelled by class; subsets of
    ``train``: ``val`` (the held-out classes) and ``train_without_val`` (what ``fit`` trains on). Validation
    scores ``val``, test scores ``test``, both leave-one-out.

    Args:
        root: the ``Stanford_Online_Products`` directory.
        val_fraction: fraction of the training classes held out for validation (0: no validation; train on all).
        val_seed: seed of the held-out classes.
        recall_ks, map_ks: cut-offs of Recall@k and mAP@k.
        **kwargs: images or stored features, batch sizes, ... (:class:`~datamodules.images.ImageBenchmark`).
    """

    name = "sop"
    expected_tree = EXPECTED_TREE

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        recall_ks: tuple[int, ...] = RECALL_KS,
        map_ks: tuple[int, ...] = MAP_KS,
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction, self.val_seed = val_fraction, val_seed
        self.recall_ks, self.map_ks = tuple(recall_ks), tuple(map_ks)
        self._subsets: dict[str, tuple[str, np.ndarray]] | None = None

    def read_lists(self) -> dict[str, ImageList]:
        self.splits = {split: read_sop_split(self.root, split) for split in ("train", "test")}
        return {split: ImageList(s.paths, labels=s.class_ids) for split, s in self.splits.items()}

    def subsets(self) -> dict[str, tuple[str, np.ndarray]]:
        if self._subsets is None:
            classes = self.lists["train"].labels
            is_val = np.isin(classes, held_out_classes(classes, self.val_fraction, self.val_seed))
            self._subsets = {
                "val": ("train", np.flatnonzero(is_val)),
                "train_without_val": ("train", np.flatnonzero(~is_val)),
            }
        return self._subsets

    def train_list(self) -> str:
        return "train_without_val" if self.val_fraction > 0 else "train"

    def eval_specs(self, stage) -> list[EvalSpec]:
        if stage == "val":
            if self.val_fraction == 0:
                return []
            rows = self.subsets()["val"][1]
            return [
                EvalSpec(
                    "sop", sop_ground_truth(self.lists["train"].labels[rows], self.recall_ks, self.map_ks), ["val"]
                )
            ]
        self.lists  # noqa: B018 - reads the splits
        return [EvalSpec("sop", sop_ground_truth(self.splits["test"].class_ids, self.recall_ks, self.map_ks), ["test"])]

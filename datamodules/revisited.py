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

from datamodules.images import EvalSpec, ImageBenchmark, ImageList
from datamodules.layout import DatasetFormatError, require_file
from retrieval.ground_truth import RevisitedGroundTruth
from retrieval.metrics import rop_map

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
    """``<root>/<name>/gnd_<name>.pkl`` and its image paths: ``roxford5k``, ``rparis6k`` or any dataset written in
    the same layout (e.g. the generated ``rlandmarks`` of :mod:`datamodules.generated_landmarks`)."""
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
            raise DatasetFormatError(
                f"{path}: gnd[{q}]['bbx'] = {entry['bbx']}; expected [x1, y1, x2, y2], x1 < x2, y1 < y2"
            )
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


class RevisitedOxfordParis(ImageBenchmark):
    """Revisited Oxford and/or Paris, optionally with the 1M distractors (see the module docstring).

    Lists: ``<name>_query`` (cropped to their boxes), ``<name>_database`` for each dataset, and
    ``revisitop1m`` with distractors, which is appended to every database (extracted once, shared).
    Each dataset is one evaluation set (``roxford5k`` or ``roxford5k+1m``) of ``test`` only: the benchmark has
    no training or validation data, so nothing may be selected on it (no validation, no best checkpoint; methods
    that need validation validate on GLDv2, as AMES does). With both datasets, ``test/rop/mAP`` is the AMES
    paper's ROP: the mean of medium and hard mAP over the two. The distractor list is one evaluation part shared
    by both databases, embedded once per evaluation.

    The benchmark has no training split: ``train_on`` names the list an unsupervised method fits on, e.g.
    ``revisitop1m`` (the distractors, disjoint from both test sets; read even when ``distractors`` is off)
    or ``rparis6k_database`` to test on Oxford only.

    Args:
        root: the directory holding ``roxford5k/``, ``rparis6k/`` and optionally ``revisitop1m/``.
        datasets: ``roxford5k``, ``rparis6k`` or both (the default), or other datasets in the same layout
            (``<root>/<name>/gnd_<name>.pkl``, ``<root>/<name>/jpg/``), each evaluated under its own name.
        distractors: append the 1M distractors to the databases.
        train_on: the list ``fit`` trains on.
        kappas: the k of mP@k.
        **kwargs: images or stored features, batch sizes, ... (:class:`~datamodules.images.ImageBenchmark`).
    """

    name = "revisited"
    expected_tree = EXPECTED_TREE

    def __init__(
        self,
        root: str,
        datasets: tuple[str, ...] = NAMES,
        distractors: bool = False,
        train_on: str | None = None,
        kappas: tuple[int, ...] = (1, 5, 10),
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        # Any name in the Revisited layout is accepted; a missing <name>/gnd_<name>.pkl is reported when read.
        if not datasets or len(set(datasets)) != len(datasets):
            raise ValueError(f"Revisited datasets: give one or more distinct names, e.g. {NAMES}; got {list(datasets)}")
        self.datasets, self.distractors, self.train_on, self.kappas = (
            tuple(datasets),
            distractors,
            train_on,
            tuple(kappas),
        )

    def read_lists(self) -> dict[str, ImageList]:
        self.revisited = {name: read_revisited(self.root, name) for name in self.datasets}
        lists = {}
        for name, dataset in self.revisited.items():
            lists[f"{name}_query"] = ImageList(dataset.query_paths, boxes=dataset.query_boxes)
            lists[f"{name}_database"] = ImageList(dataset.database_paths)
        if self.distractors or self.train_on == DISTRACTORS:
            self.distractor_paths = read_distractors(self.root)
            lists[DISTRACTORS] = ImageList(self.distractor_paths)
        return lists

    def train_list(self) -> str:
        if self.train_on is None:
            raise ValueError(
                "Revisited Oxford/Paris has no training split: set train_on to the list to fit on, one of "
                f"{sorted(self.lists)}"
            )
        return self.train_on

    def eval_specs(self, stage) -> list[EvalSpec]:
        if stage == "val":  # test data only: see the class docstring
            return []
        specs = []
        for name in self.datasets:
            self.lists  # noqa: B018 - reads the ground truth
            dataset = self.revisited[name]
            database = [f"{name}_database"]
            if self.distractors:
                dataset = dataset.with_distractors(self.distractor_paths)
                database.append(DISTRACTORS)
            specs.append(EvalSpec(dataset.name, dataset.ground_truth(self.kappas), database, query=f"{name}_query"))
        return specs

    def summary_metrics(self, stage, metrics: dict[str, float]) -> dict[str, float]:
        suffix = "+1m" if self.distractors else ""
        if not set(NAMES) <= set(self.datasets):  # ROP is defined on ROxford and RParis only
            return {}
        prefixes = [f"{stage}/{name}{suffix}/" for name in NAMES]
        results = [{k[len(p) :]: v for k, v in metrics.items() if k.startswith(p)} for p in prefixes]
        if not all(results):
            return {}
        return {f"{stage}/rop{suffix}/mAP": rop_map(results)}

"""Google Landmarks v2 (Weyand et al., CVPR 2020): the published layout, training-set selection and protocol.

Layout (as distributed)::

    <root>/train.csv                      id,url,landmark_id
    <root>/train_clean.csv                landmark_id,images   (space-separated train ids)
    <root>/index.csv                      id
    <root>/test.csv                       id
    <root>/retrieval_solution_v2.1.csv    id,images,Usage      (images: space-separated index ids, or None;
                                                                Usage: Public, Private or Ignored)
    <root>/{train,index,test}/<a>/<b>/<c>/<id>.jpg               a, b, c: the first three characters of the id

Real sizes: 4,132,914 training images of 203,094 landmarks (clean: 1,580,470 of 81,313), 761,757 index
images, 117,577 test images of which 379 Public and 750 Private retrieval queries (v2.1). Protocol: mAP@100
over the index, reported separately for the Public and the Private queries; Ignored queries are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.images import EvalSpec, ImageBenchmark, ImageList
from datamodules.layout import DatasetFormatError, read_csv_rows, require_file
from retrieval.ground_truth import GLDv2GroundTruth

EXPECTED_TREE = """\
<root>/
  train.csv  train_clean.csv  index.csv  test.csv  retrieval_solution_v2.1.csv
  train/0/1/2/0123456789abcdef.jpg ...
  index/...  test/...
"""
DATASET = "Google Landmarks v2"
SOLUTION = "retrieval_solution_v2.1.csv"


def image_path(split: str, image_id: str) -> str:
    """``<split>/<a>/<b>/<c>/<id>.jpg``, relative to the root."""
    return f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


@dataclass
class GLDv2Retrieval:
    index_ids: list[str]
    query_ids: list[str]  # the scored (Public and Private) queries, in solution-file order
    query_subsets: list[str]  # "public" or "private"
    positives: list[np.ndarray]  # per query, positions in index_ids

    def ground_truth(self, k: int = 100, rows=None) -> GLDv2GroundTruth:
        """The protocol over all scored queries, or over the queries at ``rows``."""
        rows = range(len(self.query_ids)) if rows is None else rows
        positives, subsets = [self.positives[i] for i in rows], [self.query_subsets[i] for i in rows]
        return GLDv2GroundTruth(positives, subsets, len(self.index_ids), k)


def read_gldv2_retrieval(root: str | Path) -> GLDv2Retrieval:
    """Read the index list, the test list and the retrieval solution, checking they agree."""
    root = Path(root)
    index_ids = _read_ids(root / "index.csv")
    test_ids = set(_read_ids(root / "test.csv"))
    position = {image_id: i for i, image_id in enumerate(index_ids)}
    solution = require_file(root / SOLUTION, DATASET, EXPECTED_TREE)
    query_ids, subsets, positives = [], [], []
    for line, row in read_csv_rows(solution, ["id", "images", "Usage"], DATASET):
        usage = row["Usage"].strip()
        if usage == "Ignored":
            continue
        if usage not in ("Public", "Private"):
            raise DatasetFormatError(f"{solution}:{line}: Usage {usage!r}; expected Public, Private or Ignored")
        if row["id"] not in test_ids:
            raise DatasetFormatError(f"{solution}:{line}: query {row['id']} is not listed in {root / 'test.csv'}")
        images = row["images"].split()
        if not images or images == ["None"]:
            raise DatasetFormatError(
                f"{solution}:{line}: {usage} query {row['id']} has no index images; only Ignored rows may be empty"
            )
        missing = [i for i in images if i not in position]
        if missing:
            raise DatasetFormatError(
                f"{solution}:{line}: index images {missing[:3]} of query {row['id']} are not listed in {root / 'index.csv'}"
            )
        query_ids.append(row["id"])
        subsets.append(usage.lower())
        positives.append(np.array(sorted(position[i] for i in images), dtype=np.int64))
    return GLDv2Retrieval(index_ids, query_ids, subsets, positives)


@dataclass(frozen=True)
class TinyGLDv2:
    """Tiny-GLDv2: the GLDv2 retrieval protocol on a small, reproducible index.

    Definition (from the published files only): the queries are all scored queries of
    ``retrieval_solution_v2.1.csv`` (Public and Private, as in GLDv2); the index is every index image that is a
    positive of a scored query (the landmarks being searched for) plus ``distractors`` other images of
    ``index.csv``, drawn without replacement by ``numpy.random.default_rng(seed).choice`` over those other images
    in ``index.csv`` order; the kept images stay in ``index.csv`` order. With v2.1 and the defaults: the 1,129
    scored queries (379 Public, 750 Private), their positives and 10,000 distractors, against the 761,757 images of
    the whole index. Metrics are those of GLDv2 (mAP@100 per subset), logged under ``tiny_gldv2``. The index is a subset of the ``index`` list, so
    the stores extracted for GLDv2 serve it unchanged.
    """

    distractors: int = 10_000
    seed: int = 0

    def index_rows(self, retrieval: GLDv2Retrieval) -> np.ndarray:
        """Rows of ``index.csv`` kept, in file order."""
        if self.distractors < 0:
            raise ValueError(f"Tiny-GLDv2 distractors must be >= 0, got {self.distractors}")
        positives = np.unique(np.concatenate([np.zeros(0, np.int64), *retrieval.positives]))
        others = np.setdiff1d(np.arange(len(retrieval.index_ids)), positives)
        if self.distractors > len(others):
            raise ValueError(
                f"Tiny-GLDv2 asks for {self.distractors} distractors but the index has only {len(others)} images that "
                "are not positives of a scored query"
            )
        chosen = np.random.default_rng(self.seed).choice(others, size=self.distractors, replace=False)
        return np.sort(np.concatenate([positives, chosen]))

    def retrieval(self, retrieval: GLDv2Retrieval) -> tuple[GLDv2Retrieval, np.ndarray]:
        """The protocol on the tiny index (positives renumbered) and the kept rows of ``index.csv``."""
        rows = self.index_rows(retrieval)
        position = np.full(len(retrieval.index_ids), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        tiny = GLDv2Retrieval(
            index_ids=[retrieval.index_ids[i] for i in rows],
            query_ids=retrieval.query_ids,
            query_subsets=retrieval.query_subsets,
            positives=[position[p] for p in retrieval.positives],
        )
        return tiny, rows


@dataclass
class GLDv2Train:
    ids: list[str]
    landmark_ids: np.ndarray


def read_gldv2_train(
    root: str | Path,
    clean: bool = True,
    min_images_per_class: int = 1,
    max_images_per_class: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> GLDv2Train:
    """The training images, selected deterministically.

    Args:
        clean: use ``train_clean.csv`` (the cleaned subset) instead of ``train.csv``.
        min_images_per_class: keep landmarks with at least this many images.
        max_images_per_class: keep at most this many images per landmark (a seeded random sample).
        num_classes: keep this many landmarks among the eligible ones (a seeded random sample).

    AMES, for instance, trains on 24K clean landmarks with more than 10 images and at most 500 images each:
    ``clean=True, min_images_per_class=11, max_images_per_class=500, num_classes=24000``.
    """
    root = Path(root)
    by_class: dict[int, list[str]] = {}
    if clean:
        path = require_file(root / "train_clean.csv", DATASET, EXPECTED_TREE)
        for line, row in read_csv_rows(path, ["landmark_id", "images"], DATASET):
            by_class.setdefault(_landmark(row, path, line), []).extend(row["images"].split())
    else:
        path = require_file(root / "train.csv", DATASET, EXPECTED_TREE)
        for line, row in read_csv_rows(path, ["id", "url", "landmark_id"], DATASET):
            by_class.setdefault(_landmark(row, path, line), []).append(row["id"])
    rng = np.random.default_rng(seed)
    eligible = sorted(c for c, images in by_class.items() if len(images) >= min_images_per_class)
    if num_classes is not None and num_classes < len(eligible):
        eligible = sorted(rng.choice(eligible, num_classes, replace=False).tolist())
    ids, labels = [], []
    for landmark in eligible:
        images = sorted(by_class[landmark])
        if max_images_per_class is not None and len(images) > max_images_per_class:
            images = sorted(rng.choice(images, max_images_per_class, replace=False).tolist())
        ids += images
        labels += [landmark] * len(images)
    return GLDv2Train(ids, np.asarray(labels, dtype=np.int64))


def _read_ids(path: Path) -> list[str]:
    path = require_file(path, DATASET, EXPECTED_TREE)
    return [row["id"] for _, row in read_csv_rows(path, ["id"], DATASET)]


def _landmark(row: dict[str, str], path: Path, line: int) -> int:
    try:
        return int(row["landmark_id"])
    except ValueError:
        raise DatasetFormatError(f"{path}:{line}: landmark_id {row['landmark_id']!r} is not an integer") from None


class GoogleLandmarksV2(ImageBenchmark):
    """Google Landmarks v2 from its published layout (see the module docstring for layout and sizes).

    Lists: ``train`` (the selected training images, labelled by landmark), ``index`` and ``test`` (the
    scored Public and Private retrieval queries, in solution-file order). GLDv2 has no validation split; as in
    the AMES code, the Public queries validate (``val/gldv2/public/mAP@100``, what configs monitor) and the
    Private queries test (``test/gldv2/private/mAP@100``), so nothing is selected on the queries that are
    reported. Both search the whole index.

    Args:
        root: the dataset directory.
        clean, min_images_per_class, max_images_per_class, num_classes, selection_seed: the training
            selection (:func:`read_gldv2_train`).
        k: the cut-off of mAP@k (100 in the challenge).
        tiny: evaluate on Tiny-GLDv2 (:class:`TinyGLDv2`: all scored queries, a small reproducible index) instead
            of the whole index; metrics under ``tiny_gldv2``.
        **kwargs: images or stored features, batch sizes, ... (:class:`~datamodules.images.ImageBenchmark`).
    """

    name = "gldv2"
    expected_tree = EXPECTED_TREE

    def __init__(
        self,
        root: str,
        clean: bool = True,
        min_images_per_class: int = 1,
        max_images_per_class: int | None = None,
        num_classes: int | None = None,
        selection_seed: int = 0,
        k: int = 100,
        tiny: TinyGLDv2 | None = None,
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        self.tiny = tiny
        self.selection = dict(
            clean=clean,
            min_images_per_class=min_images_per_class,
            max_images_per_class=max_images_per_class,
            num_classes=num_classes,
            seed=selection_seed,
        )
        self.k = k

    def read_lists(self) -> dict[str, ImageList]:
        train = read_gldv2_train(self.root, **self.selection)
        self.retrieval = read_gldv2_retrieval(self.root)
        return {
            "train": ImageList([image_path("train", i) for i in train.ids], labels=train.landmark_ids),
            "index": ImageList([image_path("index", i) for i in self.retrieval.index_ids]),
            "test": ImageList([image_path("test", i) for i in self.retrieval.query_ids]),
        }

    def train_list(self) -> str:
        return "train"

    def subsets(self) -> dict[str, tuple[str, np.ndarray]]:
        self.lists  # noqa: B018 - reads the retrieval solution
        subsets = np.asarray(self.retrieval.query_subsets)
        named = {f"test_{name}": ("test", np.flatnonzero(subsets == name)) for name in ("public", "private")}
        if self.tiny is not None:
            named["tiny_index"] = ("index", self.tiny.index_rows(self.retrieval))
        return named

    def eval_specs(self, stage) -> list[EvalSpec]:
        name = "test_public" if stage == "val" else "test_private"
        rows = self.subsets()[name][1]  # reads the retrieval solution
        if self.tiny is not None:
            tiny, _ = self.tiny.retrieval(self.retrieval)
            return [EvalSpec("tiny_gldv2", tiny.ground_truth(self.k, rows=rows), database=["tiny_index"], query=name)]
        ground_truth = self.retrieval.ground_truth(self.k, rows=rows)
        return [EvalSpec(self.name, ground_truth, database=["index"], query=name)]  # subclasses rename it

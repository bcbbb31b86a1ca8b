"""Pittsburgh30k (Torii et al., CVPR 2013; the NetVLAD splits): both published layouts and the protocol.

Layout 1, the NetVLAD release (``dbStruct`` MATLAB files)::

    <root>/datasets/pitts30k_{train,val,test}.mat   dbStruct: whichSet, dbImageFns, utmDb (2 x N),
                                                    qImageFns, utmQ (2 x M), numImages, numQueries,
                                                    posDistThr (25), posDistSqThr, nonTrivPosDistSqThr
    <root>/000/000000_pitch1_yaw1.jpg ...           database images, paths as in dbImageFns
    <root>/queries_real/000/000000_pitch1_yaw1.jpg  query images, paths as in qImageFns

Layout 2, the folder layout of the VPR benchmarks (UTM coordinates in the file names)::

    <root>/images/{train,val,test}/{database,queries}/@<utm_east>@<utm_north>@<zone>@...@.jpg

Real sizes (test): 10,000 database and 6,816 query images. Protocol: a database image within 25 m (UTM) of
the query is correct; Recall@{1, 5, 10, 20} over *all* queries, a query without any database image in range
counting as a miss (the NetVLAD code divides by the number of queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.images import EvalSpec, ImageBenchmark, ImageList
from datamodules.layout import DatasetFormatError, DatasetLayoutError, require_file
from retrieval.ground_truth import RadiusGroundTruth

RECALL_KS = (1, 5, 10, 20)
MAP_KS = (4,)  # the AE-SVC paper reports mAP@4
MAT_TREE = """\
<root>/
  datasets/pitts30k_{train,val,test}.mat   (dbStruct)
  000/000000_pitch1_yaw1.jpg ...           database images
  queries_real/000/000000_pitch1_yaw1.jpg  query images
"""
FOLDER_TREE = """\
<root>/images/{train,val,test}/
  database/@<utm_east>@<utm_north>@<zone>@<letter>@<lat>@<lon>@...@.jpg
  queries/@<utm_east>@<utm_north>@...@.jpg
"""


@dataclass
class PlaceSplit:
    """Database and query images (paths relative to the root) with their UTM positions."""

    database_paths: list[str]
    database_utm: np.ndarray  # [N, 2] easting, northing
    query_paths: list[str]
    query_utm: np.ndarray  # [M, 2]
    radius: float = 25.0


def read_pittsburgh_mat(root: str | Path, split: str, name: str = "pitts30k") -> PlaceSplit:
    """Read ``<root>/datasets/<name>_<split>.mat`` (NetVLAD ``dbStruct``), fields read by position as the
    published code does."""
    from scipy.io import loadmat

    path = require_file(Path(root) / "datasets" / f"{name}_{split}.mat", "Pittsburgh", MAT_TREE)
    try:
        fields = loadmat(str(path))["dbStruct"].item()
        database = [str(f[0].item()) for f in fields[1]]
        database_utm = np.asarray(fields[2], dtype=np.float64).T
        queries = [str(f[0].item()) for f in fields[3]]
        query_utm = np.asarray(fields[4], dtype=np.float64).T
        radius = float(np.asarray(fields[7]).item())
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise DatasetFormatError(
            f"{path} is not a NetVLAD dbStruct file ({type(error).__name__}: {error}); expected fields whichSet, "
            "dbImageFns, utmDb (2 x N), qImageFns, utmQ (2 x M), numImages, numQueries, posDistThr, ..."
        ) from error
    for what, paths, utm in (("database", database, database_utm), ("query", queries, query_utm)):
        if utm.shape != (len(paths), 2):
            raise DatasetFormatError(f"{path}: {len(paths)} {what} images but UTM array of shape {utm.T.shape}")
    return PlaceSplit(database, database_utm, [f"queries_real/{q}" for q in queries], query_utm, radius)


def read_pittsburgh_folders(root: str | Path, split: str, radius: float = 25.0) -> PlaceSplit:
    """Read ``<root>/images/<split>/{database,queries}/`` with UTM easting/northing in the file names."""
    base = Path(root) / "images" / split
    lists = {}
    for part in ("database", "queries"):
        folder = base / part
        if not folder.is_dir():
            raise DatasetLayoutError(f"Pittsburgh: {folder} not found. Expected layout:\n{FOLDER_TREE.rstrip()}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise DatasetLayoutError(f"Pittsburgh: no images in {folder}. Expected layout:\n{FOLDER_TREE.rstrip()}")
        lists[part] = ([str(p.relative_to(root)) for p in files], np.array([_utm_of(p) for p in files]))
    return PlaceSplit(*lists["database"], *lists["queries"], radius=radius)


def _utm_of(path: Path) -> tuple[float, float]:
    fields = path.name.split("@")
    try:
        return float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise DatasetFormatError(
            f"{path}: file name does not start with '@<utm_east>@<utm_north>@'; expected {FOLDER_TREE.splitlines()[1].strip()}"
        ) from None


def pittsburgh_ground_truth(split: PlaceSplit, recall_ks=RECALL_KS, map_ks=MAP_KS) -> RadiusGroundTruth:
    return RadiusGroundTruth(split.query_utm, split.database_utm, split.radius, recall_ks=recall_ks, map_ks=map_ks)


class Pittsburgh30k(ImageBenchmark):
    """Pittsburgh30k in either published layout (see the module docstring for layouts and sizes).

    Lists: ``{train,val,test}_database`` and ``{train,val,test}_queries``; validation and test search the
    queries of their split in its database. The training list is ``train_database`` (what an unsupervised
    embedding method fits on); place-recognition training with mined triplets needs both training lists.

    Args:
        root: the dataset directory.
        layout: ``mat`` (NetVLAD ``dbStruct`` files) or ``folders`` (UTM coordinates in file names).
        radius: the positive distance in metres for the folder layout (the ``.mat`` files carry theirs, 25).
        recall_ks: cut-offs of Recall@N.
        map_ks: cut-offs of mAP@k (default 4, the AE-SVC paper's metric; over queries with a positive).
        **kwargs: images or stored features, batch sizes, ... (:class:`~datamodules.images.ImageBenchmark`).
    """

    name = "pitts30k"

    def __init__(
        self,
        root: str,
        layout: Literal["mat", "folders"] = "mat",
        radius: float = 25.0,
        recall_ks: tuple[int, ...] = RECALL_KS,
        map_ks: tuple[int, ...] = MAP_KS,
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        if layout not in ("mat", "folders"):
            raise ValueError(f"Pittsburgh layout must be 'mat' or 'folders', got {layout!r}")
        self.layout, self.radius, self.recall_ks, self.map_ks = layout, radius, tuple(recall_ks), tuple(map_ks)
        self.expected_tree = MAT_TREE if layout == "mat" else FOLDER_TREE
        self._splits: dict[str, PlaceSplit] = {}

    def place_split(self, split: str) -> PlaceSplit:
        if split not in self._splits:
            if self.layout == "mat":
                self._splits[split] = read_pittsburgh_mat(self.root, split)
            else:
                self._splits[split] = read_pittsburgh_folders(self.root, split, self.radius)
        return self._splits[split]

    def read_lists(self) -> dict[str, ImageList]:
        lists = {}
        for split in ("train", "val", "test"):
            places = self.place_split(split)
            lists[f"{split}_database"] = ImageList(places.database_paths)
            lists[f"{split}_queries"] = ImageList(places.query_paths)
        return lists

    def train_list(self) -> str:
        return "train_database"

    def eval_specs(self, stage) -> list[EvalSpec]:
        ground_truth = pittsburgh_ground_truth(self.place_split(stage), self.recall_ks, self.map_ks)
        return [EvalSpec("pitts30k", ground_truth, database=[f"{stage}_database"], query=f"{stage}_queries")]

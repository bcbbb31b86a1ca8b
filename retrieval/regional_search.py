"""Detect-to-Retrieve's search from feature stores: aggregate every image's local descriptors with a codebook
(VLAD, ASMK, ASMK* or their regional versions), search, and score the rankings with a benchmark's ground truth.

Kernels (:data:`KERNELS`; definitions in :mod:`retrieval.asmk`):

- ``asmk``, ``asmk*``, ``vlad``: one set of descriptors per image. From a regional store (rows
  ``<image id>#<region>``, :mod:`retrieval.regions`) only region 0, the whole image, is used: the same store
  gives "without detection".
- ``r-asmk``, ``r-asmk*``, ``r-vlad``: every region of the image (whole image and boxes) aggregated into one
  entry per image. From a plain store each image is its own single region (R-ASMK = ASMK then).

Queries are aggregated without regions (D2R crops the query to its box and detects nothing), with
``query_assignments`` nearest words per descriptor (ASMK kinds); database descriptors go to their nearest word.
ASMK kinds are searched with the inverted file (:class:`retrieval.inverted_file.InvertedFile`), VLAD kinds by
inner product of the dense vectors (small codebooks only: ``K d`` floats per image).

The scores of every query against the whole database go to :func:`retrieval.evaluation.evaluate_scores`, the
same protocol code as every other method's rankings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrieval.asmk import (
    DEFAULT_ALPHA,
    DEFAULT_THRESHOLD,
    AggregatedImage,
    aggregate_asmk,
    aggregate_regional_asmk,
    aggregate_regional_vlad,
    aggregate_vlad,
)
from retrieval.codebook import ASMK_QUERY_ASSIGNMENTS, Codebook
from retrieval.evaluation import evaluate_scores
from retrieval.feature_store import FeatureStore
from retrieval.ground_truth import GroundTruth, RevisitedGroundTruth
from retrieval.inverted_file import InvertedFile
from retrieval.regions import REGION_SEPARATOR, group_regions

KERNELS = ("asmk", "asmk*", "r-asmk", "r-asmk*", "vlad", "r-vlad")


@dataclass(frozen=True)
class KernelSettings:
    """How images are aggregated and compared (defaults: D2R's R-ASMK* as the authors index it)."""

    kernel: str = "r-asmk*"
    alpha: float = DEFAULT_ALPHA
    threshold: float = DEFAULT_THRESHOLD
    normalisation: str = "none"
    query_assignments: int = ASMK_QUERY_ASSIGNMENTS
    num_locals: int | None = None  # the first (strongest) stored locals per row; None: all

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    @property
    def regional(self) -> bool:
        return self.kernel.startswith("r-")

    @property
    def binary(self) -> bool:
        return self.kernel.endswith("*")

    @property
    def vlad(self) -> bool:
        return self.kernel.endswith("vlad")


def image_regions(store: FeatureStore) -> tuple[list[str], list[np.ndarray]]:
    """Image ids of a store and the store rows of each image's regions (one row each in a plain store). A store is
    regional when its first id is ``<image id>#<number>``; then every id must be (checked)."""
    ids = store.ids
    if ids and ids[0].rpartition(REGION_SEPARATOR)[2].isdigit():
        return group_regions(ids)
    return list(ids), [np.array([row]) for row in range(len(ids))]


def aggregate_store(
    store: FeatureStore | str | Path,
    codebook: Codebook,
    settings: KernelSettings,
    query: bool = False,
    progress: bool = False,
) -> tuple[list[str], list[AggregatedImage] | np.ndarray]:
    """``(image ids, aggregated images)``: :class:`AggregatedImage` per image for ASMK kinds, ``float32 [N, K d]``
    for VLAD kinds. ``query``: multiple assignment and no regions (see the module docstring)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    image_ids, regions = image_regions(store)
    regional = settings.regional and not query
    if not regional:
        regions = [rows[:1] for rows in regions]  # the whole image (region 0 is stored first)
    assignments = settings.query_assignments if query and not settings.vlad else 1
    counts = [len(rows) for rows in regions]
    sets = store.local_sets(np.concatenate(regions), settings.num_locals)
    images = []
    for count in tqdm(counts, desc=f"aggregate {store.path.name}", disable=not progress):
        region_sets = [next(sets) for _ in range(count)]
        descriptors = np.concatenate(region_sets) if region_sets else np.zeros((0, codebook.dim), np.float32)
        words = codebook.assign(descriptors, assignments)
        images.append(_aggregate(descriptors, words, codebook.centroids, [len(s) for s in region_sets], settings))
    if settings.vlad:
        return image_ids, np.stack(images) if images else np.zeros((0, codebook.size * codebook.dim), np.float32)
    return image_ids, images


def _aggregate(descriptors, words, centroids, region_sizes: list[int], settings: KernelSettings):
    if len(region_sizes) == 1:
        if settings.vlad:
            return aggregate_vlad(descriptors, words, centroids)
        return aggregate_asmk(descriptors, words, centroids, settings.binary)
    bounds = np.cumsum([0] + region_sizes)
    regions = [np.arange(start, stop) for start, stop in zip(bounds, bounds[1:])]
    if settings.vlad:
        return aggregate_regional_vlad(descriptors, words, centroids, regions)
    return aggregate_regional_asmk(descriptors, words, centroids, regions, binary=settings.binary)


def search_scores(queries, database, settings: KernelSettings, progress: bool = False) -> np.ndarray:
    """``float64 [num_queries, num_database]``: the kernel similarity of every query to every database image,
    from the inverted file (ASMK kinds: ``database`` the aggregated images or their :class:`InvertedFile`) or
    dense inner products (VLAD kinds)."""
    if settings.vlad:
        return np.asarray(queries, dtype=np.float64) @ np.asarray(database, dtype=np.float64).T
    index = database if isinstance(database, InvertedFile) else InvertedFile(database)
    return np.stack(
        [
            index.query_scores(query, settings.alpha, settings.threshold, settings.normalisation)
            for query in tqdm(queries, desc="search", disable=not progress)
        ]
    )


def evaluate_kernel(
    query_store: FeatureStore | str | Path,
    database_stores: Sequence[FeatureStore | str | Path],
    codebook: Codebook,
    settings: KernelSettings,
    ground_truth: GroundTruth,
    database_ids: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of one kernel on one evaluation set: the queries' store, the database's stores concatenated (e.g.
    a database and its distractors), scored by ``ground_truth``. ``database_ids``: the image ids the ground
    truth expects, in order (checked against the stores' images, so a store of other lists is refused)."""
    _, queries = aggregate_store(query_store, codebook, settings, query=True, progress=progress)
    ids, database = [], []
    for store in database_stores:
        store_ids, images = aggregate_store(store, codebook, settings, progress=progress)
        ids += store_ids
        database.append(images)
    database = np.concatenate(database) if settings.vlad else [image for part in database for image in part]
    if database_ids is not None and list(database_ids) != ids:
        raise ValueError(
            f"the database stores hold {len(ids)} images that are not the evaluation's {len(database_ids)} "
            "database images in order; extract the stores from the same lists"
        )
    if not settings.vlad:
        database = InvertedFile(database)  # built once: searched, then its memory reported
    metrics = evaluate_scores(search_scores(queries, database, settings, progress), ground_truth)
    if not settings.vlad:
        metrics["bytes_per_image"] = database.bytes_per_image
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``python -m retrieval.regional_search``: one kernel on Revisited Oxford/Paris (or any dataset in its
    layout) from extracted stores; prints the metrics and optionally writes them as JSON."""
    import argparse
    import json

    from datamodules.revisited import read_revisited  # the published layout's reader (the command, not the library)
    from retrieval.files import write_text_atomic

    parser = argparse.ArgumentParser(prog="python -m retrieval.regional_search", description=main.__doc__)
    parser.add_argument("--revisited", required=True, help="root of the Revisited layout (<root>/<dataset>/gnd_...)")
    parser.add_argument("--dataset", required=True, help="roxford5k, rparis6k, ...")
    parser.add_argument("--queries", required=True, type=Path, help="store of the query list (cropped queries)")
    parser.add_argument(
        "--database",
        required=True,
        type=Path,
        nargs="+",
        help="stores of the database (plain or regional), then of the distractors, in that order",
    )
    parser.add_argument("--codebook", required=True, type=Path, help="a .npy codebook (python -m retrieval.codebook)")
    parser.add_argument("--kernel", choices=KERNELS, default="r-asmk*")
    parser.add_argument("--normalisation", choices=("none", "word_counts"), default="none")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--query-assignments", type=int, default=ASMK_QUERY_ASSIGNMENTS)
    parser.add_argument("--num-locals", type=int, help="the first (strongest) stored locals per row")
    parser.add_argument("--output", type=Path, help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    dataset = read_revisited(args.revisited, args.dataset)
    settings = KernelSettings(
        args.kernel, args.alpha, args.threshold, args.normalisation, args.query_assignments, args.num_locals
    )
    stores = [FeatureStore(path) for path in args.database]
    num_database = sum(len(image_regions(store)[0]) for store in stores)
    ground_truth = RevisitedGroundTruth(dataset.gnd, num_database)
    first_ids = image_regions(stores[0])[0][: len(dataset.database_paths)]
    if first_ids != dataset.database_paths:
        raise ValueError(
            f"{stores[0].path}: its first images are not the {len(dataset.database_paths)} database images of "
            f"{args.dataset} in order; extract it from the same lists"
        )
    metrics = evaluate_kernel(args.queries, stores, Codebook.load(args.codebook), settings, ground_truth, progress=True)
    text = json.dumps({"dataset": args.dataset, **vars(settings), **metrics}, indent=2, default=str)
    if args.output is not None:
        write_text_atomic(args.output, text + "\n")
    print(text)
    return metrics


if __name__ == "__main__":
    main()

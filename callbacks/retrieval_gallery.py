"""The retrieval gallery: for a few fixed queries of every evaluation set, the query and its top-k results with
each result marked relevant, junk or wrong, so a user sees what a method gets wrong.

It is a hook of the one evaluation path (:class:`callbacks.retrieval_evaluation.RetrievalEvaluation`): after the
evaluation has gathered and scored the embeddings, it ranks the gallery queries from the same gathered
embeddings with :func:`retrieval.search.knn` (the evaluation's ranking order, ties by database index; a method
with several sizes: its largest, as the plain metric keys). For a pair re-ranker
(:class:`~lightning_modules.reranking.PairReranker`) it shows the final ranking: the gallery queries' shortlists
are scored again with the module's :meth:`score_pairs` and fused with its fusion weights, as
:mod:`callbacks.reranking_stage` does for every query (a few hundred pairs; ``reranked: false`` shows the global
ranking instead). The figure's title says which ranking it shows.

Marks, from the evaluation set's ground truth: **green** relevant (a positive; Revisited: ``easy`` or ``hard``,
the medium protocol), **orange** junk (ignored by the protocol: Revisited ``junk``), **red** wrong. Boxes: the
query's box in blue (a Revisited query's ``bbx``, to which the evaluation crops it; the query is shown whole),
and in cyan the result's box where the method has one: the region a regional row describes (ids
``<path>#<r>``, :class:`~datamodules.images.Regions`) or the detector's boxes of the image
(``<list>.boxes.csv``, :func:`~datamodules.landmark_boxes.read_scored_boxes`: those of the datamodule's
``regions`` or of ``detector_boxes``).

Output per stage and evaluation set: ``<run dir>/gallery_<stage>_<set>.png`` (rewritten at every evaluation) and,
with a W&B logger, the same image under ``<stage>/<set>/gallery``. Rank 0 draws; the other processes return at
once (nothing here communicates, so nothing waits on them). It adds no metrics.

Images come from the datamodule's image directory (or its Hugging Face source); a datamodule that reads stored
descriptors without one (e.g. :class:`~datamodules.feature_store.LabelledFeatureStores`) draws the images its
stores' ids name under ``image_root``. A missing image directory is an error at setup, not an empty gallery.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw

from datamodules.base import EvalSet, RowSubset
from datamodules.images import ImageBenchmark, ImageList, ImageListDataset, load_image
from datamodules.layout import DatasetLayoutError
from retrieval.files import replace_atomically
from retrieval.localisation import gld_box_to_pixels
from retrieval.regions import REGION_SEPARATOR, split_region_id
from retrieval.search import knn

MARK_COLOURS = {"relevant": (26, 152, 80), "junk": (243, 156, 18), "wrong": (215, 48, 39)}
QUERY_COLOUR = (33, 102, 172)  # the query's frame and box
RESULT_BOX_COLOUR = (0, 188, 212)  # a result's region or detected box
BACKGROUND = (235, 235, 235)  # around a thumbnail that is not square
# Layout in pixels (gallery_size): a coloured frame around each thumbnail, a caption under it, gaps, a title.
BORDER, GAP, CAPTION, TITLE = 4, 6, 14, 34
DPI = 100
EVAL_STAGES = {"fit": ("val",), "validate": ("val",), "test": ("test",)}


# ---- what to show (pure) ----------------------------------------------------------------------------------------


@dataclass
class Relevance:
    """One query's ground truth: positives (database index -> label: ``relevant``, or Revisited ``easy`` /
    ``hard``) and junk indices (ignored by the protocol)."""

    positives: dict[int, str]
    junk: frozenset[int] = frozenset()


def relevance_of(ground_truth, query: int) -> Relevance:
    """Query ``query``'s :class:`Relevance` under ``ground_truth``: Revisited (``gnd``: easy and hard are
    relevant, junk is junk; the medium protocol) or explicit positives (labels, radius, GLDv2: no junk)."""
    gnd = getattr(ground_truth, "gnd", None)
    if gnd is not None:
        entry = gnd[query]
        positives = {int(i): "hard" for i in entry.get("hard", [])}
        positives.update({int(i): "easy" for i in entry.get("easy", [])})
        return Relevance(positives, frozenset(int(i) for i in entry.get("junk", [])))
    positives = getattr(ground_truth, "positives", None)
    if positives is None:
        raise TypeError(
            f"RetrievalGallery cannot tell relevant results under {type(ground_truth).__name__}: it has neither "
            "per-query positives nor a Revisited gnd"
        )
    return Relevance({int(i): "relevant" for i in np.asarray(positives[query]).reshape(-1)})


def mark_results(ids, relevance: Relevance) -> list[tuple[str, str]]:
    """``(mark, label)`` of every ranked database index: mark ``relevant`` / ``junk`` / ``wrong`` (the colour),
    label what the ground truth calls it (``easy``, ``hard``, ``relevant``, ``junk``, ``wrong``)."""
    marks = []
    for item in np.asarray(ids).reshape(-1).tolist():
        if item in relevance.positives:
            marks.append(("relevant", relevance.positives[item]))
        elif item in relevance.junk:
            marks.append(("junk", "junk"))
        else:
            marks.append(("wrong", "wrong"))
    return marks


def gallery_queries(num_queries: int, count: int, explicit=None, what: str = "evaluation set") -> np.ndarray:
    """The gallery's query indices: ``explicit`` ones (checked), else ``count`` evenly spaced over the
    ``num_queries`` (first and last included; all when there are no more), so every run shows the same queries."""
    if explicit is not None:
        chosen = np.asarray(list(explicit), dtype=np.int64).reshape(-1)
        outside = chosen[(chosen < 0) | (chosen >= num_queries)]
        if len(outside):
            raise ValueError(
                f"RetrievalGallery queries {outside.tolist()} are not queries of {what}, which has {num_queries} "
                f"(indices 0 to {num_queries - 1})"
            )
        return chosen
    if count >= num_queries:
        return np.arange(num_queries)
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    # A step of at least 1 between evenly spaced values keeps their rounding distinct.
    return np.round(np.linspace(0, num_queries - 1, count)).astype(np.int64)


@dataclass
class GalleryRanking:
    """The top ``k`` of each gallery query: database indices, global scores and each item's place in the global
    ranking (differs from its column only after re-ranking)."""

    ids: np.ndarray
    scores: np.ndarray
    global_places: np.ndarray
    reranked: bool = False


def top_results(queries, database, rows, k: int, leave_one_out: bool = False, device=None) -> GalleryRanking:
    """The first ``k`` entries of the global rankings of query ``rows``, exactly as the evaluation ranks them
    (:func:`retrieval.search.knn`: score descending, equal scores by database index). Leave-one-out (the
    queries are the database): ``k + 1`` are searched and the query itself dropped (or the surplus last
    entry), which is what ``knn(..., exclude_self=True)`` does for the whole database."""
    rows = np.asarray(rows, dtype=np.int64)
    source = database if leave_one_out else queries
    k = min(k, len(database) - int(leave_one_out))
    scores, ids = knn(np.asarray(source)[rows], database, k + int(leave_one_out), device=device)
    if leave_one_out:
        is_self = ids == rows[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        scores, ids = scores[~is_self].reshape(len(rows), k), ids[~is_self].reshape(len(rows), k)
    places = np.broadcast_to(np.arange(k), ids.shape).copy()
    return GalleryRanking(ids, scores, places)


def reranked_results(module, eval_set: EvalSet, queries, database, rows, k: int, device=None) -> GalleryRanking:
    """The first ``k`` entries of the re-ranked rankings of query ``rows`` for a pair re-ranker: its global
    shortlist of ``shortlist`` items scored with ``module.score_pairs`` at its main local sizes and re-ordered
    by the fused score to the module's fusion depth (:func:`retrieval.reranking.rerank_order`), then the
    global ranking, as :mod:`callbacks.reranking_stage` ranks every query."""
    from callbacks.reranking_stage import database_encoding, read_rows
    from retrieval.reranking import rerank_order

    rows = np.asarray(rows, dtype=np.int64)
    leave_one_out = eval_set.queries is None
    m = min(int(module.hparams.shortlist), len(database) - int(leave_one_out))
    ranking = top_results(queries, database, rows, max(k, m), leave_one_out, device)
    shortlist = ranking.ids[:, :m]
    query_locals, database_locals = module.local_size_configs()[0]
    query_parts = eval_set.query_parts or eval_set.database_parts
    encoding = database_encoding(eval_set)
    batch = max(1, int(getattr(module.hparams, "pair_batch_size", m)))
    logits = np.empty(shortlist.shape, dtype=np.float64)
    with torch.inference_mode():
        for q, row in enumerate(rows.tolist()):
            for start in range(0, m, batch):
                items = shortlist[q, start : start + batch]
                query_global, query_local = read_rows(
                    query_parts, np.full(len(items), row), query_locals, module.device
                )
                item_global, item_local = read_rows(eval_set.database_parts, items, database_locals, module.device)
                scored = module.score_pairs(query_global, query_local, item_global, item_local, encoding)
                logits[q, start : start + len(items)] = scored.float().cpu().numpy()
    fusion = module.fusion
    order = rerank_order(ranking.scores[:, :m], logits, fusion["lambda"], fusion["gamma"], fusion["depth"])
    columns = np.broadcast_to(np.arange(ranking.ids.shape[1]), ranking.ids.shape).copy()
    columns[:, : order.shape[1]] = order
    columns = columns[:, :k]
    return GalleryRanking(
        np.take_along_axis(ranking.ids, columns, axis=1),
        np.take_along_axis(ranking.scores, columns, axis=1),
        columns,
        reranked=True,
    )


# ---- drawing ------------------------------------------------------------------------------------------------------


@dataclass
class GalleryCell:
    """One thumbnail: the image, boxes ``[(x1, y1, x2, y2 pixels of the image, colour)]``, frame colour, caption."""

    image: Image.Image
    frame: tuple[int, int, int]
    caption: str
    boxes: list[tuple[np.ndarray, tuple[int, int, int]]] = field(default_factory=list)


def gallery_size(rows: int, columns: int, thumbnail: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a gallery of ``rows`` queries and ``columns`` cells per row."""
    cell = thumbnail + 2 * BORDER
    return columns * (cell + GAP) + GAP, TITLE + rows * (cell + CAPTION + GAP) + GAP


def cell_origin(row: int, column: int, thumbnail: int) -> tuple[int, int]:
    """Top-left pixel ``(x, y)`` of a cell's frame."""
    cell = thumbnail + 2 * BORDER
    return GAP + column * (cell + GAP), TITLE + GAP + row * (cell + CAPTION + GAP)


def thumbnail_of(cell: GalleryCell, size: int) -> Image.Image:
    """The image fitted into a ``size`` square (aspect ratio kept, centred) with its boxes drawn."""
    image = cell.image.convert("RGB")
    scale = size / max(image.size)
    width, height = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    resized = image.resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(resized)
    for box, colour in cell.boxes:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle(
            [round(x1), round(y1), max(round(x2) - 1, round(x1)), max(round(y2) - 1, round(y1))],
            outline=colour,
            width=2,
        )
    square = Image.new("RGB", (size, size), BACKGROUND)
    square.paste(resized, ((size - width) // 2, (size - height) // 2))
    return square


def draw_gallery(
    cells: list[list[GalleryCell]], path: str | os.PathLike, title: str, thumbnail: int = 96, colours: int | None = 256
) -> Path:
    """Write the gallery (one row per query: its cells left to right) as a PNG of :func:`gallery_size`,
    atomically; the frame of each cell in its colour, its caption under it, ``title`` (one or two lines) on top.

    ``colours``: the PNG's palette size (the marks' and boxes' colours exactly, the rest quantised), which makes
    it about three times smaller than RGB; ``None`` keeps RGB.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max((len(row) for row in cells), default=0)
    width, height = gallery_size(len(cells), columns, thumbnail)
    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    cell_side = thumbnail + 2 * BORDER
    captions = []
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            x, y = cell_origin(r, c, thumbnail)
            mosaic[y : y + cell_side, x : x + cell_side] = cell.frame
            inner = np.asarray(thumbnail_of(cell, thumbnail))
            mosaic[y + BORDER : y + BORDER + thumbnail, x + BORDER : x + BORDER + thumbnail] = inner
            captions.append((x + cell_side / 2, y + cell_side + 1, cell.caption))
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(mosaic, interpolation="none")
    axis.set_axis_off()
    for x, y, text in captions:
        axis.text(x, y, text, ha="center", va="top", fontsize=7, color="black")
    axis.text(width / 2, TITLE / 2, title, ha="center", va="center", fontsize=8, color="black", linespacing=1.3)
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=DPI)
    plt.close(figure)
    with Image.open(drawn) as opened:
        image = opened.convert("RGB")
    if colours is not None:
        image = _with_palette(image, colours)
    with replace_atomically(path) as temporary:
        image.save(temporary, format="PNG")
    return Path(path)


def _with_palette(image: Image.Image, colours: int) -> Image.Image:
    """``image`` with a palette of ``colours``: the image quantised to all but a few, and the drawing's fixed
    colours (frames, boxes, background, text) as the last entries, given to exactly their pixels (a palette
    lookup alone would round them)."""
    fixed = [*MARK_COLOURS.values(), QUERY_COLOUR, RESULT_BOX_COLOUR, BACKGROUND, (255, 255, 255), (0, 0, 0)]
    if colours <= len(fixed) or colours > 256:
        raise ValueError(f"colours must be in ({len(fixed)}, 256], got {colours}")
    others = colours - len(fixed)
    quantised = image.quantize(others, method=Image.Quantize.FASTOCTREE)
    indices = np.array(quantised, dtype=np.uint8)
    pixels = np.asarray(image)
    for number, colour in enumerate(fixed):
        indices[(pixels == colour).all(axis=2)] = others + number
    result = Image.frombytes("P", image.size, indices.tobytes())
    palette = quantised.getpalette()[: 3 * others]
    palette += [0] * (3 * others - len(palette))  # fewer distinct colours than asked: the fixed ones stay in place
    result.putpalette(palette + [value for colour in fixed for value in colour])
    return result


# ---- images of evaluation rows -----------------------------------------------------------------------------------


@dataclass
class ImageRef:
    """Where a row's picture is: its path (relative to the image root, or a Hugging Face id), and the box of
    the row within the image (``x1, y1, x2, y2``; fractions of the image when ``relative``) if any."""

    path: str
    box: np.ndarray | None = None
    relative: bool = False
    region: int | None = None


class _Images:
    """The images of a datamodule's evaluation rows: the image source and each part's list."""

    def __init__(self, datamodule, image_root: str | None, detector_boxes: str | None, min_box_score: float):
        self.datamodule = datamodule
        self.benchmark = datamodule if isinstance(datamodule, ImageBenchmark) else None
        self.root = Path(image_root) if image_root is not None else None
        self.hf_images = None
        if self.root is None and self.benchmark is not None:
            self.root, self.hf_images = self.benchmark.root, self.benchmark.hf_images
        self.detector_boxes = Path(detector_boxes) if detector_boxes is not None else None
        self.min_box_score = min_box_score
        self._subsets = self.benchmark.subsets() if self.benchmark is not None else {}
        self._boxes: dict[str, dict | None] = {}  # list name -> its boxes file read, or None
        self._thresholds: dict[str, float] = {}  # list name -> min score of its regions entry

    def open(self, path: str) -> Image.Image:
        if self.hf_images is not None:
            return self.hf_images.open(path)
        return load_image(self.root / path)  # a missing or undecodable file raises, naming it

    def list_row(self, part: str, dataset, row: int) -> tuple[str | None, ImageList | None, int]:
        """``(list name, list, row in it)`` of a part's row, or ``(None, None, row)`` for a dataset without one."""
        if self.benchmark is not None:
            name, rows = self._subsets.get(part, (part, None))
            if name in self.benchmark.lists:
                return name, self.benchmark.lists[name], int(rows[row]) if rows is not None else row
        base = dataset
        if isinstance(dataset, RowSubset):
            base, row = dataset.dataset, int(dataset.rows[row])
        if isinstance(base, ImageListDataset):
            return part, base.images, row
        return None, None, row

    def reference(self, part: str, dataset, row: int) -> ImageRef:
        _, images, list_row = self.list_row(part, dataset, row)
        if images is not None:
            box = images.boxes[list_row] if images.boxes is not None else None
            region = None
            if images.region_ids is not None:
                region = split_region_id(images.region_ids[list_row])[1]
            return ImageRef(images.paths[list_row], box, images.relative_boxes, region)
        ids = getattr(dataset, "ids", None)
        if ids is None:
            raise ValueError(
                f"RetrievalGallery: evaluation part '{part}' ({type(dataset).__name__}) records no image ids, so "
                "its images cannot be drawn"
            )
        image_id = ids[row]
        if REGION_SEPARATOR in image_id and image_id.rpartition(REGION_SEPARATOR)[2].isdigit():
            path, region = split_region_id(image_id)
            return ImageRef(path, region=region)
        return ImageRef(image_id)

    def detected_boxes(self, list_name: str | None, path: str) -> list[np.ndarray]:
        """The detector's boxes of an image (``ymin xmin ymax xmax`` normalised) above the score threshold."""
        if list_name is None:
            return []
        if list_name not in self._boxes:
            self._boxes[list_name] = self._read_boxes(list_name)
        found = self._boxes[list_name]
        if found is None:
            return []
        boxes, scores = found.get(path) or found.get(PurePosixPath(path).stem) or (np.zeros((0, 4)), np.zeros(0))
        threshold = self._thresholds.get(list_name, self.min_box_score)
        return [box for box, score in zip(boxes, scores) if score >= threshold]

    def _read_boxes(self, list_name: str) -> dict | None:
        from datamodules.landmark_boxes import read_scored_boxes

        for regions in getattr(self.benchmark, "regions", []) or []:
            if regions.boxes is not None and list_name in regions.lists:
                path = Path(regions.boxes)
                path = path if path.is_absolute() or path.exists() else self.benchmark.root / path
                self._thresholds[list_name] = regions.min_score
                return read_scored_boxes(path)
        if self.detector_boxes is not None and (self.detector_boxes / f"{list_name}.boxes.csv").is_file():
            return read_scored_boxes(self.detector_boxes / f"{list_name}.boxes.csv")
        return None


def _part_of(parts: dict, row: int) -> tuple[str, object, int]:
    """``(part name, dataset, row within it)`` of a row of parts concatenated in order."""
    for name, dataset in parts.items():
        if row < len(dataset):
            return name, dataset, row
        row -= len(dataset)
    raise IndexError(f"row beyond the {sum(len(d) for d in parts.values())} rows of parts {list(parts)}")


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---- the callback ------------------------------------------------------------------------------------------------


class RetrievalGallery(pl.Callback):
    """See the module docstring.

    Args:
        num_queries: queries shown per evaluation set, evenly spaced over its query list (first and last
            included), so every run and every evaluation shows the same ones.
        queries: explicit query indices (0-based in the set's query list) instead; the same for every set.
        top_k: results shown per query.
        stages: the evaluations drawn (``val``: every validation of ``fit`` and ``validate``; ``test``).
        thumbnail_size: side of each thumbnail in pixels.
        image_root: the directory image ids are relative to; default the datamodule's (``root``, or its
            Hugging Face source). Needed for a datamodule that reads feature stores without one.
        detector_boxes: a directory of the detector's ``<list>.boxes.csv`` files (``predict`` with
            :class:`~lightning_modules.d2r.LandmarkDetector`), drawn on the results of those lists; a
            datamodule's ``regions`` boxes files are drawn without it.
        min_box_score: the lowest score of a drawn detector box (a ``regions`` entry's ``min_score`` wins).
        reranked: for a pair re-ranker, show the re-ranked ranking (else the global one).
    """

    def __init__(
        self,
        num_queries: int = 6,
        queries: list[int] | None = None,
        top_k: int = 8,
        stages: tuple[str, ...] = ("val", "test"),
        thumbnail_size: int = 96,
        image_root: str | None = None,
        detector_boxes: str | None = None,
        min_box_score: float = 0.1,
        reranked: bool = True,
    ):
        if num_queries < 1 or top_k < 1 or thumbnail_size < 8:
            raise ValueError(
                f"RetrievalGallery: num_queries and top_k must be at least 1 and thumbnail_size at least 8, got "
                f"{num_queries}, {top_k}, {thumbnail_size}"
            )
        unknown = set(stages) - {"val", "test"}
        if unknown:
            raise ValueError(f"RetrievalGallery: stages are 'val' and/or 'test', got {sorted(unknown)}")
        self.num_queries, self.queries, self.top_k = num_queries, queries, top_k
        self.stages, self.thumbnail_size = tuple(stages), thumbnail_size
        self.image_root, self.detector_boxes, self.min_box_score = image_root, detector_boxes, min_box_score
        self.reranked = reranked
        self._images: _Images | None = None

    # ---- setup: can the images be drawn? ----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        stages = [s for s in EVAL_STAGES.get(stage, ()) if s in self.stages]
        if not stages:
            return
        datamodule = trainer.datamodule
        self._images = _Images(datamodule, self.image_root, self.detector_boxes, self.min_box_score)
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise DatasetLayoutError(f"RetrievalGallery: image_root {self.image_root} is not a directory")
        if self._images.benchmark is not None:
            for eval_stage in stages:
                for spec in self._images.benchmark.eval_specs(eval_stage):
                    for name in spec.lists:
                        self._check_first_image(name, self._images.benchmark.lists[_source(datamodule, name)].paths)
            return
        eval_sets = [e for s in stages for e in datamodule.eval_sets(s)]
        if eval_sets and self.image_root is None:
            raise ValueError(
                f"RetrievalGallery draws the images of the evaluation sets, but {type(datamodule).__name__} reads "
                "stored descriptors without an image directory: set image_root (the directory its stores' image "
                "ids are relative to) in the callback's init_args, or remove the callback"
            )
        for eval_set in eval_sets:
            for part, dataset in [*eval_set.query_parts.items(), *eval_set.database_parts.items()]:
                if len(dataset):
                    self._check_first_image(part, [self._images.reference(part, dataset, 0).path])

    def _check_first_image(self, name: str, paths: list[str]) -> None:
        """One ``stat`` per list: images that are not there fail now, naming the file, not at the first drawing."""
        images = self._images
        if not paths:
            return
        if images.hf_images is not None:
            missing = images.hf_images.missing(paths[:1])
            where = f"{images.hf_images.source} (no row '{paths[0]}')"
        else:
            missing = [] if (images.root / paths[0]).is_file() else [paths[0]]
            where = str(images.root / paths[0])
        if missing:
            raise DatasetLayoutError(
                f"RetrievalGallery draws the images of '{name}', but {where} is missing: the datamodule may read "
                "stored descriptors without the images; set image_root to the images' directory, or remove the callback"
            )

    # ---- the hook of the evaluation -------------------------------------------------------------------------------
    def evaluation_metrics(self, trainer, pl_module, stage: str) -> dict[str, float]:
        """Called by :class:`~callbacks.retrieval_evaluation.RetrievalEvaluation` on every process, after it has
        scored the stage; rank 0 draws. Adds no metrics."""
        if stage not in self.stages or not trainer.is_global_zero:
            return {}
        from callbacks.retrieval_evaluation import RetrievalEvaluation
        from lightning_modules.reranking import PairReranker

        evaluation = next((c for c in trainer.callbacks if isinstance(c, RetrievalEvaluation)), None)
        gathered = evaluation.gathered if evaluation is not None else {}
        datamodule = trainer.datamodule
        if self._images is None or self._images.datamodule is not datamodule:
            self._images = _Images(datamodule, self.image_root, self.detector_boxes, self.min_box_score)
        device = trainer.strategy.root_device if trainer.strategy.root_device.type != "cpu" else None
        reranker = pl_module if self.reranked and isinstance(pl_module, PairReranker) else None
        for eval_set in datamodule.eval_sets(stage):
            parts = [*eval_set.query_parts, *eval_set.database_parts]
            if any(part not in gathered for part in parts):
                raise RuntimeError(
                    f"RetrievalGallery: the evaluation kept no embeddings of {eval_set.name} "
                    "(RetrievalEvaluation.gathered); it ranks from what the evaluation scored"
                )
            database = _largest_size(_concatenate([gathered[p] for p in eval_set.database_parts]), pl_module)
            queries = None
            if eval_set.queries is not None:
                queries = _largest_size(_concatenate([gathered[p] for p in eval_set.query_parts]), pl_module)
            num_queries = eval_set.ground_truth.num_queries
            rows = gallery_queries(num_queries, self.num_queries, self.queries, f"evaluation set {eval_set.name}")
            if reranker is not None:
                ranking = reranked_results(reranker, eval_set, queries, database, rows, self.top_k, device)
            else:
                ranking = top_results(queries, database, rows, self.top_k, eval_set.queries is None, device)
            path = Path(trainer.default_root_dir) / f"gallery_{stage}_{_file_name(eval_set.name)}.png"
            title = self._title(trainer, stage, eval_set, ranking, len(database))
            draw_gallery(self._cells(eval_set, rows, ranking), path, title, self.thumbnail_size)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        key=f"{stage}/{eval_set.name}/gallery",
                        images=[str(path)],
                        caption=[title],
                        step=trainer.global_step,
                    )
        return {}

    def _cells(self, eval_set: EvalSet, rows: np.ndarray, ranking: GalleryRanking) -> list[list[GalleryCell]]:
        query_parts = eval_set.query_parts or eval_set.database_parts
        cells = []
        for q, row in enumerate(rows.tolist()):
            relevance = relevance_of(eval_set.ground_truth, row)
            query = self._cell(query_parts, row, QUERY_COLOUR, f"query {row} ({len(relevance.positives)} rel.)", True)
            line = [query]
            marks = mark_results(ranking.ids[q], relevance)
            for column, (item, score, place) in enumerate(
                zip(ranking.ids[q], ranking.scores[q], ranking.global_places[q])
            ):
                mark, label = marks[column]
                moved = f" (g{place + 1})" if ranking.reranked and place != column else ""
                caption = f"{column + 1}{moved} {score:.3f} {label}"
                line.append(self._cell(eval_set.database_parts, int(item), MARK_COLOURS[mark], caption, False))
            cells.append(line)
        return cells

    def _cell(self, parts: dict, row: int, frame, caption: str, is_query: bool) -> GalleryCell:
        images = self._images
        part, dataset, local_row = _part_of(parts, row)
        reference = images.reference(part, dataset, local_row)
        image = images.open(reference.path)
        boxes = []
        if reference.box is not None:
            box = np.asarray(reference.box, dtype=np.float64)
            if reference.relative:
                box = box * np.array([image.width, image.height, image.width, image.height])
            boxes.append((box, QUERY_COLOUR if is_query else RESULT_BOX_COLOUR))
        if reference.region is not None and reference.box is None:
            caption += f" r{reference.region}"
        if not is_query:
            list_name = images.list_row(part, dataset, local_row)[0]
            for detected in images.detected_boxes(list_name, reference.path):
                boxes.append((gld_box_to_pixels(detected, image.width, image.height), RESULT_BOX_COLOUR))
        return GalleryCell(image, frame, caption, boxes)

    def _title(self, trainer, stage: str, eval_set: EvalSet, ranking: GalleryRanking, database_size: int) -> str:
        which = "re-ranked (final) ranking" if ranking.reranked else "global ranking"
        checkpoint = getattr(trainer, "ckpt_path", None)
        when = (
            f"checkpoint {Path(checkpoint).name}"
            if checkpoint
            else f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        )
        shown = f"top {ranking.ids.shape[1]} of the {which} of {database_size} database items"
        first = f"{stage}/{eval_set.name}: {shown}; {when}"
        legend = "frame: green relevant, orange junk (ignored by the protocol), red wrong; box: blue query, cyan result"
        if ranking.reranked:
            legend += "; (gN): place in the global ranking"
        return f"{first}\n{legend}"


def _source(datamodule: ImageBenchmark, name: str) -> str:
    subset = datamodule.subsets().get(name)
    return subset[0] if subset is not None else name


def _largest_size(embeddings: np.ndarray, module) -> np.ndarray:
    """The embedding the plain metric keys score: with several sizes, the largest one's columns, L2-normalised
    again (as the evaluation does)."""
    views = module.size_views()
    if not views:
        return embeddings
    part = embeddings[:, views[max(views)]]
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in name)

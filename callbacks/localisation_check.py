"""The localisation check of the spatial context (slides of the smoothing + GCN method, "Verification for
localization"): how well a module's feature maps find the object in Revisited-layout images, scored by IoU.

Added to a ``test`` (or ``validate``) run on a Revisited-layout datamodule (:class:`RevisitedOxfordParis`, the
generated :class:`GeneratedLandmarksRevisited`), it reads every map the module exposes through
``feature_maps(images) -> {name: [B, C, H, W]}`` (:class:`SpatialContextRetrieval`: ``backbone``, ``smoothed``,
``refined``), so the backbone's map and the maps after smoothing and refinement are compared on the same images.
Per evaluation set and map, with :mod:`retrieval.localisation`:

* ``query_box``: each query image, whole; the lowest-degree patch as the object seed, grown by similarity;
  the box against the query's ``bbx``;
* ``object``: the same on database images, against their true landmark boxes (a Google-Landmark-Boxes CSV:
  the generated benchmark's ``boxes/boxes_eval.csv`` by default; real Revisited data has none, so these two
  checks need ``true_boxes``);
* ``query_seeded``: the query-driven variant: the seed is the database image's patch most similar to the query
  (the mean feature of the query map's cells inside its ``bbx``), grown the same way, in each positive (easy or
  hard) database image of that query, against the true box.

Metrics ``<stage>/<set>/localisation/<map>/<check>/iou_mean`` and ``.../iou@0.5`` join the evaluation's
metrics (``metrics.json``, the loggers); every box goes to ``localisation/<stage>/<set>.json`` in the run
directory, and the first ``examples`` images of each check are drawn there as PNG files (the true box green,
one colour per map) and logged to W&B as images. Rank 0 does the work and shares the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from datamodules.generated_landmarks import read_landmark_boxes
from datamodules.images import open_image
from retrieval.files import write_text_atomic
from retrieval.localisation import box_iou, draw_boxes, gld_box_to_pixels, iou_summary, localise

CHECKS = ("query_box", "object", "query_seeded")


class LocalisationCheck(pl.Callback):
    """See the module docstring.

    Args:
        stages: the evaluations the check runs in (``test``; ``val`` too for a datamodule that validates).
        max_queries, max_database: images checked per set (the first ones in list order; ``None``: all).
        examples: images drawn per set and check.
        k, degree_similarity_threshold, threshold, connectivity: :func:`retrieval.localisation.localise`. The
            degree is the dense graph's by default (LOST's: the patches more than 0.5 cosine-similar), because the
            k-NN in-degree (``degree_similarity_threshold: null``) misses objects of more than about ``k`` cells
            and, in a flat background, lets image noise make a background patch the seed.
        iou_threshold: an image counts as localised when its IoU is above this.
        true_boxes: a Google-Landmark-Boxes CSV (``id,box``; ``id`` the image name without extension) of the
            database and query images; default the datamodule's ``true_boxes`` when it has one.
        output_dir: folder of the run directory for the boxes and the drawings.
    """

    def __init__(
        self,
        stages: tuple[str, ...] = ("test",),
        max_queries: int | None = None,
        max_database: int | None = 200,
        examples: int = 4,
        k: int = 8,
        degree_similarity_threshold: float | None = 0.5,
        threshold: float = 0.5,
        connectivity: int = 4,
        iou_threshold: float = 0.5,
        true_boxes: str | None = None,
        output_dir: str = "localisation",
    ):
        self.stages, self.max_queries, self.max_database = tuple(stages), max_queries, max_database
        self.examples, self.iou_threshold, self.true_boxes, self.output_dir = (
            examples,
            iou_threshold,
            true_boxes,
            output_dir,
        )
        self.options = dict(
            k=k, degree_similarity_threshold=degree_similarity_threshold, threshold=threshold, connectivity=connectivity
        )

    def evaluation_metrics(self, trainer, pl_module, stage: str) -> dict[str, float]:
        """Called by :class:`callbacks.retrieval_evaluation.RetrievalEvaluation` on every process."""
        if stage not in self.stages:
            return {}
        if not hasattr(pl_module, "feature_maps"):
            raise TypeError(
                f"LocalisationCheck needs a module with feature_maps(images); {type(pl_module).__name__} has none"
            )
        datamodule = trainer.datamodule
        if not getattr(datamodule, "revisited", None):
            raise TypeError(
                f"LocalisationCheck needs a Revisited-layout datamodule (RevisitedOxfordParis, "
                f"GeneratedLandmarksRevisited); got {type(datamodule).__name__}"
            )
        metrics = None
        if trainer.is_global_zero:
            metrics = {}
            directory = Path(trainer.default_root_dir) / self.output_dir / stage
            truth = self._true_boxes(datamodule)
            for name, dataset in datamodule.revisited.items():
                records, drawn = self._check_set(trainer, pl_module, datamodule, dataset, truth, directory / name)
                write_text_atomic(directory / f"{name}.json", json.dumps({"images": records}, indent=1) + "\n")
                metrics.update(self._metrics(records, stage, name))
                self._log_images(trainer, f"{stage}/{name}/localisation", drawn)
        return trainer.strategy.broadcast(metrics, src=0)

    # ---- one evaluation set ---------------------------------------------------------------------------------
    def _check_set(self, trainer, module, datamodule, dataset, truth, directory: Path) -> tuple[list, list]:
        records, drawn = [], []
        queries = range(len(dataset.query_paths))[: self.max_queries]
        descriptors = {}
        for q in queries:
            image, maps, to_original = self._maps(trainer, module, datamodule, dataset.query_paths[q])
            bbx = np.asarray(dataset.query_boxes[q], dtype=np.float64)
            boxes = {m: self._localise(f, to_original, "object") for m, f in maps.items()}
            descriptors[q] = {m: _box_descriptor(f, _to_resized(bbx, to_original)) for m, f in maps.items()}
            records.append(_record("query_box", dataset.query_paths[q], bbx, boxes))
            if q < self.examples:
                drawn.append(self._draw(image, bbx, boxes, directory / f"query_{q:03d}.png", records[-1]))
        positives = {}  # database index -> the checked queries it is a positive of
        for q in queries:
            for i in list(dataset.gnd[q].get("easy", [])) + list(dataset.gnd[q].get("hard", [])):
                positives.setdefault(int(i), []).append(q)
        with_truth = [i for i, path in enumerate(dataset.database_paths) if Path(path).stem in truth]
        shown = {"object": 0, "query_seeded": 0}
        for i in with_truth[: self.max_database]:
            path = dataset.database_paths[i]
            image, maps, to_original = self._maps(trainer, module, datamodule, path)
            true = gld_box_to_pixels(truth[Path(path).stem], *image.size)
            boxes = {m: self._localise(f, to_original, "object") for m, f in maps.items()}
            records.append(_record("object", path, true, boxes))
            if shown["object"] < self.examples:
                shown["object"] += 1
                drawn.append(
                    self._draw(image, true[0], boxes, directory / f"object_{Path(path).stem}.png", records[-1])
                )
            for q in positives.get(i, []):
                boxes = {m: self._localise(f, to_original, "query", descriptors[q][m]) for m, f in maps.items()}
                records.append(_record("query_seeded", path, true, boxes, query=dataset.query_paths[q]))
                if shown["query_seeded"] < self.examples:
                    shown["query_seeded"] += 1
                    target = directory / f"query_seeded_{q:03d}_{Path(path).stem}.png"
                    drawn.append(self._draw(image, true[0], boxes, target, records[-1]))
        return records, drawn

    def _maps(self, trainer, module, datamodule, path: str):
        """The full image, its maps as ``{name: float [C, H, W]}`` and the transform's ``to_original``."""
        with open_image(Path(datamodule.root) / path) as opened:
            image = opened.convert("RGB")
        pixels, to_original = datamodule.transform(image)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            maps = module.feature_maps(pixels[None].to(module.device))
        resized = (pixels.shape[2], pixels.shape[1])
        return image, {m: (f[0].float().cpu().numpy(), resized) for m, f in maps.items()}, to_original.numpy()

    def _localise(self, feature, to_original, mode: str, descriptor=None) -> np.ndarray:
        features, resized = feature
        cells = features.shape[1] * features.shape[2]
        if cells < 2:  # one cell: the whole image is all a map can say
            return _to_original(np.array([0.0, 0.0, resized[0], resized[1]]), to_original)
        options = {**self.options, "k": min(self.options["k"], cells - 1)}  # small maps have fewer other cells
        box = localise(features, resized, mode=mode, query_descriptor=descriptor, **options)
        return _to_original(box, to_original)

    def _draw(self, image, true, boxes: dict, path: Path, record: dict):
        draw_boxes(image, {"true": true, **boxes}, path)
        ious = ", ".join(f"{m} {v:.2f}" for m, v in record["iou"].items())
        return path, f"{record['check']} {Path(record['image']).name}: IoU {ious}"

    # ---- scores and logging ---------------------------------------------------------------------------------
    def _true_boxes(self, datamodule) -> dict[str, np.ndarray]:
        path = self.true_boxes or getattr(datamodule, "true_boxes", None)
        return read_landmark_boxes(path) if path is not None else {}

    def _metrics(self, records: list[dict], stage: str, name: str) -> dict[str, float]:
        metrics = {}
        for check in CHECKS:
            of_check = [r for r in records if r["check"] == check]
            for feature in of_check[0]["iou"] if of_check else []:
                iou = np.array([r["iou"][feature] for r in of_check])
                for key, value in iou_summary(iou, self.iou_threshold).items():
                    metrics[f"{stage}/{name}/localisation/{feature}/{check}/{key}"] = value
        return metrics

    def _log_images(self, trainer, key: str, drawn: list) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and drawn:
                import wandb

                logger.experiment.log({key: [wandb.Image(str(path), caption=caption) for path, caption in drawn]})


def _record(check: str, image: str, true, boxes: dict, query: str | None = None) -> dict:
    true = np.atleast_2d(np.asarray(true, dtype=np.float64))
    record = {"check": check, "image": image, "true": true.tolist()}
    if query is not None:
        record["query"] = query
    record["predicted"] = {m: np.asarray(b).tolist() for m, b in boxes.items()}
    # an image with several true boxes is localised by its best-matching one
    record["iou"] = {m: float(max(box_iou(b, t) for t in true)) for m, b in boxes.items()}
    return record


def _to_original(box, to_original) -> np.ndarray:
    scale_x, scale_y, offset_x, offset_y = to_original
    x1, y1, x2, y2 = box
    return np.array(
        [x1 * scale_x + offset_x, y1 * scale_y + offset_y, x2 * scale_x + offset_x, y2 * scale_y + offset_y]
    )


def _to_resized(box, to_original) -> np.ndarray:
    scale_x, scale_y, offset_x, offset_y = to_original
    x1, y1, x2, y2 = box
    return np.array(
        [(x1 - offset_x) / scale_x, (y1 - offset_y) / scale_y, (x2 - offset_x) / scale_x, (y2 - offset_y) / scale_y]
    )


def _box_descriptor(feature, box) -> np.ndarray:
    """The mean of the L2-normalised cells whose centres lie in ``box`` (pixels of the resized image); the cell
    under the box's centre when none does."""
    features, (width, height) = feature
    channels, rows, columns = features.shape
    centres_x = (np.arange(columns) + 0.5) * width / columns
    centres_y = (np.arange(rows) + 0.5) * height / rows
    inside_x = (centres_x >= box[0]) & (centres_x < box[2])
    inside_y = (centres_y >= box[1]) & (centres_y < box[3])
    cells = features.reshape(channels, rows, columns)
    if not inside_x.any() or not inside_y.any():
        column = int(np.clip((box[0] + box[2]) / 2 * columns / width, 0, columns - 1))
        row = int(np.clip((box[1] + box[3]) / 2 * rows / height, 0, rows - 1))
        inside_x, inside_y = np.arange(columns) == column, np.arange(rows) == row
    selected = cells[:, inside_y][:, :, inside_x].reshape(channels, -1).T
    norms = np.linalg.norm(selected, axis=1, keepdims=True)
    return (selected / np.where(norms > 0, norms, 1)).mean(axis=0)

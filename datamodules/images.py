"""Image benchmarks: lists of image files (or their stored descriptors) with the ground truth that scores them.

Every dataset family (:mod:`datamodules.sop`, :mod:`~datamodules.pittsburgh`, :mod:`~datamodules.gldv2`,
:mod:`~datamodules.revisited`) reads its published lists into named :class:`ImageList` objects and describes
its evaluation sets by list name (:class:`EvalSpec`). :class:`ImageBenchmark` turns that description into
datasets of two kinds, chosen by one argument:

* ``features=None``: the images, decoded and resized (``{"index", "image", "to_original"}`` examples), for
  image-level methods and for extraction (``predict``);
* ``features=<dir>``: the stored descriptors ``<dir>/<list name>.h5`` written by extraction
  (``{"index", "embedding"}`` examples), for embedding-level methods. Their ids must equal the list's paths,
  so a store extracted from another version of the lists is refused rather than silently misaligned.

An unreadable image (e.g. a truncated JPEG) stops evaluation and extraction with an error naming the file:
a missing row would shift every index after it. For training, ``skip_unreadable_train=True`` instead drops
such images from their batch, warns with the file name, and counts them in the batch (``"skipped"``).

Training on images: ``train_augmentation`` gives the training split random resized crops of one fixed size,
flips and colour jitter (:class:`~datamodules.augmentation.TrainAugmentation`); evaluation keeps the protocol's
resizing (:class:`ImageTransform`). ``class_balanced`` trains on P classes x K images per global batch
(:class:`~datamodules.sampling.ClassBalancedSampler`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from datamodules.augmentation import AugmentationSettings, TrainAugmentation
from datamodules.base import EvalSet, EvalStage, RetrievalDataModule, RowSubset
from datamodules.feature_store import EmbeddingDataset, collate_embeddings, training_locals
from datamodules.hf_images import HFImageSource
from datamodules.layout import DatasetFormatError, DatasetLayoutError
from datamodules.sampling import ClassBalanced
from datamodules.triplets import TripletMining
from retrieval.feature_store import LOCAL_COLUMNS, FeatureStore
from retrieval.ground_truth import GroundTruth
from retrieval.regions import region_rows

ResizeMode = Literal["longer_side", "square", "center_crop"]


@dataclass
class ImageList:
    """Images of one split: paths relative to the dataset root (also their ids in feature stores)."""

    paths: list[str]
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None  # [N, 4] x1, y1, x2, y2 crop boxes in pixels (Revisited queries)
    relative_boxes: bool = False  # boxes as fractions of the image's width and height (regions)
    region_ids: list[str] | None = None  # ids of a regional list's rows, '<path>#<region>' (see retrieval.regions)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ids(self) -> list[str]:
        """The rows' ids in feature stores: the paths, or the region ids of a regional list."""
        return self.region_ids if self.region_ids is not None else self.paths


@dataclass
class Regions:
    """Regional lists for Detect-to-Retrieve: for each list in ``lists``, a list ``<name>_<suffix>`` with one row
    per region of each image (the whole image first when ``whole_image``, then its ``boxes`` from a boxes CSV
    ``id,box[,score]`` as ``predict`` with the detector writes it or the Google Landmark Boxes files give it,
    with a score of at least ``min_score``, at most ``max_regions`` per image; or the cells of a fixed ``grid``
    at these levels), each row reading its crop of the image. Extracting the list stores every region's
    descriptors with the id ``<image id>#<region number>`` (:mod:`retrieval.regions`)."""

    lists: list[str]
    boxes: str | None = None
    grid: list[int] | None = None
    min_score: float = 0.1
    max_regions: int | None = None
    whole_image: bool = True
    suffix: str = "regions"


@dataclass
class EvalSpec:
    """An evaluation set by list names; ``query=None`` is leave-one-out over the database."""

    name: str
    ground_truth: GroundTruth
    database: list[str]  # list names, concatenated in this order (e.g. a database then its distractors)
    query: str | None = None
    lists: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lists = ([self.query] if self.query else []) + list(self.database)


class ImageTransform:
    """PIL image -> float tensor in [0, 1] (the backbone normalises), plus the map back to original pixels.

    Modes:
        ``longer_side``: the longer side becomes ``image_size``, the aspect ratio is kept (the Revisited and
            GLDv2 practice); images of the same resized shape are batched together (see
            :meth:`ImageListDataset.resized_shapes`).
        ``square``: resized to ``image_size`` x ``image_size``, aspect ratio not kept.
        ``center_crop``: the shorter side becomes ``image_size``, then the central square is cut.
    Each side is rounded to a multiple of ``multiple_of`` (a ViT's patch size), at least one multiple.
    ``to_original`` holds ``(scale_x, scale_y, offset_x, offset_y)``: original = transformed * scale + offset.
    """

    def __init__(self, image_size: int = 224, mode: ResizeMode = "longer_side", multiple_of: int = 1):
        if mode not in ("longer_side", "square", "center_crop"):
            raise ValueError(f"resize mode must be longer_side, square or center_crop, got {mode!r}")
        self.image_size, self.mode, self.multiple_of = image_size, mode, multiple_of

    def _round(self, value: float) -> int:
        return max(self.multiple_of, int(round(value / self.multiple_of)) * self.multiple_of)

    @property
    def keeps_aspect_ratio(self) -> bool:
        """Whether the output shape depends on the image (else every image gets the same shape)."""
        return self.mode == "longer_side"

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the transformed image of an image of ``width`` x ``height`` pixels."""
        if self.mode == "longer_side":
            ratio = self.image_size / max(width, height)
            return self._round(width * ratio), self._round(height * ratio)
        side = self._round(self.image_size)
        return side, side

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        offset_x = offset_y = 0.0
        if self.mode == "center_crop":
            side = min(width, height)
            offset_x, offset_y = (width - side) // 2, (height - side) // 2
            image = image.crop((offset_x, offset_y, offset_x + side, offset_y + side))
            width = height = side
        new_w, new_h = self.output_size(width, height)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        to_original = torch.tensor([width / new_w, height / new_h, offset_x, offset_y], dtype=torch.float32)
        return pixels.float().div_(255), to_original


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` (the header only, until pixels are asked for); a missing file, or one that cannot
    be decoded within the block, raises :class:`DatasetLayoutError` / :class:`DatasetFormatError` naming it."""
    try:
        with Image.open(path) as opened:
            yield opened
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetFormatError(
            f"{path}: cannot be decoded as an image ({error}); expected a complete JPEG/PNG file"
        ) from error


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB, completely (a truncated file fails here, naming it)."""
    with open_image(path) as opened:
        return opened.convert("RGB")


class ImageListDataset(Dataset):
    """The images of an :class:`ImageList` under ``root``, or from a Hugging Face dataset (``source``).

    Boxes crop the decoded image the way the Revisited code does (PIL ``crop``). ``skip_unreadable``: return ``{"index", "unreadable": path}`` for a file that cannot be decoded instead of
    raising; :func:`collate_images` drops it from the batch and counts it.
    """

    def __init__(
        self,
        root: str | Path,
        images: ImageList,
        transform: ImageTransform | TrainAugmentation,
        skip_unreadable: bool = False,
        source: HFImageSource | None = None,
    ):
        self.root = Path(root)
        self.source = source
        self.images = images
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._sizes: np.ndarray | None = None  # [N, 2] width, height; -1 until read

    @property
    def ids(self) -> list[str]:
        return self.images.ids

    @property
    def labels(self) -> np.ndarray | None:
        return self.images.labels

    def image_sizes(self, indices: Sequence[int]) -> np.ndarray:
        """``[len(indices), 2]`` (width, height) of the images as the transform receives them (after the crop
        box), read from the file headers without decoding, and cached."""
        if self._sizes is None:
            self._sizes = np.full((len(self), 2), -1, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        for index in np.unique(indices[self._sizes[indices, 0] < 0]):
            self._sizes[index] = self._read_size(int(index))
        return self._sizes[indices]

    def _read_size(self, index: int) -> tuple[int, int]:
        if self.images.boxes is not None and not self.images.relative_boxes:
            x1, y1, x2, y2 = _rounded_box(self.images.boxes[index])
            return x2 - x1, y2 - y1
        image_id = self.images.paths[index]
        if self.source is not None:
            size = self.source.open(image_id).size
        else:
            with open_image(self.root / image_id) as opened:  # reads the header only
                size = opened.size
        if self.images.boxes is None:
            return size
        x1, y1, x2, y2 = _rounded_box(self._pixel_box(index, *size))
        return x2 - x1, y2 - y1

    def _pixel_box(self, index: int, width: int, height: int) -> np.ndarray:
        box = np.asarray(self.images.boxes[index], dtype=np.float64)
        return box * np.array([width, height, width, height]) if self.images.relative_boxes else box

    def resized_shapes(self, indices: Sequence[int]) -> list[tuple[int, int]] | None:
        """``(height, width)`` of each transformed image, or ``None`` when the transform gives every image the
        same shape; the dataloaders batch equal shapes together."""
        if not self.transform.keeps_aspect_ratio:
            return None
        return [self.transform.output_size(w, h)[::-1] for w, h in self.image_sizes(indices).tolist()]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image_id = self.images.paths[index]
        try:
            image = self.source.open(image_id) if self.source is not None else load_image(self.root / image_id)
        except (DatasetFormatError, DatasetLayoutError) as error:
            if not self.skip_unreadable:
                raise
            return {"index": index, "unreadable": str(error)}
        if self.images.boxes is not None:
            image = image.crop(tuple(float(v) for v in self._pixel_box(index, *image.size)))
        pixels, to_original = self.transform(image)
        example = {"index": index, "image": pixels, "to_original": to_original}
        if self.images.labels is not None:
            example["label"] = int(self.images.labels[index])
        return example


def _rounded_box(box) -> tuple[int, ...]:
    """A crop box as PIL's ``crop`` rounds it, whatever the image's size."""
    return tuple(int(round(float(v))) for v in box)


def collate_images(examples: list[dict]) -> dict:
    """Stack a batch; unreadable examples (see :class:`ImageListDataset`) are dropped, warned about, counted."""
    readable = [e for e in examples if "unreadable" not in e]
    for example in examples:
        if "unreadable" in example:
            warnings.warn(f"skipping an unreadable training image: {example['unreadable']}", stacklevel=1)
    shapes = {tuple(e["image"].shape) for e in readable}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(shapes)} in one batch: batch them by shape "
            "(datamodules.sampling.ShapeBatchSampler with ImageListDataset.resized_shapes, as the datamodules' "
            "loaders do), set the batch size to 1, or use resize mode 'square' or 'center_crop'"
        )
    batch = default_collate(readable) if readable else {}
    batch["skipped"] = torch.tensor(len(examples) - len(readable))
    return batch


class ImageBenchmark(RetrievalDataModule):
    """Base of the image benchmarks: subclasses read their lists (:meth:`read_lists`), say which one trains
    (:meth:`train_list`) and describe evaluation (:meth:`eval_specs`).

    Args:
        root: the dataset's root directory, in its published layout.
        features: directory of feature stores ``<list name>.h5`` to read instead of the images.
        hf_images: read the pixels from a Hugging Face ``datasets`` dataset instead of the image files:
            the arguments of :class:`~datamodules.hf_images.HFImageSource` (``path``, ``split``,
            ``id_column``, ``image_column``, ``data_files``, ``revision``); the lists still come from ``root``.
        image_size, resize: see :class:`ImageTransform`; ``multiple_of`` rounds sides (a ViT's patch size).
        skip_unreadable_train: drop (and count) unreadable training images instead of stopping.
        check_files: check on ``setup`` that every listed image file exists (one ``stat`` per image).
        predict_lists: which lists ``predict`` runs over (default: all of them).
        local_descriptors, train_locals, triplet_mining: with ``features``, the stores' local descriptors for
            re-ranking and triplet training (see :class:`~datamodules.feature_store.LabelledFeatureStores`).
        train_augmentation: reading images, the training split's transform instead of ``image_size`` /
            ``resize``: the arguments of :class:`~datamodules.augmentation.TrainAugmentation` (``image_size``,
            default this datamodule's, rounded to ``multiple_of``; ``scale``, ``ratio``, ``flip_probability``,
            ``brightness``, ``contrast``, ``saturation``, ``hue``). Evaluation and ``predict`` are not augmented.
        class_balanced: global training batches of P classes x K images, ``{classes_per_batch: P,
            images_per_class: K, min_images_per_class: M}`` (:class:`~datamodules.sampling.ClassBalanced`);
            ``batch_size`` must be P x K.
        regions: regional lists of image crops (the whole image plus detected boxes or a grid) for regional
            aggregation, ``{lists: [...], boxes: <csv> | grid: [levels], min_score, max_regions, whole_image,
            suffix}`` (:class:`Regions`), or several with different suffixes; e.g. ``predict_lists:
            [roxford5k_database_regions]`` extracts them.
    """

    def __init__(
        self,
        root: str,
        features: str | None = None,
        hf_images: dict | None = None,
        image_size: int = 224,
        resize: ResizeMode = "longer_side",
        multiple_of: int = 1,
        skip_unreadable_train: bool = False,
        check_files: bool = True,
        predict_lists: Sequence[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        local_descriptors: bool = False,
        train_locals: int | None = None,
        triplet_mining: TripletMining | None = None,
        train_augmentation: AugmentationSettings | None = None,
        class_balanced: ClassBalanced | None = None,
        regions: Regions | list[Regions] | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        regions = [] if regions is None else regions if isinstance(regions, list) else [regions]
        self.regions = [Regions(**r) if isinstance(r, dict) else r for r in regions]
        if features is None and (local_descriptors or train_locals is not None or triplet_mining is not None):
            raise ValueError(
                f"{type(self).__name__}: local descriptors and triplet mining read feature stores; set features"
            )
        self.local_descriptors = local_descriptors
        self.train_locals = train_locals
        self.triplet_mining = triplet_mining
        self.root = Path(root)
        self.features = Path(features) if features is not None else None
        self.hf_images = HFImageSource(**hf_images) if hf_images else None
        self.transform = ImageTransform(image_size, resize, multiple_of)
        self.train_transform: TrainAugmentation | None = None
        if train_augmentation is not None:
            if features is not None:
                raise ValueError(f"{type(self).__name__}: train_augmentation augments images; unset features")
            if not isinstance(train_augmentation, dict):
                raise ValueError(
                    f"{type(self).__name__}: train_augmentation must be the arguments of TrainAugmentation as a "
                    f"dict (image_size, scale, ratio, flip_probability, brightness, contrast, saturation, hue), "
                    f"got {train_augmentation!r}"
                )
            options = {"image_size": self.transform._round(image_size), **train_augmentation}
            if options["image_size"] % multiple_of:
                raise ValueError(
                    f"{type(self).__name__}: train_augmentation image_size {options['image_size']} must be a multiple "
                    f"of multiple_of = {multiple_of} (a ViT's patch size)"
                )
            try:
                self.train_transform = TrainAugmentation(**options)
            except TypeError as error:
                raise ValueError(f"{type(self).__name__}: train_augmentation: {error}") from None
        self.set_class_balanced(class_balanced)
        self.skip_unreadable_train = skip_unreadable_train
        self.check_files = check_files
        self.predict_lists = list(predict_lists) if predict_lists is not None else None
        self._lists: dict[str, ImageList] | None = None

    # ---- to implement -----------------------------------------------------------------------------------
    def read_lists(self) -> dict[str, ImageList]:
        """Every list of the benchmark by name (validating the layout)."""
        raise NotImplementedError

    def eval_specs(self, stage: EvalStage) -> list[EvalSpec]:
        raise NotImplementedError

    def train_list(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no training split")

    def subsets(self) -> dict[str, tuple[str, np.ndarray]]:
        """Named subsets of published lists, ``{name: (list name, rows)}``, usable wherever a list name is (e.g. a
        validation split held out from the training list). They read the list's images or stored features and
        are never extracted on their own."""
        return {}

    # ---- provided ---------------------------------------------------------------------------------------
    @property
    def lists(self) -> dict[str, ImageList]:
        if self._lists is None:
            lists = self.read_lists()
            for regions in self.regions:
                lists.update(regional_lists(lists, regions, self.root))
            self._lists = lists
        return self._lists

    def setup(self, stage: str | None = None) -> None:
        lists = self.lists  # reads and validates the published lists
        if self.features is None and self.check_files:
            for name in dict.fromkeys(self._source_list(n) for n in self._used_lists(stage)):
                self._check_images_exist(name, lists[name])

    def _used_lists(self, stage: str | None) -> list[str]:
        if stage == "predict":
            return self.predict_list_names()
        used = []
        if stage in (None, "fit"):
            try:
                used.append(self.train_list())
            except NotImplementedError:
                pass
        for eval_stage in {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, ["val", "test"]):
            used += [name for spec in self.eval_specs(eval_stage) for name in spec.lists]
        return list(dict.fromkeys(used))

    def _check_images_exist(self, name: str, images: ImageList) -> None:
        if self.hf_images is not None:
            missing = self.hf_images.missing(images.paths)
            where, example = self.hf_images.source, missing[0] if missing else ""
        else:
            missing = [p for p in images.paths if not (self.root / p).is_file()]
            where, example = self.root, self.root / missing[0] if missing else ""
        if missing:
            raise DatasetLayoutError(
                f"{type(self).__name__}: {len(missing)} of {len(images)} images of list '{name}' are missing in "
                f"{where}, e.g. {example}"
                + (f"\nExpected layout:\n{self.expected_tree.rstrip()}" if getattr(self, "expected_tree", "") else "")
            )

    def _source_list(self, name: str) -> str:
        """The published list that ``name`` (a list or a subset) reads."""
        subset = self.subsets().get(name)
        return subset[0] if subset is not None else name

    def dataset(self, name: str, train: bool = False) -> Dataset:
        """The images of list (or subset) ``name``, or its stored descriptors when ``features`` is set."""
        subset = self.subsets().get(name)
        if subset is not None:
            return RowSubset(self.dataset(subset[0], train), subset[1])
        if name not in self.lists:
            raise ValueError(f"{type(self).__name__} has lists {sorted(self.lists)}, not {name!r}")
        images = self.lists[name]
        if self.features is None:
            skip = train and self.skip_unreadable_train
            transform = self.train_transform if train and self.train_transform is not None else self.transform
            return ImageListDataset(self.root, images, transform, skip_unreadable=skip, source=self.hf_images)
        store = FeatureStore(self.features / f"{name}.h5")
        if store.ids != images.ids:
            raise DatasetFormatError(
                f"{store.path}: its {store.num_images} image ids do not match the {len(images)} images of list "
                f"'{name}' under {self.root}; extract it again from these lists"
            )
        locals_per_example = training_locals(self, store) if train else None
        local_store = store if self.local_descriptors or locals_per_example is not None else None
        return EmbeddingDataset(
            store.global_descriptors(), images.ids, images.labels, local_store, locals_per_example, store
        )

    @property
    def embedding_dim(self) -> int | None:
        """Size of the stored global descriptors (``None`` when reading images)."""
        if self.features is None:
            return None
        try:
            name = self.train_list()
        except (NotImplementedError, ValueError):  # no training list: any list's store tells the size
            name = next(iter(self.lists))
        return FeatureStore(self.features / f"{self._source_list(name)}.h5").global_dim

    @property
    def local_dim(self) -> int | None:
        """Size of the stored local descriptors (``None`` when reading images or stores without locals)."""
        if self.features is None:
            return None
        for name in self.lists:
            path = self.features / f"{name}.h5"
            if path.is_file() and FeatureStore(path).has_local:
                return FeatureStore(path).local_shape[1] - len(LOCAL_COLUMNS)
        return None

    def train_dataset(self) -> Dataset:
        return self.dataset(self.train_list(), train=True)

    def train_store_path(self) -> str:
        if self.features is None:
            raise ValueError(f"{type(self).__name__}: triplet training reads feature stores; set features")
        name = self.train_list()
        store = self.features / f"{self._source_list(name)}.h5"
        # A subset of a list (e.g. training without its validation rows) keeps its own neighbour file.
        return str(store if name == self._source_list(name) else self.features / f"{name}.h5")

    def build_eval_sets(self, stage: EvalStage) -> list[EvalSet]:
        datasets: dict[str, Dataset] = {}  # one dataset per list, shared by the evaluation sets that use it

        def parts(names: list[str]) -> dict[str, Dataset]:
            for name in names:
                if name not in datasets:
                    datasets[name] = self.dataset(name)
            return {name: datasets[name] for name in names}

        return [
            EvalSet(spec.name, parts(spec.database), spec.ground_truth, parts([spec.query]) if spec.query else None)
            for spec in self.eval_specs(stage)
        ]

    def predict_list_names(self) -> list[str]:
        names = self.predict_lists if self.predict_lists is not None else list(self.lists)
        unknown = [n for n in names if n not in self.lists]
        if unknown:
            raise ValueError(f"predict_lists {unknown} are not lists of {type(self).__name__}: {sorted(self.lists)}")
        return names

    def predict_datasets(self) -> dict[str, Dataset]:
        return {name: self.dataset(name) for name in self.predict_list_names()}

    def collate_fn(self):
        return collate_images if self.features is None else collate_embeddings


def regional_lists(lists: dict[str, ImageList], regions: Regions, root: Path) -> dict[str, ImageList]:
    """The lists ``<name>_<suffix>`` of :class:`Regions`: one row per region of every image of ``name``."""
    unknown = [name for name in regions.lists if name not in lists]
    clashing = [f"{name}_{regions.suffix}" for name in regions.lists if f"{name}_{regions.suffix}" in lists]
    if clashing:
        raise ValueError(f"regions: lists {clashing} exist already; give each regions entry its own suffix")
    if unknown:
        raise ValueError(f"regions: lists {unknown} are not lists of this benchmark: {sorted(lists)}")
    boxes = None
    if regions.boxes is not None:
        from datamodules.landmark_boxes import read_scored_boxes  # the detector's module reads datamodules

        path = Path(regions.boxes)
        boxes = read_scored_boxes(path if path.is_absolute() or path.exists() else root / path)
    regional = {}
    for name in regions.lists:
        images = lists[name]
        if images.boxes is not None:
            raise ValueError(
                f"regions: list '{name}' is already cropped to boxes (queries); regions are for whole images"
            )
        rows = region_rows(
            images.paths, boxes, regions.grid, regions.min_score, regions.max_regions, regions.whole_image
        )
        ymin, xmin, ymax, xmax = rows.boxes.T
        regional[f"{name}_{regions.suffix}"] = ImageList(
            [images.paths[i] for i in rows.image.tolist()],
            labels=images.labels[rows.image] if images.labels is not None else None,
            boxes=np.stack([xmin, ymin, xmax, ymax], axis=1),
            relative_boxes=True,
            region_ids=rows.ids(images.paths),
        )
    return regional

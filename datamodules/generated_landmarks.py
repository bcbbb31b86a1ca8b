"""The generated landmarks benchmark: seeded, procedurally drawn "landmarks" photographed as JPEG files, written in
the published GLDv2 and Revisited layouts with Google-Landmark-Boxes-style boxes, so that image-level methods
(global descriptors, the D2R detector) train and are scored on CPU in minutes without downloading anything.

Every image is square (``image_size`` pixels) and drawn as follows:

* **landmark**: a planar "facade", one per landmark id, drawn once from the seed and the id: a palette of five
  colours, a wall texture (bricks, planks or stucco), a grid of windows of one shape (rectangles, arches, round or
  pointed windows, with mullions, some left out), a door, cornices, pilasters, a roof ornament (pediment, dome,
  battlements or dentils, with a rose window) and a few random polygons and discs, so landmarks differ in colour,
  layout and fine detail (local features have something to match). Its aspect ratio is between 0.6 and 1.67;
* **view**: a homography places the facade in the image: size ``scale`` (the square root of its area before
  perspective, as a fraction of the image side; log-uniform in ``scale_range``, from large to small), rotation
  uniform within ``max_rotation`` degrees, a perspective tilt whose corners' divisors ``w = 1 + tx u + ty v``
  (``u, v`` the facade's normalised coordinates in [-1, 1]) satisfy ``|tx| + |ty| <= perspective`` and its
  centre uniform in the middle 60% of the image, so large landmarks are often cut by the image border.
  ``foreshortening`` = ``(1 + |tx| + |ty|) / (1 - |tx| - |ty|)``: how much nearer one side looks than the other;
* **lighting**: the landmark's brightness and colour change (gain within ``1 +- lighting``, a colour cast a third
  of that), then the whole photograph gets a brightness gradient (a shadow) in a random direction;
* **occlusion**: with ``occlusion_probability``, a textured occluder with an irregular edge (a tree, a wall)
  covers a band of ``occlusion_extent`` of the landmark's box from one side;
* **clutter**: the background is a horizon between two textures plus building-like blocks of others
  (``background_textures`` in all per image), drawn from a pool of ``background_pool`` textures shared by every
  image; ``distractors_per_image`` objects (discs, signs, trees, cars, stars with patterned fills) from a pool of
  ``distractor_pool`` shared by every image and class (0.12 to 0.4 of the image side, rotated up to 30 degrees)
  are pasted behind or in front of the landmark, so they also occlude it. Shared
  clutter makes unrelated images look alike to a global descriptor, and a small landmark covers few pixels of its
  own image.

Exact truth per image (``views.csv``): the landmark, its pose, the box (the bounding box of the landmark's projected
quadrilateral, clipped to the image, in pixels; occlusion does not shrink it, as in annotated boxes),
``visible_fraction`` (landmark pixels inside the image and not covered by anything drawn in front, over the area
of its whole quadrilateral), ``visible_size`` (the square root of the visible landmark pixels over the image's
pixels) and ``occluded`` (the fraction of its in-image pixels that something in front hides).

Layouts written under ``root`` (the readers of :mod:`datamodules.gldv2` and :mod:`datamodules.revisited` read them
unchanged)::

    gldv2/train.csv, train_clean.csv (the same images: nothing is noisy), index.csv, test.csv,
    gldv2/retrieval_solution_v2.1.csv                   test queries alternately Public and Private, and
                                                        ``ignored_queries`` images without a landmark, Ignored
    gldv2/{train,index,test}/<a>/<b>/<c>/<id>.jpg       16-hexadecimal-character ids
    revisited/<revisited_name>/gnd_<revisited_name>.pkl imlist (image_00000, ...), qimlist (query_000, ...),
                                                        gnd[{bbx, easy, hard, junk}], 0-based
    revisited/<revisited_name>/jpg/<image>.jpg
    boxes/boxes_split1.csv, boxes_split2.csv            the training images' boxes (split2: the images of a
                                                        ``boxes_validation_fraction`` of the training landmarks,
                                                        to validate a detector on unseen landmarks)
    boxes/boxes_eval.csv                                index, test and Revisited database and query images
    views.csv                                           per image: the truth above (the images are listed
                                                        before drawing, so that a later generation removes
                                                        those of an older or interrupted one)
    generated_landmarks.json                            the spec, written last and atomically: generation is
                                                        skipped while it matches, and an interrupted
                                                        generation starts again

Boxes files are in the Google Landmark Boxes format of Detect-to-Retrieve (``boxes_split1.csv`` /
``boxes_split2.csv``): header ``id,box``, one row per box, ``box`` = ``ymin xmin ymax xmax`` normalised to [0, 1]
by the image's height and width (read with :func:`datamodules.landmark_boxes.read_landmark_boxes`). Images without a
landmark have no row. :class:`GeneratedLandmarkBoxes` trains and validates the landmark detector on them.

Landmark ids: training ``0 .. train_landmarks - 1``, then the queried GLDv2 landmarks, the GLDv2 index
distractors (landmarks no query asks for), the Revisited landmarks and the Revisited distractors, all disjoint, so
retrieval is always on unseen landmarks, as in GLDv2 and Revisited.

Revisited labels of a query's landmark's database images (the same for every query of a landmark), from
``views.csv``: **junk** if ``visible_size < junk_below_size`` or ``visible_fraction < junk_below_visible`` (barely
visible); else **easy** if ``visible_size >= easy_min_size``, ``visible_fraction >= easy_min_visible``,
``|rotation| <= easy_max_rotation`` and ``foreshortening <= easy_max_foreshortening`` (large, mostly visible,
nearly frontal); else **hard** (small, cut, occluded or strongly warped, but identifiable). Revisited queries are
centred, nearly frontal, fairly large, unoccluded views with clutter behind only (``bbx`` = their box, which the
reader crops); the first database image of every Revisited landmark is drawn like a query, so almost every query
has an easy positive. GLDv2 test queries are ordinary views, whole images, as in GLDv2.

Sizes with the default spec (112-pixel images): training 2,400 images of 200 landmarks (boxes: 2,160 in split1,
240 in split2); GLDv2 index 900 images of 150 landmarks (50 queried, 6 images each, and 100 distractors), test 120
images (50 Public and 50 Private queries, 20 Ignored); ``rlandmarks``: 45 queries of 15 landmarks, 420 database
images (180 of the queried landmarks, 240 of 20 distractor landmarks), per query 2.8 easy, 6.9 hard and 2.3 junk
images on average; 3,885 images, 25 MB, generated in about 12 seconds on one CPU core
(``python -m datamodules.generated_landmarks [root]`` prints the numbers). :func:`baseline_metrics` scores a
global descriptor with nothing learnt, a colour histogram: of the whole image it reaches GLDv2 mAP@100 0.017
(Public) / 0.012 (Private), about chance, and ``rlandmarks`` medium mAP 0.18; of the true boxes 0.20 / 0.18 and
0.44. Clutter dominates the whole image, and knowing where the landmark is pays.

What it can show: whether a descriptor learnt on some landmarks retrieves unseen ones across scale, viewpoint,
occlusion and lighting changes; how much shared clutter fools a global descriptor, and whether attending to the
landmark (a detector trained on the boxes, regional aggregation, local-feature re-ranking) recovers small
landmarks; the Revisited easy/medium/hard split by visibility. What it cannot: facades are flat, drawn from one
family of patterns, without 3-D structure, night, seasons, near-duplicate buildings or label noise, and the
backgrounds are textures, not scenes, so numbers here are not numbers on GLDv2 or Revisited Oxford/Paris.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.gldv2 import GoogleLandmarksV2, image_path
from datamodules.landmark_boxes import BOX_FILES, BOXES_HEADER, LandmarkBoxes, read_landmark_boxes
from datamodules.layout import DatasetFormatError, read_csv_rows, require_file
from datamodules.revisited import RevisitedOxfordParis

MARKER = "generated_landmarks.json"
VIEWS = "views.csv"
LOCK = ".generation.lock"
GENERATOR = "generated_landmarks"
FORMAT_VERSION = 1  # bump when the drawing changes, so stored benchmarks are regenerated
VIEW_COLUMNS = [
    "image",
    "split",
    "landmark",
    "centre_x",
    "centre_y",
    "scale",
    "rotation",
    "tilt_x",
    "tilt_y",
    "foreshortening",
    "visible_fraction",
    "visible_size",
    "occluded",
    "x1",
    "y1",
    "x2",
    "y2",
]
# Independent random streams (numpy seed sequences [seed, stream, index]), so that a landmark, a texture or an
# image depends only on the seed and its own index, not on how many others are generated.
FACADE, BACKGROUND, DISTRACTOR, IDS, SPLITS, VIEW = range(6)
VIEW_STREAMS = {"train": 0, "index": 1, "test": 2, "revisited_database": 3, "revisited_query": 4}


@dataclass(frozen=True)
class GeneratedLandmarksSpec:
    """Generation parameters (see the module docstring); stored in the marker file, so a change regenerates."""

    seed: int = 0
    image_size: int = 112  # side of the square images, pixels
    jpeg_quality: int = 90
    # GLDv2 layout.
    train_landmarks: int = 200
    train_images_per_landmark: int = 12
    boxes_validation_fraction: float = 0.1  # of the training landmarks, whose boxes go to boxes_split2.csv
    query_landmarks: int = 50  # unseen landmarks that the test queries ask for
    queries_per_landmark: int = 2  # test queries per queried landmark, alternately Public and Private
    index_images_per_landmark: int = 6
    index_distractor_landmarks: int = 100  # unseen landmarks in the index that no query asks for
    ignored_queries: int = 20  # test images without a landmark (Ignored rows of the solution)
    # Revisited layout.
    revisited_name: str = "rlandmarks"
    revisited_landmarks: int = 15
    revisited_queries_per_landmark: int = 3
    revisited_database_per_landmark: int = 12  # also the count of each distractor landmark
    revisited_distractor_landmarks: int = 20  # database landmarks that no query asks for
    # Views.
    scale_range: tuple[float, float] = (0.12, 0.9)  # landmark side / image side, large to small, log-uniform
    perspective: float = 0.35  # maximum |tx| + |ty| of the tilt (0: none; below 0.6)
    max_rotation: float = 25.0  # degrees, uniform in [-max_rotation, max_rotation]
    occlusion_probability: float = 0.3
    occlusion_extent: tuple[float, float] = (0.2, 0.6)  # fraction of the landmark's box an occluder covers
    lighting: float = 0.3  # relative strength of the brightness, colour and shadow changes
    # Clutter.
    background_textures: int = 3  # textured regions per background (horizon: 2, then building-like blocks)
    distractors_per_image: tuple[int, int] = (1, 4)  # shared objects per image, uniform in [min, max]
    background_pool: int = 24  # background textures shared by all images
    distractor_pool: int = 24  # distractor objects shared by all images and classes
    # Revisited labels (see the module docstring).
    easy_min_size: float = 0.3
    easy_min_visible: float = 0.75
    easy_max_rotation: float = 20.0
    easy_max_foreshortening: float = 1.6
    junk_below_size: float = 0.15
    junk_below_visible: float = 0.4

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"GeneratedLandmarksSpec: {message}")

        for name in (
            "train_landmarks",
            "train_images_per_landmark",
            "query_landmarks",
            "queries_per_landmark",
            "index_images_per_landmark",
            "revisited_landmarks",
            "revisited_queries_per_landmark",
            "revisited_database_per_landmark",
        ):
            require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("index_distractor_landmarks", "ignored_queries", "revisited_distractor_landmarks"):
            require(getattr(self, name) >= 0, f"{name} must be at least 0, got {getattr(self, name)}")
        require(
            self.query_landmarks * self.queries_per_landmark >= 2,
            "at least 2 test queries are needed (one Public, one Private)",
        )
        require(self.image_size >= 32, f"image_size must be at least 32 pixels, got {self.image_size}")
        require(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        require(0 <= self.boxes_validation_fraction < 1, "boxes_validation_fraction must be in [0, 1)")
        low, high = self.scale_range
        require(0 < low <= high <= 1.5, f"scale_range must satisfy 0 < min <= max <= 1.5, got {self.scale_range}")
        require(0 <= self.perspective < 0.6, f"perspective must be in [0, 0.6), got {self.perspective}")
        require(0 <= self.max_rotation <= 180, f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        require(0 <= self.occlusion_probability <= 1, "occlusion_probability must be in [0, 1]")
        low, high = self.occlusion_extent
        require(0 <= low <= high <= 1, f"occlusion_extent must satisfy 0 <= min <= max <= 1, got {low, high}")
        require(0 <= self.lighting < 1, f"lighting must be in [0, 1), got {self.lighting}")
        require(self.background_textures >= 1, "background_textures must be at least 1")
        low, high = self.distractors_per_image
        require(0 <= low <= high, f"distractors_per_image must satisfy 0 <= min <= max, got {low, high}")
        require(self.background_pool >= 1 and self.distractor_pool >= 1, "the pools need at least one member")
        require(self.revisited_name.isidentifier(), f"revisited_name must be a plain name, got {self.revisited_name!r}")


# ---- geometry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pose:
    """Where a facade lands in an image (see the module docstring)."""

    centre_x: float  # fraction of the image width
    centre_y: float  # fraction of the image height
    scale: float  # sqrt(facade area before perspective) / image side
    rotation: float = 0.0  # degrees, counter-clockwise on screen
    tilt_x: float = 0.0  # perspective divisor w = 1 + tilt_x u + tilt_y v, u, v in [-1, 1] across the facade
    tilt_y: float = 0.0

    @property
    def foreshortening(self) -> float:
        tilt = abs(self.tilt_x) + abs(self.tilt_y)
        return (1 + tilt) / (1 - tilt)


def homography(pose: Pose, facade_size: tuple[int, int], image_size: int) -> np.ndarray:
    """3x3 map from facade pixel coordinates (continuous: pixel i covers [i, i + 1)) to image coordinates."""
    width, height = facade_size
    pixels_per_facade_pixel = pose.scale * image_size / math.sqrt(width * height)
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], dtype=np.float64)
    tilt = np.array([[1, 0, 0], [0, 1, 0], [pose.tilt_x / (width / 2), pose.tilt_y / (height / 2), 1]])
    angle = math.radians(pose.rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    k = pixels_per_facade_pixel
    rotate_scale = np.array([[k * cos, k * sin, 0], [-k * sin, k * cos, 0], [0, 0, 1]])  # y points down
    place = np.array([[1, 0, pose.centre_x * image_size], [0, 1, pose.centre_y * image_size], [0, 0, 1]])
    return place @ rotate_scale @ tilt @ centre


def project(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[n, 2]`` points through a homography."""
    points = np.asarray(points, dtype=np.float64)
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def facade_corners(facade_size: tuple[int, int]) -> np.ndarray:
    width, height = facade_size
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)


def landmark_box(matrix: np.ndarray, facade_size: tuple[int, int], image_size: int) -> np.ndarray:
    """``[x1, y1, x2, y2]`` in pixels: the bounding box of the facade's projected corners, clipped to the image.

    A homography whose divisor stays positive maps the convex facade to a convex quadrilateral, whose bounding box is
    that of its corners."""
    corners = project(matrix, facade_corners(facade_size))
    low, high = corners.min(0), corners.max(0)
    return np.clip(np.r_[low, high], 0, image_size)


def warp(image: Image.Image, matrix: np.ndarray, image_size: int) -> np.ndarray:
    """``image`` (RGBA, premultiplied) drawn through ``matrix`` into an ``image_size`` square: ``[S, S, 4]`` float32
    in [0, 1], colours premultiplied by the coverage (alpha), zero outside."""
    inverse = np.linalg.inv(matrix)
    inverse /= inverse[2, 2]
    warped = image.transform(
        (image_size, image_size), Image.PERSPECTIVE, tuple(inverse.reshape(-1)[:8]), Image.BILINEAR
    )
    return np.asarray(warped, dtype=np.float32) / 255.0


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# ---- drawing -------------------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _palette(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Wall, window, frame, accent, roof: hues around a random base (plus a complementary accent), with values spread
    so that windows contrast with the wall."""
    base = rng.random()
    hues = base + np.array(
        [0.0, rng.normal(0, 0.06), rng.normal(0, 0.06), 0.5 + rng.normal(0, 0.1), rng.normal(0, 0.1)]
    )
    saturations = rng.uniform(0.15, 0.85, 5)
    wall_value = rng.uniform(0.45, 0.9)
    values = [wall_value, wall_value * rng.uniform(0.15, 0.5), min(1.0, wall_value * rng.uniform(1.1, 1.4))]
    values += list(rng.uniform(0.3, 0.95, 2))
    return [_hsv(h, s, v) for h, s, v in zip(hues, saturations, values)]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def draw_facade(seed: int, landmark: int, image_size: int) -> Image.Image:
    """The facade of ``landmark`` (RGB, longer side ``image_size``), a function of the seed and the id only."""
    rng = _rng(seed, FACADE, landmark)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1 / 0.6)))  # width / height
    width, height = (
        (image_size, round(image_size / aspect)) if aspect >= 1 else (round(image_size * aspect), image_size)
    )
    up = 2  # drawn at twice the size, then reduced: smooth edges, fine detail kept
    W, H = width * up, height * up
    wall, window, frame, accent, roof = _palette(rng)
    facade = Image.new("RGB", (W, H), wall)
    draw = ImageDraw.Draw(facade)

    # Wall texture: the fine, repeated detail that local features see everywhere on the facade.
    kind = rng.integers(3)
    line_colour = _shade(wall, rng.choice([0.75, 1.2]))
    if kind == 0:  # bricks
        course = int(rng.integers(3, 6)) * up
        brick = course * int(rng.integers(2, 4))
        for row, y in enumerate(range(0, H, course)):
            draw.line([(0, y), (W, y)], fill=line_colour, width=1)
            for x in range((row % 2) * brick // 2, W, brick):
                draw.line([(x, y), (x, y + course)], fill=line_colour, width=1)
    elif kind == 1:  # planks or ribs
        step = int(rng.integers(3, 7)) * up
        for x in range(0, W, step):
            draw.line([(x, 0), (x, H)], fill=line_colour, width=up)
    else:  # stucco: a low-frequency tint
        grid = rng.uniform(0.85, 1.15, (4, 4)).astype(np.float32)
        tint = np.asarray(Image.fromarray(grid).resize((W, H), Image.BICUBIC))
        facade = Image.fromarray(np.clip(np.asarray(facade, np.float32) * tint[..., None], 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(facade)

    roof_height = int(H * rng.uniform(0.12, 0.25))
    base_height = int(H * rng.uniform(0.05, 0.12))
    rows, columns = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    cell_w, cell_h = W / columns, (H - roof_height - base_height) / rows
    window_w, window_h = cell_w * rng.uniform(0.35, 0.7), cell_h * rng.uniform(0.4, 0.75)
    shape = rng.integers(5)  # rectangle, arch, round, pointed, paired
    mullions = rng.random() < 0.6
    kept = rng.random((rows, columns)) < rng.uniform(0.75, 1.0)
    outline = max(1, up * int(rng.integers(1, 3)))

    if rng.random() < 0.5:  # pilasters between the window columns
        for c in range(1, columns):
            x = c * cell_w
            draw.rectangle([x - up * 2, roof_height, x + up * 2, H - base_height], fill=accent)
    for r in range(rows + 1):  # cornices between storeys
        y = roof_height + r * cell_h
        draw.rectangle([0, y - up, W, y + up * int(rng.integers(0, 3))], fill=frame)

    def window_at(x0: float, y0: float, w: float, h: float) -> None:
        box = [x0, y0, x0 + w, y0 + h]
        cap = min(w, h) / 2  # height of an arch's or a point's top
        if shape == 1:  # arch: a rectangle under a half ellipse
            draw.rectangle([x0, y0 + cap, x0 + w, y0 + h], fill=window, outline=frame, width=outline)
            draw.pieslice([x0, y0, x0 + w, y0 + 2 * cap], 180, 360, fill=window, outline=frame, width=outline)
        elif shape == 2:
            draw.ellipse(box, fill=window, outline=frame, width=outline)
        elif shape == 3:  # pointed: a rectangle under a triangle
            draw.rectangle([x0, y0 + cap, x0 + w, y0 + h], fill=window, outline=frame, width=outline)
            draw.polygon([(x0, y0 + cap), (x0 + w / 2, y0), (x0 + w, y0 + cap)], fill=window, outline=frame)
        else:
            draw.rectangle(box, fill=window, outline=frame, width=outline)
        if mullions and shape != 2:
            draw.line([(x0 + w / 2, y0 + (cap if shape in (1, 3) else 0)), (x0 + w / 2, y0 + h)], fill=frame, width=up)
            draw.line([(x0, y0 + h * 0.55), (x0 + w, y0 + h * 0.55)], fill=frame, width=up)

    for r in range(rows):
        for c in range(columns):
            if not kept[r, c]:
                continue
            x0 = c * cell_w + (cell_w - window_w) / 2
            y0 = roof_height + r * cell_h + (cell_h - window_h) / 2
            if shape == 4:  # paired narrow windows
                narrow = window_w * 0.42
                window_at(x0, y0, narrow, window_h)
                window_at(x0 + window_w - narrow, y0, narrow, window_h)
            else:
                window_at(x0, y0, window_w, window_h)

    # Door and base.
    draw.rectangle([0, H - base_height, W, H], fill=_shade(wall, 0.8))
    door_w = W * rng.uniform(0.12, 0.25)
    door_x = W * rng.uniform(0.3, 0.7) - door_w / 2
    door_top = H - base_height - cell_h * rng.uniform(0.5, 0.9)
    door_cap = min(door_w, H - door_top) / 2
    door = _shade(window, 0.7)
    draw.rectangle([door_x, door_top + door_cap, door_x + door_w, H], fill=door, outline=frame, width=up)
    draw.pieslice([door_x, door_top, door_x + door_w, door_top + 2 * door_cap], 180, 360, fill=door)

    # Roof ornament.
    draw.rectangle([0, 0, W, roof_height], fill=roof)
    ornament = rng.integers(4)
    if ornament == 0:  # pediment
        draw.polygon([(W * 0.05, roof_height), (W / 2, roof_height * 0.1), (W * 0.95, roof_height)], fill=accent)
    elif ornament == 1:  # dome
        dome_w = W * rng.uniform(0.3, 0.6)
        draw.pieslice(
            [W / 2 - dome_w / 2, 0, W / 2 + dome_w / 2, roof_height * 2], 180, 360, fill=accent, outline=frame
        )
    elif ornament == 2:  # battlements
        tooth = W / (2 * int(rng.integers(4, 9)))
        for x in np.arange(0, W, 2 * tooth):
            draw.rectangle([x, 0, x + tooth, roof_height * 0.4], fill=wall)
    else:  # dentils: a row of small blocks
        step = up * int(rng.integers(3, 6))
        for x in range(0, W, 2 * step):
            draw.rectangle([x, roof_height - 2 * step, x + step, roof_height - step], fill=frame)
    if rng.random() < 0.5:  # rose window with spokes
        radius = min(roof_height * 0.35, W * 0.12)
        cx, cy = W * rng.uniform(0.3, 0.7), roof_height * 0.55
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=window, outline=frame, width=up)
        for angle in np.linspace(0, np.pi, int(rng.integers(3, 7)), endpoint=False):
            dx, dy = radius * np.cos(angle), radius * np.sin(angle)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=frame, width=up)

    # A few random polygons and discs: landmark-specific shapes for local features.
    for _ in range(int(rng.integers(1, 5))):
        colour = [accent, frame, roof, window][int(rng.integers(4))]
        cx, cy, radius = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.03, 0.1) * W
        if rng.random() < 0.5:
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour, outline=frame)
        else:
            count = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, count))
            radii = radius * rng.uniform(0.5, 1.3, count)
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=colour)
    return facade.resize((width, height), Image.LANCZOS)


def draw_background_texture(seed: int, index: int, image_size: int) -> np.ndarray:
    """Shared background texture ``index``: ``[2S, 2S, 3]`` float32 in [0, 255] (images crop an ``S`` square)."""
    rng = _rng(seed, BACKGROUND, index)
    side = 2 * image_size
    colours = np.array(
        [_hsv(rng.random(), rng.uniform(0.05, 0.7), rng.uniform(0.2, 0.95)) for _ in range(3)], np.float32
    )
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # clouds, foliage, gravel: smooth noise at a random frequency
        cells = int(rng.integers(3, 24))
        noise = rng.random((cells, cells)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(noise).resize((side, side), Image.BICUBIC), np.float32)
        mix = np.clip(field_, 0, 1)[..., None]
    elif kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 20)
        mix = (0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period))[..., None]
    elif kind == 2:  # tiles
        cell = int(rng.integers(4, 16))
        mix = (((x // cell) + (y // cell)) % 2)[..., None] * rng.uniform(0.5, 1)
    else:  # a gradient (sky, a lit wall)
        mix = (y / side)[..., None]
    texture = colours[0] * (1 - mix) + colours[1] * mix
    grain = rng.normal(0, rng.uniform(2, 10), (side, side, 1)).astype(np.float32)  # fine grain, for local features
    return np.clip(texture + grain, 0, 255).astype(np.float32)


def draw_distractor(seed: int, index: int, image_size: int) -> Image.Image:
    """Shared distractor object ``index``: a patterned shape, premultiplied RGBA (``RGBa``), ``S/2`` square."""
    rng = _rng(seed, DISTRACTOR, index)
    side = image_size  # drawn at twice the final size
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    first = np.array(_hsv(rng.random(), rng.uniform(0.5, 1), rng.uniform(0.5, 1)), np.float32)
    second = np.array(_hsv(rng.random(), rng.uniform(0.2, 1), rng.uniform(0.1, 0.9)), np.float32)
    pattern = rng.integers(3)
    period = rng.uniform(5, 14)
    if pattern == 0:
        mix = (np.sin(2 * np.pi * (x + rng.uniform(0.3, 1) * y) / period) > 0).astype(np.float32)
    elif pattern == 1:
        mix = ((np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)) > 0.3).astype(np.float32)
    else:
        mix = (x // period + y // period) % 2
    colours = first * (1 - mix[..., None]) + second * mix[..., None]
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    m = side * 0.05
    shape = rng.integers(6)
    if shape == 0:  # disc
        draw.ellipse([m, m, side - m, side - m], fill=255)
    elif shape == 1:  # sign: a board on a pole
        draw.rectangle([side * 0.45, side * 0.4, side * 0.55, side - m], fill=255)
        draw.rectangle([m, m, side - m, side * 0.5], fill=255)
    elif shape == 2:  # tree: a crown on a trunk
        draw.rectangle([side * 0.43, side * 0.5, side * 0.57, side - m], fill=255)
        draw.ellipse([m, m, side - m, side * 0.7], fill=255)
    elif shape == 3:  # car: a body on two wheels
        draw.rectangle([m, side * 0.4, side - m, side * 0.75], fill=255)
        draw.rectangle([side * 0.25, side * 0.2, side * 0.75, side * 0.45], fill=255)
        for cx in (0.25, 0.75):
            draw.ellipse([side * (cx - 0.12), side * 0.65, side * (cx + 0.12), side * 0.89], fill=255)
    elif shape == 4:  # star
        count = int(rng.integers(4, 8))
        angles = np.linspace(0, 2 * np.pi, 2 * count, endpoint=False)
        radii = np.where(np.arange(2 * count) % 2 == 0, side / 2 - m, side * rng.uniform(0.15, 0.3))
        draw.polygon([(side / 2 + r * np.cos(a), side / 2 + r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    else:  # rounded block
        draw.rounded_rectangle([m, side * 0.2, side - m, side * 0.8], radius=side * 0.15, fill=255)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    rgba = np.concatenate([colours * alpha, alpha * 255], axis=-1).astype(np.uint8)
    return Image.fromarray(rgba, "RGBa").resize((side // 2, side // 2), Image.LANCZOS)


@dataclass
class _Assets:
    """Facades (cached per landmark, premultiplied RGBA), background textures and distractor objects."""

    spec: GeneratedLandmarksSpec
    facades: dict[int, Image.Image] = field(default_factory=dict)
    backgrounds: list[np.ndarray] = field(default_factory=list)
    distractors: list[Image.Image] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.spec
        self.backgrounds = [draw_background_texture(s.seed, i, s.image_size) for i in range(s.background_pool)]
        self.distractors = [draw_distractor(s.seed, i, s.image_size) for i in range(s.distractor_pool)]

    def facade(self, landmark: int) -> Image.Image:
        if landmark not in self.facades:
            self.facades[landmark] = draw_facade(self.spec.seed, landmark, self.spec.image_size).convert("RGBa")
        return self.facades[landmark]


# ---- one photograph ------------------------------------------------------------------------------------------------


@dataclass
class View:
    """The truth about one generated image (one row of ``views.csv``); no landmark: ``landmark = -1``, NaN pose."""

    image: str  # path relative to the benchmark root
    split: str
    landmark: int
    pose: Pose | None = None
    visible_fraction: float = 0.0
    visible_size: float = 0.0
    occluded: float = 0.0
    box: np.ndarray | None = None  # [x1, y1, x2, y2] pixels


def sample_pose(
    rng: np.random.Generator, spec: GeneratedLandmarksSpec, facade_size: tuple[int, int], query_like: bool = False
) -> Pose:
    """A random view (see the module docstring).

    ``query_like``: a query's view: centred, nearly frontal (within half the easy rotation and foreshortening),
    scale in the upper half of ``scale_range`` but at least 1.15 ``easy_min_size``, and at most what keeps the
    facade's longer side within 80% of the image."""
    low, high = np.log(spec.scale_range)
    if query_like:
        width, height = facade_size
        largest = math.log(0.8 / math.sqrt(max(width / height, height / width)))
        high = min(high, largest)
        low = min(high, max((low + high) / 2, math.log(1.15 * spec.easy_min_size)))
        max_rotation = min(spec.max_rotation, spec.easy_max_rotation / 2)
        easy_tilt = (spec.easy_max_foreshortening - 1) / (spec.easy_max_foreshortening + 1)
        max_tilt, centre_range = min(spec.perspective, easy_tilt / 2), (0.45, 0.55)
    else:
        max_rotation, max_tilt, centre_range = spec.max_rotation, spec.perspective, (0.2, 0.8)
    scale = float(np.exp(rng.uniform(low, high)))
    rotation = float(rng.uniform(-max_rotation, max_rotation))
    tilt, split = rng.uniform(0, max_tilt), rng.random()
    signs = rng.choice([-1.0, 1.0], 2)
    centre_x, centre_y = rng.uniform(*centre_range, 2)
    return Pose(
        float(centre_x),
        float(centre_y),
        scale,
        rotation,
        float(signs[0] * tilt * split),
        float(signs[1] * tilt * (1 - split)),
    )


def _composite(canvas: np.ndarray, layer: np.ndarray) -> None:
    """Premultiplied ``layer`` ``[S, S, 4]`` (in [0, 1]) over ``canvas`` ``[S, S, 3]`` (in [0, 255]), in place."""
    canvas *= 1 - layer[..., 3:]
    canvas += 255 * layer[..., :3]


def _background(rng: np.random.Generator, assets: _Assets) -> np.ndarray:
    spec, size = assets.spec, assets.spec.image_size

    def crop() -> np.ndarray:
        texture = assets.backgrounds[int(rng.integers(len(assets.backgrounds)))]
        x0, y0 = rng.integers(0, size + 1, 2)
        return texture[y0 : y0 + size, x0 : x0 + size]

    canvas = crop().copy()
    if spec.background_textures >= 2:  # a horizon, slightly tilted, between two textures
        y, x = np.mgrid[0:size, 0:size]
        horizon = size * rng.uniform(0.25, 0.75) + rng.uniform(-0.3, 0.3) * (x - size / 2)
        below = y >= horizon
        canvas[below] = crop()[below]
    for _ in range(spec.background_textures - 2):  # building-like blocks rising from the bottom
        x0 = int(rng.integers(0, size))
        x1 = min(size, x0 + int(rng.integers(size // 8, size // 2)))
        top = int(rng.integers(0, size * 3 // 4))
        canvas[top:, x0:x1] = crop()[top:, x0:x1]
    return canvas


def _distractor_layer(rng: np.random.Generator, assets: _Assets) -> np.ndarray:
    sprite = assets.distractors[int(rng.integers(len(assets.distractors)))]
    pose = Pose(
        centre_x=float(rng.uniform(0, 1)),
        centre_y=float(rng.uniform(0, 1)),
        scale=float(rng.uniform(0.12, 0.4)),
        rotation=float(rng.uniform(-30, 30)),
        tilt_x=float(rng.uniform(-0.15, 0.15)),
    )
    return warp(sprite, homography(pose, sprite.size, assets.spec.image_size), assets.spec.image_size)


def _occluder_layer(rng: np.random.Generator, assets: _Assets, box: np.ndarray) -> np.ndarray:
    """A textured band with an irregular edge covering ``occlusion_extent`` of ``box`` from one side."""
    spec, size = assets.spec, assets.spec.image_size
    x1, y1, x2, y2 = box
    extent = rng.uniform(*spec.occlusion_extent)
    side = int(rng.integers(4))  # from the left, right, bottom or top
    jitter = lambda n: rng.uniform(-0.08, 0.08, n)  # noqa: E731 - the irregular inner edge
    steps = np.linspace(0, 1, 6)
    if side < 2:
        edge = x1 + (x2 - x1) * (extent if side == 0 else 1 - extent) + (x2 - x1) * jitter(6)
        far = -size if side == 0 else 2 * size
        ys = y1 - 0.1 * size + steps * (y2 - y1 + 0.2 * size)
        polygon = [(far, ys[0]), *zip(edge, ys), (far, ys[-1])]
    else:
        edge = y1 + (y2 - y1) * (1 - extent if side == 2 else extent) + (y2 - y1) * jitter(6)
        far = 2 * size if side == 2 else -size
        xs = x1 - 0.1 * size + steps * (x2 - x1 + 0.2 * size)
        polygon = [(xs[0], far), *zip(xs, edge), (xs[-1], far)]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([(float(a), float(b)) for a, b in polygon], fill=255)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    x0, y0 = rng.integers(0, size + 1, 2)
    texture = assets.backgrounds[int(rng.integers(len(assets.backgrounds)))][y0 : y0 + size, x0 : x0 + size]
    texture = texture * rng.uniform(0.5, 1.0)  # occluders in the shade
    return np.concatenate([texture / 255.0 * alpha, alpha], axis=-1)


def render_view(
    rng: np.random.Generator,
    assets: _Assets,
    landmark: int | None,
    pose: Pose | None,
    occlusion: bool,
    clutter_in_front: bool = True,
) -> tuple[Image.Image, dict]:
    """One photograph: background, distractors behind, the landmark, an occluder, distractors in front, shadow.

    Returns the RGB image and, with a landmark, its box, visible fraction and size, and occluded fraction."""
    spec, size = assets.spec, assets.spec.image_size
    canvas = _background(rng, assets)
    count = int(rng.integers(spec.distractors_per_image[0], spec.distractors_per_image[1] + 1))
    in_front = (rng.random(count) < 0.5) & clutter_in_front & (landmark is not None)
    for _ in range(int((~in_front).sum())):
        _composite(canvas, _distractor_layer(rng, assets))
    truth: dict = {}
    if landmark is not None:
        facade = assets.facade(landmark)
        matrix = homography(pose, facade.size, size)
        layer = warp(facade, matrix, size)
        gain = (1 + rng.uniform(-spec.lighting, spec.lighting)) * (1 + rng.uniform(-1, 1, 3) * spec.lighting / 3)
        layer[..., :3] = np.clip(layer[..., :3] * gain.astype(np.float32), 0, layer[..., 3:])
        _composite(canvas, layer)
        landmark_pixels = layer[..., 3] >= 0.5
        hidden = np.zeros((size, size), dtype=bool)
        box = landmark_box(matrix, facade.size, size)
        front = [_occluder_layer(rng, assets, box)] if occlusion else []
        front += [_distractor_layer(rng, assets) for _ in range(int(in_front.sum()))]
        for occluder in front:
            _composite(canvas, occluder)
            hidden |= occluder[..., 3] >= 0.5
        visible = int((landmark_pixels & ~hidden).sum())
        area = polygon_area(project(matrix, facade_corners(facade.size)))
        truth = {
            "box": box,
            "visible_fraction": min(1.0, visible / area),
            "visible_size": math.sqrt(visible / size**2),
            "occluded": 1 - visible / max(1, int(landmark_pixels.sum())),
        }
    # A shadow: brightness falling off in a random direction, and a global exposure change.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(angle) + y * np.sin(angle)
    light = (1 + rng.uniform(-0.5, 0.5) * spec.lighting) * (1 + spec.lighting * rng.uniform(0, 1) * ramp)
    canvas *= light[..., None]
    pixels = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), truth


# ---- the benchmark -------------------------------------------------------------------------------------------------


def revisited_difficulty(view: View, spec: GeneratedLandmarksSpec) -> str:
    """``easy``, ``hard`` or ``junk`` for a database image of a query's landmark (thresholds: module docstring)."""
    if view.visible_size < spec.junk_below_size or view.visible_fraction < spec.junk_below_visible:
        return "junk"
    easy = (
        view.visible_size >= spec.easy_min_size
        and view.visible_fraction >= spec.easy_min_visible
        and abs(view.pose.rotation) <= spec.easy_max_rotation
        and view.pose.foreshortening <= spec.easy_max_foreshortening
    )
    return "easy" if easy else "hard"


@dataclass
class _Job:
    split: str
    index: int  # within the split: the image's random stream
    image: str  # path relative to the root
    landmark: int | None
    query_like: bool = False


def _landmark_ranges(spec: GeneratedLandmarksSpec) -> dict[str, np.ndarray]:
    counts = {
        "train": spec.train_landmarks,
        "query": spec.query_landmarks,
        "index_distractor": spec.index_distractor_landmarks,
        "revisited": spec.revisited_landmarks,
        "revisited_distractor": spec.revisited_distractor_landmarks,
    }
    ranges, start = {}, 0
    for name, count in counts.items():
        ranges[name] = np.arange(start, start + count)
        start += count
    return ranges


def _hex_ids(spec: GeneratedLandmarksSpec, count: int) -> list[str]:
    """Distinct 16-hexadecimal-character ids, as in GLDv2."""
    rng = _rng(spec.seed, IDS, 0)
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        for digits in rng.integers(0, 16, (count - len(ids), 16)):
            image_id = "".join("0123456789abcdef"[d] for d in digits)
            if image_id not in seen:
                seen.add(image_id)
                ids.append(image_id)
    return ids


def _plan(spec: GeneratedLandmarksSpec) -> dict:
    """Every image to draw, the lists and the solution, before drawing anything."""
    ranges = _landmark_ranges(spec)
    split_rng = _rng(spec.seed, SPLITS, 0)
    train_landmarks = np.repeat(ranges["train"], spec.train_images_per_landmark)
    queried = np.repeat(ranges["query"], spec.queries_per_landmark)
    index_landmarks = np.repeat(np.r_[ranges["query"], ranges["index_distractor"]], spec.index_images_per_landmark)
    index_landmarks = split_rng.permutation(index_landmarks)  # the index order says nothing about landmarks
    test_landmarks = np.r_[queried, np.full(spec.ignored_queries, -1)]
    test_order = split_rng.permutation(len(test_landmarks))
    ids = _hex_ids(spec, len(train_landmarks) + len(index_landmarks) + len(test_landmarks))
    train_ids = ids[: len(train_landmarks)]
    index_ids = ids[len(train_landmarks) : len(train_landmarks) + len(index_landmarks)]
    test_ids = ids[len(train_landmarks) + len(index_landmarks) :]
    usage = np.where(np.arange(len(queried)) % 2 == 0, "Public", "Private")
    test_usage = np.r_[usage, np.full(spec.ignored_queries, "Ignored")][test_order]
    test_landmarks = test_landmarks[test_order]

    validation_count = int(round(spec.boxes_validation_fraction * spec.train_landmarks))
    if spec.boxes_validation_fraction > 0 and spec.train_landmarks >= 2:
        validation_count = min(max(1, validation_count), spec.train_landmarks - 1)
    box_validation = set(split_rng.choice(ranges["train"], validation_count, replace=False).tolist())

    name = spec.revisited_name
    database = np.repeat(
        np.r_[ranges["revisited"], ranges["revisited_distractor"]], spec.revisited_database_per_landmark
    )
    first_of_landmark = np.r_[True, database[1:] != database[:-1]]  # drawn like a query: an easy positive
    order = split_rng.permutation(len(database))
    database, first_of_landmark = database[order], first_of_landmark[order]
    query_landmarks = np.repeat(ranges["revisited"], spec.revisited_queries_per_landmark)

    jobs = [
        _Job("train", i, f"gldv2/{image_path('train', d)}", int(lm))
        for i, (d, lm) in enumerate(zip(train_ids, train_landmarks))
    ]
    jobs += [
        _Job("index", i, f"gldv2/{image_path('index', d)}", int(lm))
        for i, (d, lm) in enumerate(zip(index_ids, index_landmarks))
    ]
    jobs += [
        _Job("test", i, f"gldv2/{image_path('test', d)}", int(lm) if lm >= 0 else None)
        for i, (d, lm) in enumerate(zip(test_ids, test_landmarks))
    ]
    imlist = [f"image_{i:05d}" for i in range(len(database))]
    qimlist = [f"query_{j:03d}" for j in range(len(query_landmarks))]
    jobs += [
        _Job("revisited_database", i, f"revisited/{name}/jpg/{image}.jpg", int(lm), query_like=bool(first))
        for i, (image, lm, first) in enumerate(zip(imlist, database, first_of_landmark))
    ]
    jobs += [
        _Job("revisited_query", j, f"revisited/{name}/jpg/{image}.jpg", int(lm), query_like=True)
        for j, (image, lm) in enumerate(zip(qimlist, query_landmarks))
    ]
    return {
        "jobs": jobs,
        "train": (train_ids, train_landmarks),
        "index": (index_ids, index_landmarks),
        "test": (test_ids, test_landmarks, test_usage),
        "box_validation": box_validation,
        "revisited": (imlist, database, qimlist, query_landmarks),
    }


def _draw(job: _Job, assets: _Assets) -> tuple[Image.Image, View]:
    spec = assets.spec
    rng = _rng(spec.seed, VIEW, VIEW_STREAMS[job.split] * 10**9 + job.index)
    if job.landmark is None:
        image, _ = render_view(rng, assets, None, None, occlusion=False)
        return image, View(job.image, job.split, -1)
    pose = sample_pose(rng, spec, assets.facade(job.landmark).size, query_like=job.query_like)
    occlusion = not job.query_like and rng.random() < spec.occlusion_probability
    image, truth = render_view(rng, assets, job.landmark, pose, occlusion, clutter_in_front=not job.query_like)
    # Rounded once, here: views.csv, the boxes and the Revisited labels all use these exact values.
    view = View(
        job.image,
        job.split,
        job.landmark,
        Pose(*(round(v, 6) for v in asdict(pose).values())),
        round(truth["visible_fraction"], 6),
        round(truth["visible_size"], 6),
        round(truth["occluded"], 6),
        np.round(truth["box"], 6),
    )
    return image, view


def _write_text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _box_row(image_id: str, box: np.ndarray, size: int) -> str:
    x1, y1, x2, y2 = (float(v) / size for v in box)
    return f"{image_id},{y1:.6f} {x1:.6f} {y2:.6f} {x2:.6f}"


def _config(spec: GeneratedLandmarksSpec) -> dict:
    return json.loads(json.dumps({"generator": GENERATOR, "format": FORMAT_VERSION, "spec": asdict(spec)}))


def is_generated(root: str | Path, spec: GeneratedLandmarksSpec = GeneratedLandmarksSpec()) -> bool:
    """Whether ``root`` holds a complete benchmark generated with ``spec`` (its marker file matches)."""
    try:
        return json.loads((Path(root) / MARKER).read_text()) == _config(spec)
    except (OSError, ValueError):
        return False


def _remove_previous_images(root: Path) -> None:
    """Delete the images that an earlier generation listed in ``views.csv``, its Revisited ground truth (whose name
    may change) and the folders they leave empty, so a changed spec leaves no stale files; nothing that the
    generator did not write is touched."""
    try:
        previous = [view.image for view in read_views(root)]
    except (OSError, DatasetFormatError):
        return
    folders = set()
    for relative in previous:
        if not relative.endswith(".jpg") or not relative.startswith(("gldv2/", "revisited/")) or ".." in relative:
            continue
        (root / relative).unlink(missing_ok=True)
        folders.update(p for p in (root / relative).parents if root in p.parents)
        parts = Path(relative).parts
        if parts[0] == "revisited" and len(parts) == 4:  # revisited/<name>/jpg/<image>.jpg
            (root / "revisited" / parts[1] / f"gnd_{parts[1]}.pkl").unlink(missing_ok=True)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else lives there
            pass


def _write_gldv2(directory: Path, plan: dict) -> None:
    train_ids, train_landmarks = plan["train"]
    index_ids, index_landmarks = plan["index"]
    test_ids, test_landmarks, test_usage = plan["test"]
    urls = [f"{i},https://generated.invalid/{i}.jpg,{lm}" for i, lm in zip(train_ids, train_landmarks)]
    _write_text(directory / "train.csv", ["id,url,landmark_id", *urls])
    train_by_landmark: dict[int, list[str]] = {}
    for image_id, landmark in zip(train_ids, train_landmarks):
        train_by_landmark.setdefault(int(landmark), []).append(image_id)
    clean = [f"{lm},{' '.join(ids)}" for lm, ids in train_by_landmark.items()]
    _write_text(directory / "train_clean.csv", ["landmark_id,images", *clean])
    _write_text(directory / "index.csv", ["id", *index_ids])
    _write_text(directory / "test.csv", ["id", *test_ids])
    index_by_landmark: dict[int, list[str]] = {}
    for image_id, landmark in zip(index_ids, index_landmarks):
        index_by_landmark.setdefault(int(landmark), []).append(image_id)
    solution = ["id,images,Usage"]
    for image_id, landmark, usage in zip(test_ids, test_landmarks, test_usage):
        images = " ".join(index_by_landmark[int(landmark)]) if landmark >= 0 else "None"
        solution.append(f"{image_id},{images},{usage}")
    _write_text(directory / "retrieval_solution_v2.1.csv", solution)


def _write_revisited(directory: Path, plan: dict, views: dict[str, View], spec: GeneratedLandmarksSpec) -> None:
    imlist, _, qimlist, query_landmarks = plan["revisited"]
    name = spec.revisited_name
    database_views = [views[f"revisited/{name}/jpg/{image}.jpg"] for image in imlist]
    gnd = []
    for query, landmark in zip(qimlist, query_landmarks):
        box = views[f"revisited/{name}/jpg/{query}.jpg"].box
        entry = {"bbx": [float(v) for v in box], "easy": [], "hard": [], "junk": []}
        for i, view in enumerate(database_views):
            if view.landmark == landmark:
                entry[revisited_difficulty(view, spec)].append(i)
        gnd.append(entry)
    (directory / name).mkdir(parents=True, exist_ok=True)
    with open(directory / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def _write_boxes(directory: Path, plan: dict, views: dict[str, View], spec: GeneratedLandmarksSpec) -> None:
    """split1 / split2: the training images by landmark; eval: every other image with a landmark."""
    size, name = spec.image_size, spec.revisited_name
    rows: dict[str, list[str]] = {file: [",".join(BOXES_HEADER)] for file in BOX_FILES}
    train_ids, train_landmarks = plan["train"]
    for image_id, landmark in zip(train_ids, train_landmarks):
        file = BOX_FILES[1] if int(landmark) in plan["box_validation"] else BOX_FILES[0]
        rows[file].append(_box_row(image_id, views[f"gldv2/{image_path('train', image_id)}"].box, size))
    for split in ("index", "test"):
        for image_id in plan[split][0]:
            view = views[f"gldv2/{image_path(split, image_id)}"]
            if view.landmark >= 0:  # the Ignored test images show no landmark
                rows[BOX_FILES[2]].append(_box_row(image_id, view.box, size))
    imlist, _, qimlist, _ = plan["revisited"]
    for image in imlist + qimlist:
        rows[BOX_FILES[2]].append(_box_row(image, views[f"revisited/{name}/jpg/{image}.jpg"].box, size))
    for file, lines in rows.items():
        _write_text(directory / file, lines)


def generate_landmark_benchmark(root: str | Path, spec: GeneratedLandmarksSpec = GeneratedLandmarksSpec()) -> Path:
    """Write the benchmark under ``root`` (see the module docstring); skipped when it exists with the same spec."""
    root = Path(root)
    if is_generated(root, spec):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / LOCK):  # concurrent runs on one root (an ablation's variants) generate it once
        if not is_generated(root, spec):
            _generate(root, spec)
    return root


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where the platform has none)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(root: Path, spec: GeneratedLandmarksSpec) -> None:
    (root / MARKER).unlink(missing_ok=True)  # from here on the directory is incomplete until the marker is back
    _remove_previous_images(root)
    plan = _plan(spec)
    # List the images before drawing them (their truth follows at the end), so that the images of a generation
    # interrupted here are known to the next one, which removes them if its spec differs.
    _write_views(root / VIEWS, [View(job.image, job.split, -1) for job in plan["jobs"]])
    assets = _Assets(spec)
    views: dict[str, View] = {}
    for job in plan["jobs"]:
        image, view = _draw(job, assets)
        path = root / job.image
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=spec.jpeg_quality)
        views[job.image] = view

    _write_gldv2(root / "gldv2", plan)
    _write_revisited(root / "revisited", plan, views, spec)
    _write_boxes(root / "boxes", plan, views, spec)
    _write_views(root / VIEWS, list(views.values()))
    temporary = root / f"{MARKER}.partial"
    temporary.write_text(json.dumps(_config(spec), indent=2) + "\n")
    os.replace(temporary, root / MARKER)  # last and atomic: a marker means a complete benchmark


# ---- readers -------------------------------------------------------------------------------------------------------


def _write_views(path: Path, views: list[View]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(VIEW_COLUMNS)
        for v in views:
            if v.pose is None:
                writer.writerow([v.image, v.split, -1] + [""] * (len(VIEW_COLUMNS) - 3))
                continue
            p = v.pose
            numbers = [
                p.centre_x,
                p.centre_y,
                p.scale,
                p.rotation,
                p.tilt_x,
                p.tilt_y,
                p.foreshortening,
                v.visible_fraction,
                v.visible_size,
            ]
            numbers += [v.occluded, *v.box]
            writer.writerow([v.image, v.split, v.landmark] + [repr(float(x)) for x in numbers])


def read_views(root: str | Path) -> list[View]:
    """The per-image truth of a generated benchmark (``<root>/views.csv``, see the module docstring)."""
    path = require_file(Path(root) / VIEWS, "Generated landmarks", f"<root>/{VIEWS}: {','.join(VIEW_COLUMNS)}")
    views = []
    for line, row in read_csv_rows(path, VIEW_COLUMNS, "Generated landmarks"):
        try:
            landmark = int(row["landmark"])
            if landmark < 0:
                views.append(View(row["image"], row["split"], -1))
                continue
            number = {k: float(row[k]) for k in VIEW_COLUMNS[3:]}
        except ValueError as error:
            raise DatasetFormatError(f"{path}:{line}: {error}; expected {','.join(VIEW_COLUMNS)}") from None
        pose = Pose(*(number[k] for k in ("centre_x", "centre_y", "scale", "rotation", "tilt_x", "tilt_y")))
        box = np.array([number[k] for k in ("x1", "y1", "x2", "y2")])
        views.append(
            View(
                row["image"],
                row["split"],
                landmark,
                pose,
                number["visible_fraction"],
                number["visible_size"],
                number["occluded"],
                box,
            )
        )
    return views


# ---- datamodules ---------------------------------------------------------------------------------------------------


class GeneratedLandmarksGLDv2(GoogleLandmarksV2):
    """The generated benchmark's GLDv2 layout (``<root>/gldv2``), generated on ``prepare_data``.

    Everything else is :class:`~datamodules.gldv2.GoogleLandmarksV2`; metrics are logged as
    ``val/generated_landmarks/public/mAP@100`` and ``test/generated_landmarks/private/mAP@100``.

    Args:
        root: the benchmark's directory (see :func:`generate_landmark_benchmark`).
        spec: the generation parameters.
        image_size: the side images are resized to; default the generated size (no resizing).
        **kwargs: the training selection, ``k`` and the image options of :class:`~datamodules.gldv2.GoogleLandmarksV2`.
    """

    name = "generated_landmarks"

    def __init__(
        self,
        root: str = "data/generated_landmarks",
        spec: GeneratedLandmarksSpec | None = None,
        image_size: int | None = None,
        **kwargs,
    ):
        self.spec = spec or GeneratedLandmarksSpec()
        self.benchmark_root = Path(root)
        super().__init__(str(self.benchmark_root / "gldv2"), image_size=image_size or self.spec.image_size, **kwargs)

    def prepare_data(self) -> None:
        generate_landmark_benchmark(self.benchmark_root, self.spec)


class GeneratedLandmarksRevisited(RevisitedOxfordParis):
    """The generated benchmark's Revisited layout (``<root>/revisited/<spec.revisited_name>``), generated on
    ``prepare_data``; evaluated as :class:`~datamodules.revisited.RevisitedOxfordParis` under the dataset's name
    (``test/rlandmarks/medium/mAP``, ...).

    Args:
        root: the benchmark's directory (see :func:`generate_landmark_benchmark`).
        spec: the generation parameters.
        image_size: the side images are resized to; default the generated size (no resizing).
        **kwargs: ``train_on``, ``kappas`` and the image options of
            :class:`~datamodules.revisited.RevisitedOxfordParis`.
    """

    name = "generated_landmarks_revisited"

    def __init__(
        self,
        root: str = "data/generated_landmarks",
        spec: GeneratedLandmarksSpec | None = None,
        image_size: int | None = None,
        **kwargs,
    ):
        self.spec = spec or GeneratedLandmarksSpec()
        self.benchmark_root = Path(root)
        super().__init__(
            str(self.benchmark_root / "revisited"),
            datasets=(self.spec.revisited_name,),
            image_size=image_size or self.spec.image_size,
            **kwargs,
        )

    def prepare_data(self) -> None:
        generate_landmark_benchmark(self.benchmark_root, self.spec)

    @property
    def true_boxes(self) -> Path:
        """The landmark box of every Revisited-layout image (``id`` = image name), for the localisation check."""
        return self.benchmark_root / "boxes" / BOX_FILES[2]


class GeneratedLandmarkBoxes(LandmarkBoxes):
    """The generated benchmark's landmark boxes for the detector, generated on ``prepare_data``: trains on
    ``boxes/boxes_split1.csv``, validates on ``boxes/boxes_split2.csv`` (other landmarks), images from the GLDv2
    layout's ``gldv2/train/``. Box mAP is logged as ``val/generated_landmark_boxes/box_mAP`` (and ``box_mAP@0.5``).

    Args:
        root: the benchmark's directory (see :func:`generate_landmark_benchmark`).
        spec: the generation parameters.
        image_size: the longer side images are resized to; default the generated size (no resizing).
        **kwargs: ``flip_probability``, batch sizes, ``num_workers``, ``shuffle_seed`` of
            :class:`~datamodules.landmark_boxes.LandmarkBoxes`.
    """

    name = "generated_landmark_boxes"

    def __init__(
        self,
        root: str = "data/generated_landmarks",
        spec: GeneratedLandmarksSpec | None = None,
        image_size: int | None = None,
        **kwargs,
    ):
        self.spec = spec or GeneratedLandmarksSpec()
        self.benchmark_root = Path(root)
        boxes = self.benchmark_root.absolute() / "boxes"
        super().__init__(
            str(self.benchmark_root / "gldv2"),
            train_boxes=str(boxes / BOX_FILES[0]),
            val_boxes=str(boxes / BOX_FILES[1]),
            image_size=image_size or self.spec.image_size,
            **kwargs,
        )

    def prepare_data(self) -> None:
        generate_landmark_benchmark(self.benchmark_root, self.spec)


def describe(root: str | Path) -> dict[str, int]:
    """Counts of a generated benchmark, read back through the GLDv2 and Revisited readers."""
    from datamodules.gldv2 import read_gldv2_retrieval, read_gldv2_train
    from datamodules.revisited import read_revisited

    root = Path(root)
    spec = GeneratedLandmarksSpec(**json.loads((root / MARKER).read_text())["spec"])
    train = read_gldv2_train(root / "gldv2")
    retrieval = read_gldv2_retrieval(root / "gldv2")
    revisited = read_revisited(root / "revisited", spec.revisited_name)
    labels = {key: [len(g[key]) for g in revisited.gnd] for key in ("easy", "hard", "junk")}
    return {
        "train images": len(train.ids),
        "train landmarks": len(set(train.landmark_ids.tolist())),
        "boxes split1": len(read_landmark_boxes(root / "boxes" / BOX_FILES[0])),
        "boxes split2": len(read_landmark_boxes(root / "boxes" / BOX_FILES[1])),
        "boxes eval": len(read_landmark_boxes(root / "boxes" / BOX_FILES[2])),
        "index images": len(retrieval.index_ids),
        "test images": len(_read_lines(root / "gldv2" / "test.csv")) - 1,
        "public queries": retrieval.query_subsets.count("public"),
        "private queries": retrieval.query_subsets.count("private"),
        f"{spec.revisited_name} queries": len(revisited.query_paths),
        f"{spec.revisited_name} database": len(revisited.database_paths),
        "mean easy per query": round(float(np.mean(labels["easy"])), 1),
        "mean hard per query": round(float(np.mean(labels["hard"])), 1),
        "mean junk per query": round(float(np.mean(labels["junk"])), 1),
        "queries without easy": sum(n == 0 for n in labels["easy"]),
        "megabytes": round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6, 1),
    }


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def colour_histogram(path: Path, box: np.ndarray | None = None) -> np.ndarray:
    """A global descriptor with nothing learnt: the 216-bin colour histogram (6 levels per channel) of the image, or
    of its ``box`` (x1, y1, x2, y2 pixels), square-rooted and L2-normalised."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    if box is not None:
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        pixels = pixels[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)]
    levels = (pixels // 43).reshape(-1, 3).astype(np.int64)
    counts = np.bincount(levels @ np.array([36, 6, 1]), minlength=216).astype(np.float64)
    root_counts = np.sqrt(counts / counts.sum())
    return root_counts / np.linalg.norm(root_counts)


def baseline_metrics(root: str | Path) -> dict[str, float]:
    """GLDv2 mAP@100 and Revisited mAP of :func:`colour_histogram` of the whole images (``whole``) and of the
    landmarks' true boxes (``box``; the Revisited queries are always cropped to their box, as the reader does):
    how much the clutter hides the landmark from a global descriptor, and what knowing where it is would give."""
    from datamodules.gldv2 import read_gldv2_retrieval
    from datamodules.revisited import read_revisited

    root = Path(root)
    boxes = {view.image: view.box for view in read_views(root)}
    spec = json.loads((root / MARKER).read_text())["spec"]
    retrieval = read_gldv2_retrieval(root / "gldv2")
    revisited = read_revisited(root / "revisited", spec["revisited_name"])
    metrics = {}
    for crop in ("whole", "box"):

        def describe_images(paths: list[str], always_crop: bool = False) -> np.ndarray:
            cropped = crop == "box" or always_crop
            return np.stack([colour_histogram(root / p, boxes[p] if cropped else None) for p in paths])

        database = describe_images([f"gldv2/{image_path('index', i)}" for i in retrieval.index_ids])
        queries = describe_images([f"gldv2/{image_path('test', i)}" for i in retrieval.query_ids])
        ranks = np.argsort(-queries @ database.T, axis=1, kind="stable")[:, :100]
        metrics |= {f"gldv2 {crop}/{k}": v for k, v in retrieval.ground_truth().evaluate(ranks).items()}
        database = describe_images([f"revisited/{p}" for p in revisited.database_paths])
        queries = describe_images([f"revisited/{p}" for p in revisited.query_paths], always_crop=True)
        ranks = np.argsort(-queries @ database.T, axis=1, kind="stable")
        scores = revisited.ground_truth().evaluate(ranks)
        metrics |= {f"{revisited.name} {crop}/{k}": v for k, v in scores.items() if k.endswith("mAP")}
    return metrics


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/generated_landmarks")
    started = time.perf_counter()
    generate_landmark_benchmark(target)
    elapsed = time.perf_counter() - started
    for key, value in describe(target).items():
        print(f"{key:>24}: {value}")
    print(f"{'seconds':>24}: {elapsed:.1f} (0 if it was already generated)")
    print("colour histogram baseline (whole image / true box):")
    for key, value in baseline_metrics(target).items():
        print(f"{key:>32}: {value:.3f}")

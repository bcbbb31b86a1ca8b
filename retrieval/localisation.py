"""Localisation check of the spatial context: where in an image is the object, judged from its feature map alone.

The slides of the smoothing + GCN method ("Verification for localization") measure how much spatial context a
backbone's patch features carry by running an unsupervised salient-object localiser on them and scoring the
boxes. The localiser they cite (unsupervised object discovery, LOST-style) assumes that foreground features are
less correlated than background ones and that there are fewer of them, and works in three steps:

1. compute each patch's *degree* in a similarity graph of the image's patches (:func:`patch_degrees`);
2. take the lowest-degree patch as the **object seed** (:func:`object_seed`);
3. expand the seed to the patches similar to it (:func:`expand_region`), whose bounding box is the prediction
   (:func:`region_box`).

The query-driven variant ("pixel retrieval") selects the seed from the query instead: the database image's
patch most similar to a query descriptor (:func:`query_seed`), expanded in each database image the same way.
:func:`localise` runs either pipeline; :func:`box_iou` and :func:`localisation_metrics` score the boxes against
ground truth (e.g. Google Landmark Boxes, converted by :func:`gld_box_to_pixels`); :func:`draw_boxes` renders
them for inspection.

Feature maps are one image's ``[C, H, W]`` (torch or numpy); the ``H x W`` cells are the backbone's stride grid.
Boxes are ``[x1, y1, x2, y2]`` in image pixels, ``x2``/``y2`` exclusive edges (a box covering one 16-pixel cell
at the origin is ``[0, 0, 16, 16]``). Cosine similarity is taken between L2-normalised patch features; an
all-zero patch stays zero and is similar to nothing (similarity 0).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from retrieval.files import replace_atomically

LOCALISATION_MODES = ("object", "query")
BOX_COLOURS = {"predicted": (230, 25, 75), "true": (60, 180, 75)}
OTHER_BOX_COLOURS = ((0, 130, 200), (245, 130, 48), (145, 30, 180), (240, 50, 230), (128, 128, 0))


def patch_degrees(
    features, k: int = 8, similarity_threshold: float | None = None, tie_tolerance: float = 1e-6
) -> np.ndarray:
    """Degree of every patch in a similarity graph of the image's patches, ``float [H, W]``.

    Default (``similarity_threshold=None``): in-degree in the k-nearest-neighbour graph. Each of the ``H * W``
    patches points to its ``k`` most cosine-similar *other* patches; a patch's degree is how many patches point
    to it. Background repeats, so its patches are many others' neighbours (high degree); a distinctive object has
    few look-alikes (low degree), which is why the slides take the lowest-degree patch as the object seed. The
    k-NN in-degree only separates an object of fewer than about ``k`` cells: the cells of a larger object point
    at each other, and their in-degrees average ``k`` like the background's.

    Ties are shared, not broken by position: when ``m`` candidates are equally similar to a patch (within
    ``tie_tolerance`` of its k-th largest similarity) for its last ``r`` neighbour slots, each receives ``r / m``.
    So the result is deterministic and symmetric, and a background of identical features does not pile its
    degree onto the first patches in row-major order (degrees may be fractional; they still sum to ``H * W * k``).
    Without a tolerance, noise decides the order inside a repeated background, and a background patch that
    happens to lie off the others (an "anti-hub") can end up with a lower in-degree than the object's patches.

    With ``similarity_threshold`` set, the dense graph of the cited object-discovery method (LOST) is used
    instead, as the slides' "degree for all N^2 nodes": a patch's degree is the number of other patches whose
    cosine similarity to it is at least the threshold (LOST uses 0, i.e. positive correlation), and ``k`` is
    ignored. This separates any object smaller than the background.

    Args:
        features: one image's feature map ``[C, H, W]``.
        k: neighbours per patch, ``1 <= k <= H * W - 1`` (k-NN graph only).
        similarity_threshold: ``None`` for the k-NN graph, else the cosine similarity that makes an edge.
        tie_tolerance: cosine similarities this close to a patch's k-th largest count as tied (k-NN graph only).
    """
    patches, height, width = _normalised_patches(features)
    num_patches = height * width
    similarity = patches @ patches.T
    np.fill_diagonal(similarity, -np.inf)  # a patch is not its own neighbour
    if similarity_threshold is not None:
        return (similarity >= similarity_threshold).sum(axis=0).astype(np.float64).reshape(height, width)
    if not 1 <= k <= num_patches - 1:
        raise ValueError(f"k must be between 1 and H * W - 1 = {num_patches - 1} for a {height}x{width} map, got {k}")
    kth_similarity = np.sort(similarity, axis=1)[:, -k][:, None]
    closer = similarity > kth_similarity + tie_tolerance
    tied = np.abs(similarity - kth_similarity) <= tie_tolerance
    remaining_slots = k - closer.sum(axis=1, keepdims=True)
    edge_weights = closer + tied * (remaining_slots / tied.sum(axis=1, keepdims=True))
    return edge_weights.sum(axis=0).reshape(height, width)


def object_seed(features, k: int = 8, similarity_threshold: float | None = None) -> tuple[int, int]:
    """The object seed of the slides: ``(row, col)`` of the lowest-degree patch (:func:`patch_degrees`).

    Equal degrees go to the first patch in row-major order.
    """
    degrees = patch_degrees(features, k=k, similarity_threshold=similarity_threshold)
    row, col = np.unravel_index(int(np.argmin(degrees)), degrees.shape)
    return int(row), int(col)


def query_seed(features, query_descriptor) -> tuple[int, int]:
    """Seed of the query-driven variant: ``(row, col)`` of the patch most cosine-similar to ``query_descriptor``.

    ``query_descriptor`` is a ``[C]`` vector taken from the query, e.g. its global descriptor or the feature of
    its own object seed. Equal similarities go to the first patch in row-major order.
    """
    patches, height, width = _normalised_patches(features)
    query = _normalised_vector(query_descriptor, patches.shape[1], "query_descriptor")
    row, col = np.unravel_index(int(np.argmax(patches @ query)), (height, width))
    return int(row), int(col)


def expand_region(features, seed: Sequence[int], threshold: float = 0.5, connectivity: int = 4) -> np.ndarray:
    """Boolean ``[H, W]`` mask grown from ``seed`` over neighbouring patches similar to the seed.

    Region growing: starting from the seed, a patch joins when it touches the region (4- or 8-connected) and
    its cosine similarity to the *seed's* feature (not to the running mean of the region, which would drift) is
    at least ``threshold``. The seed is always in, so the mask is never empty. Patches similar to the seed but
    not connected to it through similar patches stay out: the slides' localiser returns a single object.

    Args:
        features: one image's feature map ``[C, H, W]``.
        seed: ``(row, col)`` of the seed patch.
        threshold: cosine similarity to the seed a patch needs, in ``[-1, 1]``.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).
    """
    patches, height, width = _normalised_patches(features)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    row, col = _check_seed(seed, height, width)
    similar = (patches @ patches[row * width + col]).reshape(height, width) >= threshold
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    mask = np.zeros((height, width), dtype=bool)
    mask[row, col] = True
    frontier = deque([(row, col)])
    while frontier:
        r, c = frontier.popleft()
        for dr, dc in steps:
            nr, nc = r + dr, c + dc
            if 0 <= nr < height and 0 <= nc < width and similar[nr, nc] and not mask[nr, nc]:
                mask[nr, nc] = True
                frontier.append((nr, nc))
    return mask


def region_box(mask, image_size: Sequence[int]) -> np.ndarray:
    """Bounding box ``float [4] = [x1, y1, x2, y2]`` in image pixels of the ``True`` cells of ``mask [H, W]``.

    Cell ``(row, col)`` of an ``H x W`` grid over a ``width x height`` image covers
    ``x in [col * width / W, (col + 1) * width / W)`` and ``y in [row * height / H, (row + 1) * height / H)``:
    the cells tile the whole image evenly (the backbone's stride grid, stretched to the image when the image is
    not a multiple of the stride). Example: cell (1, 2) of a 4x4 grid over a 64x32 image is ``[32, 8, 48, 16]``.

    Args:
        mask: boolean ``[H, W]`` with at least one ``True`` cell.
        image_size: ``(width, height)`` in pixels, as PIL's ``Image.size``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D [H, W] array, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask has no True cell, so it has no bounding box")
    image_width, image_height = _check_image_size(image_size)
    rows, cols = np.nonzero(mask)
    cell_width, cell_height = image_width / mask.shape[1], image_height / mask.shape[0]
    return np.array(
        [
            cols.min() * cell_width,
            rows.min() * cell_height,
            (cols.max() + 1) * cell_width,
            (rows.max() + 1) * cell_height,
        ],
        dtype=np.float64,
    )


def localise(
    features,
    image_size: Sequence[int],
    mode: str = "object",
    query_descriptor=None,
    k: int = 8,
    threshold: float = 0.5,
    connectivity: int = 4,
    degree_similarity_threshold: float | None = None,
) -> np.ndarray:
    """Predicted object box ``[x1, y1, x2, y2]`` (pixels) for one image from its feature map ``[C, H, W]``.

    ``mode="object"``: seed = lowest-degree patch (:func:`object_seed`, uses ``k``, or the dense graph when
    ``degree_similarity_threshold`` is set); ``mode="query"``: seed =
    patch most similar to ``query_descriptor [C]`` (:func:`query_seed`). Either seed is then expanded by
    :func:`expand_region` (similarity to the seed patch's own feature in this image, ``threshold``,
    ``connectivity``) and boxed by :func:`region_box` over ``image_size = (width, height)``.
    """
    if mode not in LOCALISATION_MODES:
        raise ValueError(f"mode must be one of {LOCALISATION_MODES}, got {mode!r}")
    if mode == "query":
        if query_descriptor is None:
            raise ValueError('mode="query" needs a query_descriptor [C]')
        seed = query_seed(features, query_descriptor)
    else:
        seed = object_seed(features, k=k, similarity_threshold=degree_similarity_threshold)
    mask = expand_region(features, seed, threshold=threshold, connectivity=connectivity)
    return region_box(mask, image_size)


def box_iou(first, second):
    """Intersection over union of boxes ``[x1, y1, x2, y2]``: ``[4]`` with ``[4]`` gives a float, ``[N, 4]`` with
    ``[N, 4]`` (or with one ``[4]``) gives ``float [N]``, pair by pair.

    Disjoint boxes give 0. A degenerate box (zero or negative width or height) has area 0 and gives IoU 0 with
    anything, itself included, never NaN.
    """
    first, second = _as_boxes(first, "first"), _as_boxes(second, "second")
    single = first.ndim == 1 and second.ndim == 1
    if first.ndim == 2 and second.ndim == 2 and len(first) != len(second):
        raise ValueError(f"first and second must hold the same number of boxes, got {len(first)} and {len(second)}")
    widths = np.minimum(first[..., 2], second[..., 2]) - np.maximum(first[..., 0], second[..., 0])
    heights = np.minimum(first[..., 3], second[..., 3]) - np.maximum(first[..., 1], second[..., 1])
    intersection = np.clip(widths, 0, None) * np.clip(heights, 0, None)
    union = _box_area(first) + _box_area(second) - intersection
    positive = (union > 0) & (_box_area(first) > 0) & (_box_area(second) > 0)
    iou = np.where(positive, intersection / np.where(positive, union, 1.0), 0.0)
    return float(iou) if single else iou


def localisation_metrics(predicted, true, iou_threshold: float = 0.5) -> dict[str, float]:
    """Mean IoU and the fraction of images localised, for predicted and true boxes ``[N, 4]``, row ``i`` with row ``i``.

    Returns ``{"iou_mean": ..., "iou@0.5": ...}``; an image counts as localised when its IoU is strictly above
    ``iou_threshold`` (PASCAL VOC's "exceeds 50%"), and the key names the threshold used.
    """
    predicted, true = _as_boxes(predicted, "predicted"), _as_boxes(true, "true")
    if predicted.ndim != 2 or true.ndim != 2 or predicted.shape != true.shape or len(predicted) == 0:
        raise ValueError(
            f"predicted and true must both be [N, 4] with the same N >= 1, got {predicted.shape} and {true.shape}"
        )
    return iou_summary(box_iou(predicted, true), iou_threshold)


def iou_summary(iou, iou_threshold: float = 0.5) -> dict[str, float]:
    """``{"iou_mean": ..., "iou@<threshold>": ...}`` of IoUs ``[N]`` (see :func:`localisation_metrics`)."""
    iou = np.asarray(iou, dtype=np.float64)
    return {"iou_mean": float(iou.mean()), f"iou@{iou_threshold:g}": float(np.mean(iou > iou_threshold))}


def gld_box_to_pixels(box, width: float, height: float) -> np.ndarray:
    """A Google Landmark Boxes box ``[ymin, xmin, ymax, xmax]`` (fractions of the image in ``[0, 1]``) as
    ``[x1, y1, x2, y2]`` pixels of a ``width x height`` image; ``[4]`` or ``[N, 4]``."""
    box = _as_boxes(box, "box")
    if np.any(box < 0) or np.any(box > 1):
        raise ValueError("box must hold normalised coordinates ymin, xmin, ymax, xmax in [0, 1]")
    _check_image_size((width, height))
    ymin, xmin, ymax, xmax = np.moveaxis(box, -1, 0)
    return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)


def pixels_to_gld_box(box, width: float, height: float) -> np.ndarray:
    """Inverse of :func:`gld_box_to_pixels`: ``[x1, y1, x2, y2]`` pixels to normalised ``[ymin, xmin, ymax, xmax]``."""
    box = _as_boxes(box, "box")
    _check_image_size((width, height))
    x1, y1, x2, y2 = np.moveaxis(box, -1, 0)
    return np.stack([y1 / height, x1 / width, y2 / height, x2 / width], axis=-1)


def draw_boxes(
    image, boxes: Mapping[str, Sequence[float]], path: str | os.PathLike, line_width: int = 3, colours=None
) -> None:
    """Write ``image`` with each box outlined and labelled with its name as a PNG at ``path``.

    ``boxes`` maps a label (e.g. ``"predicted"``, ``"true"``) to ``[x1, y1, x2, y2]`` pixels with exclusive
    ``x2``/``y2``; the outline is drawn inward from those edges, ``line_width`` pixels thick, and the label sits
    just inside the top-left corner. Colours: ``colours[label]`` when given, else red for ``"predicted"``, green
    for ``"true"``, and a fixed palette for other labels in order. The file is written under a temporary name
    and renamed, so a reader never sees half a PNG.
    """
    from PIL import Image, ImageDraw

    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if line_width < 1:
        raise ValueError(f"line_width must be at least 1, got {line_width}")
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    others = iter(OTHER_BOX_COLOURS * (len(boxes) // len(OTHER_BOX_COLOURS) + 1))
    for label, box in boxes.items():
        box = _as_boxes(box, f"boxes[{label!r}]")
        if box.shape != (4,):
            raise ValueError(f"boxes[{label!r}] must be one box [4], got shape {box.shape}")
        x1, y1, x2, y2 = (float(v) for v in box)
        colour = (colours or {}).get(label) or BOX_COLOURS.get(label) or next(others)
        outline = [round(x1), round(y1), max(round(x2) - 1, round(x1)), max(round(y2) - 1, round(y1))]
        draw.rectangle(outline, outline=colour, width=line_width)
        draw.text((outline[0] + line_width + 1, outline[1] + line_width + 1), str(label), fill=colour)
    with replace_atomically(path) as temporary:
        canvas.save(temporary, format="PNG")


def _as_feature_map(features) -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensor, on any device
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 3 or min(features.shape) < 1:
        raise ValueError(f"features must be one image's feature map [C, H, W], got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features holds NaN or infinite values")
    return features


def _normalised_patches(features) -> tuple[np.ndarray, int, int]:
    """Row-major ``[H * W, C]`` L2-normalised patch features, with ``H`` and ``W``."""
    features = _as_feature_map(features)
    channels, height, width = features.shape
    patches = features.reshape(channels, height * width).T
    norms = np.linalg.norm(patches, axis=1, keepdims=True)
    return patches / np.where(norms > 0, norms, 1.0), height, width


def _normalised_vector(vector, channels: int, name: str) -> np.ndarray:
    if hasattr(vector, "detach"):
        vector = vector.detach().cpu().numpy()
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != (channels,):
        raise ValueError(f"{name} must be a vector [C] = [{channels}], got shape {vector.shape}")
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def _check_seed(seed, height: int, width: int) -> tuple[int, int]:
    if len(seed) != 2:
        raise ValueError(f"seed must be (row, col), got {seed!r}")
    row, col = int(seed[0]), int(seed[1])
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"seed {(row, col)} lies outside the {height}x{width} feature map")
    return row, col


def _check_image_size(image_size) -> tuple[float, float]:
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (width, height) with positive entries, got {image_size!r}")
    return float(image_size[0]), float(image_size[1])


def _as_boxes(boxes, name: str) -> np.ndarray:
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim not in (1, 2) or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be a box [4] or boxes [N, 4] as x1, y1, x2, y2, got shape {boxes.shape}")
    return boxes


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)

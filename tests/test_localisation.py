"""Localisation check of the spatial context (retrieval/localisation.py), on hand-made feature maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.localisation import (
    box_iou,
    draw_boxes,
    expand_region,
    gld_box_to_pixels,
    localisation_metrics,
    localise,
    object_seed,
    patch_degrees,
    pixels_to_gld_box,
    query_seed,
    region_box,
)


def block_map(height, width, block_rows, block_cols, channels=16, noise=0.01, seed=0):
    """Feature map ``[C, H, W]``: one background feature everywhere, a distinct object feature in the block."""
    rng = np.random.default_rng(seed)
    background, foreground = np.zeros(channels), np.zeros(channels)
    background[0], foreground[1] = 1.0, 1.0
    features = np.tile(background[:, None, None], (1, height, width))
    features[:, block_rows, block_cols] = foreground[:, None, None]
    return features + noise * rng.standard_normal(features.shape), foreground


def test_lowest_degree_patch_lies_in_the_distinct_block():
    for noise_seed in range(20):
        features, _ = block_map(4, 4, slice(1, 3), slice(2, 4), noise=1e-5, seed=noise_seed)
        degrees = patch_degrees(torch.from_numpy(features), k=8)
        assert degrees.shape == (4, 4)
        assert degrees.sum() == pytest.approx(16 * 8)
        row, col = object_seed(features, k=8)
        assert 1 <= row < 3 and 2 <= col < 4
        assert degrees[1:3, 2:4].max() < np.delete(degrees.ravel(), [6, 7, 10, 11]).min()
        # stronger noise: the dense graph of LOST (positive correlation) still finds the block
        noisy, _ = block_map(4, 4, slice(1, 3), slice(2, 4), noise=0.05, seed=noise_seed)
        row, col = object_seed(noisy, similarity_threshold=0.0)
        assert 1 <= row < 3 and 2 <= col < 4


def test_knn_in_degree_hand_case_three_patches_on_a_line():
    # unit vectors at 0, 30 and 90 degrees: 0 -> 1, 1 -> 0, 2 -> 1 are the nearest neighbours (k = 1)
    angles = np.radians([0.0, 30.0, 90.0])
    features = np.stack([np.cos(angles), np.sin(angles)])[:, None, :]  # [C=2, H=1, W=3]
    np.testing.assert_allclose(patch_degrees(features, k=1), [[1.0, 2.0, 0.0]])
    # dense graph at cosine >= 0.5: 0-1 (0.87), 1-2 (0.5) are edges, 0-2 (0) is not
    np.testing.assert_allclose(patch_degrees(features, similarity_threshold=0.5), [[1.0, 2.0, 1.0]])


def test_ties_are_shared_not_given_to_the_first_patch():
    features = np.ones((3, 2, 3))  # six identical patches: every other patch is tied
    np.testing.assert_allclose(patch_degrees(features, k=2), np.full((2, 3), 2.0))


def test_degree_argument_errors():
    with pytest.raises(ValueError, match="k must be"):
        patch_degrees(np.ones((2, 2, 2)), k=4)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        patch_degrees(np.ones((2, 2)))


def test_region_growing_keeps_the_seed_blob_and_respects_connectivity_and_threshold():
    features = np.zeros((2, 5, 5))
    features[0] = 1.0  # background
    blob = [(0, 0), (0, 1), (1, 0), (3, 3), (3, 4), (4, 3)]  # two separate blobs of the same feature
    for r, c in blob:
        features[:, r, c] = [0.0, 1.0]
    mask = expand_region(features, (0, 0), threshold=0.9)
    assert {tuple(cell) for cell in np.argwhere(mask)} == {(0, 0), (0, 1), (1, 0)}

    features[:, 2, 2] = [0.0, 1.0]  # a cell touching the second blob only diagonally
    features[:, 1, 1] = [0.6, 0.8]  # cosine 0.8 to the seed feature: joins at 0.7, not at 0.9
    four = expand_region(features, (0, 0), threshold=0.9, connectivity=4)
    eight = expand_region(features, (0, 0), threshold=0.9, connectivity=8)
    assert four.sum() == 3 and not four[1, 1]
    assert not eight[1, 1] and eight.sum() == 3  # (1, 1) too dissimilar, so nothing can reach (2, 2)
    eight_low = expand_region(features, (0, 0), threshold=0.7, connectivity=8)
    assert eight_low[1, 1] and eight_low[2, 2] and eight_low[3, 3] and eight_low.sum() == 8
    four_low = expand_region(features, (0, 0), threshold=0.7, connectivity=4)
    assert four_low[1, 1] and not four_low[2, 2] and four_low.sum() == 4

    lonely = expand_region(features, (4, 0), threshold=1.1)  # nothing reaches the threshold: the seed is still in
    assert lonely.sum() == 1 and lonely[4, 0]
    with pytest.raises(ValueError, match="connectivity"):
        expand_region(features, (0, 0), connectivity=6)
    with pytest.raises(ValueError, match="outside"):
        expand_region(features, (5, 0))


def test_query_seed_is_the_patch_equal_to_the_query():
    features = np.random.default_rng(1).standard_normal((8, 3, 4))
    assert query_seed(features, features[:, 2, 1] * 3.0) == (2, 1)
    with pytest.raises(ValueError, match="query_descriptor"):
        query_seed(features, np.ones(7))


def test_region_box_pixel_convention():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = True
    np.testing.assert_allclose(region_box(mask, (64, 32)), [32, 8, 48, 16])
    mask[3, 0] = True
    np.testing.assert_allclose(region_box(mask, (64, 32)), [0, 8, 48, 32])
    with pytest.raises(ValueError, match="no True"):
        region_box(np.zeros((4, 4), dtype=bool), (64, 32))


def test_box_iou_hand_cases_and_metrics():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert box_iou([5, 5, 5, 9], [5, 5, 5, 9]) == 0.0  # degenerate: 0, not NaN
    predicted = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    true = np.array([[0, 0, 10, 10]] * 3)
    np.testing.assert_allclose(box_iou(predicted, true), [1.0, 1 / 3, 0.0])
    metrics = localisation_metrics(predicted, true)
    assert metrics == {"iou_mean": pytest.approx(4 / 9), "iou@0.5": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        localisation_metrics(predicted, true[:2])


def test_gld_box_to_pixels_round_trip():
    gld = [0.25, 0.1, 0.75, 0.5]  # ymin, xmin, ymax, xmax
    pixels = gld_box_to_pixels(gld, width=200, height=80)
    np.testing.assert_allclose(pixels, [20, 20, 100, 60])
    np.testing.assert_allclose(pixels_to_gld_box(pixels, width=200, height=80), gld)
    np.testing.assert_allclose(gld_box_to_pixels([gld, [0, 0, 1, 1]], 200, 80), [[20, 20, 100, 60], [0, 0, 200, 80]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gld_box_to_pixels([0, 0, 1.5, 1], 200, 80)


def test_localise_object_and_query_modes_find_the_block():
    image_size = (192, 160)  # 12 x 10 cells of 16 pixels
    features, _ = block_map(10, 12, slice(3, 5), slice(5, 8), noise=1e-5)
    true_box = [5 * 16, 3 * 16, 8 * 16, 5 * 16]
    predicted = localise(features, image_size, mode="object", k=8, threshold=0.5)
    assert box_iou(predicted, true_box) >= 0.9

    big, _ = block_map(10, 12, slice(2, 7), slice(3, 9), noise=0.02)  # 30 cells: beyond k-NN, dense graph works
    dense = localise(big, image_size, mode="object", degree_similarity_threshold=0.0)
    assert box_iou(dense, [3 * 16, 2 * 16, 9 * 16, 7 * 16]) >= 0.9

    row, col = object_seed(features, k=8)
    moved, _ = block_map(10, 12, slice(6, 8), slice(1, 4), noise=0.02, seed=3)
    found = localise(moved, image_size, mode="query", query_descriptor=features[:, row, col])
    assert box_iou(found, [1 * 16, 6 * 16, 4 * 16, 8 * 16]) >= 0.9
    with pytest.raises(ValueError, match="query_descriptor"):
        localise(moved, image_size, mode="query")
    with pytest.raises(ValueError, match="mode"):
        localise(moved, image_size, mode="salient")


def test_draw_boxes_writes_a_png_with_coloured_edges(tmp_path):
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    path = tmp_path / "boxes" / "image.png"
    draw_boxes(image, {"predicted": [8, 8, 40, 40], "true": [20, 4, 60, 30]}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["image.png"]  # no temporary left behind
    with Image.open(path) as drawn:
        assert drawn.format == "PNG" and drawn.size == (64, 48)
        pixels = drawn.convert("RGB")
        assert pixels.getpixel((24, 39)) == (230, 25, 75)  # bottom edge of "predicted"
        assert pixels.getpixel((59, 20)) == (60, 180, 75)  # right edge of "true"
        assert pixels.getpixel((2, 46)) == (128, 128, 128)

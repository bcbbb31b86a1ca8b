"""The localisation check as a callback: on hand-made Revisited-layout images whose object is a red square on a
blue background, with a stand-in module whose map is the mean colour of each 8 x 8 cell, every check finds the
square exactly; boxes, metrics and drawings land where the docstring says."""

from __future__ import annotations

import contextlib
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from callbacks.localisation_check import LocalisationCheck
from datamodules.revisited import RevisitedOxfordParis

# [x1, y1, x2, y2] of the red square in each 64 x 64 image, on the 8-pixel cell grid.
QUERY_BOX = [24, 16, 40, 32]
DATABASE_BOXES = [[8, 8, 24, 24], [40, 32, 56, 48], [16, 40, 40, 56]]


def picture(box) -> Image.Image:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[...] = (25, 25, 200)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = (230, 25, 25)
    return Image.fromarray(pixels)


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "rsquares/jpg").mkdir(parents=True)
    names = [f"db_{i}" for i in range(len(DATABASE_BOXES))]
    for name, box in zip(names, DATABASE_BOXES):
        picture(box).save(tmp_path / f"rsquares/jpg/{name}.jpg", quality=95)
    picture(QUERY_BOX).save(tmp_path / "rsquares/jpg/query_0.jpg", quality=95)
    # the query's positives: database images 0 (easy) and 2 (hard); image 1 is junk to it
    gnd = [{"bbx": QUERY_BOX, "easy": [0], "hard": [2], "junk": [1]}]
    with open(tmp_path / "rsquares/gnd_rsquares.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": ["query_0"], "gnd": gnd}, f)
    rows = ["id,box"] + [
        f"{n},{y1 / 64} {x1 / 64} {y2 / 64} {x2 / 64}" for n, (x1, y1, x2, y2) in zip(names, DATABASE_BOXES)
    ]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    data = RevisitedOxfordParis(str(tmp_path), datasets=("rsquares",), image_size=64)
    data.setup("test")
    return data


def stand_in(maps=("colour",)):
    """A module whose maps are the images' mean colours per 8 x 8 cell."""
    return SimpleNamespace(
        device=torch.device("cpu"), feature_maps=lambda images: {m: F.avg_pool2d(images, 8) for m in maps}
    )


def trainer_for(data, directory, global_zero=True):
    return SimpleNamespace(
        datamodule=data,
        is_global_zero=global_zero,
        default_root_dir=str(directory),
        strategy=SimpleNamespace(broadcast=lambda value, src: value),
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        loggers=[],
    )


def test_every_check_finds_the_square_and_writes_boxes_and_drawings(dataset, tmp_path):
    check = LocalisationCheck(true_boxes=str(tmp_path / "boxes.csv"), examples=1)
    metrics = check.evaluation_metrics(trainer_for(dataset, tmp_path / "run"), stand_in(("colour", "again")), "test")
    expected = {}
    for feature in ("colour", "again"):
        for part in ("query_box", "object", "query_seeded"):
            expected |= {f"test/rsquares/localisation/{feature}/{part}/iou_mean": 1.0}
            expected |= {f"test/rsquares/localisation/{feature}/{part}/iou@0.5": 1.0}
    assert metrics.keys() == expected.keys()
    assert all(abs(metrics[key] - 1.0) < 1e-9 for key in expected), metrics

    records = json.loads((tmp_path / "run/localisation/test/rsquares.json").read_text())["images"]
    assert [(r["check"], r["image"]) for r in records] == [
        ("query_box", "rsquares/jpg/query_0.jpg"),
        ("object", "rsquares/jpg/db_0.jpg"),
        ("query_seeded", "rsquares/jpg/db_0.jpg"),  # a positive of the query
        ("object", "rsquares/jpg/db_1.jpg"),  # junk to the query: no query-seeded box
        ("object", "rsquares/jpg/db_2.jpg"),
        ("query_seeded", "rsquares/jpg/db_2.jpg"),
    ]
    assert records[2]["query"] == "rsquares/jpg/query_0.jpg" and records[2]["predicted"]["colour"] == DATABASE_BOXES[0]
    drawn = sorted(p.name for p in (tmp_path / "run/localisation/test/rsquares").iterdir())
    assert drawn == ["object_db_0.png", "query_000.png", "query_seeded_000_db_0.png"]


def test_without_true_boxes_only_the_query_box_is_checked_and_other_ranks_receive_the_metrics(dataset, tmp_path):
    check = LocalisationCheck(examples=0)
    metrics = check.evaluation_metrics(trainer_for(dataset, tmp_path / "run"), stand_in(), "test")
    assert metrics == {
        "test/rsquares/localisation/colour/query_box/iou_mean": 1.0,
        "test/rsquares/localisation/colour/query_box/iou@0.5": 1.0,
    }
    shared = trainer_for(dataset, tmp_path / "other", global_zero=False)
    shared.strategy.broadcast = lambda value, src: {"from": "rank 0"} if value is None else pytest.fail("computed")
    assert check.evaluation_metrics(shared, stand_in(), "test") == {"from": "rank 0"}
    assert check.evaluation_metrics(shared, stand_in(), "val") == {}, "not a checked stage"
    with pytest.raises(TypeError, match="feature_maps"):
        check.evaluation_metrics(trainer_for(dataset, tmp_path), SimpleNamespace(), "test")

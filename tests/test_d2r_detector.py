"""Detect-to-Retrieve's landmark detector: the Google-Landmark-Boxes datamodule (pixels, flips, errors), the boxes
files, the box mAP, the detector's predict output and its validation on 1 and 2 processes, and fit + predict
through the command line on a tiny generated benchmark."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, run_in_two_processes
from PIL import Image
from test_generated_landmarks import TINY

from datamodules.generated_landmarks import (
    GeneratedLandmarkBoxes,
    GeneratedLandmarksRevisited,
    GeneratedLandmarksSpec,
    generate_landmark_benchmark,
)
from datamodules.gldv2 import image_path
from datamodules.landmark_boxes import (
    LandmarkBoxes,
    read_landmark_boxes,
    read_scored_boxes,
    write_scored_boxes,
)
from datamodules.layout import DatasetFormatError, DatasetLayoutError
from lightning_modules.cli import main as cli_main
from lightning_modules.d2r import LandmarkDetector
from retrieval.detection import box_average_precision

CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
# Few proposals and sampled regions: a tiny detector step on 48-pixel images takes a fraction of a second.
SMALL_DETECTOR = {
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 16,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_landmark_benchmark(tmp_path_factory.mktemp("generated"), TINY)


def small_detector(**kwargs) -> LandmarkDetector:
    options = {"architecture": "mobilenet_v3_large_fpn", "weights": None, "min_size": 64, "max_size": 64}
    return LandmarkDetector(**{**options, "detector_options": SMALL_DETECTOR, **kwargs})


def spec_overrides(spec: GeneratedLandmarksSpec) -> list[str]:
    default = GeneratedLandmarksSpec()
    return [
        f"--data.init_args.spec.{f.name}={getattr(spec, f.name)}"
        for f in dataclasses.fields(spec)
        if getattr(spec, f.name) != getattr(default, f.name)
    ]


def write_image(root: Path, image_id: str, width: int, height: int) -> Path:
    path = root / image_path("train", image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 4] = 255  # a white band on the left, to see flips
    Image.fromarray(pixels).save(path)
    return path


# ---- the datamodule -------------------------------------------------------------------------------------------------


def test_generated_boxes_come_in_pixels_of_the_resized_images(root):
    data = GeneratedLandmarkBoxes(str(root), spec=TINY, image_size=96, flip_probability=0.0, batch_size=4)
    data.setup("fit")
    train, val = data.train_dataset(), data.dataset("val")
    expected = read_landmark_boxes(root / "boxes/boxes_split1.csv")
    assert train.ids == list(expected) and len(train) == 9 and len(val) == 3  # 3 of 4 landmarks train, 1 validates
    assert not set(train.ids) & set(val.ids)
    for index in range(len(train)):
        example = train[index]
        assert example["index"] == index and example["image"].shape == (3, 96, 96)
        assert 0 <= example["image"].min() and example["image"].max() <= 1
        ymin, xmin, ymax, xmax = expected[train.ids[index]].T
        np.testing.assert_allclose(example["targets"]["boxes"].numpy(), np.stack([xmin, ymin, xmax, ymax], 1) * 96)
        assert example["targets"]["labels"].tolist() == [1] * len(ymin)
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 4 and len(batch["targets"]) == 4
    assert batch["index"].dtype == torch.int64 and data.eval_sets("val") == []


def test_aspect_ratio_is_kept_and_a_flip_mirrors_image_and_boxes(tmp_path):
    write_image(tmp_path, "abc1", width=120, height=80)
    (tmp_path / "boxes.csv").write_text("id,box\nabc1,0.25 0.1 0.75 0.4\nabc1,0.0 0.5 1.0 1.0\n")
    kept = LandmarkBoxes(str(tmp_path), "boxes.csv", "boxes.csv", image_size=60, flip_probability=0.0).dataset("train")
    flipped = LandmarkBoxes(str(tmp_path), "boxes.csv", "boxes.csv", image_size=60, flip_probability=1.0)
    example, mirrored = kept[0], flipped.dataset("train")[0]
    assert example["image"].shape == (3, 40, 60)  # longer side 60, aspect ratio 3:2 kept
    np.testing.assert_allclose(example["targets"]["boxes"].numpy(), [[6, 10, 24, 30], [30, 0, 60, 40]])
    np.testing.assert_allclose(mirrored["targets"]["boxes"].numpy(), [[36, 10, 54, 30], [0, 0, 30, 40]])
    assert torch.equal(mirrored["image"], example["image"].flip(-1))
    assert example["image"][:, :, :10].mean() > 0.9 and mirrored["image"][:, :, -10:].mean() > 0.9
    assert flipped.dataset("val")[0]["targets"]["boxes"].tolist() == example["targets"]["boxes"].tolist()


def test_malformed_files_and_missing_images_are_named(tmp_path):
    write_image(tmp_path, "abc1", 32, 32)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,box\nabc1,0.1 0.1 0.5 0.5\nabc1,0.1 0.1 0.5\n")
    data = LandmarkBoxes(str(tmp_path), train_boxes=str(bad), val_boxes="bad.csv")
    with pytest.raises(DatasetFormatError, match=rf"{bad}:3: box .*not four numbers.*ymin xmin ymax xmax"):
        data.setup("fit")
    (tmp_path / "missing.csv").write_text("id,box\nabc1,0.1 0.1 0.5 0.5\nfff9,0.1 0.1 0.5 0.5\n")
    data = LandmarkBoxes(str(tmp_path), train_boxes="missing.csv", val_boxes="missing.csv")
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 images of .*missing.csv are missing.*train/f/f/f/fff9.jpg"):
        data.setup("validate")
    with pytest.raises(DatasetLayoutError, match="(?s)nothing.csv not found.*ymin xmin ymax xmax"):
        LandmarkBoxes(str(tmp_path), val_boxes="nothing.csv").setup("validate")


def test_scored_boxes_round_trip_and_published_files_read_with_score_one(tmp_path):
    rows = [
        ("a/1.jpg", np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), np.array([0.91234, 0.5])),
        ("b.jpg", np.zeros((0, 4)), np.zeros(0)),  # no boxes: no row
        ("c", np.array([[0.3, 0.3, 0.3000001, 0.4]]), np.array([0.7])),  # rounds to nothing: left out
    ]
    path = tmp_path / "list.boxes.csv"
    assert write_scored_boxes(path, rows) == 2
    assert path.read_text().splitlines() == [
        "id,box,score",
        "a/1.jpg,0.100000 0.200000 0.500000 0.600000,0.9123",
        "a/1.jpg,0.000000 0.000000 1.000000 1.000000,0.5000",
    ]
    boxes, scores = read_scored_boxes(path)["a/1.jpg"]
    np.testing.assert_allclose(boxes, rows[0][1])
    np.testing.assert_allclose(scores, [0.9123, 0.5])
    published = tmp_path / "boxes_split2.csv"
    published.write_text("id,box\nabc,0.1 0.2 0.5 0.6\n")
    boxes, scores = read_scored_boxes(published)["abc"]
    assert boxes.tolist() == [[0.1, 0.2, 0.5, 0.6]] and scores.tolist() == [1.0]
    path.write_text("id,box,score\nabc,0.1 0.2 0.5 0.6,high\n")
    with pytest.raises(DatasetFormatError, match=rf"{path}:2: score 'high' is not a number"):
        read_scored_boxes(path)


# ---- box mAP --------------------------------------------------------------------------------------------------------


def detections(boxes, scores) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.ones(len(scores), dtype=torch.int64),
    }


def truth(boxes) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(len(boxes), dtype=torch.int64)}


def test_box_map_is_one_for_the_targets_and_the_coco_value_otherwise():
    targets = [truth([[0, 0, 10, 10], [20, 20, 40, 40]]), truth([[5, 5, 50, 30]])]
    perfect = [detections(t["boxes"].tolist(), [0.9] * len(t["boxes"])) for t in targets]
    assert box_average_precision(perfect, targets) == {"box_mAP": 1.0, "box_mAP@0.5": 1.0}
    # One exact box (0.9), one false positive (0.8), one box missed: precision 1 up to recall 0.5, then nothing;
    # COCO's 101 recall points 0, 0.01, ..., 0.5 have precision 1: AP = 51 / 101 at every IoU threshold.
    found = [detections([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8])]
    scores = box_average_precision(found, targets[:1])
    assert scores["box_mAP@0.5"] == pytest.approx(51 / 101, abs=1e-6) == scores["box_mAP"]
    # IoU 0.625: a hit at thresholds 0.5, 0.55, 0.6, a miss at the 7 others.
    scores = box_average_precision([detections([[0, 0, 10, 6.25]], [0.9])], [truth([[0, 0, 10, 10]])])
    assert scores["box_mAP@0.5"] == 1.0 and scores["box_mAP"] == pytest.approx(0.3, abs=1e-6)


# ---- the module -----------------------------------------------------------------------------------------------------


def test_predict_keeps_confident_boxes_normalised_to_each_image():
    torch.manual_seed(0)
    module = small_detector(score_threshold=0.0, min_score=0.3, max_boxes_per_image=5).eval()
    images = [torch.rand(3, 40, 64), torch.rand(3, 64, 48)]
    with torch.no_grad():
        output = module.predict_step({"index": torch.tensor([3, 7]), "image": images}, 0)
        raw = module(images)
    assert output["index"].tolist() == [3, 7]
    for image, boxes, scores, found in zip(images, output["boxes"], output["scores"], raw):
        expected = found["scores"][found["scores"] >= 0.3][:5]
        assert torch.equal(scores, expected) and len(boxes) == len(scores) and 0 < len(scores) <= 5
        height, width = image.shape[1:]
        x1, y1, x2, y2 = found["boxes"][: len(scores)].T
        np.testing.assert_allclose(boxes.numpy(), torch.stack([y1 / height, x1 / width, y2 / height, x2 / width], 1))
        assert (boxes >= 0).all() and (boxes <= 1).all()


def stored_evaluation(count: int = 5) -> list[tuple[dict, dict]]:
    """Per image, noisy detections of its two true boxes (x1 y1 x2 y2 pixels) and the truth, as numpy arrays."""
    rng, ones = np.random.default_rng(0), np.ones(2, dtype=np.int64)
    images = []
    for _ in range(count):
        corner, size = rng.uniform(0, 50, (2, 2)), rng.uniform(10, 40, (2, 2))
        true_boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
        found = (true_boxes + rng.normal(0, 4, true_boxes.shape)).astype(np.float32)
        scores = rng.uniform(0, 1, 2).astype(np.float32)
        images.append(({"boxes": found, "scores": scores, "labels": ones}, {"boxes": true_boxes, "labels": ones}))
    return images


def _score_shard(rank: int, port: int, world_size: int, queue) -> None:
    """The detector's validation scoring of 5 images sharded (with padding repeats) as the datamodule shards them."""
    import os

    import torch.distributed as dist

    from datamodules.sampling import ShardSampler

    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)

    def broadcast(value, src=0):
        if world_size > 1:
            holder = [value]
            dist.broadcast_object_list(holder, src=src)
            value = holder[0]
        return value

    images = stored_evaluation()
    module = small_detector()
    module._evaluated = [(i, *images[i]) for i in ShardSampler(len(images), rank, world_size)]
    module._trainer = SimpleNamespace(
        world_size=world_size,
        is_global_zero=rank == 0,
        strategy=SimpleNamespace(broadcast=broadcast),
        datamodule=SimpleNamespace(name="landmark_boxes"),
    )
    queue.put((rank, module.evaluation_metrics("val")))
    if world_size > 1:
        dist.destroy_process_group()


def test_validation_scores_each_image_once_with_one_or_two_processes():
    single: dict = {}
    _score_shard(0, 0, 1, SimpleNamespace(put=lambda item: single.update([item])))
    assert set(single[0]) == {"val/landmark_boxes/box_mAP", "val/landmark_boxes/box_mAP@0.5"}
    images = stored_evaluation()
    expected = box_average_precision(
        [{k: torch.from_numpy(v) for k, v in found.items()} for found, _ in images],
        [{k: torch.from_numpy(v) for k, v in true.items()} for _, true in images],
    )
    assert single[0]["val/landmark_boxes/box_mAP"] == expected["box_mAP"] and 0 < expected["box_mAP"] < 1
    assert run_in_two_processes(_score_shard, 2) == {0: single[0], 1: single[0]}


# ---- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_validates_box_map_and_predict_writes_the_boxes_of_every_database_image(
    root, tmp_path, monkeypatch, capsys
):
    data = [f"--data.init_args.root={root}", *spec_overrides(TINY)]
    monkeypatch.chdir(tmp_path)
    cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "d2r/detector_generated.yaml"),
            *data,
            *QUIET,
            "--data.init_args.batch_size=3",
            "--data.init_args.eval_batch_size=2",
            "--trainer.limit_train_batches=2",
            "--model.init_args.min_size=48",
            "--model.init_args.max_size=48",
            f"--model.init_args.detector_options={json.dumps(SMALL_DETECTOR)}",
            "--model.init_args.score_threshold=0.0",
            "--model.init_args.min_score=0.2",
        ]
    )
    run = tmp_path / "runs/landmarkdetector/generated_landmark_boxes/version_0"
    record = json.loads((run / "metrics.json").read_text())
    keys = ["val/generated_landmark_boxes/box_mAP", "val/generated_landmark_boxes/box_mAP@0.5"]
    assert all(0 <= record[key] <= 1 for key in keys), record
    assert record["method"] == "D2R landmark detector" and "box_mAP@0.5" in capsys.readouterr().out
    best = run / json.loads((run / "run.json").read_text())["best_checkpoint"]
    assert best.name.startswith("epoch000") and best.is_file() and (run / "checkpoints/last.ckpt").is_file()

    cli_main(
        [
            "predict",
            "--config",
            str(CONFIGS / "d2r/predict_boxes_generated.yaml"),
            *data,
            *QUIET,
            f"--ckpt_path={best}",
            "--predictions.output_dir=boxes",
        ]
    )
    written = tmp_path / "boxes/rlandmarks_database.boxes.csv"
    assert not list((tmp_path / "boxes").glob("*.h5")), "boxes only: no feature store"
    with open(written) as f:
        assert next(csv.reader(f)) == ["id", "box", "score"]
    boxes = read_scored_boxes(written)
    ids = GeneratedLandmarksRevisited(str(root), spec=TINY).dataset("rlandmarks_database").ids
    assert list(boxes) == ids  # every image has boxes (the detector is unsure of everything yet), in list order
    for image_boxes, scores in boxes.values():
        assert (scores >= 0.2).all() and np.all(np.diff(scores) <= 0)  # the checkpoint's min_score, best first
        assert (image_boxes >= 0).all() and (image_boxes <= 1).all()

"""The generated landmarks benchmark: its layouts read by the existing readers, its boxes, labels and regeneration."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.generated_landmarks as generated
from datamodules.generated_landmarks import (
    MARKER,
    GeneratedLandmarksGLDv2,
    GeneratedLandmarksRevisited,
    GeneratedLandmarksSpec,
    Pose,
    View,
    generate_landmark_benchmark,
    homography,
    is_generated,
    landmark_box,
    read_landmark_boxes,
    read_views,
    revisited_difficulty,
    warp,
)
from datamodules.gldv2 import GoogleLandmarksV2, image_path, read_gldv2_retrieval
from datamodules.layout import DatasetFormatError, DatasetLayoutError
from datamodules.revisited import RevisitedOxfordParis, read_revisited

TINY = GeneratedLandmarksSpec(
    image_size=48,
    train_landmarks=4,
    train_images_per_landmark=3,
    boxes_validation_fraction=0.25,
    query_landmarks=2,
    queries_per_landmark=2,
    index_images_per_landmark=3,
    index_distractor_landmarks=2,
    ignored_queries=2,
    revisited_landmarks=2,
    revisited_queries_per_landmark=2,
    revisited_database_per_landmark=5,
    revisited_distractor_landmarks=1,
    background_pool=3,
    distractor_pool=3,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_landmark_benchmark(tmp_path_factory.mktemp("generated"), TINY)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def views_by_image(root: Path) -> dict[str, View]:
    return {view.image: view for view in read_views(root)}


# ---- the layouts, read by the existing readers ---------------------------------------------------------------------


def test_gldv2_readers_see_the_spec_sizes_and_labels(root):
    views = views_by_image(root)
    lists = GoogleLandmarksV2(root=str(root / "gldv2")).lists
    assert len(lists["train"]) == 4 * 3 and len(lists["index"]) == (2 + 2) * 3 and len(lists["test"]) == 2 * 2
    assert Counter(lists["train"].labels.tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert [views[f"gldv2/{p}"].landmark for p in lists["train"].paths] == lists["train"].labels.tolist()

    retrieval = read_gldv2_retrieval(root / "gldv2")
    assert sorted(retrieval.query_subsets) == ["private", "private", "public", "public"]
    test_ids = (root / "gldv2/test.csv").read_text().split()[1:]
    assert len(test_ids) == 2 * 2 + 2 and all(len(i) == 16 and int(i, 16) >= 0 for i in test_ids)
    ignored = [i for i in test_ids if i not in retrieval.query_ids]
    assert [views[f"gldv2/{image_path('test', i)}"].landmark for i in ignored] == [-1, -1], "non-landmark queries"
    index_landmarks = [views[f"gldv2/{image_path('index', i)}"].landmark for i in retrieval.index_ids]
    for query, positives in zip(retrieval.query_ids, retrieval.positives):
        landmark = views[f"gldv2/{image_path('test', query)}"].landmark
        assert sorted(positives.tolist()) == [k for k, lm in enumerate(index_landmarks) if lm == landmark]
        assert len(positives) == 3
    queried = {views[f"gldv2/{image_path('test', q)}"].landmark for q in retrieval.query_ids}
    assert len(set(index_landmarks) - queried) == 2, "the index holds landmarks that no query asks for"


def test_revisited_readers_see_the_spec_sizes_and_boxes(root):
    views = views_by_image(root)
    dataset = read_revisited(root / "revisited", "rlandmarks")
    assert len(dataset.database_paths) == (2 + 1) * 5 and len(dataset.query_paths) == 2 * 2
    for path, box, entry in zip(dataset.query_paths, dataset.query_boxes, dataset.gnd):
        np.testing.assert_array_equal(box, views[f"revisited/{path}"].box)
        landmark = views[f"revisited/{path}"].landmark
        labelled = sorted(entry["easy"] + entry["hard"] + entry["junk"])
        assert labelled == [
            i for i, p in enumerate(dataset.database_paths) if views[f"revisited/{p}"].landmark == landmark
        ]
        assert len(labelled) == 5 and entry["easy"], "every landmark's first database view is drawn like a query"
    (spec,) = RevisitedOxfordParis(root=str(root / "revisited"), datasets=("rlandmarks",)).eval_specs("test")
    assert spec.name == "rlandmarks" and spec.database == ["rlandmarks_database"] and spec.query == "rlandmarks_query"
    assert spec.ground_truth.depth == 15


def test_revisited_labels_follow_the_documented_thresholds(root):
    views = views_by_image(root)
    data = pickle.loads((root / "revisited/rlandmarks/gnd_rlandmarks.pkl").read_bytes())
    for entry in data["gnd"]:
        for label in ("easy", "hard", "junk"):
            for i in entry[label]:
                view = views[f"revisited/rlandmarks/jpg/{data['imlist'][i]}.jpg"]
                size, visible = view.visible_size, view.visible_fraction
                if size < 0.15 or visible < 0.4:
                    expected = "junk"
                elif size >= 0.3 and visible >= 0.75 and abs(view.pose.rotation) <= 20:
                    tilt = abs(view.pose.tilt_x) + abs(view.pose.tilt_y)
                    expected = "easy" if (1 + tilt) / (1 - tilt) <= 1.6 else "hard"
                else:
                    expected = "hard"
                assert label == expected, (view, label)
    # The boundaries themselves: thresholds are inclusive for easy, strict for junk.
    frontal = Pose(0.5, 0.5, 0.5, rotation=20.0, tilt_x=0.23)  # foreshortening 1.597
    assert revisited_difficulty(View("a", "b", 0, frontal, 0.75, 0.3), TINY) == "easy"
    assert revisited_difficulty(View("a", "b", 0, frontal, 0.7499, 0.3), TINY) == "hard"
    assert revisited_difficulty(View("a", "b", 0, Pose(0.5, 0.5, 0.5, rotation=20.1), 1.0, 0.9), TINY) == "hard"
    assert revisited_difficulty(View("a", "b", 0, Pose(0.5, 0.5, 0.5, tilt_x=0.25), 1.0, 0.9), TINY) == "hard"
    assert revisited_difficulty(View("a", "b", 0, frontal, 0.4, 0.15), TINY) == "hard"
    assert revisited_difficulty(View("a", "b", 0, frontal, 0.3999, 0.9), TINY) == "junk"
    assert revisited_difficulty(View("a", "b", 0, frontal, 1.0, 0.1499), TINY) == "junk"


def test_baseline_metrics_score_whole_images_and_true_boxes(root):
    metrics = generated.baseline_metrics(root)
    for crop in ("whole", "box"):
        assert {f"gldv2 {crop}/public/mAP@100", f"rlandmarks {crop}/medium/mAP"} <= set(metrics)
    assert all(0 <= value <= 1 for value in metrics.values())


def test_every_image_is_a_jpeg_of_the_stated_size_and_listed_once(root):
    views = read_views(root)
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert sorted(v.image for v in views) == written
    assert len(written) == 12 + 12 + 6 + 15 + 4
    for relative in written:
        with Image.open(root / relative) as image:
            assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"
            image.load()  # decodes completely


def test_train_landmarks_are_disjoint_from_every_retrieval_landmark(root):
    by_split: dict[str, set[int]] = {}
    for view in read_views(root):
        by_split.setdefault(view.split, set()).add(view.landmark)
    assert by_split["train"] == {0, 1, 2, 3}
    retrieval = set().union(*(by_split[s] for s in ("index", "test", "revisited_database", "revisited_query")))
    assert not by_split["train"] & retrieval
    assert not (by_split["index"] | by_split["test"]) & (by_split["revisited_database"] - {-1})


# ---- boxes ----------------------------------------------------------------------------------------------------------


def test_boxes_round_trip_and_every_landmark_image_has_its_box(root):
    views = read_views(root)
    split1, split2, evaluation = (read_landmark_boxes(root / "boxes" / f) for f in generated.BOX_FILES)
    assert (root / "boxes/boxes_split1.csv").read_text().splitlines()[0] == "id,box"

    def image_id(view: View) -> str:
        return Path(view.image).stem

    train = {image_id(v): v for v in views if v.split == "train"}
    assert set(split1) | set(split2) == set(train) and not set(split1) & set(split2)
    assert len({train[i].landmark for i in split2}) == 1, "split2: the images of a quarter of the training landmarks"
    assert not {train[i].landmark for i in split1} & {train[i].landmark for i in split2}
    evaluated = {image_id(v): v for v in views if v.split != "train"}
    assert set(evaluation) == {i for i, v in evaluated.items() if v.landmark >= 0}
    assert sum(v.landmark < 0 for v in evaluated.values()) == 2, "only the Ignored test images have no box"
    for boxes in (split1, split2, evaluation):
        for key, box in boxes.items():
            x1, y1, x2, y2 = ({**train, **evaluated}[key].box / 48).tolist()
            assert box.shape == (1, 4)
            np.testing.assert_allclose(box[0], [y1, x1, y2, x2], atol=1e-6)  # ymin xmin ymax xmax


def test_box_is_the_projection_of_the_landmark_corners_clipped():
    facade = (40, 20)  # a 40 x 20 facade at one image pixel per facade pixel: scale = sqrt(800) / 100
    scale = math.sqrt(800) / 100
    np.testing.assert_allclose(
        landmark_box(homography(Pose(0.5, 0.5, scale), facade, 100), facade, 100), [30, 40, 70, 60]
    )
    np.testing.assert_allclose(
        landmark_box(homography(Pose(0.5, 0.5, 2 * scale), facade, 100), facade, 100), [10, 30, 90, 70]
    )
    quarter_turn = homography(Pose(0.5, 0.5, scale, rotation=90), facade, 100)
    np.testing.assert_allclose(landmark_box(quarter_turn, facade, 100), [40, 30, 60, 70], atol=1e-9)
    clipped = homography(Pose(0.1, 0.95, scale), facade, 100)  # x in [-10, 30], y in [85, 105]
    np.testing.assert_allclose(landmark_box(clipped, facade, 100), [0, 85, 30, 100])
    # Tilt 0.2: the left corners have w = 0.8 (nearer, larger), the right ones w = 1.2.
    tilted = homography(Pose(0.5, 0.5, scale, tilt_x=0.2), facade, 100)
    np.testing.assert_allclose(
        landmark_box(tilted, facade, 100), [50 - 20 / 0.8, 50 - 10 / 0.8, 50 + 20 / 1.2, 60 + 2.5]
    )
    # The drawn facade covers exactly its box's pixels (continuous coordinates: pixel i covers [i, i + 1)).
    white = Image.new("RGB", facade, "white").convert("RGBa")
    for matrix in (homography(Pose(0.5, 0.5, scale), facade, 100), clipped):
        rows, columns = np.nonzero(warp(white, matrix, 100)[..., 3] >= 0.5)
        drawn = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
        np.testing.assert_allclose(drawn, landmark_box(matrix, facade, 100), atol=1e-9)


def test_malformed_boxes_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("id,box\nabc,0.1 0.2 0.5 0.6\nabc,0.0 0.0 1.0 1.0\n")
    boxes = read_landmark_boxes(path)
    np.testing.assert_allclose(boxes["abc"], [[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]])  # one row per box
    path.write_text("image,bbox\nabc,0.1 0.2 0.5 0.6\n")
    with pytest.raises(DatasetFormatError, match=rf"{path}:1 has header .*expected id,box"):
        read_landmark_boxes(path)
    for line, expected in (("abc,0.1 0.2 0.5", "not four numbers"), ("abc,0.5 0.2 0.1 0.6", "ymin < ymax")):
        path.write_text(f"id,box\nok,0.1 0.2 0.5 0.6\n{line}\n")
        with pytest.raises(DatasetFormatError, match=rf"{path}:3: box .*{expected}.*ymin xmin ymax xmax"):
            read_landmark_boxes(path)
    path.write_text("id,box\nabc,0.1 0.2 1.5 0.6\n")
    with pytest.raises(DatasetFormatError, match=rf"{path}:2: .*inside \[0, 1\]"):
        read_landmark_boxes(path)
    with pytest.raises(DatasetLayoutError, match="missing.csv not found"):
        read_landmark_boxes(tmp_path / "missing.csv")


# ---- determinism and regeneration -----------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes_another_seed_other_images(root, tmp_path):
    again = files(generate_landmark_benchmark(tmp_path / "again", TINY))
    assert again == files(root)
    other = files(generate_landmark_benchmark(tmp_path / "other", replace(TINY, seed=1)))
    assert set(other) != set(again), "other ids"
    first_database_image = "revisited/rlandmarks/jpg/image_00000.jpg"
    assert other[first_database_image] != again[first_database_image]


def test_generation_is_skipped_until_the_spec_changes_or_the_marker_is_missing(tmp_path, monkeypatch):
    generate_landmark_benchmark(tmp_path, TINY)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    drawn = []
    draw = generated._draw
    monkeypatch.setattr(generated, "_draw", lambda job, assets: drawn.append(job.image) or draw(job, assets))
    generate_landmark_benchmark(tmp_path, TINY)
    assert drawn == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before

    (tmp_path / MARKER).unlink()
    assert not is_generated(tmp_path, TINY)
    generate_landmark_benchmark(tmp_path, TINY)
    assert len(drawn) == 49 and is_generated(tmp_path, TINY)

    old_train = {v.image for v in read_views(tmp_path) if v.split == "train"}
    changed = replace(TINY, seed=3, train_images_per_landmark=2, revisited_name="rother")
    generate_landmark_benchmark(tmp_path, changed)
    assert not (tmp_path / "revisited/rlandmarks").exists() and (tmp_path / "revisited/rother/gnd_rother.pkl").is_file()
    assert is_generated(tmp_path, changed) and not is_generated(tmp_path, TINY)
    assert json.loads((tmp_path / MARKER).read_text())["spec"]["train_images_per_landmark"] == 2
    assert not any((tmp_path / image).exists() for image in old_train), "the old spec's images are removed"
    assert len(list((tmp_path / "gldv2/train").rglob("*.jpg"))) == 4 * 2


def test_concurrent_generations_on_one_root_draw_it_once(tmp_path, monkeypatch):
    drawn = []
    draw = generated._draw
    monkeypatch.setattr(generated, "_draw", lambda job, assets: drawn.append(job.image) or draw(job, assets))
    # flock locks belong to each open() of the lock file, so two threads exclude each other as two runs would.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: generate_landmark_benchmark(tmp_path, TINY), range(2)))
    assert len(drawn) == 49 == len(set(drawn)) and is_generated(tmp_path, TINY)


def test_an_interrupted_generation_is_redone_and_leaves_no_stale_files(tmp_path, monkeypatch):
    draw, count = generated._draw, [0]

    def failing_draw(job, assets):
        count[0] += 1
        if count[0] > 10:
            raise KeyboardInterrupt
        return draw(job, assets)

    monkeypatch.setattr(generated, "_draw", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        generate_landmark_benchmark(tmp_path / "a", replace(TINY, seed=5))
    assert not (tmp_path / "a" / MARKER).exists()
    planned = {v.image for v in read_views(tmp_path / "a")}  # listed before drawing
    assert len(planned) == 49 and sum((tmp_path / "a" / image).is_file() for image in planned) == 10
    monkeypatch.setattr(generated, "_draw", draw)
    # Generated again under another spec: the interrupted images are gone, the result is a clean generation.
    clean = files(generate_landmark_benchmark(tmp_path / "b", TINY))
    assert files(generate_landmark_benchmark(tmp_path / "a", TINY)) == clean


def test_spec_rejects_impossible_values():
    with pytest.raises(ValueError, match="perspective must be in"):
        GeneratedLandmarksSpec(perspective=0.8)
    with pytest.raises(ValueError, match="scale_range"):
        GeneratedLandmarksSpec(scale_range=(0.5, 0.2))


# ---- datamodules and the reader changes ------------------------------------------------------------------------


def test_gldv2_datamodule_generates_and_serves_images_and_labels(tmp_path):
    datamodule = GeneratedLandmarksGLDv2(root=str(tmp_path), spec=TINY, batch_size=4)
    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.train_dataset()
    example = train[0]
    assert example["image"].shape == (3, 48, 48) and 0 <= example["image"].min() <= example["image"].max() <= 1
    assert example["label"] in {0, 1, 2, 3} and len(train) == 12
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["label"].shape == (4,)
    (val,) = datamodule.eval_sets("val")
    assert val.name == "generated_landmarks" and len(val.ground_truth.positives) == 2  # the Public queries
    assert datamodule.eval_sets("test")[0].name == "generated_landmarks"
    resized = GeneratedLandmarksGLDv2(root=str(tmp_path), spec=TINY, image_size=32, resize="square")
    resized.setup("fit")
    assert resized.train_dataset()[0]["image"].shape == (3, 32, 32)

    revisited = GeneratedLandmarksRevisited(root=str(tmp_path), spec=TINY)
    revisited.prepare_data()  # already generated: skipped
    revisited.setup("test")
    (test,) = revisited.eval_sets("test")
    assert test.name == "rlandmarks" and revisited.summary_metrics("test", {"test/rlandmarks/medium/mAP": 0.5}) == {}


def test_revisited_accepts_any_name_with_a_ground_truth_file(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"nowhere/gnd_nowhere.pkl not found"):
        read_revisited(tmp_path, "nowhere")
    with pytest.raises(DatasetLayoutError, match=r"nowhere/gnd_nowhere.pkl not found"):
        RevisitedOxfordParis(root=str(tmp_path), datasets=("nowhere",)).setup("test")
    assert RevisitedOxfordParis(root=str(tmp_path)).datasets == ("roxford5k", "rparis6k")

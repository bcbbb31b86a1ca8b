"""Regions for Detect-to-Retrieve (whole image + boxes or a grid), their extraction through the command line, and
the aggregated-kernel search scored by the shared protocol code."""

import json

import numpy as np
import pytest
from conftest import REPO

from datamodules.generated_landmarks import GeneratedLandmarksRevisited, GeneratedLandmarksSpec
from datamodules.images import Regions
from lightning_modules import run_directory
from lightning_modules.cli import main as cli_main
from retrieval.asmk import aggregate_asmk, aggregate_regional_asmk
from retrieval.codebook import Codebook
from retrieval.evaluation import evaluate_embeddings, evaluate_scores
from retrieval.feature_store import FeatureStore
from retrieval.ground_truth import PositivesGroundTruth, RevisitedGroundTruth
from retrieval.regional_search import KernelSettings, aggregate_store, evaluate_kernel
from retrieval.regional_search import main as regional_search_command
from retrieval.regions import grid_boxes, group_regions, region_rows, split_region_id

TINY_SPEC = {
    "image_size": 64,
    "train_landmarks": 2,
    "train_images_per_landmark": 2,
    "query_landmarks": 1,
    "index_distractor_landmarks": 0,
    "ignored_queries": 0,
    "revisited_landmarks": 2,
    "revisited_queries_per_landmark": 2,
    "revisited_database_per_landmark": 5,
    "revisited_distractor_landmarks": 1,
    "background_pool": 3,
    "distractor_pool": 3,
}
TINY_RESNET = {"layers": [1, 1, 1, 1]}

# ---- regions ---------------------------------------------------------------------------------------------------


def test_grid_cells_overlap_by_half_and_cover_the_image():
    third = 1 / 3
    expected = [[0, 0, 2 * third, 2 * third], [0, third, 2 * third, 1], [third, 0, 1, 2 * third], [third, third, 1, 1]]
    np.testing.assert_allclose(grid_boxes([2]), expected)
    np.testing.assert_allclose(grid_boxes([1]), [[0, 0, 1, 1]])
    assert grid_boxes([2, 3]).shape == (4 + 9, 4)
    with pytest.raises(ValueError, match="at least 1"):
        grid_boxes([0])


def test_regions_are_the_whole_image_then_the_boxes_above_the_score_by_decreasing_score():
    boxes = {
        "a/x.jpg": (
            np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3]]),
            np.array([0.3, 0.9, 0.05]),
        ),
        "y": (np.array([[0.5, 0.5, 1.0, 1.0]]), np.array([0.5])),  # keyed by the file name without extension
    }
    rows = region_rows(["a/x.jpg", "b/y.jpg", "c/z.jpg"], boxes, min_score=0.1)
    assert rows.image.tolist() == [0, 0, 0, 1, 1, 2]
    assert rows.number.tolist() == [0, 1, 2, 0, 1, 0]
    np.testing.assert_allclose(rows.scores, [1.0, 0.9, 0.3, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(rows.boxes[1], [0.2, 0.2, 0.9, 0.9])
    np.testing.assert_allclose(rows.boxes[[0, 3, 5]], [[0, 0, 1, 1]] * 3)
    assert rows.ids(["a/x.jpg", "b/y.jpg", "c/z.jpg"])[:3] == ["a/x.jpg#0", "a/x.jpg#1", "a/x.jpg#2"]
    capped = region_rows(["a/x.jpg"], boxes, min_score=0.1, max_regions=1, whole_image=False)
    assert capped.number.tolist() == [1] and capped.scores.tolist() == [0.9]
    gridded = region_rows(["a", "b"], grid=[2])
    assert gridded.image.tolist() == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="exactly one"):
        region_rows(["a"])


def test_grouping_recovers_images_and_refuses_scattered_or_plain_ids():
    images, rows = group_regions(["p#0", "p#1", "q#0", "r#0", "r#1", "r#2"])
    assert images == ["p", "q", "r"]
    assert [r.tolist() for r in rows] == [[0, 1], [2], [3, 4, 5]]
    assert split_region_id("dir/a#b.jpg#12") == ("dir/a#b.jpg", 12)
    with pytest.raises(ValueError, match="not stored one after the other"):
        group_regions(["p#0", "q#0", "p#1"])
    with pytest.raises(ValueError, match="not a regional id"):
        group_regions(["p.jpg"])


# ---- scores through the shared protocol ----------------------------------------------------------------------------


def test_scores_are_evaluated_as_the_embedding_search_ranks_them_ties_included():
    rng = np.random.default_rng(0)
    queries = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)  # small integers: many tied scores
    database = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    scores = queries @ database.T
    labels = rng.integers(0, 3, size=30)
    positives = [np.flatnonzero(labels == q % 3) for q in range(6)]
    plain = PositivesGroundTruth(positives, 30, recall_ks=(1, 5), map_ks=(10,))
    assert evaluate_scores(scores, plain) == evaluate_embeddings(queries, database, plain)
    gnd = [
        {"easy": p[: len(p) // 2].tolist(), "hard": p[len(p) // 2 :].tolist(), "junk": [int(q)], "bbx": [0, 0, 1, 1]}
        for q, p in enumerate(positives)
    ]
    revisited = RevisitedGroundTruth(gnd, 30)
    assert evaluate_scores(scores, revisited) == evaluate_embeddings(queries, database, revisited)
    with pytest.raises(ValueError, match="num_queries, num_database"):
        evaluate_scores(scores[:, :5], plain)


# ---- extraction of regions and search, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A tiny generated benchmark, its Revisited lists and the database's grid regions extracted by a small
    random ResNet through ``predict`` (one CLI run)."""
    work = tmp_path_factory.mktemp("regional")
    regions = json.dumps({"lists": ["rlandmarks_database"], "grid": [2]})
    lists = json.dumps(["rlandmarks_query", "rlandmarks_database", "rlandmarks_database_regions"])
    cli_main(
        [
            "predict",
            f"--config={REPO / 'configs/extract/resnet50_revisited.yaml'}",
            "--data=datamodules.generated_landmarks.GeneratedLandmarksRevisited",
            f"--data.init_args.root={work / 'data'}",
            *[f"--data.init_args.spec.{key}={value}" for key, value in TINY_SPEC.items()],
            "--data.init_args.image_size=64",
            "--data.init_args.num_workers=0",
            f"--data.init_args.regions={regions}",
            f"--data.init_args.predict_lists={lists}",
            "--model.init_args.pretrained=false",
            f"--model.init_args.model_kwargs={json.dumps(TINY_RESNET)}",
            "--model.init_args.num_local=24",
            f"--predictions.output_dir={work / 'features'}",
            "--predictions.neighbours=0",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return work


def datamodule(work, **kwargs) -> GeneratedLandmarksRevisited:
    spec = GeneratedLandmarksSpec(**TINY_SPEC)
    data = GeneratedLandmarksRevisited(str(work / "data"), spec=spec, image_size=64, **kwargs)
    data.prepare_data()
    return data


def test_regional_lists_crop_each_region_of_each_image(extracted):
    data = datamodule(extracted, regions=Regions(lists=["rlandmarks_database"], grid=[2]))
    whole = data.dataset("rlandmarks_database")
    regional = data.dataset("rlandmarks_database_regions")
    assert len(regional) == 5 * len(whole)
    assert regional.ids[:5] == [f"{whole.ids[0]}#{r}" for r in range(5)]
    # region 0 is the whole image, unchanged; region 4 the bottom-right cell, as PIL crops it
    np.testing.assert_array_equal(regional[0]["image"].numpy(), whole[0]["image"].numpy())
    width, height = whole.image_sizes([0])[0]
    third = round(width / 3), round(height / 3)
    assert tuple(regional.image_sizes([4])[0]) == (width - third[0], height - third[1])


def test_extracted_regions_aggregate_to_r_asmk_and_whole_image_asmk(extracted):
    features = extracted / "features"
    plain, regional = (
        FeatureStore(features / "rlandmarks_database.h5"),
        FeatureStore(features / "rlandmarks_database_regions.h5"),
    )
    assert [split_region_id(i) for i in regional.ids[:5]] == [(plain.ids[0], r) for r in range(5)]
    descriptors = np.concatenate(list(plain.local_sets()))
    codebook = Codebook.train(descriptors, 8, seed=0)
    # ASMK* from the regional store's whole-image rows is ASMK* of the plain store: same crops, same images
    settings = KernelSettings("asmk*", normalisation="word_counts")
    ids_plain, from_plain = aggregate_store(plain, codebook, settings)
    ids_regional, from_regional = aggregate_store(regional, codebook, settings)
    assert ids_plain == ids_regional == plain.ids
    for a, b in zip(from_plain, from_regional):
        np.testing.assert_array_equal(a.words, b.words)
        np.testing.assert_array_equal(a.vectors, b.vectors)
    # R-ASMK* of an image: its five regions' descriptors aggregated together
    _, r_asmk = aggregate_store(regional, codebook, KernelSettings("r-asmk*"))
    sets = list(regional.local_sets(range(5)))
    bounds = np.cumsum([0] + [len(s) for s in sets])
    stacked = np.concatenate(sets)
    expected = aggregate_regional_asmk(
        stacked,
        codebook.assign(stacked),
        codebook.centroids,
        [np.arange(a, b) for a, b in zip(bounds, bounds[1:])],
        binary=True,
    )
    np.testing.assert_array_equal(r_asmk[0].words, expected.words)
    np.testing.assert_array_equal(r_asmk[0].vectors, expected.vectors)
    assert not np.array_equal(
        expected.vectors, aggregate_asmk(sets[0], codebook.assign(sets[0]), codebook.centroids, True).vectors
    )


def test_kernels_are_scored_by_the_revisited_protocol(extracted):
    features = extracted / "features"
    data = datamodule(extracted)
    data.setup("test")
    (eval_set,) = data.eval_sets("test")
    codebook = Codebook.train(np.concatenate(list(FeatureStore(features / "rlandmarks_database.h5").local_sets())), 8)
    database_ids = data.lists["rlandmarks_database"].paths
    results = {}
    for kernel in ("asmk*", "r-asmk*", "r-vlad"):
        results[kernel] = evaluate_kernel(
            features / "rlandmarks_query.h5",
            [features / "rlandmarks_database_regions.h5"],
            codebook,
            KernelSettings(kernel, query_assignments=2),
            eval_set.ground_truth,
            database_ids=database_ids,
        )
    for metrics in results.values():
        assert {"easy/mAP", "medium/mAP", "hard/mAP"} <= metrics.keys()
        assert all(0 <= metrics[k] <= 1 for k in ("easy/mAP", "medium/mAP", "hard/mAP"))
    # R-ASMK* keeps one entry per word per image: more words than whole-image ASMK*, never one per region
    assert results["asmk*"]["bytes_per_image"] < results["r-asmk*"]["bytes_per_image"]
    # the command reads the ground truth from the published layout and gives the same numbers
    codebook.save(extracted / "codebook.npy")
    command = ["--revisited", str(extracted / "data/revisited"), "--dataset", "rlandmarks", "--codebook"]
    command += [str(extracted / "codebook.npy"), "--queries", str(features / "rlandmarks_query.h5")]
    command += ["--database", str(features / "rlandmarks_database_regions.h5"), "--query-assignments", "2"]
    assert regional_search_command([*command, "--output", str(extracted / "m.json")]) == results["r-asmk*"]
    assert json.loads((extracted / "m.json").read_text())["medium/mAP"] == results["r-asmk*"]["medium/mAP"]
    with pytest.raises(ValueError, match="not the .* database images of rlandmarks in order"):
        regional_search_command([*command[:-3], str(features / "rlandmarks_query.h5")])
    with pytest.raises(ValueError, match="database images in order"):
        evaluate_kernel(
            features / "rlandmarks_query.h5",
            [features / "rlandmarks_database_regions.h5"],
            codebook,
            KernelSettings("asmk*"),
            eval_set.ground_truth,
            database_ids=database_ids[::-1],
        )


@pytest.mark.slow
def test_the_d2r_comparison_runs_every_step_through_the_cli_and_resumes(tmp_path, monkeypatch):
    """The generated-benchmark comparison end to end at tiny sizes: both fits, boxes, regional extraction, codebook,
    the table; run again, it reuses every output (no command runs) and gives the same table. The commands run in
    this process, one after the other (the script's subprocess runner is the spatial-context ablation test's)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import cli_runs
    import d2r_comparison

    def in_process(subcommand, *args, log):
        with open(log, "a") as output:
            output.write(f"$ {subcommand} {' '.join(args)}\n")
        monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)  # each command chooses its own run directory
        cli_main([subcommand, *args, "--trainer.enable_model_summary=false"])

    monkeypatch.setattr(cli_runs, "cli", in_process)
    monkeypatch.setattr(d2r_comparison, "cli", in_process)
    monkeypatch.chdir(tmp_path)
    spec = [f"{key}={value}" for key, value in TINY_SPEC.items()]
    fits = ["--local-fit=--trainer.max_epochs=1", "--local-fit=--data.init_args.batch_size=4"]
    fits += [
        "--local-fit=--model.init_args.pca_images=4",
        "--detector-fit=--trainer.limit_train_batches=2",
        "--detector-fit=--data.init_args.batch_size=2",
    ]
    fits += ["--local-fit=--model.init_args.num_local=40"]
    quiet = ["--", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    command = ["--root", "data", "--output", "out", "--codebook-size", "16", "--parallel", "1", "--spec", *spec]
    command += [*fits, *quiet]
    rows = {row["method"]: row for row in d2r_comparison.main(command)}
    assert list(rows) == ["global descriptor"] + [label for label, _, _ in d2r_comparison.ROWS]
    for row in rows.values():
        assert all(0 <= row[metric] <= 1 for metric in d2r_comparison.METRICS)
    assert rows["R-ASMK* grid"]["regions_per_image"] == 5.0  # the whole image and a 2 x 2 grid
    assert rows["R-ASMK* true boxes"]["regions_per_image"] == 2.0  # every database image shows its landmark once
    report = json.loads((tmp_path / "out/d2r.json").read_text())
    assert set(report["detection"]) == {"boxes_per_image", "images_with_a_box", "best_box_iou@0.5"}
    logs = {path: path.read_text() for path in (tmp_path / "out").glob("*.log")}
    assert len(logs) == 3

    def without_timing(table):
        return [{key: value for key, value in row.items() if key != "seconds"} for row in table]

    assert without_timing(d2r_comparison.main(command)) == without_timing(rows.values())
    assert {path: path.read_text() for path in (tmp_path / "out").glob("*.log")} == logs


@pytest.mark.slow
def test_the_revisited_recipe_extracts_regions_and_searches_in_the_published_layout(tmp_path, monkeypatch):
    """The README's Revisited commands on tiny Oxford and Paris layouts with detector boxes files: the shipped
    extraction config (a small random backbone and 128-px images instead of the GLDv2 checkpoint at 1,024 px),
    a codebook of Paris's locals, the search of Oxford."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from layouts import write_revisited

    gnd = [{"easy": [0], "hard": [2], "junk": [1]}, {"easy": [3], "hard": [1], "junk": []}]
    boxes = tmp_path / "features/d2r_detector/revisited"
    boxes.mkdir(parents=True)
    for name in ("roxford5k", "rparis6k"):
        imlist = write_revisited(tmp_path / "data/revisited", name, num_database=4, gnd=gnd, size=(96, 72))["imlist"]
        rows = [f"{name}/jpg/{imlist[0]}.jpg,0.1 0.2 0.6 0.7,0.9", f"{name}/jpg/{imlist[0]}.jpg,0.5 0.5 1 1,0.05"]
        rows.append(f"{imlist[2]},0.0 0.0 0.5 0.5,0.4")  # a published-style id (the image name) works too
        (boxes / f"{name}_database.boxes.csv").write_text("id,box,score\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    cli_main(
        [
            "predict",
            f"--config={REPO / 'configs/d2r/extract_regions_revisited.yaml'}",
            "--model.init_args.backbone=resnet18",
            f"--model.init_args.model_kwargs={json.dumps({'layers': [1, 1, 1, 1]})}",
            "--model.init_args.projection_dim=null",  # no trained checkpoint, so no fitted PCA
            "--model.init_args.num_local=50",
            "--data.init_args.image_size=128",
            "--trainer.enable_progress_bar=false",
        ]
    )
    features = tmp_path / "features/delf/revisited"
    detected = FeatureStore(features / "roxford5k_database_detected.h5")
    # image 0: whole + the box above 0.1 (not the one at 0.05); image 2: whole + its box; the others: whole only
    assert [split_region_id(i)[1] for i in detected.ids] == [0, 1, 0, 0, 1, 0]
    assert FeatureStore(features / "rparis6k_database_grid.h5").num_images == 4 * 5
    codebook = Codebook.train(np.concatenate(list(FeatureStore(features / "rparis6k_database.h5").local_sets())), 16)
    codebook.save(tmp_path / "codebook.npy")
    metrics = regional_search_command(
        ["--revisited", str(tmp_path / "data/revisited"), "--dataset", "roxford5k", "--codebook"]
        + [str(tmp_path / "codebook.npy"), "--queries", str(features / "roxford5k_query.h5"), "--database"]
        + [str(features / "roxford5k_database_detected.h5")]
    )
    assert {"easy/mAP", "medium/mAP", "hard/mAP", "bytes_per_image"} <= metrics.keys()

"""Revisited Oxford/Paris with the 1M distractors through the evaluation: parts shared by the evaluation sets,
every example at its global position, and the command line on images and on stored features, 1 and 2 processes."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import run_cli_together
from layouts import write_distractors, write_revisited
from test_datamodules import OneProcess

from callbacks.retrieval_evaluation import score_eval_sets
from datamodules.revisited import RevisitedOxfordParis
from retrieval import evaluate_embeddings
from retrieval.feature_store import FeatureStore, write_feature_store
from retrieval.ground_truth import RevisitedGroundTruth

GND = [
    {"easy": [0, 3], "hard": [5], "junk": [1]},
    {"easy": [2], "hard": [4, 6], "junk": []},
    {"easy": [7], "hard": [], "junk": [0]},
]
DATASETS = ("roxford5k", "rparis6k")
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 56}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisited")
    for name in DATASETS:
        write_revisited(root / "data/revisited", name, num_database=9, gnd=GND)
    write_distractors(root / "data/revisited", 7)
    return root


class ScoringProcess(OneProcess):
    class strategy:  # noqa: N801 - stands in for the trainer's strategy
        root_device = torch.device("cpu")
        broadcast = staticmethod(lambda value, src=0: value)


def test_distractors_are_one_part_shared_by_both_databases_and_scored_at_their_global_positions(layout):
    root = layout / "data/revisited"
    features = layout / "parts_features"
    data = RevisitedOxfordParis(str(root), distractors=True, features=str(features))
    rng = np.random.default_rng(0)
    stored = {}
    for name, images in data.lists.items():
        stored[name] = rng.standard_normal((len(images), 8)).astype(np.float32)
        write_feature_store(features / f"{name}.h5", images.paths, stored[name])
    parts = data.eval_parts("test")
    # Two query lists, two databases, ONE distractor loader: embedded and gathered once per evaluation.
    assert list(parts) == [
        "roxford5k_query",
        "roxford5k_database",
        "revisitop1m",
        "rparis6k_query",
        "rparis6k_database",
    ]
    assert len(data.test_dataloader()) == 5
    # Each process's outputs are (index within the part, embedding), as the evaluation step returns them.
    outputs = {
        i: [(torch.arange(len(dataset)), torch.from_numpy(stored[name]))]
        for i, (name, dataset) in enumerate(parts.items())
    }
    metrics = score_eval_sets(ScoringProcess(), data, "test", lambda i: outputs[i])
    for name in DATASETS:
        database = np.concatenate([stored[f"{name}_database"], stored["revisitop1m"]])
        expected = evaluate_embeddings(stored[f"{name}_query"], database, RevisitedGroundTruth(GND, num_database=16))
        assert {k: metrics[f"test/{name}+1m/{k}"] for k in expected} == expected
    # A distractor scored at the position of a database image would change the numbers: the part order matters.
    swapped = np.concatenate([stored["revisitop1m"], stored["roxford5k_database"]])
    wrong = evaluate_embeddings(stored["roxford5k_query"], swapped, RevisitedGroundTruth(GND, num_database=16))
    assert wrong != {k: metrics[f"test/roxford5k+1m/{k}"] for k in wrong}


def read_test_metrics(run_directory):
    metrics = json.loads((run_directory / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


def extractor_config(path, features: str | None = None):
    model = (
        "class_path: lightning_modules.RawEmbedding"
        if features
        else "class_path: lightning_modules.FeatureExtractor\n  init_args:\n    backbone: dinov2_vits14\n"
        f"    pretrained: false\n    model_kwargs: {json.dumps(TINY_VIT)}"
    )
    path.write_text(
        f"""
seed_everything: 0
model:
  {model}
data:
  class_path: datamodules.RevisitedOxfordParis
  init_args:
    root: data/revisited
    distractors: true
    image_size: 56
    resize: square
    multiple_of: 14
    eval_batch_size: 4
    {f"features: {features}" if features else ""}
trainer:
  logger: false
  enable_progress_bar: false
"""
    )
    return path.name


@pytest.mark.slow
def test_command_line_scores_the_distractors_alike_on_images_features_and_two_processes(layout):
    images = extractor_config(layout / "images.yaml")
    stored = extractor_config(layout / "stored.yaml", features="features/tiny")
    two = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    # Two at a time, one of them on two processes: the stored features are read once predict has finished.
    run_cli_together(
        (["predict", "--config", images, "--predictions.output_dir=features/tiny"], None),
        (["test", "--config", images, *two, "--trainer.default_root_dir=runs/images_two"], None),
        cwd=layout,
    )
    run_cli_together(
        (["test", "--config", images, "--trainer.default_root_dir=runs/images_one"], None),
        (["test", "--config", stored, *two, "--trainer.default_root_dir=runs/stored_two"], None),
        cwd=layout,
    )

    from_images = read_test_metrics(layout / "runs/images_one/version_0")
    assert read_test_metrics(layout / "runs/images_two/version_0") == pytest.approx(from_images, abs=1e-6)
    assert read_test_metrics(layout / "runs/stored_two/version_0") == pytest.approx(from_images, abs=1e-6)
    # The numbers are those of the stored descriptors, searched over database + distractors.
    stored = {path.stem: FeatureStore(path).global_descriptors() for path in (layout / "features/tiny").glob("*.h5")}
    for name in DATASETS:
        with open(layout / "data/revisited" / name / f"gnd_{name}.pkl", "rb") as f:
            gnd = pickle.load(f)["gnd"]
        database = np.concatenate([stored[f"{name}_database"], stored["revisitop1m"]])
        expected = evaluate_embeddings(stored[f"{name}_query"], database, RevisitedGroundTruth(gnd, len(database)))
        for key, value in expected.items():
            assert from_images[f"test/{name}+1m/{key}"] == pytest.approx(value, abs=1e-6)
    rop = np.mean([from_images[f"test/{n}+1m/{s}/mAP"] for n in DATASETS for s in ("medium", "hard")])
    assert from_images["test/rop+1m/mAP"] == pytest.approx(rop)


class RerankingProcess(ScoringProcess):
    global_rank = 0

    class state:  # noqa: N801
        fn = "test"


def test_reranking_with_the_distractors_scores_pairs_at_their_global_positions(layout, tmp_path):
    """The re-ranking stage on Revisited+1M: shortlists over the database followed by the distractors, pairs read
    from the right part, and exactly the metrics of re-ranking the concatenated arrays directly."""
    from lightning_modules.ames import AMES
    from retrieval.reranking import evaluate_reranked, global_shortlist

    root = layout / "data/revisited"
    features = tmp_path / "features"
    data = RevisitedOxfordParis(str(root), distractors=True, features=str(features), local_descriptors=True)
    rng = np.random.default_rng(1)
    stored = {}
    for name, images in data.lists.items():
        global_ = rng.standard_normal((len(images), 8)).astype(np.float32)
        local = np.zeros((len(images), 4, 5 + 6), dtype=np.float32)
        local[..., 5:] = rng.standard_normal((len(images), 4, 6))
        local[:, 3, 3] = 1
        stored[name] = (global_ / np.linalg.norm(global_, axis=1, keepdims=True), local)
        write_feature_store(features / f"{name}.h5", images.paths, global_, local)
    torch.manual_seed(0)
    module = AMES(
        local_dim=6,
        num_layers=1,
        ffn_dim=16,
        shortlist=10,
        query_locals=4,
        database_locals=4,
        pair_batch_size=7,
        tune_fusion=False,
        fusion_weight=0.3,
        fusion_temperature=0.5,
    ).eval()
    parts = data.eval_parts("test")
    outputs = {
        i: [(torch.arange(len(dataset)), torch.from_numpy(stored[name][0]))]
        for i, (name, dataset) in enumerate(parts.items())
    }
    metrics = score_eval_sets(RerankingProcess(), data, "test", lambda i: outputs[i], reranker=module)
    for name in DATASETS:
        queries, query_local = stored[f"{name}_query"]
        database = np.concatenate([stored[f"{name}_database"][0], stored["revisitop1m"][0]])
        database_local = np.concatenate([stored[f"{name}_database"][1], stored["revisitop1m"][1]])
        truth = RevisitedGroundTruth(GND, num_database=16)
        scores, shortlist = global_shortlist(queries, database, 10)
        pairs_q = torch.from_numpy(query_local).repeat_interleave(10, 0)
        pairs_x = torch.from_numpy(database_local[shortlist.reshape(-1)])
        with torch.no_grad():
            logits = module.score_pairs(None, pairs_q, None, pairs_x).reshape(len(queries), 10).numpy()
        expected = evaluate_reranked(truth, queries, database, scores, shortlist, logits, 0.3, 0.5)
        assert {k: metrics[f"test/{name}+1m/{k}"] for k in expected} == pytest.approx(expected, abs=1e-12)
        assert expected != evaluate_embeddings(queries, database, truth)  # the re-ranking changed the numbers
        assert metrics[f"test/{name}+1m/bytes_per_image"] == 8 * 4 + 4 * 256

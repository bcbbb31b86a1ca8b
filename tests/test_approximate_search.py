"""IVF-PQ search (retrieval.approximate_search): recall against exact search, and the evaluation option."""

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from lightning_modules import run_directory
from lightning_modules.cli import main as cli_main
from reporting.run_results import read_run
from retrieval.approximate_search import (
    IVFPQIndex,
    IVFPQSettings,
    main,
    positions_in_rankings,
    recall_against_exact,
)
from retrieval.evaluation import evaluate_embeddings
from retrieval.feature_store import write_feature_store
from retrieval.ground_truth import LabelGroundTruth, PositivesGroundTruth, RevisitedGroundTruth
from retrieval.metrics import revisited_map
from retrieval.search import knn

REPO = Path(__file__).resolve().parents[1]

# 256 rows, 1-d sub-spaces of 8-bit codes: every training residual becomes a centroid of its own, so the codes
# reconstruct the rows exactly and only float rounding separates the index's scores from exact ones.
EXACT_CODES = IVFPQSettings(nlist=4, m=8, nbits=8, nprobe=4, training_size=256, ranking_depth=256, recall_sample=50)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """One OpenMP thread: faiss' k-means spins its threads, which on 2 cores shared with other tests is many
    times slower than one thread (the results are the same)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit_rows(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(num, dim, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit_rows(centres[rng.integers(0, clusters, num)] + 0.35 * rng.standard_normal((num, dim)))


def test_an_exhaustive_index_with_exact_codes_ranks_like_exact_search():
    rng = np.random.default_rng(0)
    database, queries = unit_rows(rng.standard_normal((256, 8))), unit_rows(rng.standard_normal((30, 8)))
    index = IVFPQIndex.build(database, EXACT_CODES)
    scores, ids = index.search(queries, 20)
    exact_scores, exact_ids = knn(queries, database, 20)
    assert np.array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=2e-6)
    # One byte per sub-quantizer, plus the int64 id in the inverted lists; codebooks and centroids once.
    assert (index.code_bytes_per_image, index.bytes_per_image) == (8, 16)
    assert index.index_bytes() == 256 * 16 + 4 * 8 * 4 + 256 * 8 * 4
    # Leave-one-out: an item never lists itself; the rest is the exact leave-one-out ranking.
    _, own = index.search(database, 10, exclude_self=True)
    assert np.array_equal(own, knn(database, database, 10, exclude_self=True)[1])


def test_recall_is_about_one_with_every_list_visited_and_fine_codes_on_clustered_data():
    database = clustered(1000, 8, clusters=20, seed=1)
    queries = unit_rows(database[:100] + 0.1 * np.random.default_rng(2).standard_normal((100, 8)))
    index = IVFPQIndex.build(database, IVFPQSettings(nlist=16, m=8, nbits=8, nprobe=16, training_size=1000))
    _, exact = knn(queries, database, 10)
    assert recall_against_exact(index.search(queries, 10)[1], exact, 10) >= 0.97
    index.nprobe = 1  # one list of 16: neighbours across a list border are lost
    assert recall_against_exact(index.search(queries, 10)[1], exact, 10) < 0.95


def test_recall_grows_with_the_lists_visited():
    database = clustered(2000, 16, clusters=20, seed=3)
    queries = unit_rows(database[:200] + 0.1 * np.random.default_rng(4).standard_normal((200, 16)))
    index = IVFPQIndex.build(database, IVFPQSettings(nlist=32, m=8, nbits=6, nprobe=1, training_size=2000))
    _, exact = knn(queries, database, 10)
    recalls = []
    for nprobe in (1, 4, 32):
        index.nprobe = nprobe
        recalls.append(recall_against_exact(index.search(queries, 10)[1], exact, 10))
    # Visiting more lists finds more, up to what 6-bit codes of 2-d sub-spaces can tell apart.
    assert recalls[0] < recalls[1] <= recalls[2] < 0.9


def test_refining_with_exact_scores_gives_the_exact_ranking_from_coarse_codes():
    database = clustered(1000, 16, clusters=20, seed=8)
    queries = unit_rows(database[:50] + 0.1 * np.random.default_rng(9).standard_normal((50, 16)))
    coarse = IVFPQSettings(nlist=8, m=2, nbits=4, nprobe=8, training_size=1000)  # one byte per image
    exact_scores, exact_ids = knn(queries, database, 10)
    assert recall_against_exact(IVFPQIndex.build(database, coarse).search(queries, 10)[1], exact_ids, 10) < 0.8
    # Every item a candidate, re-scored exactly: the exact ranking, whatever the codes lost.
    refined = IVFPQIndex.build(database, replace(coarse, refine=1000))
    scores, ids = refined.search(queries, 10)
    assert np.array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
    _, own = refined.search(database[:30], 5, exclude_self=True, query_rows=np.arange(30))
    assert np.array_equal(own, knn(database, database, 5, exclude_self=True)[1][:30])


def test_recall_against_exact_and_positions_on_a_hand_made_case():
    approximate = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 1, 7], [5, 6, 8]])
    assert recall_against_exact(approximate, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_against_exact(approximate, exact, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert recall_against_exact(approximate, exact, 1) == 0.0
    # Empty slots of the exact ranking (fewer candidates than k) are not asked for.
    assert recall_against_exact(np.array([[2, 3]]), np.array([[2, -1]]), 2) == 1.0
    with pytest.raises(ValueError, match="rankings' depth"):
        recall_against_exact(approximate, exact, 4)
    # Places in a ranking; -1 where an item is not in it (not ranked).
    places = positions_in_rankings(approximate, [[3, 9, 1], [-1, 5]])
    assert [p.tolist() for p in places] == [[2, -1, 0], [-1, 1]]


def test_evaluation_with_an_exhaustive_index_gives_the_exact_metrics():
    rng = np.random.default_rng(5)
    database, queries = unit_rows(rng.standard_normal((256, 8))), unit_rows(rng.standard_normal((12, 8)))
    labels = rng.integers(0, 12, 256)
    truths = {
        "leave-one-out": (None, LabelGroundTruth(labels)),
        "positives": (queries, PositivesGroundTruth([np.flatnonzero(labels == q) for q in range(12)], 256)),
    }
    gnd = [
        {"easy": rng.choice(256, 6, replace=False), "hard": rng.choice(256, 3, replace=False), "junk": [q]}
        for q in range(12)
    ]
    gnd = [{**g, "hard": np.setdiff1d(g["hard"], g["easy"])} for g in gnd]
    truths["revisited"] = (queries, RevisitedGroundTruth(gnd, 256))
    for name, (query_rows, truth) in truths.items():
        exact = evaluate_embeddings(query_rows, database, truth)
        approximate = evaluate_embeddings(query_rows, database, truth, approximate=EXACT_CODES)
        depth = 256 if name == "revisited" else truth.depth
        assert approximate.pop(f"ann_recall@{depth}") == 1.0, name
        assert approximate == exact, name
    # Revisited ranked only 5 deep: the metrics of the truncated ranking (positives below it not retrieved).
    shallow = IVFPQSettings(**{**EXACT_CODES.__dict__, "ranking_depth": 5, "recall_sample": 0})
    approximate = evaluate_embeddings(queries, database, truths["revisited"][1], approximate=shallow)
    assert approximate == revisited_map(knn(queries, database, 5)[1], gnd)
    assert approximate != evaluate_embeddings(queries, database, truths["revisited"][1])


def test_bad_settings_fail_naming_the_setting():
    database = unit_rows(np.random.default_rng(6).standard_normal((300, 12)))
    with pytest.raises(ValueError, match="nlist 512 and nbits 8 needs at least 512 training rows"):
        IVFPQIndex.build(database, IVFPQSettings(nlist=512, m=4))
    with pytest.raises(ValueError, match="m = 5 sub-quantizers must divide the dimension 12"):
        IVFPQIndex.build(database, IVFPQSettings(nlist=4, m=5))
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        IVFPQSettings(nprobe=0)


def test_the_command_reports_recall_bytes_and_times_from_feature_stores(tmp_path, capsys):
    rng = np.random.default_rng(7)
    database, queries = unit_rows(rng.standard_normal((256, 8))), unit_rows(rng.standard_normal((40, 8)))
    # The database in two stores (e.g. a Revisited database, then its distractors), searched as one.
    write_feature_store(tmp_path / "part0.h5", [f"d{i}" for i in range(100)], database[:100])
    write_feature_store(tmp_path / "part1.h5", [f"d{i}" for i in range(100, 256)], database[100:])
    write_feature_store(tmp_path / "queries.h5", [f"q{i}" for i in range(40)], queries)
    common = ["--database", str(tmp_path / "part0.h5"), str(tmp_path / "part1.h5"), "--k", "10", "--nlist", "4"]
    common += ["--m", "8"]
    common += ["--training-size", "256", "--nprobe", "1", "4"]
    result = main([*common, "--queries", str(tmp_path / "queries.h5"), "--output", str(tmp_path / "ann.json")])
    assert json.loads((tmp_path / "ann.json").read_text()) == result
    assert result["queries_sampled"] == 40 and result["code_bytes_per_image"] == 8
    assert result["float32_bytes_per_image"] == 32 and result["index_bytes_per_image"] == 16
    one_list, every_list = result["nprobes"]
    assert every_list["recall@10"] == 1.0 > one_list["recall@10"]
    assert "recall@10 vs exact" in capsys.readouterr().out
    # Without queries: the database against itself, leave-one-out.
    leave_one_out = main([*common, "--sample", "30"])
    assert leave_one_out["queries_sampled"] == 30 and leave_one_out["nprobes"][1]["recall@10"] == 1.0


@pytest.mark.slow
def test_the_evaluation_callback_option_scores_the_approximate_ranking_and_its_recall(tmp_path, monkeypatch):
    """``validate`` of the raw embeddings of a small embedded benchmark (256 database rows of 16 dimensions),
    exactly and through ``--evaluation.approximate_search`` with exact codes: the same metrics, and the recall
    of the exact top-100 logged with them."""
    monkeypatch.chdir(tmp_path)
    spec = {"dim": 16, "semantic_dim": 8, "nuisance_dim": 2, "train_classes": 10, "eval_classes": 16}
    args = ["validate", "--config", str(REPO / "configs/raw/embedded.yaml"), "--data.init_args.root=data/embedded"]
    args += [f"--data.init_args.spec.{key}={value}" for key, value in {**spec, "database_per_class": 16}.items()]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    approximate = {"nlist": 2, "m": 16, "nbits": 8, "nprobe": 2, "training_size": 256}
    metrics = {}
    for name, extra in (("exact", []), ("approximate", ["--evaluation.approximate_search", json.dumps(approximate)])):
        monkeypatch.setattr(run_directory, "_exported", None)
        monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)
        cli_main([*args, f"--trainer.default_root_dir=runs/{name}", *extra])
        metrics[name] = read_run(tmp_path / f"runs/{name}/version_0", "val").metrics
    assert metrics["approximate"].pop("val/embedded/ann_recall@100") == 1.0
    assert metrics["approximate"] == metrics["exact"]
    assert set(metrics["exact"]) == {f"val/embedded/{m}" for m in ("recall@1", "recall@10", "mAP@4", "mAP@100")}

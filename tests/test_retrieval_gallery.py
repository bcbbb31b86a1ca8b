"""The retrieval gallery: which results it shows for which queries and how it marks them (hand-built cases, and
the evaluation's own rankings), the drawn grid, images of stored descriptors, the re-ranked ranking of a pair
re-ranker, and the gallery of real command-line runs on a tiny generated landmark benchmark."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.data import Dataset

from callbacks.retrieval_evaluation import RetrievalEvaluation
from callbacks.retrieval_gallery import (
    MARK_COLOURS,
    QUERY_COLOUR,
    GalleryCell,
    RetrievalGallery,
    cell_origin,
    draw_gallery,
    gallery_queries,
    gallery_size,
    mark_results,
    relevance_of,
    reranked_results,
    top_results,
)
from datamodules.base import EvalSet, RetrievalDataModule
from datamodules.feature_store import EmbeddingDataset
from datamodules.layout import DatasetLayoutError
from lightning_modules import run_directory
from lightning_modules.cli import main as cli_main
from retrieval.evaluation import evaluate_embeddings
from retrieval.ground_truth import LabelGroundTruth, PositivesGroundTruth, RevisitedGroundTruth
from retrieval.search import knn

GREEN, ORANGE, RED = MARK_COLOURS["relevant"], MARK_COLOURS["junk"], MARK_COLOURS["wrong"]

# ---- what is shown, and how it is marked -------------------------------------------------------------------------


def test_a_hand_built_revisited_query_is_ranked_with_ties_by_index_and_marked_easy_hard_junk_wrong():
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # scores 0, 1, 0.6, 0.6 (a tie: the lower index first), -1, 0.8
    database = np.array([[0, 1], [1, 0], [0.6, 0.8], [0.6, -0.8], [-1, 0], [0.8, 0.6]], dtype=np.float32)
    ground_truth = RevisitedGroundTruth([{"easy": [5], "hard": [3], "junk": [2]}], num_database=6)
    ranking = top_results(query, database, [0], k=5)
    assert ranking.ids.tolist() == [[1, 5, 2, 3, 0]]
    np.testing.assert_allclose(ranking.scores[0], [1.0, 0.8, 0.6, 0.6, 0.0], atol=1e-6)
    assert not ranking.reranked and ranking.global_places.tolist() == [[0, 1, 2, 3, 4]]
    marks = mark_results(ranking.ids[0], relevance_of(ground_truth, 0))
    assert marks == [
        ("wrong", "wrong"),
        ("relevant", "easy"),
        ("junk", "junk"),
        ("relevant", "hard"),
        ("wrong", "wrong"),
    ]
    # explicit positives (labels, radius, GLDv2) have no junk
    positives = PositivesGroundTruth([np.array([2, 3])], num_database=6)
    assert [m for m, _ in mark_results([1, 5, 2, 3], relevance_of(positives, 0))] == ["wrong", "wrong"] + [
        "relevant"
    ] * 2
    with pytest.raises(TypeError, match="neither per-query positives nor a Revisited gnd"):
        relevance_of(SimpleNamespace(), 0)


def test_the_gallery_ranks_exactly_as_the_evaluation_does():
    generator = np.random.default_rng(0)
    # small integers: exact float32 scores with many ties, so the tie order is checked too
    database = generator.integers(-2, 3, size=(40, 4)).astype(np.float32)
    queries = generator.integers(-2, 3, size=(7, 4)).astype(np.float32)
    rows = np.array([0, 3, 6])
    # leave-one-out: as knn(exclude_self=True) over the whole database
    _, expected = knn(database, database, 5, exclude_self=True)
    assert top_results(None, database, np.array([0, 17, 39]), 5, leave_one_out=True).ids.tolist() == (
        expected[[0, 17, 39]].tolist()
    )
    # separate queries; at full depth, the protocol scores the gallery's rankings as the evaluation scores its own
    assert top_results(queries, database, rows, 6).ids.tolist() == knn(queries, database, 6)[1][rows].tolist()
    gnd = [{"easy": [i, i + 7], "hard": [i + 1, 30], "junk": [i + 2]} for i in range(7)]
    ground_truth = RevisitedGroundTruth(gnd, num_database=40)
    everything = top_results(queries, database, np.arange(7), 40).ids
    assert ground_truth.evaluate(everything) == evaluate_embeddings(queries, database, ground_truth)


def test_gallery_queries_are_evenly_spaced_or_explicit_and_checked():
    assert gallery_queries(10, 4).tolist() == [0, 3, 6, 9]
    assert gallery_queries(45, 6).tolist() == [0, 9, 18, 26, 35, 44]
    assert gallery_queries(3, 6).tolist() == [0, 1, 2] and gallery_queries(5, 1).tolist() == [0]
    assert gallery_queries(10, 4, explicit=[7, 2]).tolist() == [7, 2]
    with pytest.raises(ValueError, match=r"queries \[10\] are not queries of evaluation set x, which has 10"):
        gallery_queries(10, 4, explicit=[1, 10], what="evaluation set x")


# ---- the drawing -------------------------------------------------------------------------------------------------


def test_the_png_has_the_grid_size_and_each_frame_its_mark(tmp_path):
    image = Image.new("RGB", (60, 30), (90, 90, 90))
    rows = [[QUERY_COLOUR, GREEN, ORANGE, RED], [QUERY_COLOUR, RED, RED, GREEN]]
    cells = [[GalleryCell(image, colour, f"{i}") for i, colour in enumerate(row)] for row in rows]
    cells[0][0].boxes.append((np.array([0, 0, 30, 30]), QUERY_COLOUR))
    path = draw_gallery(cells, tmp_path / "gallery.png", "title\nlegend", thumbnail=40)
    # 4 columns of 40 + 2 * 4 (frame) + 6 (gap), + 6; title 34 + 2 rows of 48 + 14 (caption) + 6, + 6
    assert gallery_size(2, 4, 40) == (4 * 54 + 6, 34 + 2 * 68 + 6) == (222, 176)
    with Image.open(path) as drawn:
        assert drawn.size == (222, 176)
        pixels = np.asarray(drawn.convert("RGB"))
    for r, row in enumerate(rows):
        for c, colour in enumerate(row):
            x, y = cell_origin(r, c, 40)
            assert tuple(pixels[y + 1, x + 1]) == colour and tuple(pixels[y + 46, x + 46]) == colour
    x, y = cell_origin(0, 1, 40)
    # the image inside the frame (its grey quantised into the palette; the marks' colours above are exact)
    assert np.abs(pixels[y + 4 + 20, x + 4 + 20].astype(int) - 90).max() <= 3
    assert tuple(pixels[y + 4 + 2, x + 4 + 2]) == (235, 235, 235)  # a wide image leaves a band above it
    x, y = cell_origin(0, 0, 40)
    assert tuple(pixels[y + 4 + 10, x + 4]) == QUERY_COLOUR  # the query's box, at the left edge of the image


# ---- stored descriptors: images under image_root, checked at setup -------------------------------------------------


class StoredDescriptors(RetrievalDataModule):
    """Descriptors with the ids of their images and labels, searched leave-one-out (as a feature store's)."""

    name = "stored"

    def __init__(self, embeddings, ids, labels):
        super().__init__(batch_size=4)
        self.embeddings, self.ids, self.labels = embeddings, ids, labels

    def build_eval_sets(self, stage):
        dataset = EmbeddingDataset(self.embeddings, self.ids, self.labels)
        return [EvalSet("stored", dataset, LabelGroundTruth(self.labels))]


def test_stored_descriptors_draw_their_images_under_image_root_or_fail_at_setup(tmp_path):
    angles = np.radians([0, 10, 20, 90, 180])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = ["a.jpg", "b.jpg", "c.jpg#1", "d.jpg", "e.jpg"]  # c: a region of an image
    datamodule = StoredDescriptors(embeddings, ids, np.array([0, 0, 1, 1, 0]))
    trainer = SimpleNamespace(datamodule=datamodule)
    with pytest.raises(ValueError, match="StoredDescriptors reads stored descriptors without an image directory"):
        RetrievalGallery().setup(trainer, None, "validate")
    with pytest.raises(DatasetLayoutError, match=f"{tmp_path / 'a.jpg'} is missing"):
        RetrievalGallery(image_root=str(tmp_path)).setup(trainer, None, "fit")
    RetrievalGallery().setup(trainer, None, "predict")  # draws nothing there, so needs nothing
    for number, name in enumerate("abcde"):
        Image.new("RGB", (32, 24), (40 * number, 0, 0)).save(tmp_path / f"{name}.jpg")

    gallery = RetrievalGallery(num_queries=2, top_k=3, stages=["val"], thumbnail_size=32, image_root=str(tmp_path))
    gallery.setup(trainer, None, "validate")
    evaluation = RetrievalEvaluation()
    evaluation.gathered = {"stored/database": embeddings}  # as the evaluation keeps them for its hooks
    trainer = SimpleNamespace(
        datamodule=datamodule,
        is_global_zero=True,
        callbacks=[evaluation, gallery],
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        default_root_dir=str(tmp_path / "run"),
        loggers=[],
        ckpt_path=None,
        current_epoch=0,
        global_step=3,
    )
    module = SimpleNamespace(size_views=lambda: None)
    assert gallery.evaluation_metrics(trainer, module, "test") == {}  # not one of its stages: nothing drawn
    assert not (tmp_path / "run").exists()
    assert gallery.evaluation_metrics(trainer, module, "val") == {}
    with Image.open(tmp_path / "run/gallery_val_stored.png") as drawn:
        assert drawn.size == gallery_size(2, 4, 32)
        pixels = np.asarray(drawn.convert("RGB"))
    # queries 0 and 4 (the first and the last); 0 (0 deg) finds 10, 20, 90 deg: labels 0, 1, 1 against its 0;
    # 4 (180 deg) finds 90, 20, 10 deg: labels 1, 1, 0 against its 0
    for r, frames in enumerate([[QUERY_COLOUR, GREEN, RED, RED], [QUERY_COLOUR, RED, RED, GREEN]]):
        for c, colour in enumerate(frames):
            x, y = cell_origin(r, c, 32)
            assert tuple(pixels[y + 1, x + 1]) == colour
    other_rank = SimpleNamespace(**{**vars(trainer), "is_global_zero": False, "default_root_dir": str(tmp_path / "x")})
    assert gallery.evaluation_metrics(other_rank, module, "val") == {} and not (tmp_path / "x").exists()


# ---- a pair re-ranker: the final ranking -------------------------------------------------------------------------


class DescriptorRows(Dataset):
    """Global and local descriptors of rows, read as the re-ranking stage reads them."""

    def __init__(self, global_descriptors, local_descriptors):
        self.global_descriptors, self.local_descriptors_ = global_descriptors, local_descriptors

    def __len__(self):
        return len(self.global_descriptors)

    def __getitems__(self, rows):
        return {"embedding": torch.from_numpy(self.global_descriptors[rows])}

    def local_descriptors(self, rows, count=None):
        return self.local_descriptors_[np.asarray(rows)][:, :count]


def test_a_pair_reranker_shows_its_reranked_shortlist_then_the_global_ranking():
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # global scores 0.8, 0.2, -1, 0.9, 0.5: the global ranking is 3, 0, 4, 1, 2
    database = np.array([[0.8, 0.6], [0.2, 0.98], [-1, 0], [0.9, 0.44], [0.5, 0.87]], dtype=np.float32)
    # the pair scorer's logit of a database image: its first local's x column (3: 0, 0: 1, 4: 5)
    database_locals = np.zeros((5, 2, 7), dtype=np.float32)
    database_locals[:, 0, 0] = [1, -3, 9, 0, 5]
    eval_set = EvalSet(
        "pairs",
        DescriptorRows(database, database_locals),
        PositivesGroundTruth([np.array([4])], num_database=5),
        DescriptorRows(query, np.zeros((1, 2, 7), dtype=np.float32)),
    )
    scored = []

    def score_pairs(query_global, query_local, database_global, database_local, encoding):
        scored.append(len(database_global))
        return database_local[:, 0, 0]

    module = SimpleNamespace(
        hparams=SimpleNamespace(shortlist=3, pair_batch_size=2),
        local_size_configs=lambda: [(1, 1)],
        device="cpu",
        fusion={"lambda": 0.0, "gamma": 1.0, "depth": 3, "tuned": True},
        score_pairs=score_pairs,
    )
    ranking = reranked_results(module, eval_set, query, database, np.array([0]), k=4)
    assert ranking.reranked and scored == [2, 1]  # the shortlist of 3 in pair batches of 2
    assert ranking.ids.tolist() == [[4, 0, 3, 1]]  # 4, 0, 3 by logit (item 2's logit 9 is not shortlisted)
    assert ranking.global_places.tolist() == [[2, 1, 0, 3]]
    np.testing.assert_allclose(ranking.scores[0], [0.5, 0.8, 0.9, 0.2], atol=1e-6)
    module.fusion = {**module.fusion, "depth": 2}  # only the first 2 re-ranked: 0 before 3, then 4 where it was
    assert reranked_results(module, eval_set, query, database, np.array([0]), k=4).ids.tolist() == [[0, 3, 4, 1]]


# ---- real runs ---------------------------------------------------------------------------------------------------

TINY_SPEC = {
    "image_size": 48,
    "train_landmarks": 3,
    "train_images_per_landmark": 3,
    "query_landmarks": 2,
    "queries_per_landmark": 2,
    "index_images_per_landmark": 3,
    "index_distractor_landmarks": 1,
    "ignored_queries": 0,
    "revisited_landmarks": 2,
    "revisited_queries_per_landmark": 2,
    "revisited_database_per_landmark": 4,
    "revisited_distractor_landmarks": 1,
    "background_pool": 2,
    "distractor_pool": 2,
}


@pytest.mark.slow
def test_the_shipped_configs_draw_galleries_of_fit_and_test_into_the_run_directory(tmp_path, monkeypatch):
    """fit on the GLDv2 layout (the validation's gallery, logged to W&B too), then test the checkpoint on the
    Revisited layout (its queries' boxes, junk results), in this process."""
    from lightning.pytorch.loggers import WandbLogger

    logged = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None, **kwargs: logged.append(key))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)
    monkeypatch.setattr(run_directory, "_exported", None)
    common = [f"--data.init_args.spec.{key}={value}" for key, value in TINY_SPEC.items()]
    common += ["--data.init_args.root=generated", '--model.init_args.model_kwargs={"layers": [1, 1, 1, 1]}']
    common += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    configs = REPO / "configs/spatial_context"
    cli_main(
        [
            "fit",
            f"--config={configs / 'generated_landmarks.yaml'}",
            *common,
            "--trainer.max_epochs=1",
            "--data.init_args.batch_size=4",
        ]
    )
    run = tmp_path / "runs/spatial_context/generated_landmarks/version_0"
    assert logged == ["val/generated_landmarks/gallery"]
    with Image.open(run / "gallery_val_generated_landmarks.png") as drawn:
        assert drawn.size == gallery_size(2, 1 + 8, 96)  # the 2 Public queries, 8 of the 9 index images each

    monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)
    checkpoint = str(run / "checkpoints/last.ckpt")
    test = ["test", f"--config={configs / 'generated_rlandmarks.yaml'}", *common, "--trainer.logger=false"]
    # the config's gallery alone (the localisation check beside it has its own tests and costs seconds here)
    cli_main([*test, f"--ckpt_path={checkpoint}", '--trainer.callbacks=[{"class_path": "callbacks.RetrievalGallery"}]'])
    with Image.open(run / "gallery_test_rlandmarks.png") as drawn:
        assert drawn.size == gallery_size(4, 1 + 8, 96)  # all 4 queries, 8 of the 12 database images each
        pixels = np.asarray(drawn.convert("RGB"))
    rows = [[tuple(pixels[y + 1, x + 1]) for x, y in (cell_origin(r, c, 96) for c in range(1, 9))] for r in range(4)]
    assert {frame for row in rows for frame in row} <= {GREEN, ORANGE, RED}
    # The gallery shows the evaluation's ranking and marks: its first result that is not junk is relevant exactly
    # as often as the logged medium mP@1 says (junk is taken out of the ranking before the precision).
    first_judged = [next(frame for frame in row if frame != ORANGE) for row in rows]
    (entry,) = [e for e in json.loads((run / "metrics.json").read_text())["evaluations"] if e["stage"] == "test"]
    assert entry["metrics"]["test/rlandmarks/medium/mP@1"] == pytest.approx(np.mean([f == GREEN for f in first_judged]))

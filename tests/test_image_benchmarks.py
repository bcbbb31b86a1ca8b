"""The image datamodules on generated copies of each benchmark: lists, images, crops, broken files, features."""

import numpy as np
import pytest
import torch
from layouts import (
    truncate_file,
    write_distractors,
    write_gldv2,
    write_pittsburgh_folders,
    write_pittsburgh_mat,
    write_revisited,
    write_sop,
)
from PIL import Image

from datamodules import (
    GoogleLandmarksV2,
    ImageList,
    ImageListDataset,
    Pittsburgh30k,
    RevisitedOxfordParis,
    StanfordOnlineProducts,
)
from datamodules.gldv2 import image_path
from datamodules.images import ImageTransform, collate_images
from datamodules.layout import DatasetFormatError, DatasetLayoutError
from retrieval import evaluate_embeddings
from retrieval.feature_store import write_feature_store

GND = [{"easy": [0, 4], "hard": [2], "junk": [1]}, {"easy": [3], "hard": [5], "junk": []}]
UTM_DB = np.array([[0.0, 0.0], [20.0, 0.0], [100.0, 100.0], [200.0, 0.0]])
UTM_Q = np.array([[5.0, 0.0], [195.0, 0.0], [500.0, 500.0]])


def pixels_of(path, box=None, transform=ImageTransform(32, "square")):
    image = Image.open(path).convert("RGB")
    return transform(image.crop(tuple(box)) if box is not None else image)[0]


# ---- transforms ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected_size, to_original",
    [
        # 100 x 60 image, size 50, multiple of 7: the longer side 50 -> 49, the other 30 -> 28.
        ("longer_side", (28, 49), [100 / 49, 60 / 28, 0.0, 0.0]),
        ("square", (49, 49), [100 / 49, 60 / 49, 0.0, 0.0]),
        # shorter side 60 -> 49 after the central 60 x 60 crop starting at x = 20
        ("center_crop", (49, 49), [60 / 49, 60 / 49, 20.0, 0.0]),
    ],
)
def test_transform_sizes_and_map_back_to_original_pixels(mode, expected_size, to_original):
    image = Image.fromarray(np.zeros((60, 100, 3), dtype=np.uint8))
    pixels, mapping = ImageTransform(50, mode, multiple_of=7)(image)
    assert tuple(pixels.shape) == (3, *expected_size)
    np.testing.assert_allclose(mapping.numpy(), to_original, rtol=1e-6)


# ---- each family ----------------------------------------------------------------------------------------------------


def test_sop_images_and_leave_one_out_eval_set(tmp_path):
    write_sop(tmp_path, train_classes=2, test_classes=3, per_class=2)
    data = StanfordOnlineProducts(str(tmp_path), image_size=32, resize="square", val_fraction=0.5)
    data.setup("fit")
    [eval_set] = data.eval_sets("test")
    assert eval_set.name == "sop" and eval_set.queries is None and list(eval_set.database_parts) == ["test"]
    example = eval_set.database_parts["test"][1]
    assert example["index"] == 1 and example["label"] == 3
    assert torch.equal(example["image"], pixels_of(tmp_path / data.lists["test"].paths[1]))


def test_sop_validates_on_training_classes_held_out_with_a_seed(tmp_path):
    write_sop(tmp_path, train_classes=10, test_classes=2, per_class=2)
    data = StanfordOnlineProducts(str(tmp_path), image_size=32, resize="square", val_fraction=0.2, val_seed=3)
    [val_set] = data.eval_sets("val")
    val = val_set.database_parts["val"]
    val_classes = sorted({val[i]["label"] for i in range(len(val))})
    assert len(val) == 4 and len(val_classes) == 2 and val_set.ground_truth.num_database == 4
    assert [val[i]["index"] for i in range(4)] == [0, 1, 2, 3]  # positions in the split, as the evaluation expects
    train = data.train_dataset()
    train_labels = [train[i]["label"] for i in range(len(train))]
    assert len(train) == 16 and not set(train_labels) & set(val_classes)
    assert [train[i]["index"] for i in range(len(train))] == list(range(16))
    assert set(data.lists["test"].labels.tolist()).isdisjoint(val_classes)  # held out of training, not of test
    # The same seed holds out the same classes; another seed others; 0 trains on every class, validates on none.
    again = StanfordOnlineProducts(str(tmp_path), val_fraction=0.2, val_seed=3).subsets()
    np.testing.assert_array_equal(again["val"][1], data.subsets()["val"][1])
    assert not np.array_equal(
        StanfordOnlineProducts(str(tmp_path), val_fraction=0.2, val_seed=4).subsets()["val"][1], again["val"][1]
    )
    everything = StanfordOnlineProducts(str(tmp_path), val_fraction=0)
    assert everything.eval_sets("val") == [] and len(everything.train_dataset()) == 20


@pytest.mark.parametrize("layout", ["mat", "folders"])
def test_pittsburgh_images_in_both_layouts(tmp_path, layout):
    for split in ("train", "val", "test"):
        writer = write_pittsburgh_mat if layout == "mat" else write_pittsburgh_folders
        writer(tmp_path, split, UTM_DB, UTM_Q)
    data = Pittsburgh30k(str(tmp_path), layout=layout, image_size=32, resize="square")
    data.setup("test")
    [eval_set] = data.eval_sets("test")
    assert (len(eval_set.query_parts["test_queries"]), len(eval_set.database_parts["test_database"])) == (3, 4)
    assert sorted(data.lists) == sorted(f"{s}_{p}" for s in ("train", "val", "test") for p in ("database", "queries"))
    # Query (5, 0) matches the places (0, 0) and (20, 0), query (195, 0) the place (200, 0), query (500, 500)
    # none, whatever order the layout lists them in (the folder layout sorts file names).
    places = data.place_split("test")
    expected = {(5.0, 0.0): {(0.0, 0.0), (20.0, 0.0)}, (195.0, 0.0): {(200.0, 0.0)}, (500.0, 500.0): set()}
    for query, positives in zip(places.query_utm, eval_set.ground_truth.positives):
        assert {tuple(places.database_utm[p]) for p in positives} == expected[tuple(query)]
    # Recall over all three queries, the one without positives a miss: a perfect ranking scores 2/3.
    one_hot = np.eye(4, dtype=np.float32)
    queries = np.stack([one_hot[p[0]] if len(p) else np.zeros(4, np.float32) for p in eval_set.ground_truth.positives])
    assert evaluate_embeddings(queries, one_hot, eval_set.ground_truth)["recall@1"] == pytest.approx(2 / 3)


def test_gldv2_images_train_selection_and_queries(tmp_path):
    written = write_gldv2(
        tmp_path,
        train_per_class={7: 3, 9: 1},
        solution=[("Public", [0]), ("Ignored", None), ("Private", [1, 2])],
        num_index=3,
    )
    data = GoogleLandmarksV2(str(tmp_path), min_images_per_class=2, image_size=32, resize="square")
    data.setup("fit")
    assert data.lists["train"].labels.tolist() == [7, 7, 7]
    assert len(data.lists["test"]) == 2  # the Ignored query is not scored, hence not extracted
    assert data.lists["test"].paths[1].endswith(f"{written['test_ids'][2]}.jpg")
    # Public queries validate, Private ones test; both search the whole index.
    [val_set], [test_set] = data.eval_sets("val"), data.eval_sets("test")
    assert val_set.ground_truth.subsets.tolist() == ["public"] and test_set.ground_truth.subsets.tolist() == ["private"]
    assert val_set.query_parts["test_public"][0]["index"] == 0 and test_set.query_parts["test_private"][0]["index"] == 0
    assert torch.equal(test_set.query_parts["test_private"][0]["image"], data.dataset("test")[1]["image"])
    assert val_set.ground_truth.num_database == test_set.ground_truth.num_database == 3


def test_revisited_query_is_cropped_to_its_box_and_distractors_follow_the_database(tmp_path):
    write_revisited(tmp_path, "roxford5k", num_database=6, gnd=GND, size=(64, 48))
    write_distractors(tmp_path, 3)
    data = RevisitedOxfordParis(str(tmp_path), datasets=["roxford5k"], distractors=True, image_size=32, resize="square")
    data.setup("test")
    [eval_set] = data.eval_sets("test")
    assert eval_set.name == "roxford5k+1m" and list(eval_set.database_parts) == ["roxford5k_database", "revisitop1m"]
    assert eval_set.ground_truth.num_database == 9
    box = data.lists["roxford5k_query"].boxes[0]
    query = eval_set.query_parts["roxford5k_query"][0]
    assert torch.equal(query["image"], pixels_of(tmp_path / data.lists["roxford5k_query"].paths[0], box))
    assert not torch.equal(query["image"], pixels_of(tmp_path / data.lists["roxford5k_query"].paths[0]))
    assert eval_set.database_parts["revisitop1m"][2]["index"] == 2  # each part is embedded and gathered on its own
    assert data.eval_sets("val") == []  # test data only: nothing is validated (or selected) on it
    with pytest.raises(ValueError, match="no training split: set train_on"):
        data.train_dataset()


def test_revisited_rop_is_the_mean_of_medium_and_hard_over_both_datasets(tmp_path):
    for name in ("roxford5k", "rparis6k"):
        write_revisited(tmp_path, name, num_database=6, gnd=GND)
    data = RevisitedOxfordParis(str(tmp_path))
    metrics = {
        f"test/{n}/{s}/mAP": v
        for n, vs in (("roxford5k", (0.5, 0.2)), ("rparis6k", (0.9, 0.6)))
        for s, v in zip(("medium", "hard"), vs)
    }
    assert data.summary_metrics("test", metrics) == {"test/rop/mAP": pytest.approx(0.55)}
    assert data.summary_metrics("test", {k: v for k, v in metrics.items() if "rparis" not in k}) == {}


# ---- broken variants ------------------------------------------------------------------------------------------------


def test_truncated_jpeg_stops_evaluation_naming_the_file(tmp_path):
    write_sop(tmp_path, train_classes=1, test_classes=2, per_class=2)
    data = StanfordOnlineProducts(str(tmp_path), image_size=32, resize="square")
    broken = truncate_file(tmp_path / data.lists["test"].paths[2])
    [eval_set] = data.eval_sets("test")
    with pytest.raises(DatasetFormatError, match=f"{broken}: cannot be decoded as an image"):
        eval_set.database_parts["test"][2]


def test_truncated_training_jpeg_is_skipped_counted_and_named_when_configured(tmp_path):
    write_sop(tmp_path, train_classes=2, test_classes=1, per_class=2)
    # val_fraction=0: all four training images train (none held out for validation).
    data = StanfordOnlineProducts(
        str(tmp_path), image_size=32, resize="square", skip_unreadable_train=True, batch_size=4, val_fraction=0
    )
    broken = truncate_file(tmp_path / data.lists["train"].paths[1])
    with pytest.warns(UserWarning, match=f"skipping an unreadable training image: {broken}"):
        batches = list(data.train_dataloader())
    assert [int(b["skipped"]) for b in batches] == [1]
    assert sorted(batches[0]["index"].tolist()) == [0, 2, 3]
    # Without the option the same file stops training.
    strict = StanfordOnlineProducts(str(tmp_path), image_size=32, resize="square", batch_size=4, val_fraction=0)
    with pytest.raises(DatasetFormatError, match=str(broken)):
        list(strict.train_dataloader())


def test_missing_image_file_is_reported_on_setup(tmp_path):
    write_revisited(tmp_path, "rparis6k", num_database=6, gnd=GND)
    (tmp_path / "rparis6k/jpg/paris_000002.jpg").unlink()
    data = RevisitedOxfordParis(str(tmp_path), datasets=["rparis6k"])
    with pytest.raises(
        DatasetLayoutError,
        match=r"(?s)1 of 6 images of list 'rparis6k_database' are missing.*paris_000002.jpg.*Expected layout",
    ):
        data.setup("test")


def test_missing_list_file_is_reported_on_setup_with_the_expected_tree(tmp_path):
    write_pittsburgh_mat(tmp_path, "train", UTM_DB, UTM_Q)
    with pytest.raises(DatasetLayoutError, match=r"(?s)pitts30k_val.mat not found. Expected layout:.*queries_real"):
        Pittsburgh30k(str(tmp_path)).setup("fit")


def test_gldv2_query_absent_from_test_list_is_reported_on_setup(tmp_path):
    write_gldv2(tmp_path, train_per_class={1: 2}, solution=[("Public", [0])], num_index=2)
    (tmp_path / "test.csv").write_text("id\n")
    with pytest.raises(DatasetFormatError, match="is not listed in"):
        GoogleLandmarksV2(str(tmp_path)).setup("test")


def test_images_of_different_sizes_in_one_batch_ask_for_batch_size_one(tmp_path):
    for i, size in enumerate([(40, 30), (30, 40)]):
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    dataset = ImageListDataset(tmp_path, ImageList(["0.jpg", "1.jpg"]), ImageTransform(20, "longer_side"))
    with pytest.raises(ValueError, match="set the batch size to 1"):
        collate_images([dataset[0], dataset[1]])


# ---- stored features ------------------------------------------------------------------------------------------------


def test_feature_variant_reads_the_stores_and_refuses_misaligned_ids(tmp_path):
    write_sop(tmp_path / "sop", train_classes=2, test_classes=2, per_class=2)
    data = StanfordOnlineProducts(str(tmp_path / "sop"), features=str(tmp_path / "features"))
    rng = np.random.default_rng(0)
    for name, images in data.lists.items():
        write_feature_store(tmp_path / "features" / f"{name}.h5", images.paths, rng.standard_normal((len(images), 5)))
    data.setup("fit")
    assert data.embedding_dim == 5
    [eval_set] = data.eval_sets("val")
    assert eval_set.database_parts["val"][1]["embedding"].shape == (5,)
    paths = data.lists["train"].paths
    write_feature_store(tmp_path / "features/train.h5", paths[::-1], rng.standard_normal((len(paths), 5)))
    with pytest.raises(DatasetFormatError, match="train.h5: its 4 image ids do not match the 4 images of list 'train'"):
        data.train_dataset()


# ---- Hugging Face datasets ------------------------------------------------------------------------------------------


def test_images_from_a_hugging_face_dataset_equal_the_files(tmp_path):
    import datasets

    write_revisited(tmp_path / "revisited", "roxford5k", num_database=6, gnd=GND)
    files = RevisitedOxfordParis(str(tmp_path / "revisited"), datasets=["roxford5k"], image_size=32, resize="square")
    ids = [p for images in files.lists.values() for p in images.paths]
    hf = datasets.Dataset.from_dict({"path": ids[1:], "image": [str(tmp_path / "revisited" / p) for p in ids[1:]]})
    hf.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    from_hf = RevisitedOxfordParis(
        str(tmp_path / "revisited"),
        datasets=["roxford5k"],
        image_size=32,
        resize="square",
        hf_images={"path": str(tmp_path / "hf")},
    )
    # The first query is absent from the HF dataset: named on setup.
    with pytest.raises(
        DatasetLayoutError, match=rf"1 of 2 images of list 'roxford5k_query' are missing in HF dataset.*{ids[0]}"
    ):
        from_hf.setup("test")
    [file_set], [hf_set] = files.eval_sets("test"), from_hf.eval_sets("test")
    query, database = "roxford5k_query", "roxford5k_database"
    assert torch.equal(file_set.query_parts[query][1]["image"], hf_set.query_parts[query][1]["image"])  # same crop
    assert torch.equal(file_set.database_parts[database][5]["image"], hf_set.database_parts[database][5]["image"])


def test_a_held_out_split_of_stored_features_reads_each_batch_at_once_at_its_own_positions(tmp_path):
    write_sop(tmp_path / "sop", train_classes=5, test_classes=2, per_class=2)
    data = StanfordOnlineProducts(
        str(tmp_path / "sop"), features=str(tmp_path / "features"), val_fraction=0.4, batch_size=6
    )
    stored = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)  # row r of the train list holds 3r, 3r+1, 3r+2
    write_feature_store(tmp_path / "features/train.h5", data.lists["train"].paths, stored)
    write_feature_store(tmp_path / "features/test.h5", data.lists["test"].paths, np.zeros((4, 3)))
    rows = data.subsets()["train_without_val"][1]
    [batch] = list(data.train_dataloader())
    positions = batch["index"].numpy()  # positions in the subset (in the epoch's shuffled order) ...
    np.testing.assert_array_equal(batch["embedding"].numpy(), stored[rows[positions]])  # ... read from its rows
    assert sorted(positions.tolist()) == list(range(6))


def test_a_held_out_split_of_images_is_batched_by_the_shapes_of_its_own_rows(tmp_path):
    written = write_gldv2(tmp_path, {7: 2}, [("Private", [0]), ("Public", [1]), ("Public", [2])], num_index=3)
    wide = tmp_path / image_path("test", written["test_ids"][2])
    Image.new("RGB", (96, 32)).save(wide, format="JPEG")  # the second Public query: wider than the others
    data = GoogleLandmarksV2(str(tmp_path), image_size=48, resize="longer_side", eval_batch_size=2)
    [val_set] = data.eval_sets("val")
    public = val_set.query_parts["test_public"]
    assert public.resized_shapes([0, 1]) == [(40, 48), (16, 48)]  # rows 1 and 2 of the test list, not 0 and 1
    [batch_1, batch_2] = list(data.sharded_dataloader(public))  # different shapes: never one batch
    assert {tuple(batch_1["image"].shape[2:]), tuple(batch_2["image"].shape[2:])} == {(40, 48), (16, 48)}

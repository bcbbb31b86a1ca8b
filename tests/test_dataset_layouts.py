"""The benchmarks' published layouts: readers, broken variants, and ground truth on hand-built cases."""

import pickle

import numpy as np
import pytest
from layouts import (
    write_distractors,
    write_gldv2,
    write_pittsburgh_folders,
    write_pittsburgh_mat,
    write_revisited,
    write_sop,
)

from datamodules.gldv2 import GoogleLandmarksV2, TinyGLDv2, image_path, read_gldv2_retrieval, read_gldv2_train
from datamodules.layout import DatasetFormatError, DatasetLayoutError
from datamodules.pittsburgh import pittsburgh_ground_truth, read_pittsburgh_folders, read_pittsburgh_mat
from datamodules.revisited import read_distractors, read_revisited
from datamodules.sop import read_sop_split, sop_ground_truth
from retrieval import evaluate_embeddings, rop_map

# ---- Stanford Online Products ----------------------------------------------------------------------------------


def test_sop_reads_both_lists_and_scores_leave_one_out(tmp_path):
    written = write_sop(tmp_path, train_classes=4, test_classes=3, per_class=3)
    train, test = read_sop_split(tmp_path, "train"), read_sop_split(tmp_path, "test")
    assert train.class_ids.tolist() == written["train"] and test.class_ids.tolist() == written["test"]
    assert test.class_ids.min() == 5  # test classes follow the training classes, as in SOP
    assert all((tmp_path / p).is_file() for p in test.paths)
    ground_truth = sop_ground_truth(test.class_ids, recall_ks=(1, 2, 1000))
    # One-hot class embeddings: every query's nearest other images are its own class.
    embeddings = np.eye(8, dtype=np.float32)[test.class_ids]
    metrics = evaluate_embeddings(None, embeddings, ground_truth)
    assert metrics["recall@1"] == metrics["recall@1000"] == 1.0 and metrics["mAP@100"] == 1.0


def test_sop_missing_list_shows_the_expected_tree(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)Ebay_test.txt not found. Expected layout:.*Ebay_train.txt"):
        read_sop_split(tmp_path, "test")


def test_sop_malformed_line_names_file_and_line(tmp_path):
    write_sop(tmp_path)
    path = tmp_path / "Ebay_test.txt"
    path.write_text(path.read_text() + "99 not-a-class 1 bicycle_final/x.JPG\n")
    with pytest.raises(DatasetFormatError, match=r"Ebay_test.txt:11: expected 'image_id class_id super_class_id path'"):
        read_sop_split(tmp_path, "test")


# ---- Pittsburgh ------------------------------------------------------------------------------------------------

DATABASE_UTM = np.array([[0.0, 0.0], [20.0, 0.0], [100.0, 100.0], [200.0, 0.0]])
QUERY_UTM = np.array([[5.0, 0.0], [195.0, 0.0], [500.0, 500.0]])


def test_pittsburgh_mat_and_folder_layouts_agree(tmp_path):
    written = write_pittsburgh_mat(tmp_path / "mat", "test", DATABASE_UTM, QUERY_UTM)
    from_mat = read_pittsburgh_mat(tmp_path / "mat", "test")
    assert from_mat.database_paths == written["database"] and from_mat.query_paths == written["queries"]
    assert all((tmp_path / "mat" / p).is_file() for p in from_mat.database_paths + from_mat.query_paths)
    assert from_mat.radius == 25.0
    write_pittsburgh_folders(tmp_path / "folders", "test", DATABASE_UTM, QUERY_UTM)
    from_folders = read_pittsburgh_folders(tmp_path / "folders", "test")
    # Folder listings are sorted by name, so compare positions as sets.
    assert sorted(map(tuple, from_folders.database_utm)) == sorted(map(tuple, from_mat.database_utm))
    np.testing.assert_allclose(np.sort(from_folders.query_utm, axis=0), np.sort(QUERY_UTM, axis=0))


def test_pittsburgh_recall_counts_queries_without_positives_as_misses(tmp_path):
    write_pittsburgh_mat(tmp_path, "test", DATABASE_UTM, QUERY_UTM)
    split = read_pittsburgh_mat(tmp_path, "test")
    ground_truth = pittsburgh_ground_truth(split, recall_ks=(1, 2))
    assert [p.tolist() for p in ground_truth.positives] == [[0, 1], [3], []]
    # Query 0 is nearest to database 2 (wrong), then 0 (right); query 1 to 3 (right); query 2 has no positive.
    database = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0, 0.9, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=np.float32)
    metrics = evaluate_embeddings(queries, database, ground_truth)
    # mAP@4 over the queries with a positive: query 0 ranks 2, 0, 1, 3 (AP (1/2 + 2/3) / 2), query 1 ranks 3 first.
    expected_map = ((1 / 2 + 2 / 3) / 2 + 1) / 2
    assert metrics == {
        "recall@1": pytest.approx(1 / 3),
        "recall@2": pytest.approx(2 / 3),
        "mAP@4": pytest.approx(expected_map),
    }


def test_pittsburgh_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)pitts30k_val.mat not found.*queries_real"):
        read_pittsburgh_mat(tmp_path, "val")
    (tmp_path / "datasets").mkdir()
    from scipy.io import savemat

    savemat(str(tmp_path / "datasets/pitts30k_val.mat"), {"dbStruct": {"whichSet": "val"}})
    with pytest.raises(DatasetFormatError, match="is not a NetVLAD dbStruct file"):
        read_pittsburgh_mat(tmp_path, "val")
    write_pittsburgh_folders(tmp_path, "val", DATABASE_UTM, QUERY_UTM)
    (tmp_path / "images/val/queries/holiday.jpg").write_bytes(b"")
    with pytest.raises(
        DatasetFormatError, match=r"holiday.jpg: file name does not start with '@<utm_east>@<utm_north>@'"
    ):
        read_pittsburgh_folders(tmp_path, "val")


# ---- Google Landmarks v2 ---------------------------------------------------------------------------------------

SOLUTION = [("Public", [0, 1]), ("Ignored", None), ("Private", [2]), ("Public", [3]), ("Private", [1, 4])]


def test_gldv2_retrieval_solution_and_per_subset_map(tmp_path):
    written = write_gldv2(tmp_path, {7: 3}, SOLUTION, num_index=6)
    retrieval = read_gldv2_retrieval(tmp_path)
    assert retrieval.index_ids == written["index_ids"]
    assert retrieval.query_ids == [written["test_ids"][i] for i in (0, 2, 3, 4)]  # Ignored left out
    assert retrieval.query_subsets == ["public", "private", "public", "private"]
    assert [p.tolist() for p in retrieval.positives] == [[0, 1], [2], [3], [1, 4]]
    assert (tmp_path / image_path("index", retrieval.index_ids[0])).is_file()
    ranks = np.array([[1, 5, 0], [2, 0, 1], [5, 4, 2], [4, 3, 1]])
    metrics = retrieval.ground_truth(k=3).evaluate(ranks)
    # public: q0 hits at 1 and 3 -> (1 + 2/3)/2; q3 misses -> 0.  private: q2 -> 1; q4 hits at 1, 3 -> (1 + 2/3)/2.
    assert metrics == {
        "public/mAP@3": pytest.approx((1 + 2 / 3) / 2 / 2),
        "private/mAP@3": pytest.approx((1 + (1 + 2 / 3) / 2) / 2),
    }


def test_tiny_gldv2_keeps_every_positive_and_a_seeded_sample_of_the_rest(tmp_path):
    solution = [("Public", [1, 4]), ("Private", [4, 6]), ("Ignored", None)]
    written = write_gldv2(tmp_path, {7: 3}, solution, num_index=9)
    retrieval = read_gldv2_retrieval(tmp_path)
    tiny_spec = TinyGLDv2(distractors=2, seed=3)
    tiny, rows = tiny_spec.retrieval(retrieval)
    others = np.array([0, 2, 3, 5, 7, 8])
    expected_distractors = np.random.default_rng(3).choice(others, size=2, replace=False)
    assert rows.tolist() == sorted([1, 4, 6, *expected_distractors.tolist()])
    assert tiny.index_ids == [written["index_ids"][i] for i in rows]
    # the positives are the same images, renumbered in the tiny index
    for positives, tiny_positives in zip(retrieval.positives, tiny.positives):
        assert [tiny.index_ids[i] for i in tiny_positives] == [retrieval.index_ids[i] for i in positives]
    # a ranking listing each query's positives first scores 1 on both subsets
    ranks = np.array([list(tiny.positives[0]) + [0], list(tiny.positives[1]) + [0]])
    assert tiny.ground_truth(k=3).evaluate(ranks) == {"public/mAP@3": 1.0, "private/mAP@3": 1.0}
    with pytest.raises(ValueError, match="asks for 7 distractors but the index has only 6"):
        TinyGLDv2(distractors=7).retrieval(retrieval)

    data = GoogleLandmarksV2(str(tmp_path), tiny=tiny_spec)
    (val,) = data.eval_specs("val")
    assert val.name == "tiny_gldv2" and val.database == ["tiny_index"]
    assert data.dataset("tiny_index").ids == [image_path("index", i) for i in tiny.index_ids]


def test_gldv2_query_absent_from_test_list(tmp_path):
    write_gldv2(tmp_path, {7: 3}, SOLUTION, num_index=6)
    test_csv = tmp_path / "test.csv"
    lines = test_csv.read_text().splitlines()
    test_csv.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the first query
    with pytest.raises(
        DatasetFormatError, match=r"retrieval_solution_v2.1.csv:2: query c0+ is not listed in .*test.csv"
    ):
        read_gldv2_retrieval(tmp_path)


def test_gldv2_empty_solution_row(tmp_path):
    write_gldv2(tmp_path, {7: 3}, [("Public", [0]), ("Private", [])], num_index=3)
    with pytest.raises(
        DatasetFormatError, match=r":3: Private query c0+1 has no index images; only Ignored rows may be empty"
    ):
        read_gldv2_retrieval(tmp_path)


def test_gldv2_missing_file_and_bad_header(tmp_path):
    with pytest.raises(
        DatasetLayoutError, match=r"(?s)index.csv not found. Expected layout:.*retrieval_solution_v2.1.csv"
    ):
        read_gldv2_retrieval(tmp_path)
    write_gldv2(tmp_path, {7: 3}, SOLUTION, num_index=6)
    (tmp_path / "index.csv").write_text("image,url\nb0,x\n")
    with pytest.raises(DatasetFormatError, match=r"index.csv:1 has header \['image', 'url'\]; expected id"):
        read_gldv2_retrieval(tmp_path)


def test_gldv2_training_selection(tmp_path):
    write_gldv2(tmp_path, {1: 2, 2: 12, 3: 15, 4: 11}, SOLUTION, num_index=6)
    everything = read_gldv2_train(tmp_path, clean=False)
    assert len(everything.ids) == 40 and sorted(set(everything.landmark_ids.tolist())) == [1, 2, 3, 4]
    selected = read_gldv2_train(
        tmp_path, clean=True, min_images_per_class=11, max_images_per_class=12, num_classes=2, seed=3
    )
    counts = dict(zip(*np.unique(selected.landmark_ids, return_counts=True)))
    assert len(counts) == 2 and 1 not in counts and all(c <= 12 for c in counts.values())
    again = read_gldv2_train(
        tmp_path, clean=True, min_images_per_class=11, max_images_per_class=12, num_classes=2, seed=3
    )
    assert again.ids == selected.ids, "the selection is deterministic for a seed"


# ---- Revisited Oxford / Paris ------------------------------------------------------------------------------------

GND = [{"easy": [0], "hard": [2], "junk": [1]}, {"easy": [3], "hard": [], "junk": []}]


def test_revisited_reads_the_pickle_and_appends_distractors(tmp_path):
    written = write_revisited(tmp_path, "roxford5k", num_database=6, gnd=GND)
    dataset = read_revisited(tmp_path, "roxford5k")
    assert dataset.database_paths == [f"roxford5k/jpg/{i}.jpg" for i in written["imlist"]]
    assert all((tmp_path / p).is_file() for p in dataset.database_paths + dataset.query_paths)
    np.testing.assert_allclose(dataset.query_boxes[0], [4.5, 2.0, 55.5, 45.0])
    entries = write_distractors(tmp_path, 5)
    with_distractors = dataset.with_distractors(read_distractors(tmp_path))
    assert with_distractors.name == "roxford5k+1m" and len(with_distractors.database_paths) == 11
    assert with_distractors.database_paths[-1] == f"revisitop1m/jpg/{entries[-1]}"
    assert with_distractors.ground_truth().depth == 11
    # The ranking [1, 0, 3, 2, 4, 5] of the metrics tests; distractors ranked last change nothing.
    ranks = np.array([[1, 0, 3, 2, 4, 5, 6, 7, 8, 9, 10]] * 2)
    metrics = with_distractors.ground_truth(kappas=(1,)).evaluate(ranks)
    assert metrics["medium/mAP"] == pytest.approx((0.5 + 7 / 24 + 1 / 6) / 2)
    assert rop_map([metrics]) == pytest.approx((metrics["medium/mAP"] + metrics["hard/mAP"]) / 2)


def test_revisited_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)gnd_rparis6k.pkl not found.*revisitop1m.txt"):
        read_revisited(tmp_path, "rparis6k")
    write_revisited(tmp_path, "rparis6k", num_database=4, gnd=GND)
    path = tmp_path / "rparis6k/gnd_rparis6k.pkl"
    data = pickle.loads(path.read_bytes())
    data["gnd"][1]["easy"] = [9]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"gnd\[1\]\['easy'\] indexes outside imlist \(0..3\)"):
        read_revisited(tmp_path, "rparis6k")
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="is not a Revisited ground-truth pickle"):
        read_revisited(tmp_path, "rparis6k")

"""Feature stores: exact round trips, atomic and resumable writing, clear errors on bad files."""

import h5py
import numpy as np
import pytest

from retrieval.feature_store import FeatureStore, FeatureStoreError, FeatureStoreWriter, write_feature_store


@pytest.fixture
def descriptors():
    rng = np.random.default_rng(0)
    ids = [f"jpg/image_{i:03d}.jpg" for i in range(50)]
    global_descriptors = rng.standard_normal((50, 16)).astype(np.float32)
    local = rng.standard_normal((50, 7, 5 + 8)).astype(np.float16)
    return ids, global_descriptors, local


def test_round_trip_is_bit_identical(tmp_path, descriptors):
    ids, global_descriptors, local = descriptors
    labels = np.arange(50) % 7
    config = {"backbone": "vit_small_patch14_dinov2", "resolution": 224}
    path = write_feature_store(tmp_path / "store.h5", ids, global_descriptors, local, labels=labels, config=config)
    store = FeatureStore(path)
    assert store.ids == ids and store.config == config and store.num_images == 50
    np.testing.assert_array_equal(store.labels, labels)
    loaded = store.global_descriptors()
    assert isinstance(loaded, np.memmap)  # contiguous storage is memory-mapped, not copied
    assert loaded.tobytes() == global_descriptors.tobytes()
    assert store.local_descriptors(slice(None)).tobytes() == local.tobytes()
    rows = [40, 3, 17]
    np.testing.assert_array_equal(store.local_descriptors(rows), local[rows])


def test_interrupted_writing_resumes_and_ends_identical(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    path = tmp_path / "store.h5"
    with pytest.raises(KeyboardInterrupt):
        with FeatureStoreWriter(path, ids, global_dim=16) as writer:
            writer.write([5, 1, 0], global_descriptors[[5, 1, 0]])  # any order
            writer.write(range(10, 30), global_descriptors[10:30])
            raise KeyboardInterrupt  # killed mid-way
    assert not path.exists(), "an incomplete store must never appear under its final name"
    with pytest.raises(FileNotFoundError, match="writing was interrupted"):
        FeatureStore(path)
    writer = FeatureStoreWriter(path, ids, global_dim=16)
    missing = writer.missing_rows()
    assert len(missing) == 50 - 23 and 5 not in missing and 2 in missing
    writer.write(missing, global_descriptors[missing])
    writer.finalize()
    one_shot = write_feature_store(tmp_path / "one_shot.h5", ids, global_descriptors)
    assert FeatureStore(path).global_descriptors().tobytes() == FeatureStore(one_shot).global_descriptors().tobytes()


def test_finalize_refuses_missing_rows(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    writer = FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16)
    writer.write(range(49), global_descriptors[:49])
    with pytest.raises(FeatureStoreError, match=r"1 of 50 rows were never written \(first: \[49\]\)"):
        writer.finalize()


def test_resume_refuses_a_different_layout(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    writer = FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16, config={"resolution": 224})
    writer.write([0], global_descriptors[:1])
    writer.close()
    with pytest.raises(FeatureStoreError, match="extraction config differs; delete it to start over"):
        FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16, config={"resolution": 518})


def test_writing_refuses_non_finite_descriptors(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    bad = global_descriptors.copy()
    bad[[2, 7]] = np.nan
    with pytest.raises(ValueError, match="2 of 50 rows contain NaN or Inf"):
        write_feature_store(tmp_path / "store.h5", ids, bad)


def test_reading_refuses_non_finite_descriptors_naming_the_file(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    path = write_feature_store(tmp_path / "store.h5", ids, global_descriptors)
    with h5py.File(path, "r+") as f:
        f["global"][4, 0] = np.inf
    with pytest.raises(ValueError, match=r"store.h5 \(global, from row 0\): 1 of 50 rows contain NaN or Inf values \(rows 4\)"):
        FeatureStore(path).global_descriptors()


def test_missing_file_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"feature store .*nowhere.h5 not found; expected an HDF5 feature store"):
        FeatureStore(tmp_path / "nowhere.h5")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "store.h5"
    path.write_text("id,descriptor\n")
    with pytest.raises(FeatureStoreError, match=r"store.h5 is not a readable HDF5 file .* expected an HDF5 feature store"):
        FeatureStore(path)


def test_hdf5_without_the_layout(tmp_path):
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4)))
        f.attrs["format"] = "retrieval-feature-store"
        f.attrs["num_images"] = 3
    with pytest.raises(FeatureStoreError, match=r"features.h5 has datasets \['features'\]; expected"):
        FeatureStore(path)


def test_rows_that_disagree_with_num_images(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    path = write_feature_store(tmp_path / "store.h5", ids, global_descriptors)
    with h5py.File(path, "r+") as f:
        f.attrs["num_images"] = 60
    with pytest.raises(FeatureStoreError, match="dataset 'ids' has 50 rows but num_images is 60"):
        FeatureStore(path)

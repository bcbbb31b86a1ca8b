"""Feature stores: exact round trips, atomic and resumable writing, clear errors on bad files."""

from pathlib import Path

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


def test_a_writer_killed_between_writes_leaves_a_file_that_resumes(tmp_path):
    import subprocess
    import sys

    script = f"""
import os, signal, numpy as np
from retrieval.feature_store import FeatureStoreWriter
writer = FeatureStoreWriter({str(tmp_path / "store.h5")!r}, [f"i{{i}}" for i in range(5000)], global_dim=32)
for start in range(0, 3000, 500):
    writer.write(range(start, start + 500), np.full((500, 32), start, np.float32))
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == -9
    writer = FeatureStoreWriter(tmp_path / "store.h5", [f"i{i}" for i in range(5000)], global_dim=32)
    np.testing.assert_array_equal(writer.missing_rows(), np.arange(3000, 5000))
    writer.write(range(3000, 5000), np.zeros((2000, 32), np.float32))
    store = FeatureStore(writer.finalize())
    assert store.global_descriptors()[2999, 0] == 2500


def test_values_that_overflow_the_stored_dtype_are_refused(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    too_large = global_descriptors.copy()
    too_large[3, 0] = 1e5  # above float16's maximum (65504)
    with pytest.raises(ValueError, match=r"1 of 50 rows contain NaN or Inf values \(rows 3\)"):
        write_feature_store(tmp_path / "store.h5", ids, too_large, global_dtype="float16")


def test_rows_and_values_must_have_the_same_length(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    writer = FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16)
    with pytest.raises(ValueError, match="50 rows of global descriptors given for 3 row indices"):
        writer.write([0, 1, 2], global_descriptors)


def test_local_descriptors_of_repeated_or_no_rows(tmp_path, descriptors):
    ids, global_descriptors, local = descriptors
    store = FeatureStore(write_feature_store(tmp_path / "store.h5", ids, global_descriptors, local))
    np.testing.assert_array_equal(store.local_descriptors([7, 2, 7]), local[[7, 2, 7]])
    assert store.local_descriptors([]).shape == (0, 7, 13)


def test_resume_refuses_different_labels_or_dtype(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16, labels=np.zeros(50)).close()
    with pytest.raises(FeatureStoreError, match="labels differ"):
        FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16)
    with pytest.raises(FeatureStoreError, match="global descriptor shape or dtype differs"):
        FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16, labels=np.zeros(50), global_dtype="float16")


def test_a_failed_creation_leaves_nothing_behind(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    with pytest.raises(ValueError, match="3 labels for 50 images"):
        FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16, labels=[1, 2, 3])
    assert not (tmp_path / "store.h5.partial").exists()

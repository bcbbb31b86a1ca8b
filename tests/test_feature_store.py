"""Feature stores: exact round trips, atomic and resumable writing, clear errors on bad files, compressed
stores."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datamodules.feature_store import EmbeddingDataset
from retrieval.compression import ProductQuantizer, binary_codes, bytes_per_image, itq_projection, unpack_bits
from retrieval.feature_store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    QuantizedRows,
    compress_feature_store,
    write_compressed_store,
    write_feature_store,
    write_virtual_store,
)


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
    with pytest.raises(
        ValueError, match=r"store.h5 \(global, from row 0\): 1 of 50 rows contain NaN or Inf values \(rows 4\)"
    ):
        FeatureStore(path).global_descriptors()


def test_missing_file_names_path_and_layout(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"feature store .*nowhere.h5 not found; expected an HDF5 feature store"
    ):
        FeatureStore(tmp_path / "nowhere.h5")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "store.h5"
    path.write_text("id,descriptor\n")
    with pytest.raises(
        FeatureStoreError, match=r"store.h5 is not a readable HDF5 file .* expected an HDF5 feature store"
    ):
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


def test_a_store_written_by_plain_h5py_from_the_readme(tmp_path):
    """The README's minimal layout: ids and global (and optional labels), no attributes at all."""
    rng = np.random.default_rng(1)
    ids = [f"img_{i}.jpg" for i in range(5)]
    descriptors = rng.standard_normal((5, 8)).astype(np.float32)
    with h5py.File(tmp_path / "mine.h5", "w") as f:
        f["ids"] = ids  # h5py stores a list of str as variable-length strings
        f["global"] = descriptors
        f["labels"] = [3, 3, 1, 2, 1]
    store = FeatureStore(tmp_path / "mine.h5")
    assert store.ids == ids and store.num_images == 5 and store.config == {} and store.global_dim == 8
    assert isinstance(store.global_descriptors(), np.memmap)
    np.testing.assert_array_equal(store.global_descriptors(), descriptors)
    np.testing.assert_array_equal(store.labels, [3, 3, 1, 2, 1])
    # Locals only, integer ids.
    local = rng.standard_normal((5, 4, 5 + 8)).astype(np.float16)
    with h5py.File(tmp_path / "locals.h5", "w") as f:
        f["ids"] = np.arange(5)
        f["local"] = local
    store = FeatureStore(tmp_path / "locals.h5")
    assert store.ids == ["0", "1", "2", "3", "4"] and store.local_shape == (4, 13) and not store.has_global
    np.testing.assert_array_equal(store.local_descriptors([4, 0]), local[[4, 0]])


def test_a_hand_written_store_of_another_format_or_shape_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["ids"] = ["a", "b"]
        f["global"] = np.zeros((2, 4), np.float32)
        f.attrs["format"] = "someone-elses-format"
    with pytest.raises(FeatureStoreError, match=r"other.h5 has format='someone-elses-format'.*expected an HDF5"):
        FeatureStore(tmp_path / "other.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["ids"] = ["a", "b"]
        f["global"] = np.zeros(8, np.float32)
    with pytest.raises(FeatureStoreError, match="flat.h5: 'global' must be a 2-d dataset"):
        FeatureStore(tmp_path / "flat.h5")
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f["ids"] = ["a", "b", "c"]
        f["global"] = np.zeros((2, 4), np.float32)
    with pytest.raises(FeatureStoreError, match="short.h5: dataset 'global' has 2 rows but num_images is 3"):
        FeatureStore(tmp_path / "short.h5")


def test_joined_shards_read_like_one_store_without_copying(tmp_path, descriptors):
    ids, global_descriptors, local = descriptors
    labels = np.arange(50) % 4
    starts = [0, 17, 34]
    shards = []
    for rank, (start, stop) in enumerate(zip(starts, starts[1:] + [50])):
        path = tmp_path / "features/.shards" / f"list.rank{rank}of3.h5"
        write_feature_store(path, ids[start:stop], global_descriptors[start:stop], local[start:stop], config={"a": 1})
        shards.append((start, path))
    joined = write_virtual_store(tmp_path / "features/list.h5", ids, shards, labels=labels, config={"a": 1})
    assert joined.stat().st_size < 20_000  # ids, labels and the mapping; the descriptors stay in the shards
    whole_path = write_feature_store(
        tmp_path / "whole.h5", ids, global_descriptors, local, labels=labels, config={"a": 1}
    )
    whole = FeatureStore(whole_path)
    # Moved as a directory, read from elsewhere: the shards are found relative to the joined file.
    (tmp_path / "features").rename(tmp_path / "moved")
    store = FeatureStore(tmp_path / "moved/list.h5")
    assert store.ids == whole.ids and store.config == whole.config and store.num_images == 50
    assert [p.name for p in store.sources] == [f"list.rank{r}of3.h5" for r in range(3)]
    np.testing.assert_array_equal(store.labels, whole.labels)
    assert np.asarray(store.global_descriptors()).tobytes() == whole.global_descriptors().tobytes()
    rows = [49, 0, 17, 16, 33, 34, 17]  # across shard boundaries, repeated, any order
    # The joined global descriptors stay on disk: each shard memory-mapped, rows read across them.
    joined_global, whole_global = store.global_descriptors(), whole.global_descriptors()
    assert all(isinstance(block, np.memmap) for block in joined_global.blocks) and len(joined_global) == 50
    np.testing.assert_array_equal(joined_global[rows], whole_global[rows])
    np.testing.assert_array_equal(joined_global[10:40], whole_global[10:40])
    np.testing.assert_array_equal(joined_global[34], whole_global[34])
    np.testing.assert_array_equal(joined_global[-1], whole_global[49])
    batch = EmbeddingDataset(joined_global).__getitems__(rows)
    np.testing.assert_array_equal(batch.embedding.numpy(), whole_global[rows].astype(np.float32))
    assert store.local_descriptors(rows).tobytes() == whole.local_descriptors(rows).tobytes()
    assert store.local_descriptors(slice(10, 40)).tobytes() == whole.local_descriptors(slice(10, 40)).tobytes()
    # A missing shard is an error naming it, not rows of zeros.
    (tmp_path / "moved/.shards/list.rank1of3.h5").unlink()
    with pytest.raises(FeatureStoreError, match=r"list.h5 joins shards that are missing: .*list.rank1of3.h5"):
        FeatureStore(tmp_path / "moved/list.h5")


def test_joining_refuses_shards_that_do_not_tile_the_rows(tmp_path, descriptors):
    ids, global_descriptors, _ = descriptors
    first = write_feature_store(tmp_path / "a.h5", ids[:20], global_descriptors[:20])
    second = write_feature_store(tmp_path / "b.h5", ids[20:], global_descriptors[20:])
    with pytest.raises(FeatureStoreError, match=r"a.h5 holds 20 rows, expected rows 0..24"):
        write_virtual_store(tmp_path / "joined.h5", ids, [(0, first), (25, second)])
    assert not (tmp_path / "joined.h5").exists()


def test_a_process_forked_while_writing_does_not_block_finishing(tmp_path, descriptors):
    """A dataloader worker forked between two writes (e.g. for the next list) must not inherit the store's
    open handle and its HDF5 file lock, which made finishing fail with 'unable to lock file'."""
    import multiprocessing
    import time

    ids, global_descriptors, _ = descriptors
    writer = FeatureStoreWriter(tmp_path / "store.h5", ids, global_dim=16)
    writer.write(range(25), global_descriptors[:25])
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    try:
        writer.write(range(25, 50), global_descriptors[25:])
        path = writer.finalize()
    finally:
        worker.terminate()
        worker.join()
    assert FeatureStore(path).global_descriptors().tobytes() == global_descriptors.tobytes()


# Compressed stores: PQ global codes and packed binary local descriptors (format version 2).


@pytest.fixture
def float_store(tmp_path):
    rng = np.random.default_rng(4)
    ids = [f"db/{i:04d}.jpg" for i in range(300)]
    global_descriptors = rng.standard_normal((300, 16)).astype(np.float32)
    local = rng.standard_normal((300, 6, 5 + 32)).astype(np.float16)
    local[:, :, 2] = rng.integers(0, 7, (300, 6))  # scale index
    local[:, :, 3] = 0
    local[:5, 4:, 3] = 1  # padding
    labels = np.arange(300) % 11
    path = write_feature_store(tmp_path / "float.h5", ids, global_descriptors, local, labels=labels, config={"a": 1})
    return path, global_descriptors, local


def test_a_compressed_store_reads_in_the_float_layout(tmp_path, float_store):
    source, global_descriptors, local = float_store
    projection = itq_projection(local[..., 5:].reshape(-1, 32), bits=16)
    path = compress_feature_store(
        source,
        tmp_path / "compressed.h5",
        global_pq_sub_dim=4,
        local_projection=projection,
        num_locals=4,
        rows_per_block=64,  # written in several blocks
    )
    store = FeatureStore(path)
    assert (store.global_encoding, store.local_encoding) == ("pq", "binary")
    assert store.global_dim == 16 and store.local_shape == (4, 5 + 16) and store.has_global and store.has_local
    assert store.ids == FeatureStore(source).ids and store.config == {"a": 1}
    np.testing.assert_array_equal(store.labels, np.arange(300) % 11)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["local_bits"] == 16 and "local" not in f
        assert f["local_bits"].dtype == np.uint8 and f["local_bits"].shape == (300, 4, 2)
        assert json.loads(f.attrs["compression"])["global_pq_training"] == "source store (300 rows)"
    # Globals: the PQ reconstruction, decoded as rows are read.
    quantizer = store.global_quantizer()
    assert quantizer.centroids.shape == (4, 256, 4)
    expected = quantizer.decode(quantizer.encode(global_descriptors))
    loaded = store.global_descriptors()
    assert isinstance(loaded, QuantizedRows) and loaded.shape == (300, 16) and isinstance(loaded.codes, np.memmap)
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    np.testing.assert_array_equal(loaded[[7, 2, 7]], expected[[7, 2, 7]])
    np.testing.assert_array_equal(loaded[10:20], expected[10:20])
    np.testing.assert_array_equal(loaded[-1], expected[-1])
    assert loaded[3, 2] == expected[3, 2]
    np.testing.assert_array_equal(store.global_descriptors(memory_map=False), expected)
    assert 0 < np.mean((expected - global_descriptors) ** 2) < np.mean(global_descriptors**2)
    # Locals: the metadata columns, then the ±1 codes, as float16 like the float store.
    rows = [299, 0, 3, 0]
    values = store.local_descriptors(rows)
    assert values.shape == (4, 4, 21) and values.dtype == np.float16
    np.testing.assert_array_equal(values[..., :5], local[rows, :4, :5])
    np.testing.assert_array_equal(values[..., 5:], binary_codes(local[rows, :4, 5:], projection))
    np.testing.assert_array_equal(store.local_descriptors(slice(0, 5))[..., 3], local[:5, :4, 3])
    assert store.local_descriptors([]).shape == (0, 4, 21)
    # The datamodule reads it like any store.
    dataset = EmbeddingDataset.from_store(store, locals_per_example=2)
    batch = dataset.__getitems__([5, 1])
    np.testing.assert_array_equal(batch.embedding.numpy(), expected[[5, 1]])
    assert batch.local.shape == (2, 2, 21) and batch.local.dtype == torch.float32


def test_bytes_per_image_of_stores_follow_the_formula(tmp_path, float_store, descriptors):
    ids, global_descriptors, local = descriptors  # float32 16-d globals, 7 float16 8-d locals
    store = FeatureStore(write_feature_store(tmp_path / "store.h5", ids, global_descriptors, local))
    assert store.stored_bytes_per_image() == bytes_per_image(16, "fp32", 7, "fp16", local_dim=8) == 64 + 7 * 16
    assert store.stored_bytes_per_image(num_locals=3) == bytes_per_image(16, "fp32", 3, "fp16", local_dim=8)
    with pytest.raises(ValueError, match="8 local descriptors per image asked, .*store.h5 stores 7"):
        store.stored_bytes_per_image(num_locals=8)
    source, _, _ = float_store
    compressed = FeatureStore(
        compress_feature_store(
            source, tmp_path / "c.h5", global_pq_sub_dim=8, local_projection=np.eye(32, 16), num_locals=5
        )
    )
    assert compressed.stored_bytes_per_image() == bytes_per_image(16, "pq8", 5, "binary", local_dim=16) == 2 + 5 * 2
    # The AMES "1 KB" setting: a 2048-d global as PQ8 codes and 48 binary 128-bit locals.
    rng = np.random.default_rng(5)
    quantizer = ProductQuantizer(rng.standard_normal((256, 256, 8)).astype(np.float32))
    path = write_compressed_store(
        tmp_path / "one_kb.h5",
        ["a", "b"],
        global_descriptors=rng.standard_normal((2, 2048)),
        global_quantizer=quantizer,
        keep_float_global=True,
        local_codes=rng.random((2, 48, 128)) > 0.5,
        local_meta=np.zeros((2, 48, 5)),
    )
    one_kb = FeatureStore(path)
    assert one_kb.stored_bytes_per_image() == bytes_per_image(2048, "pq8", 48, "binary") == 1024


def test_float_globals_kept_beside_pq_codes(tmp_path):
    rng = np.random.default_rng(6)
    ids = [str(i) for i in range(300)]
    global_descriptors = rng.standard_normal((300, 8)).astype(np.float32)
    quantizer = ProductQuantizer.train(global_descriptors, sub_dim=4)
    path = write_compressed_store(
        tmp_path / "both.h5",
        ids,
        global_descriptors=global_descriptors,
        global_quantizer=quantizer,
        keep_float_global=True,
    )
    store = FeatureStore(path)
    assert store.global_encoding == "pq" and not store.has_local and store.local_encoding is None
    reconstruction = quantizer.decode(quantizer.encode(global_descriptors))
    np.testing.assert_array_equal(np.asarray(store.global_descriptors()), reconstruction)
    assert store.global_descriptors(quantized=False).tobytes() == global_descriptors.tobytes()
    assert store.stored_bytes_per_image() == 2  # the codes; the float copy is kept for comparison
    # Without the copy, asking for it names what is missing.
    source = write_feature_store(tmp_path / "float.h5", ids, global_descriptors)
    only_codes = FeatureStore(compress_feature_store(source, tmp_path / "codes.h5", global_quantizer=quantizer))
    np.testing.assert_array_equal(np.asarray(only_codes.global_descriptors()), reconstruction)
    with pytest.raises(FeatureStoreError, match="codes.h5 holds no float global descriptors"):
        only_codes.global_descriptors(quantized=False)
    with pytest.raises(FeatureStoreError, match="float.h5 holds no PQ codes global descriptors"):
        FeatureStore(source).global_descriptors(quantized=True)


def test_pq_is_trained_on_the_given_training_data(tmp_path, float_store):
    source, global_descriptors, _ = float_store
    training = np.random.default_rng(7).standard_normal((400, 16)).astype(np.float32) * 3
    path = compress_feature_store(source, tmp_path / "c.h5", global_pq_sub_dim=8, pq_training=training)
    store = FeatureStore(path)
    expected = ProductQuantizer.train(training, 8)
    np.testing.assert_array_equal(store.global_quantizer().centroids, expected.centroids)
    assert store.local_encoding == "float" and store.local_shape == (6, 37)  # locals copied as they were
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["compression"])["global_pq_training"] == "given array (400 vectors)"
    # A quantizer shared by the parts of one database gives them one codebook.
    again = compress_feature_store(source, tmp_path / "again.h5", global_quantizer=store.global_quantizer())
    np.testing.assert_array_equal(FeatureStore(again).global_quantizer().centroids, expected.centroids)


def test_stores_without_compressed_data_keep_format_version_1(tmp_path, descriptors):
    ids, global_descriptors, local = descriptors
    path = write_feature_store(tmp_path / "store.h5", ids, global_descriptors, local)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 1 and "compression" not in f.attrs
    store = FeatureStore(path)
    assert (store.global_encoding, store.local_encoding) == ("float", "float")
    assert store.global_quantizer() is None
    # Compressing nothing (no PQ, no projection) copies the store, still as version 1.
    copy = compress_feature_store(path, tmp_path / "copy.h5", global_pq_sub_dim=None, num_locals=3)
    with h5py.File(copy, "r") as f:
        assert f.attrs["format_version"] == 1
    assert FeatureStore(copy).global_descriptors().tobytes() == global_descriptors.tobytes()
    assert FeatureStore(copy).local_descriptors(slice(None)).tobytes() == local[:, :3].tobytes()


def test_a_compressed_store_written_by_plain_h5py(tmp_path):
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 256, (3, 4), dtype=np.uint8)
    centroids = rng.standard_normal((4, 256, 2)).astype(np.float32)
    bits = rng.integers(0, 256, (3, 5, 16), dtype=np.uint8)
    meta = rng.standard_normal((3, 5, 5)).astype(np.float16)
    with h5py.File(tmp_path / "mine.h5", "w") as f:
        f["ids"] = ["a", "b", "c"]
        f["global_pq"] = codes
        f["global_pq_centroids"] = centroids
        f["local_bits"] = bits
        f["local_meta"] = meta
        f.attrs["local_bits"] = 128
    store = FeatureStore(tmp_path / "mine.h5")
    assert store.global_dim == 8 and store.local_shape == (5, 133) and store.num_images == 3
    np.testing.assert_array_equal(store.global_descriptors()[[1]], ProductQuantizer(centroids).decode(codes[[1]]))
    np.testing.assert_array_equal(store.local_descriptors([2])[0, :, 5:], unpack_bits(bits[2]))
    assert store.stored_bytes_per_image() == 4 + 5 * 16


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.__delitem__("local_meta"), r"local_bits needs local_meta \[3, 5, 5\] .*got none"),
        (lambda f: f.attrs.__setitem__("local_bits", 120), r"attr local_bits=120; expected uint8 \[N, L, bits/8\]"),
        (lambda f: f.attrs.__delitem__("local_bits"), "attr local_bits=missing"),
        (lambda f: f.create_dataset("local", data=np.zeros((3, 5, 9))), "holds both 'local' and 'local_bits'"),
        (lambda f: f.__delitem__("global_pq_centroids"), r"global_pq uint8 \(3, 4\) needs uint8 codes .*got none"),
        (lambda f: f.create_dataset("global", data=np.zeros((3, 6))), "global has 6 dimensions but its PQ codebook 8"),
        (lambda f: f.attrs.__setitem__("format_version", 3), "format_version 3, newer than this code reads"),
    ],
)
def test_a_broken_compressed_store_is_refused_naming_the_file(tmp_path, change, message):
    path = write_compressed_store(
        tmp_path / "broken.h5",
        ["a", "b", "c"],
        global_descriptors=np.zeros((3, 8)),
        global_quantizer=ProductQuantizer(np.zeros((4, 256, 2))),
        local_codes=np.ones((3, 5, 128)),
        local_meta=np.zeros((3, 5, 5)),
    )
    FeatureStore(path)  # intact, it reads
    with h5py.File(path, "r+") as f:
        change(f)
    with pytest.raises(FeatureStoreError, match=f"broken.h5.*{message}"):
        FeatureStore(path)


def test_compression_refuses_what_it_cannot_do(tmp_path, float_store, descriptors):
    source, _, _ = float_store
    compressed = compress_feature_store(source, tmp_path / "c.h5", global_pq_sub_dim=4)
    with pytest.raises(FeatureStoreError, match="c.h5 is already compressed"):
        compress_feature_store(compressed, tmp_path / "cc.h5")
    with pytest.raises(ValueError, match=r"local_projection of shape \(16, 8\) does not apply to .*32-d"):
        compress_feature_store(source, tmp_path / "x.h5", local_projection=np.zeros((16, 8)))
    with pytest.raises(ValueError, match="num_locals=7: .*float.h5 stores 6 local descriptors"):
        compress_feature_store(source, tmp_path / "x.h5", num_locals=7)
    with pytest.raises(ValueError, match="a positive multiple of 8 bits, got 12"):
        compress_feature_store(source, tmp_path / "x.h5", local_projection=np.zeros((32, 12)))
    assert not (tmp_path / "x.h5").exists()
    ids, global_descriptors, _ = descriptors
    shard = compress_feature_store(
        write_feature_store(tmp_path / "s.h5", ids[:10], global_descriptors[:10]),
        tmp_path / "shard.h5",
        global_quantizer=ProductQuantizer(np.zeros((2, 256, 8))),
    )
    with pytest.raises(FeatureStoreError, match="joining compressed stores is not supported"):
        write_virtual_store(tmp_path / "joined.h5", ids[:10], [(0, shard)])

"""Datamodules: the embedded benchmark, labelled feature stores, evaluation sets and their errors."""

from dataclasses import replace
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from callbacks.retrieval_evaluation import gather_by_index
from datamodules import EmbeddedBenchmark, EmbeddedBenchmarkSpec, LabelledFeatureStores
from datamodules.base import EvalSet
from datamodules.feature_store import EmbeddingDataset
from retrieval import LabelGroundTruth, write_feature_store
from retrieval.feature_store import FeatureStore

SMALL = replace(EmbeddedBenchmarkSpec(), train_classes=20, eval_classes=10, database_per_class=6)


def test_embedded_benchmark_is_generated_once_and_deterministic(tmp_path):
    first = EmbeddedBenchmark(root=str(tmp_path / "a"), spec=SMALL)
    first.prepare_data()
    stamp = (tmp_path / "a/train.h5").stat().st_mtime_ns
    first.prepare_data()
    assert (tmp_path / "a/train.h5").stat().st_mtime_ns == stamp, "an unchanged spec must not regenerate"
    second = EmbeddedBenchmark(root=str(tmp_path / "b"), spec=SMALL)
    second.prepare_data()
    for split in ("train", "val_query", "test_database"):
        a, b = FeatureStore(tmp_path / "a" / f"{split}.h5"), FeatureStore(tmp_path / "b" / f"{split}.h5")
        assert a.global_descriptors().tobytes() == b.global_descriptors().tobytes()
        np.testing.assert_array_equal(a.labels, b.labels)
    assert first.embedding_dim == 384
    # Disjoint classes between training, validation and test, as in SOP.
    labels = {
        s: set(FeatureStore(tmp_path / "a" / f"{s}.h5").labels.tolist()) for s in ("train", "val_query", "test_query")
    }
    assert not (labels["train"] & labels["val_query"]) and not (labels["val_query"] & labels["test_query"])


def test_a_changed_spec_regenerates(tmp_path):
    EmbeddedBenchmark(root=str(tmp_path), spec=SMALL).prepare_data()
    before = FeatureStore(tmp_path / "train.h5").global_descriptors().copy()
    EmbeddedBenchmark(root=str(tmp_path), spec=replace(SMALL, seed=1)).prepare_data()
    assert not np.array_equal(before, FeatureStore(tmp_path / "train.h5").global_descriptors())


def test_eval_sets_expose_queries_database_and_ground_truth(tmp_path):
    data = EmbeddedBenchmark(root=str(tmp_path), spec=SMALL)
    data.prepare_data()
    (eval_set,) = data.eval_sets("val")
    assert eval_set.name == "embedded" and len(eval_set.queries) == 50 and len(eval_set.database) == 60
    assert list(data.eval_parts("val")) == ["embedded/query", "embedded/database"]
    example = eval_set.database[3]
    assert example["index"] == 3 and example["embedding"].dtype == torch.float32
    assert len(eval_set.ground_truth.positives[0]) == 6


def make_store(path, labels=True, rows=12, dim=4, nan_row=None):
    values = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    write_feature_store(path, [f"img{i}" for i in range(rows)], values, labels=np.arange(rows) % 3 if labels else None)
    if nan_row is not None:
        with h5py.File(path, "r+") as f:
            f["global"][nan_row, 1] = np.nan
    return path


def test_leave_one_out_when_no_query_store_is_given(tmp_path):
    data = LabelledFeatureStores(val_database=str(make_store(tmp_path / "db.h5")), name="sop", recall_ks=(1, 100))
    (eval_set,) = data.eval_sets("val")
    assert eval_set.queries is None and eval_set.ground_truth.queries_are_database
    assert list(data.eval_parts("val")) == ["sop/database"]
    assert eval_set.ground_truth.depth == 11  # recall@100 on 11 candidates is scored on the full list


def test_missing_store_names_the_path_and_the_layout(tmp_path):
    data = LabelledFeatureStores(train=str(tmp_path / "missing_train.h5"))
    with pytest.raises(FileNotFoundError, match=r"missing_train.h5 not found; expected an HDF5 feature store with"):
        data.train_dataset()
    with pytest.raises(ValueError, match=r"no 'val_database' feature store configured \(data.init_args.val_database\)"):
        data.eval_sets("val")


def test_store_without_labels_cannot_be_ground_truth(tmp_path):
    data = LabelledFeatureStores(val_database=str(make_store(tmp_path / "db.h5", labels=False)))
    with pytest.raises(ValueError, match=r"db.h5 has no 'labels' dataset, needed as ground truth"):
        data.eval_sets("val")


def test_store_with_nan_is_refused_with_a_count(tmp_path):
    data = LabelledFeatureStores(train=str(make_store(tmp_path / "train.h5", nan_row=5)))
    with pytest.raises(
        ValueError, match=r"train.h5 \(global, from row 0\): 1 of 12 rows contain NaN or Inf values \(rows 5\)"
    ):
        data.train_dataset()


def test_stores_of_different_sizes_are_refused(tmp_path):
    data = LabelledFeatureStores(
        train=str(make_store(tmp_path / "a.h5", dim=4)), val_database=str(make_store(tmp_path / "b.h5", dim=5))
    )
    with pytest.raises(ValueError, match="feature stores disagree on the descriptor size"):
        data.embedding_dim


def test_eval_set_checks_sizes_against_its_ground_truth():
    database = EmbeddingDataset(np.zeros((5, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="4 query examples but the ground truth expects 3"):
        EvalSet("x", database, LabelGroundTruth([0, 1, 2], [0, 1, 2, 0, 1]), EmbeddingDataset(np.zeros((4, 2))))
    with pytest.raises(ValueError, match="no queries given, but the protocol is not leave-one-out"):
        EvalSet("x", database, LabelGroundTruth([0, 1, 2], [0, 1, 2, 0, 1]))


class OneProcess:
    world_size, is_global_zero = 1, True


def test_gathering_drops_repeats_sorts_and_refuses_gaps():
    outputs = [
        (torch.tensor([2, 0]), torch.tensor([[2.0], [0.0]])),
        (torch.tensor([1, 0]), torch.tensor([[1.0], [0.0]])),
    ]
    np.testing.assert_array_equal(gather_by_index(OneProcess(), outputs, 3, "db"), [[0.0], [1.0], [2.0]])
    with pytest.raises(RuntimeError, match="received 3 distinct db embeddings, expected 4"):
        gather_by_index(OneProcess(), outputs, 4, "db")


class _GlooTrainer:
    """The pieces of a trainer that gathering uses, over an initialised gloo process group."""

    def __init__(self, rank: int):
        import torch.distributed as dist

        self.world_size, self.global_rank, self.is_global_zero = 2, rank, rank == 0
        self.strategy = self

        def all_gather(tensor):
            parts = [torch.empty_like(tensor) for _ in range(2)]
            dist.all_gather(parts, tensor)
            return torch.stack(parts)

        self.all_gather = all_gather
        self.root_device = torch.device("cpu")


def _gather_in_two_processes(rank, port, chunk_sizes, queue):
    import os

    import torch.distributed as dist

    import callbacks.retrieval_evaluation as evaluation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # 23 examples sharded as the evaluation loaders shard them (every 2nd, padded by repeating index 0), in
    # batches of 5: rank 0 holds 12 rows, rank 1 11 + 1 repeat.
    indices = list(range(rank, 23, 2)) + ([0] if rank == 1 else [])
    outputs = [
        (torch.tensor(batch), torch.tensor([[i, -i, 0.5 * i] for i in batch], dtype=torch.float32))
        for batch in (indices[s : s + 5] for s in range(0, len(indices), 5))
    ]
    gathered = {}
    for rows in chunk_sizes:
        evaluation.GATHER_CHUNK_ROWS = rows
        gathered[rows] = evaluation.gather_by_index(_GlooTrainer(rank), outputs, 23, "database")
    queue.put((rank, gathered))
    dist.destroy_process_group()


def test_gathering_to_rank_zero_in_chunks_across_chunk_boundaries():
    from conftest import run_in_two_processes

    # Chunks of 4 and 5 rows split both processes' rows (and the batches) at several places; 64 is one chunk.
    results = run_in_two_processes(_gather_in_two_processes, [4, 5, 64])
    expected = np.array([[i, -i, 0.5 * i] for i in range(23)], dtype=np.float32)
    for rows in (4, 5, 64):
        np.testing.assert_array_equal(results[0][rows], expected)
        assert results[1][rows].shape == (0, 3)  # only rank 0 scores


def test_loaders_pin_memory_for_a_cuda_trainer_only(tmp_path):
    data = EmbeddedBenchmark(root=str(tmp_path), spec=SMALL, batch_size=8)
    data.prepare_data()
    data.setup("fit")
    for device, pinned in ((None, False), ("cpu", False), ("cuda", True)):
        strategy = SimpleNamespace(root_device=torch.device(device or "cpu"))
        data.trainer = None if device is None else SimpleNamespace(strategy=strategy, global_rank=0, world_size=1)
        assert data.pin_memory is pinned
        assert data.eval_dataloaders("val")[0].pin_memory is pinned and data.train_dataloader().pin_memory is pinned

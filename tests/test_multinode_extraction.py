"""Extraction across nodes, simulated on this machine: one process per "node", started with the environment
torchrun gives it (``RANK``, ``GROUP_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``, ...) and
``--trainer.num_nodes=2 --trainer.devices=1``, as ``configs/trainer/multinode_torchrun.yaml`` launches it."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import free_port, run_cli
from layouts import write_distractors, write_revisited
from test_extraction import DATABASE_SIZES, GND, LISTS, assert_same_stores, read_stores, write_extraction_config

from callbacks.prediction_writer import _check_shared_directory
from lightning_modules import run_directory
from lightning_modules.cli import main as cli_main
from retrieval.feature_store import FeatureStore, FeatureStoreError

TWO_NODES = "  accelerator: cpu\n  strategy: ddp\n  num_nodes: 2\n  devices: 1\n"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    for name in ("roxford5k", "rparis6k"):
        write_revisited(root / "data/revisited", name, num_database=9, gnd=GND, database_sizes=DATABASE_SIZES)
    write_distractors(root / "data/revisited", 6)
    return root


def node_config(path, root, output_dir):
    """The extraction config with the images at an absolute path, so nodes may start in other directories."""
    write_extraction_config(path, output_dir=output_dir, batch_size=4, num_workers=0, extra_trainer=TWO_NODES)
    path.write_text(path.read_text().replace("root: data/revisited", f"root: {root / 'data/revisited'}"))
    return path


def launch_two_nodes(config, working_directories):
    """``predict`` on "node" 0 and 1 at once, each in its working directory; their completed processes."""
    port = free_port()

    def node(rank):
        env = {"RANK": str(rank), "GROUP_RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        env |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env |= {"TORCHELASTIC_RUN_ID": f"test{port}", "HF_HUB_OFFLINE": "1"}
        cwd = working_directories[rank]
        cwd.mkdir(parents=True, exist_ok=True)
        return run_cli("predict", "--config", str(config), cwd=cwd, env=env, check=False, timeout=240)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(node, range(2)))


@pytest.mark.slow
def test_two_nodes_write_the_stores_of_one_process(layout, monkeypatch):
    # The reference: one process in this one, batches of 1.
    monkeypatch.chdir(layout)
    monkeypatch.setattr(run_directory, "_exported", None)
    monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)
    one = write_extraction_config(layout / "one.yaml", output_dir="features/one", num_workers=0)
    cli_main(["predict", "--config", str(one), "--trainer.enable_model_summary=false"])
    # Two nodes on a shared filesystem, started in different directories, writing to one absolute output path.
    shared = layout / "features/nodes"
    config = node_config(layout / "nodes.yaml", layout, str(shared))
    results = launch_two_nodes(config, [layout / "node0", layout / "node1"])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1].stderr + results[1].stdout
    assert_same_stores(read_stores(layout / "features/one"), read_stores(shared))
    # Shards by global rank of the world of 2 (nodes x processes), joined by rank 0 without copying.
    for name in LISTS:
        joined = FeatureStore(shared / f"{name}.h5")
        assert [p.name for p in joined.sources] == [f"{name}.rank{r}of2.h5" for r in range(2)]
    assert not list(shared.glob(".shards/.shared-check-*"))  # the shared-directory check cleans up


class OneProcessOfTwo:
    """What the shared-directory check asks of a trainer, for one process of a world of two whose other process
    (rank 0, when this one is not) runs elsewhere: the broadcast token comes from rank 0, and the sums over
    processes are this process's own values plus the other's (which sees its own directory)."""

    def __init__(self, is_global_zero: bool):
        self.is_global_zero, self.world_size = is_global_zero, 2
        self.strategy = self
        self.root_device = torch.device("cpu")

    def broadcast(self, value, src=0):
        return value if self.is_global_zero else "token-of-rank-0"

    def reduce(self, tensor, reduce_op="sum"):
        return tensor  # the other process adds 0: it sees the directory it writes to


def test_an_output_directory_the_processes_do_not_share_is_refused_before_extracting(tmp_path):
    # Rank 0 writes its marker and finds it: the check passes and leaves nothing behind.
    _check_shared_directory(OneProcessOfTwo(is_global_zero=True), tmp_path / "features")
    assert list((tmp_path / "features/.shards").iterdir()) == []
    # Another process whose path names another directory (a node-local disk) never sees rank 0's marker.
    with pytest.raises(FeatureStoreError, match="1 of 2 processes do not see the output directory .*/node1/features"):
        _check_shared_directory(OneProcessOfTwo(is_global_zero=False), tmp_path / "node1/features")

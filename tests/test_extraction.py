"""Descriptor extraction: the descriptors themselves, then ``predict`` writing feature stores (reload,
resume after a kill, 1 vs 2 processes) and the end-to-end path from images to a trained method's metrics."""

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli
from layouts import write_distractors, write_gldv2, write_pittsburgh_mat, write_revisited, write_sop

from lightning_modules.cli import main as cli_main
from lightning_modules.extraction import FeatureExtractor
from lightning_modules.nn.backbones import gem, top_weighted
from retrieval.feature_store import FeatureStore

# A two-block ViT-S/14-shaped DINOv2 with random weights: fast on a CPU, same code path as the real one.
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 56}


def tiny_extractor(**kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor("dinov2_vits14", pretrained=False, model_kwargs=TINY_VIT, **kwargs)


# ---- descriptors ------------------------------------------------------------------------------------------------


def test_gem_on_a_hand_computed_case():
    features = torch.tensor([[[1.0], [8.0]]])  # two positions, one channel
    assert gem(features, p=3.0).item() == pytest.approx(((1 + 512) / 2) ** (1 / 3))
    assert gem(features, p=1.0).item() == pytest.approx(4.5)


def test_top_weighted_sorts_by_weight_and_pads():
    local = torch.zeros(1, 3, 6)
    local[0, :, 4] = torch.tensor([0.2, 0.9, 0.5])
    local[0, :, 5] = torch.tensor([1.0, 2.0, 3.0])  # identifies the rows
    top = top_weighted(local, 5)
    assert top[0, :, 5].tolist() == [2.0, 3.0, 1.0, 0.0, 0.0]
    assert top[0, :, 3].tolist() == [0, 0, 0, 1, 1]  # pad flags


def test_local_positions_cover_the_patch_grid_in_original_pixels():
    model = tiny_extractor(num_local=100, local_weight="norm")
    image = torch.rand(1, 3, 28, 42)  # a 2 x 3 grid of 14-pixel patches
    to_original = torch.tensor([[2.0, 3.0, 10.0, 0.0]])  # the input was resized by 1/2, 1/3 and shifted by 10
    _, local = model.extractor(image, to_original)
    assert local.shape == (1, 100, 5 + 48)
    real = local[0, local[0, :, 3] == 0]
    assert len(real) == 6
    expected = {(10 + 2 * (7 + 14 * j), 3 * (7 + 14 * i)) for i in range(2) for j in range(3)}
    assert {(round(x.item()), round(y.item())) for x, y in real[:, :2]} == expected
    assert torch.all(real[:-1, 4] >= real[1:, 4])  # sorted by weight
    torch.testing.assert_close(real[:, 5:].norm(dim=1), torch.ones(6))


def test_cls_attention_weights_equal_the_attention_timm_computes():
    model = tiny_extractor(num_local=16)
    backbone = model.extractor.backbone
    attention = backbone.blocks[-1].attn
    captured = {}
    attention.fused_attn = False  # the explicit path, whose probabilities pass through attn_drop
    attention.attn_drop.register_forward_hook(lambda module, args, output: captured.update(p=output))
    image = torch.rand(2, 3, 56, 56)
    _, local = model.extractor(image)
    probabilities = captured["p"].mean(dim=1)[:, 0, backbone.num_prefix_tokens :]  # CLS row, patch columns
    expected, _ = probabilities.sort(dim=1, descending=True)
    torch.testing.assert_close(local[:, :, 4], expected, rtol=1e-5, atol=1e-6)


def test_multi_scale_global_is_the_renormalised_mean_of_the_scales():
    image = torch.rand(1, 3, 56, 56)
    multi = tiny_extractor(scales=[1.0, 0.5]).extractor(image)[0]
    singles = [tiny_extractor(scales=[s]).extractor(image)[0] for s in (1.0, 0.5)]
    torch.testing.assert_close(multi, F.normalize(singles[0] + singles[1], dim=-1))


def test_weights_load_from_a_local_checkpoint_file(tmp_path):
    model = tiny_extractor()
    path = tmp_path / "weights.pth"
    torch.save(model.extractor.backbone.state_dict(), path)
    loaded = FeatureExtractor("dinov2_vits14", checkpoint_path=str(path), model_kwargs=TINY_VIT)
    image = torch.rand(2, 3, 56, 56)
    torch.testing.assert_close(loaded.extractor(image)[0], model.extractor(image)[0], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint_path .*missing.pth not found"):
        FeatureExtractor("dinov2_vits14", checkpoint_path=str(tmp_path / "missing.pth"))


def test_resnet_has_no_cls_token():
    with pytest.raises(ValueError, match="no CLS token: use global_pool='gem'"):
        FeatureExtractor("resnet50", pretrained=False, model_kwargs={"layers": [1, 1, 1, 1]})


# ---- predict: feature stores ------------------------------------------------------------------------------------

GND = [
    {"easy": [0, 3], "hard": [5], "junk": [1]},
    {"easy": [2], "hard": [4, 6], "junk": []},
    {"easy": [7], "hard": [], "junk": [0]},
]


def write_extraction_config(path, output_dir="features/tiny/revisited", extra_trainer="", batch_size=1, num_workers=2):
    path.write_text(
        f"""
model:
  class_path: lightning_modules.FeatureExtractor
  init_args:
    backbone: dinov2_vits14
    pretrained: false
    model_kwargs: {json.dumps(TINY_VIT)}
    num_local: 6
    scales: [1.0, 0.75]
data:
  class_path: datamodules.RevisitedOxfordParis
  init_args:
    root: data/revisited
    distractors: true
    image_size: 56
    multiple_of: 14
    eval_batch_size: {batch_size}
    num_workers: {num_workers}
predictions:
  output_dir: {output_dir}
  neighbours: 5
trainer:
  logger: false
  enable_progress_bar: false
{extra_trainer}"""
    )
    return path


# Database images of three shapes: batches of a longer-side resize are formed by shape.
DATABASE_SIZES = [(64, 48), (48, 64), (64, 64)]


@pytest.fixture(scope="module")
def revisited_layout(tmp_path_factory):
    """The images, shared by the tests of this module (each writes its configs, stores and runs under its own
    names next to them)."""
    root = tmp_path_factory.mktemp("revisited_layout")
    for name in ("roxford5k", "rparis6k"):
        write_revisited(root / "data/revisited", name, num_database=9, gnd=GND, database_sizes=DATABASE_SIZES)
    write_distractors(root / "data/revisited", 6)
    return root


@pytest.fixture(scope="module")
def uninterrupted_stores(revisited_layout):
    """``features/one``: one ``predict`` on one process with batches of 1, never interrupted, run once for the
    module: the reference of the runs that crash, are killed or run on two processes, and the input of the
    end-to-end test."""
    config = write_extraction_config(revisited_layout / "one.yaml", output_dir="features/one")
    run_cli("predict", "--config", str(config), cwd=revisited_layout, env={"HF_HUB_OFFLINE": "1"})
    return revisited_layout / "features/one"


def read_stores(directory) -> dict:
    contents = {}
    for path in sorted(directory.glob("*.h5")):
        with h5py.File(path, "r") as f:
            contents[path.name] = {name: f[name][()] for name in f} | {"config": f.attrs.get("config", "")}
    return contents


def assert_same_stores(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key]), f"{name}: {key} differs"


LISTS = ["roxford5k_query", "roxford5k_database", "rparis6k_query", "rparis6k_database", "revisitop1m"]


FAIL_AT_END = "  callbacks:\n    - class_path: helpers.FailAtPredictEnd\n"


def killed_then_resumed(workdir):
    """``predict`` into ``features/killed`` killed after 20 of the 30 images (SIGKILL: no clean-up), then run
    again: the killed run, the files it left, and the resuming run."""
    killed = write_extraction_config(
        workdir / "killed.yaml",
        output_dir="features/killed",
        extra_trainer="  callbacks:\n    - class_path: helpers.KillAtPredictBatch\n      init_args: {batches: 20}\n",
    )
    killed_run = run_cli("predict", "--config", str(killed), cwd=workdir, env={"HF_HUB_OFFLINE": "1"}, check=False)
    left = sorted(p.name for p in (workdir / "features/killed").iterdir())
    config_resume = write_extraction_config(workdir / "resume.yaml", output_dir="features/killed")
    resumed = run_cli("predict", "--config", str(config_resume), cwd=workdir, env={"HF_HUB_OFFLINE": "1"})
    return killed_run, left, resumed


@pytest.mark.slow
def test_extraction_writes_stores_that_reload_bit_identically_and_resume_after_a_kill(
    revisited_layout, uninterrupted_stores
):
    workdir = revisited_layout
    # The kill and its resume (their own output directory) run meanwhile: these runs are mostly start-up.
    with ThreadPoolExecutor(1) as pool:
        killed_then_resumed_runs = pool.submit(killed_then_resumed, workdir)
        stores = crash_after_the_last_row_then_resume_then_run_again(workdir, uninterrupted_stores)
        killed, partial, resumed = killed_then_resumed_runs.result()

    # Killed after 20 of the 30 images (SIGKILL: no clean-up), then resumed: the same files as uninterrupted.
    assert killed.returncode == -9
    assert "roxford5k_database.h5.partial" in partial and "revisitop1m.h5" not in partial
    assert "resuming extraction: 20 of 30 images already written" in resumed.stdout + resumed.stderr
    assert_same_stores(read_stores(workdir / "features/killed"), stores)


def crash_after_the_last_row_then_resume_then_run_again(workdir, uninterrupted_stores) -> dict:
    """``predict`` into ``features/tiny/revisited`` crashed after the last row, run again, and once more: checked
    after each run; returns the stores."""
    # With loader workers (2): a crash after the last row was written leaves only .partial files ...
    crashed = write_extraction_config(workdir / "crashed.yaml", extra_trainer=FAIL_AT_END)
    result = run_cli("predict", "--config", str(crashed), cwd=workdir, env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode != 0 and "simulated crash after the last predicted batch" in result.stderr
    out = workdir / "features/tiny/revisited"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.h5.partial" for n in LISTS)
    # ... and running the command again, with nothing left to predict, finishes every store.
    config = write_extraction_config(workdir / "extract.yaml")
    result = run_cli("predict", "--config", str(config), cwd=workdir, env={"HF_HUB_OFFLINE": "1"})
    assert "resuming extraction: 30 of 30 images already written" in result.stdout + result.stderr
    assert not list(out.glob("*.partial"))
    printed = result.stdout + result.stderr
    for name in LISTS:  # where it wrote, once
        assert printed.count(f"features/tiny/revisited/{name}.h5 (") == 1
    out = workdir / "features/tiny/revisited"
    stores = read_stores(out)
    assert sorted(stores) == sorted(
        [f"{n}.h5" for n in LISTS] + ["roxford5k+1m_neighbours.h5", "rparis6k+1m_neighbours.h5"]
    )
    # Crashed after the last row and finished by the second run: the same files as a run never interrupted.
    assert_same_stores(stores, read_stores(uninterrupted_stores))
    # Reload: the rows are the module's descriptors of the images, in list order.
    from datamodules import RevisitedOxfordParis

    data = RevisitedOxfordParis(str(workdir / "data/revisited"), distractors=True, image_size=56, multiple_of=14)
    model = tiny_extractor(num_local=6, scales=[1.0, 0.75])
    store = FeatureStore(out / "roxford5k_query.h5")
    assert store.ids == data.lists["roxford5k_query"].paths and store.local_shape == (6, 5 + 48)
    example = data.dataset("roxford5k_query")[2]
    global_descriptor, local = model.extractor(example["image"][None], example["to_original"][None])
    assert np.array_equal(store.global_descriptors()[2], global_descriptor[0].numpy())
    assert np.array_equal(store.local_descriptors([2])[0], local[0].numpy().astype(np.float16))
    # Neighbours: the exact top-5 of each query in database + distractors.
    database = np.concatenate(
        [FeatureStore(out / f"{n}.h5").global_descriptors() for n in ("roxford5k_database", "revisitop1m")]
    )
    scores = store.global_descriptors() @ database.T
    neighbours = stores["roxford5k+1m_neighbours.h5"]
    np.testing.assert_allclose(neighbours["scores"], -np.sort(-scores, axis=1)[:, :5], rtol=1e-6)
    np.testing.assert_allclose(
        np.take_along_axis(scores, neighbours["indices"], axis=1), neighbours["scores"], rtol=1e-6
    )

    # Running again finds everything written and changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if "neighbours" not in p.name}
    result = run_cli("predict", "--config", str(config), cwd=workdir, env={"HF_HUB_OFFLINE": "1"})
    assert "already written" in result.stdout + result.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if "neighbours" not in p.name}
    return stores


@pytest.mark.slow
def test_one_and_two_processes_write_identical_stores(revisited_layout, uninterrupted_stores):
    """One process with batches of 1 (``uninterrupted_stores``); two processes with batches of 4 formed by image
    shape (any order within a process's block), crashed after the last batch and resumed: the same stores, the
    two-process ones joining the shards without copying them."""
    workdir = revisited_layout
    ddp = "  accelerator: cpu\n  devices: 2\n  strategy: ddp\n"
    crashed = write_extraction_config(
        workdir / "crash2.yaml", output_dir="features/two", batch_size=4, extra_trainer=ddp + FAIL_AT_END
    )
    two = write_extraction_config(workdir / "two.yaml", output_dir="features/two", batch_size=4, extra_trainer=ddp)
    result = run_cli("predict", "--config", str(crashed), cwd=workdir, env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode != 0 and not list((workdir / "features/two").glob("*.h5"))
    result = run_cli("predict", "--config", str(two), cwd=workdir, env={"HF_HUB_OFFLINE": "1"})
    assert "resuming extraction: 30 of 30 images already written" in result.stdout + result.stderr
    assert_same_stores(read_stores(uninterrupted_stores), read_stores(workdir / "features/two"))
    joined = FeatureStore(workdir / "features/two/roxford5k_database.h5")
    assert [p.name for p in joined.sources] == [f"roxford5k_database.rank{r}of2.h5" for r in range(2)]
    single = FeatureStore(uninterrupted_stores / "roxford5k_database.h5")
    assert np.array_equal(joined.global_descriptors(), single.global_descriptors())
    assert np.array_equal(joined.local_descriptors([8, 0, 4]), single.local_descriptors([8, 0, 4]))


@pytest.mark.slow
def test_end_to_end_images_to_extraction_to_aesvc_to_revisited_map(revisited_layout, uninterrupted_stores, monkeypatch):
    workdir = revisited_layout  # the images were extracted by the command line into uninterrupted_stores
    (workdir / "aesvc.yaml").write_text(
        """
seed_everything: 0
model:
  class_path: lightning_modules.AESVC
  init_args: {latent_dim: 4, hidden_dims: [32]}
data:
  class_path: datamodules.RevisitedOxfordParis
  init_args:
    root: data/revisited
    features: features/one
    train_on: revisitop1m
    batch_size: 6
trainer:
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  default_root_dir: runs/aesvc
"""
    )
    monkeypatch.chdir(workdir)  # fit and test in this process (the extraction ran as its own command)
    cli_main(["fit", "--config", "aesvc.yaml"])
    monkeypatch.delenv("RETRIEVAL_RUN_DIR", raising=False)
    # Revisited has no validation data (nothing is selected on its test split): score the last checkpoint.
    cli_main(["test", "--config", "aesvc.yaml", "--ckpt_path", "runs/aesvc/version_0/checkpoints/last.ckpt"])
    monkeypatch.delenv("RETRIEVAL_RUN_DIR", raising=False)
    metrics = json.loads((workdir / "runs/aesvc/version_0/metrics.json").read_text())
    for name in ("roxford5k", "rparis6k"):
        for setup in ("easy", "medium", "hard"):
            assert 0.0 < metrics[f"test/{name}/{setup}/mAP"] <= 1.0
    expected_rop = np.mean(
        [metrics[f"test/{n}/{s}/mAP"] for n in ("roxford5k", "rparis6k") for s in ("medium", "hard")]
    )
    assert metrics["test/rop/mAP"] == pytest.approx(expected_rop)
    assert math.isfinite(metrics["test/rop/mAP"]) and os.path.isfile(
        workdir / "runs/aesvc/version_0/checkpoints/last.ckpt"
    )


def test_offline_without_weights_gives_a_one_line_error(tmp_path):
    result = run_cli(
        "predict",
        "--config",
        str(write_extraction_config(tmp_path / "x.yaml")),
        "--model.init_args.pretrained=true",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        check=False,
    )
    assert result.returncode != 0
    assert "cannot load pretrained weights of vit_small_patch14_dinov2.lvd142m (HF_HUB_OFFLINE is set)" in result.stderr
    assert "model.init_args.checkpoint_path" in result.stderr


# ---- batches of images of the same shape (longer-side resize) ---------------------------------------------------


def test_longer_side_batches_by_shape_give_the_descriptors_of_batch_one(tmp_path):
    from datamodules import RevisitedOxfordParis

    write_revisited(tmp_path / "revisited", "roxford5k", num_database=9, gnd=GND, database_sizes=DATABASE_SIZES)
    write_revisited(tmp_path / "revisited", "rparis6k", num_database=9, gnd=GND)
    data = RevisitedOxfordParis(str(tmp_path / "revisited"), image_size=56, multiple_of=14, eval_batch_size=2)
    database, queries = data.dataset("roxford5k_database"), data.dataset("roxford5k_query")
    # Shapes predicted from the headers (and, for queries, the crop boxes) are those of the decoded images.
    for dataset in (database, queries):
        predicted = dataset.resized_shapes(range(len(dataset)))
        assert predicted == [tuple(dataset[i]["image"].shape[1:]) for i in range(len(dataset))]
    assert sorted(set(database.resized_shapes(range(9)))) == [(42, 56), (56, 42), (56, 56)]

    block = [7, 1, 3, 0, 4, 6, 2, 8]  # any order, e.g. what a resumed process has left
    loader = data.sharded_dataloader(database, block)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[7, 1], [4], [3, 0], [6], [2, 8]]
    model = tiny_extractor(num_local=6)
    for batch in batches:
        global_batch, local_batch = model.extractor(batch["image"], batch["to_original"])
        for row, index in enumerate(batch["index"].tolist()):
            example = database[index]
            global_one, local_one = model.extractor(example["image"][None], example["to_original"][None])
            torch.testing.assert_close(global_batch[row], global_one[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(local_batch[row], local_one[0], rtol=0, atol=1e-5)


# ---- the shipped extraction configs, as written --------------------------------------------------------------------

SHIPPED = sorted((REPO / "configs/extract").glob("*.yaml"))
DATASET_ROOTS = {name: name for name in ("sop", "pitts30k", "gldv2", "revisited")} | {"revisited1m": "revisited"}


def tiny_backbone_overrides(config_path) -> list[str]:
    """Only the backbone's size (random weights) and the image size: four patches / cells a side, at which the
    generated Revisited database images get three different shapes."""
    import yaml

    config = yaml.safe_load(config_path.read_text())
    size = 4 * config["data"]["init_args"]["multiple_of"]
    if config["model"]["init_args"]["backbone"].startswith("resnet"):
        model_kwargs = {"layers": [1, 1, 1, 1]}
    else:
        model_kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": size}
    return [
        "--model.init_args.pretrained=false",
        f"--model.init_args.model_kwargs={json.dumps(model_kwargs)}",
        f"--data.init_args.image_size={size}",
    ]


@pytest.fixture(scope="module")
def dataset_layouts(tmp_path_factory):
    """Each benchmark in its published layout, a few images each; enough GLDv2 landmarks with the shipped
    selection (11 images or more)."""
    root = tmp_path_factory.mktemp("layouts")
    write_sop(root / "sop", train_classes=4, test_classes=2, per_class=2)
    utm = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    for split in ("train", "val", "test"):
        write_pittsburgh_mat(root / "pitts30k", split, utm, utm[:2] + 1.0)
    write_gldv2(root / "gldv2", {1: 11, 2: 11}, [("Public", [0]), ("Private", [1])], num_index=3)
    for name in ("roxford5k", "rparis6k"):
        write_revisited(root / "revisited", name, num_database=8, gnd=GND, database_sizes=DATABASE_SIZES)
    write_distractors(root / "revisited", 3)
    return root


def shipped_cli(config_path, layouts, output_dir, run: bool, extra=()):
    from lightning_modules.cli import RetrievalCLI

    dataset = config_path.stem.rsplit("_", 1)[1]
    args = [
        *(["predict"] if run else []),  # built without running: no subcommand
        "--config",
        str(config_path),
        *tiny_backbone_overrides(config_path),
        f"--data.init_args.root={layouts / DATASET_ROOTS[dataset]}",
        f"--predictions.output_dir={output_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    return RetrievalCLI(args=args, run=run)


@pytest.mark.parametrize("config_path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_extraction_config_extracts_a_batch(config_path, dataset_layouts, tmp_path, monkeypatch):
    """Each config as written (workers, batch sizes, resizing, pooling, locals, precision): built by the
    command line, one batch of its first predicted list through its model (workers: see the end-to-end test)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load(config_path.read_text())
    cli = shipped_cli(config_path, dataset_layouts, tmp_path / "features", run=False)
    data, model = cli.datamodule, cli.model
    assert (data.num_workers, data.batch_size, data.eval_batch_size) == tuple(
        shipped["data"]["init_args"][k] for k in ("num_workers", "batch_size", "eval_batch_size")
    )
    assert cli.trainer.precision == shipped["trainer"]["precision"].split()[0]
    data.setup("predict")
    loader = data.predict_dataloader()[0]
    indices = next(iter(loader.batch_sampler))
    batch = loader.collate_fn([loader.dataset[i] for i in indices])
    outputs = model.predict_step(batch, 0)
    embeddings = outputs["embeddings"]
    assert embeddings.shape == (len(indices), model.retrieval_dim)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(indices)))
    num_local = shipped["model"]["init_args"]["num_local"]
    assert ("local" in outputs) == (num_local > 0)
    if num_local:
        assert outputs["local"].shape == (len(indices), num_local, 5 + model.retrieval_dim)


END_TO_END = [
    "dinov2_vits14_sop",
    "resnet50_pitts30k",
    "clip_vitb16_gldv2",
    "dinov2_vitb14_reg_revisited",
    "vit_b16_revisited1m",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", END_TO_END)
def test_shipped_extraction_config_runs_end_to_end(name, dataset_layouts, tmp_path, monkeypatch):
    """One config per dataset, whole ``predict`` with the shipped loader workers (8) and batch sizes."""
    monkeypatch.chdir(tmp_path)
    config_path = REPO / "configs/extract" / f"{name}.yaml"
    cli = shipped_cli(config_path, dataset_layouts, tmp_path / "features", run=True)
    lists = cli.datamodule.predict_list_names()
    stores = sorted(p.name for p in (tmp_path / "features").glob("*.h5") if "neighbours" not in p.name)
    assert stores == sorted(f"{n}.h5" for n in lists)
    for list_name in lists:
        store = FeatureStore(tmp_path / "features" / f"{list_name}.h5")
        assert store.ids == cli.datamodule.lists[list_name].paths
        assert store.has_local == (cli.model.hparams.num_local > 0)


def test_a_predict_that_leaves_rows_unwritten_fails_naming_the_store(dataset_layouts, tmp_path, monkeypatch):
    """Exit status 0 must mean complete stores: a run that stops early (here: half the batches of each list) is an error."""
    from retrieval.feature_store import FeatureStoreError

    monkeypatch.chdir(tmp_path)
    config_path = REPO / "configs/extract/dinov2_vits14_revisited.yaml"
    extra = ["--trainer.limit_predict_batches=0.5", "--data.init_args.num_workers=0"]
    extra += ["--data.init_args.predict_lists=[roxford5k_database]"]  # three shapes: three batches
    with pytest.raises(FeatureStoreError, match=r"roxford5k_database.h5.partial: 5 of 8 rows were never written"):
        shipped_cli(config_path, dataset_layouts, tmp_path / "features", run=True, extra=extra)
    assert not (tmp_path / "features/roxford5k_database.h5").exists()

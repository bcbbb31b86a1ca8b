"""The command line as a user runs it: configs, run directories, 1 vs 2 processes, crash and resume."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL_BENCHMARK, run_cli

from lightning_modules.cli import RetrievalCLI
from retrieval.feature_store import FeatureStore
from retrieval.run_results import read_run

CONFIGS = REPO / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("data", "logger"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metrics_of(run_directory: Path) -> dict:
    return read_run(run_directory)[1]  # the numbers, without the method's name


# ---- parsing (in process, fast) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_print_config_works_for_every_shipped_config(config, capsys):
    subcommand = "predict" if config.parent.name == "extract" else "fit"
    with pytest.raises(SystemExit) as exit_info:
        RetrievalCLI(args=[subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    assert "${" not in json.dumps(printed), "interpolations must be resolved"


def test_extraction_configs_are_those_the_generator_writes():
    spec = importlib.util.spec_from_file_location("generate", CONFIGS / "extract/generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    expected = generate.expected_files()
    assert sorted(expected) == sorted((CONFIGS / "extract").glob("*.yaml"))
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.name} differs: run python configs/extract/generate.py"


def test_interpolation_within_a_config_file(tmp_path, capsys):
    text = (CONFIGS / "aesvc/embedded.yaml").read_text().replace("../", f"{CONFIGS}/")
    config = tmp_path / "interpolated.yaml"
    config.write_text(text.replace("max_epochs: 15", "max_epochs: ${model.init_args.latent_dim}"))
    with pytest.raises(SystemExit):
        RetrievalCLI(args=["fit", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == printed["model"]["init_args"]["latent_dim"] == 64


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        RetrievalCLI(args=["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--model.init_args.latnt_dim=32"])
    assert exit_info.value.code != 0
    assert "latnt_dim" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        RetrievalCLI(args=["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "max_epoch" in capsys.readouterr().err


# ---- end to end (subprocesses, as a user runs them) --------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart (2 epochs, small benchmark), run twice in the same directory."""
    workdir = tmp_path_factory.mktemp("quickstart")
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_BENCHMARK, "--trainer.max_epochs=2", *QUIET]
    args += ["--model.init_args.latent_dim=32"]  # the baselines follow the method's size
    first = run_cli(*args, cwd=workdir)
    second = run_cli(*args, cwd=workdir)
    return workdir, first, second


@pytest.mark.slow
def test_quickstart_prints_the_four_row_comparison(quickstart):
    workdir, first, _ = quickstart
    run = workdir / "runs/quickstart/version_0"
    rows = json.loads((run / "comparison.json").read_text())
    assert [(r["method"], r["dim"]) for r in rows] == [("raw", 384), ("PCA", 32), ("PCA-whitening", 32), ("AE-SVC", 32)]
    for row in rows:
        assert 0 <= row["embedded/recall@1"] <= row["embedded/recall@10"] <= 1
        assert row["method"] in first.stdout
    # The trained method's row is the same evaluation as its logged validation metrics.
    assert rows[-1]["embedded/recall@1"] == metrics_of(run)["val/embedded/recall@1"]
    # Whitening equalises the variance of the directions: random pairs' cosine variance falls towards 1/32.
    by_method = {r["method"]: r for r in rows}
    assert by_method["PCA-whitening"]["embedded/cos_var"] < by_method["PCA"]["embedded/cos_var"]


@pytest.mark.slow
def test_second_run_in_the_same_directory_gets_its_own_run_directory(quickstart):
    workdir, first, second = quickstart
    for version in ("version_0", "version_1"):
        run = workdir / "runs/quickstart" / version
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["seed_everything"] == 0
        assert config["model"]["init_args"]["latent_dim"] == 32
        info = json.loads((run / "run.json").read_text())
        assert info["seed"] == 0 and len(info["wandb_id"]) == 8
        assert (run / "checkpoints/last.ckpt").is_file()
    assert metrics_of(workdir / "runs/quickstart/version_0") == metrics_of(workdir / "runs/quickstart/version_1")


@pytest.mark.slow
def test_baseline_alone_equals_its_comparison_row_then_test_and_predict_write_into_its_run(quickstart, tmp_path):
    workdir, _, _ = quickstart
    config = str(CONFIGS / "pca_whitening/embedded.yaml")
    # W&B is left to decide: no credentials here, so it must log offline (and not block).
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(tmp_path)}
    run_cli("fit", "--config", config, *SMALL_BENCHMARK, *QUIET, "--model.init_args.dim=32", cwd=workdir, env=env)
    run = workdir / "runs/pcaprojection/embedded/version_0"
    rows = json.loads((workdir / "runs/quickstart/version_0/comparison.json").read_text())
    row = next(r for r in rows if r["method"] == "PCA-whitening")
    assert metrics_of(run)["val/embedded/recall@1"] == row["embedded/recall@1"]
    assert metrics_of(run)["val/embedded/mAP@100"] == row["embedded/mAP@100"]
    assert list((run / "wandb").glob("offline-run-*")), "W&B should have logged offline into the run directory"

    checkpoint = str(run / "checkpoints/last.ckpt")
    training_config = (run / "config.yaml").read_text()
    run_cli("test", "--config", config, *SMALL_BENCHMARK, *QUIET, "--ckpt_path", checkpoint, cwd=workdir)
    assert {"val/embedded/recall@1", "test/embedded/recall@1"} <= metrics_of(run).keys()
    assert (run / "config.yaml").read_text() == training_config, "the training config must not be replaced"
    assert "ckpt_path" in (run / "config.test.yaml").read_text()
    run_cli("predict", "--config", config, *SMALL_BENCHMARK, *QUIET, "--ckpt_path", checkpoint, cwd=workdir)
    store = FeatureStore(run / "embeddings/test_database.h5")
    assert store.num_images == 40 * 20 and store.global_dim == 32
    assert store.ids[0] == "test_database/000000" and store.labels is not None


@pytest.mark.slow
def test_one_and_two_ddp_processes_log_identical_metrics(tmp_path):
    # float64, so the only difference between the runs (the order of floating-point sums) cannot flip a ranking
    args = ["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), *SMALL_BENCHMARK, *QUIET]
    args += ["--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.precision=64-true"]
    run_cli(*args, "--trainer.devices=1", "--trainer.default_root_dir=runs/one", cwd=tmp_path)
    run_cli(*args, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.default_root_dir=runs/two", cwd=tmp_path)
    one, two = metrics_of(tmp_path / "runs/one/version_0"), metrics_of(tmp_path / "runs/two/version_0")
    metrics = {"recall@1", "recall@10", "mAP@100"}
    sizes = {f"{m}@d{size}" for m in metrics for size in (8, 16, 32, 64)}  # AE-SVC is also scored truncated
    assert one.keys() == {f"val/embedded/{name}" for name in metrics | sizes}
    assert one == two


@pytest.mark.slow
def test_closed_form_baseline_sums_its_statistics_over_ddp_processes(tmp_path):
    args = ["fit", "--config", str(CONFIGS / "pca_whitening/embedded.yaml"), *SMALL_BENCHMARK, *QUIET]
    args += ["--trainer.accelerator=cpu", "--trainer.strategy=ddp"]
    run_cli(*args, "--trainer.devices=1", "--trainer.default_root_dir=runs/one", cwd=tmp_path)
    run_cli(*args, "--trainer.devices=2", "--trainer.default_root_dir=runs/two", cwd=tmp_path)
    assert metrics_of(tmp_path / "runs/one/version_0") == metrics_of(tmp_path / "runs/two/version_0")


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_final_metrics(tmp_path):
    # 10 steps per epoch; checkpoints every 4 steps; killed at step 14, i.e. mid-epoch 1, 2 steps after step 12.
    args = ["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), *SMALL_BENCHMARK, *QUIET]
    args += ["--trainer.max_epochs=3", "--checkpoint.every_n_train_steps=4"]
    run_cli(*args, "--trainer.default_root_dir=runs/uninterrupted", cwd=tmp_path)
    kill = tmp_path / "kill.yaml"
    kill.write_text("trainer:\n  callbacks:\n    - class_path: helpers.KillAtStep\n      init_args: {step: 14}\n")
    killed = run_cli(*args, "--config", str(kill), "--trainer.default_root_dir=runs/crashed", cwd=tmp_path, check=False)
    assert killed.returncode == -9
    crashed = tmp_path / "runs/crashed/version_0"
    assert not (crashed / "metrics.json").exists()
    resumed = run_cli(*args, "--trainer.default_root_dir=runs/crashed", "--ckpt_path", "last", cwd=tmp_path)
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "runs/crashed/version_1").exists(), "the resumed run continues in its own directory"
    assert metrics_of(crashed) == metrics_of(tmp_path / "runs/uninterrupted/version_0")
    assert len(json.loads((crashed / "run.json").read_text())["commands"]) == 2


@pytest.mark.slow
def test_resume_without_any_checkpoint_says_where_it_looked(tmp_path):
    result = run_cli("fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--ckpt_path", "last", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "--ckpt_path last: no run under runs/aesvc/embedded has checkpoints/last.ckpt" in result.stderr

"""The command line as a user runs it: configs, run directories, checkpoints and their metrics, 1 vs 2
processes, crash and resume, errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMALL_BENCHMARK, run_cli

from lightning_modules.cli import RetrievalCLI, main, raised_on_purpose
from reporting.run_results import read_run
from retrieval.feature_store import FeatureStore

CONFIGS = REPO / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("data", "logger", "trainer"))
TRAINER_SNIPPETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metrics_of(run_directory: Path, stage: str = "val", checkpoint: str = "best") -> dict:
    return read_run(run_directory, stage, checkpoint).metrics


def evaluations_of(run_directory: Path) -> list[dict]:
    """Every evaluation recorded in the run's metrics.json, without the time it was made."""
    record = json.loads((run_directory / "metrics.json").read_text())
    return [{k: v for k, v in entry.items() if k != "time"} for entry in record["evaluations"]]


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


@pytest.mark.parametrize("snippet", TRAINER_SNIPPETS, ids=lambda p: p.name)
def test_trainer_snippets_add_to_a_method_config(snippet, capsys):
    """``--trainer configs/trainer/<x>.yaml`` sets its keys and keeps the method config's other trainer settings."""
    with pytest.raises(SystemExit) as exit_info:
        RetrievalCLI(
            args=["fit", "--config", str(CONFIGS / "aesvc/sop.yaml"), "--trainer", str(snippet), "--print_config"]
        )
    assert exit_info.value.code in (None, 0)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    for key, value in yaml.safe_load(snippet.read_text()).items():
        assert trainer[key] == value, key
    method = yaml.safe_load((CONFIGS / "aesvc/sop.yaml").read_text())["trainer"]
    assert trainer["max_epochs"] == method["max_epochs"] and trainer["logger"]["class_path"].endswith("WandbLogger")


def test_a_whole_number_of_batches_is_a_count_and_a_fraction_a_fraction(tmp_path, capsys):
    """Lightning reads limit_*_batches=1 (an int) as one batch and 1.0 as the whole epoch: "1" must stay an int,
    from the command line and from a config file alike."""
    snippet = tmp_path / "limits.yaml"
    snippet.write_text("limit_val_batches: 1\n")
    args = ["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--trainer", str(snippet)]
    args += ["--trainer.limit_train_batches=1", "--trainer.limit_test_batches=0.5", "--print_config"]
    with pytest.raises(SystemExit):
        RetrievalCLI(args=args)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    limits = [trainer[f"limit_{stage}_batches"] for stage in ("train", "val", "test")]
    assert limits == [1, 1, 0.5] and [type(limit) for limit in limits] == [int, int, float]


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


def test_unknown_config_key_is_rejected_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--model.init_args.latnt_dim=32"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Option 'latnt_dim' is not accepted" in error and "usage:" not in error
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--config", str(bad)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "error: Subcommand 'fit' does not accept option 'trainer.max_epoch' (see --help)\n"
    )


# ---- end to end (subprocesses, as a user runs them) --------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart (2 epochs, small benchmark), run twice in the same directory: first in a new interpreter, as
    the README's first command, then as every other test's runs are, forked from a process that has imported
    torch and Lightning (conftest.run_cli); their equal metrics check that shortcut too."""
    workdir = tmp_path_factory.mktemp("quickstart")
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_BENCHMARK, "--trainer.max_epochs=2", *QUIET]
    args += ["--model.init_args.latent_dim=32"]  # the baselines follow the method's size
    first = run_cli(*args, cwd=workdir, fresh=True)
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
    # The trained method's row is the same evaluation as the validation at the end of its training.
    assert rows[-1]["embedded/recall@1"] == metrics_of(run, checkpoint="last")["val/embedded/recall@1"]
    assert "AE-SVC at the end of training, step 20" in first.stdout
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
    assert "val/embedded/recall@1" in metrics_of(run) and "test/embedded/recall@1" in metrics_of(run, "test")
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
    metrics = {"recall@1", "recall@10", "mAP@4", "mAP@100"}
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
    assert evaluations_of(crashed) == evaluations_of(tmp_path / "runs/uninterrupted/version_0")
    assert len(json.loads((crashed / "run.json").read_text())["commands"]) == 2


@pytest.mark.slow
def test_resume_without_any_checkpoint_says_where_it_looked(tmp_path):
    result = run_cli(
        "fit", "--config", str(CONFIGS / "aesvc/embedded.yaml"), "--ckpt_path", "last", cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    assert "--ckpt_path last: no run under runs/aesvc/embedded has checkpoints/last.ckpt" in result.stderr


@pytest.mark.slow
def test_each_evaluation_is_kept_with_its_checkpoint_and_test_without_one_uses_the_best(tmp_path):
    args = ["--config", str(CONFIGS / "aesvc/embedded.yaml"), *SMALL_BENCHMARK, *QUIET]
    fit = run_cli("fit", *args, "--trainer.max_epochs=3", cwd=tmp_path)
    run = tmp_path / "runs/aesvc/embedded/version_0"
    best = json.loads((run / "run.json").read_text())["best_checkpoint"]
    assert best.startswith("checkpoints/epoch") and (run / best).is_file()
    import torch

    def step_of(checkpoint: str) -> int:
        return torch.load(run / checkpoint, map_location="cpu", weights_only=True)["global_step"]

    fitted = evaluations_of(run)
    best_entry = next(e for e in fitted if "best" in e["roles"])
    last_entry = next(e for e in fitted if "last" in e["roles"])
    assert best_entry["checkpoint"] == best and best_entry["step"] == step_of(best)
    # last.ckpt holds the end of training (10 steps per epoch), even when the best came earlier
    assert last_entry["step"] == step_of("checkpoints/last.ckpt") == 30 == max(e["step"] for e in fitted)
    # the best is the best on the monitor among the validations of the fit
    monitor = "val/embedded/mAP@100"
    assert best_entry["metrics"][monitor] == max(e["metrics"][monitor] for e in fitted)
    assert f"val metrics of the best{' and last' if best_entry is last_entry else ''} checkpoint {best}" in fit.stdout

    validated = run_cli("validate", *args, cwd=tmp_path)  # no --ckpt_path: the best of the newest finished run
    assert (
        f"using the best checkpoint of the newest finished run under runs/aesvc/embedded: {run / best}".replace(
            str(tmp_path) + "/", ""
        )
        in validated.stdout
    )
    run_cli("validate", *args, "--ckpt_path", str(run / "checkpoints/last.ckpt"), cwd=tmp_path)
    run_cli("test", *args, cwd=tmp_path)
    evaluations = evaluations_of(run)
    again = next(e for e in evaluations if e["subcommand"] == "validate" and "best" in e["roles"])
    assert again["checkpoint"] == best and again["metrics"] == best_entry["metrics"]  # same weights, same numbers
    of_last = next(e for e in evaluations if e["subcommand"] == "validate" and e["roles"] == ["last"])
    assert of_last["checkpoint"] == "checkpoints/last.ckpt" and of_last["metrics"] == last_entry["metrics"]
    tested = next(e for e in evaluations if e["stage"] == "test")
    assert tested["checkpoint"] == best and tested["roles"][0] == "best"
    # the headline (and so `compare`) stays the best checkpoint's whatever was evaluated last
    record = json.loads((run / "metrics.json").read_text())
    assert record[monitor] == best_entry["metrics"][monitor] and best in record["headline"]["val"]
    assert not (tmp_path / "runs/aesvc/embedded/version_1").exists()


# ---- errors ----------------------------------------------------------------------------------------------------


def test_errors_raised_on_purpose_are_told_from_bugs():
    def raised(error_type, message, where):
        try:
            exec(compile(f"raise {error_type}({message!r})", where, "exec"))
        except Exception as error:
            return error

    assert raised_on_purpose(raised("ValueError", "bad store", str(REPO / "retrieval/feature_store.py")))
    assert raised_on_purpose(raised("FileNotFoundError", "no list", str(REPO / "datamodules/sop.py")))
    assert not raised_on_purpose(raised("ValueError", "shapes", "/usr/lib/python3/site-packages/numpy/core.py"))
    assert not raised_on_purpose(raised("KeyError", "x", str(REPO / "retrieval/feature_store.py")))


def test_a_missing_config_file_or_bad_key_is_one_line_without_the_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "missing.yaml" in error and "usage:" not in error
    assert len(error.strip().splitlines()) == 1


@pytest.mark.slow
def test_deliberate_errors_print_one_line_and_leave_no_run_behind(tmp_path):
    # a missing dataset root, with W&B logging offline: no traceback, no version directory, no run to sync
    sop = ["fit", "--config", str(CONFIGS / "aesvc/sop.yaml"), *QUIET, "--data.init_args.root=nowhere"]
    result = run_cli(*sop, cwd=tmp_path, check=False, env={"WANDB_MODE": "offline"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: Stanford Online Products: nowhere/Ebay_train.txt not found" in result.stderr
    assert not list((tmp_path / "runs").rglob("version_*")) and not list(tmp_path.rglob("*run-*"))
    verbose = run_cli(*sop, cwd=tmp_path, check=False, env={"RETRIEVAL_TRACEBACK": "1"})
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr

    # an unknown key: the message, not a usage dump
    embedded = ["fit", "--config", str(CONFIGS / "aesvc/embedded.yaml")]
    result = run_cli(*embedded, "--trainer.max_epochz=3", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "usage:" not in result.stderr
    # exactly one line: not even a warning of LightningCLI's about how the command line reached it
    assert result.stderr.splitlines() == ["error: unrecognized arguments: --trainer.max_epochz=3 (see --help)"]

    # a truncated checkpoint is named
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "model.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "model.ckpt").read_bytes()[:2000])
    test = ["test", "--config", str(CONFIGS / "aesvc/embedded.yaml"), *QUIET, "--ckpt_path", "truncated.ckpt"]
    result = run_cli(*test, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: --ckpt_path truncated.ckpt is not a readable checkpoint (truncated" in result.stderr
    assert not list((tmp_path / "runs").rglob("version_*"))


def test_help_lists_compare(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "compare RUN [RUN ...]" in capsys.readouterr().out

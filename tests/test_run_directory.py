"""Run directories and the W&B mode choice."""

import json
import os

import pytest

from lightning_modules import loggers, run_directory
from lightning_modules.run_directory import (
    RUN_DIR_ENV,
    RunInfo,
    choose_run_directory,
    export_run_directory,
    newest_resumable_run,
    next_version,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in (RUN_DIR_ENV, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(run_directory, "_exported", None)


def test_each_run_gets_the_next_version(tmp_path):
    assert next_version(tmp_path).name == "version_0"
    (tmp_path / "version_7").mkdir()
    (tmp_path / "notes").mkdir()
    assert next_version(tmp_path).name == "version_8"


def test_last_resolves_to_the_newest_run_with_a_last_checkpoint(tmp_path):
    for version, mtime in (("version_0", 100), ("version_1", 300), ("version_2", None)):
        (tmp_path / version / "checkpoints").mkdir(parents=True)
        if mtime:
            last = tmp_path / version / "checkpoints/last.ckpt"
            last.write_bytes(b"")
            os.utime(last, (mtime, mtime))
    assert newest_resumable_run(tmp_path) == tmp_path / "version_1"
    directory, checkpoint = choose_run_directory(tmp_path, "fit", "last")
    assert directory == tmp_path / "version_1" and checkpoint == str(tmp_path / "version_1/checkpoints/last.ckpt")


def test_a_checkpoint_inside_a_run_directory_reuses_that_run(tmp_path):
    run = tmp_path / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    RunInfo(directory=str(run), wandb_id="abcd1234").save()
    checkpoint = str(run / "checkpoints/epoch001.ckpt")
    assert choose_run_directory(tmp_path, "test", checkpoint) == (run, checkpoint)
    # A checkpoint from elsewhere starts a new run.
    assert choose_run_directory(tmp_path, "test", "/elsewhere/model.ckpt")[0] == tmp_path / "version_4"


def test_processes_launched_by_the_run_inherit_its_directory(tmp_path, monkeypatch):
    export_run_directory(tmp_path / "version_0")
    # The exporting process itself starts a new version on its next run ...
    assert choose_run_directory(tmp_path, "fit", None)[0] == tmp_path / "version_0"
    assert choose_run_directory(tmp_path, "fit", None)[0] == tmp_path / "version_1"
    # ... while a process that inherited the variable (a DDP child) uses it.
    monkeypatch.setattr(run_directory, "_exported", None)
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "version_0"))
    assert choose_run_directory(tmp_path, "fit", None)[0] == tmp_path / "version_0"


def test_processes_started_together_share_a_job_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4242")
    assert choose_run_directory(tmp_path, "fit", None)[0] == tmp_path / "job_4242"


def test_run_info_records_every_invocation(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py", "fit", "--config", "c.yaml"])
    run_directory.prepare_run(tmp_path, seed=7)
    first = json.loads((tmp_path / "run.json").read_text())
    run_directory.prepare_run(tmp_path, seed=7)
    second = json.loads((tmp_path / "run.json").read_text())
    assert first["wandb_id"] == second["wandb_id"] and second["seed"] == 7
    assert len(second["commands"]) == 2 and second["commands"][0].endswith("python -m lightning_modules.cli fit --config c.yaml")


def test_wandb_mode_follows_the_environment_credentials_and_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.choose_wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert loggers.choose_wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert loggers.choose_wandb_mode() == "offline"  # no credentials
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1")  # nothing listens on 443 here
    assert loggers.choose_wandb_mode() == "offline"
    monkeypatch.setattr(loggers, "_reachable", lambda host, port: True)
    assert loggers.choose_wandb_mode() == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_BASE_URL")
    assert loggers.choose_wandb_mode() == "online"  # credentials from `wandb login`


def test_torchrun_without_a_unique_id_is_refused_rather_than_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun without --rdzv-id"):
        choose_run_directory(tmp_path, "fit", None)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process can take the next version safely
    assert choose_run_directory(tmp_path, "fit", None)[0] == tmp_path / "version_0"


def test_only_global_rank_zero_writes_run_json(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    run_directory.prepare_run(tmp_path, seed=1)
    assert not (tmp_path / "run.json").exists()

"""Run directories, best checkpoints and the W&B mode choice."""

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from lightning_modules import loggers, run_directory
from lightning_modules.run_directory import (
    RUN_DIR_ENV,
    RunInfo,
    best_checkpoint,
    choose_run_directory,
    export_run_directory,
    newest_finished_run,
    newest_resumable_run,
    next_version,
    record_fit_result,
    record_input,
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
    assert len(second["commands"]) == 2 and second["commands"][0].endswith(
        "python -m lightning_modules.cli fit --config c.yaml"
    )


def finished_run(directory, finished: str | None, best="checkpoints/epoch003-step000040.ckpt"):
    """A run directory with a last and a best checkpoint; ``finished=None``: a run still training."""
    (directory / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", best.split("/")[-1]):
        (directory / "checkpoints" / name).write_bytes(b"weights")
    RunInfo(
        directory=str(directory), wandb_id="abcd1234", best_checkpoint=best if finished else None, finished=finished
    ).save()
    return directory / best


def test_evaluating_without_a_checkpoint_uses_the_best_of_the_newest_finished_run(tmp_path, monkeypatch, capsys):
    finished_run(tmp_path / "version_0", "2026-01-01T10:00:00")
    best = finished_run(tmp_path / "version_1", "2026-01-02T10:00:00")
    finished_run(tmp_path / "version_2", None)  # newer, still training
    assert newest_finished_run(tmp_path) == tmp_path / "version_1"
    assert choose_run_directory(tmp_path, "test", None) == (tmp_path / "version_1", str(best))
    assert f"using the best checkpoint of the newest finished run under {tmp_path}: {best}" in capsys.readouterr().out
    # fit and predict never pick a checkpoint by themselves
    assert choose_run_directory(tmp_path, "fit", None) == (tmp_path / "version_3", None)
    # a DDP child that inherited the run directory makes the same choice
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "version_1"))
    assert choose_run_directory(tmp_path, "validate", None) == (tmp_path / "version_1", str(best))


def test_evaluating_without_any_finished_run_uses_the_model_as_configured(tmp_path, capsys):
    finished_run(tmp_path / "version_0", None)
    assert choose_run_directory(tmp_path, "validate", None) == (tmp_path / "version_1", None)
    assert f"no finished run under {tmp_path}: evaluating the model as configured" in capsys.readouterr().out


def test_fit_result_and_resolved_inputs_are_recorded_in_run_json(tmp_path, monkeypatch):
    RunInfo(directory=str(tmp_path), wandb_id="abcd1234").save()
    assert best_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/epoch001.ckpt").write_bytes(b"abc")
    record_fit_result(tmp_path, tmp_path / "checkpoints/epoch001.ckpt", "val/x/mAP")
    info = json.loads((tmp_path / "run.json").read_text())
    assert (
        info["best_checkpoint"] == "checkpoints/epoch001.ckpt" and info["monitor"] == "val/x/mAP" and info["finished"]
    )
    assert best_checkpoint(tmp_path) == tmp_path / "checkpoints/epoch001.ckpt"
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    digest = record_input("teacher_checkpoint", tmp_path / "checkpoints/epoch001.ckpt")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # SHA-256 of b"abc"
    assert digest == hashlib.sha256(b"abc").hexdigest()
    recorded = RunInfo.load(tmp_path).inputs["teacher_checkpoint"]
    assert recorded == {"path": str((tmp_path / "checkpoints/epoch001.ckpt").resolve()), "sha256": digest}
    # a run.json from a newer version with fields this one does not know still loads
    (tmp_path / "run.json").write_text(json.dumps({**info, "added_later": 1}))
    assert RunInfo.load(tmp_path).best_checkpoint == "checkpoints/epoch001.ckpt"


class FakeProxy:
    """An HTTP proxy on 127.0.0.1 answering CONNECT with ``reply`` (``None``: never answers), that stops by
    itself after ``lifetime`` seconds."""

    def __init__(self, reply: bytes | None, lifetime: float = 5.0):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(lifetime)
        self.port = self.server.getsockname()[1]
        self.requests: list[bytes] = []
        self.reply, self.lifetime = reply, lifetime
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.server:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(self.lifetime)
                try:
                    self.requests.append(connection.recv(1024))
                    if self.reply is None:
                        time.sleep(self.lifetime)  # a proxy that hangs
                    else:
                        connection.sendall(self.reply)
                except OSError:
                    pass


@pytest.fixture
def wandb_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for name in ("WANDB_MODE", "WANDB_BASE_URL", "NO_PROXY", "no_proxy", *loggers._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loggers, "_PROBE_SECONDS", 0.5)
    monkeypatch.setattr(loggers, "_reachable", lambda host, port: pytest.fail("the proxy must be used"))


def test_wandb_behind_a_proxy_goes_online_only_when_the_proxy_connects_to_wandb(wandb_credentials, monkeypatch):
    accepting = FakeProxy(b"HTTP/1.1 200 Connection established\r\n\r\n")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{accepting.port}")
    assert loggers.choose_wandb_mode() == "online"
    assert accepting.requests == [b"CONNECT api.wandb.ai:443 HTTP/1.1\r\nHost: api.wandb.ai:443\r\n\r\n"]
    refusing = FakeProxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{refusing.port}")
    assert loggers.choose_wandb_mode() == "offline"
    with socket.socket() as closed:  # a port nothing listens on (the HTTPS_PROXY=http://127.0.0.1:9)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert loggers.choose_wandb_mode() == "offline"


def test_wandb_behind_a_proxy_that_hangs_goes_offline_within_the_probe_bound(wandb_credentials, monkeypatch):
    hanging = FakeProxy(None, lifetime=3.0)
    monkeypatch.setenv("https_proxy", f"127.0.0.1:{hanging.port}")  # scheme-less, as some clusters set it
    started = time.monotonic()
    assert loggers.choose_wandb_mode() == "offline"
    assert time.monotonic() - started < 2.0, "the probe must give up after _PROBE_SECONDS (0.5 s here)"
    assert hanging.requests and hanging.requests[0].startswith(b"CONNECT api.wandb.ai:443 ")


def test_wandb_host_listed_in_no_proxy_is_probed_directly(wandb_credentials, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "localhost,api.wandb.ai")
    monkeypatch.setattr(loggers, "_reachable", lambda host, port: (host, port) == ("api.wandb.ai", 443))
    assert loggers.choose_wandb_mode() == "online"


def test_wandb_mode_follows_the_environment_credentials_and_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in loggers._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
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

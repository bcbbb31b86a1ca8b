import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never talk to W&B; the logger code still runs (in disabled mode).
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("RETRIEVAL_RUN_DIR", None)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A small embedded benchmark so command-line runs take seconds.
SMALL_BENCHMARK = [
    "--data.init_args.spec.train_classes=100",
    "--data.init_args.spec.eval_classes=40",
    "--data.init_args.batch_size=200",
    "--data.init_args.eval_batch_size=150",
]


def run_cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 300):
    """Run ``python -m lightning_modules.cli`` in a subprocess (as a user would) and return the result.

    ``env`` entries are added to the environment; a ``None`` value removes the variable.
    """
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    # WANDB_SERVICE: a W&B service started by an in-process test must not be shared with the subprocess.
    for name, value in {"RETRIEVAL_RUN_DIR": None, "WANDB_SERVICE": None, **(env or {})}.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    result = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(autouse=True)
def no_run_directory_pin(monkeypatch):
    """Every test starts with no run directory pinned. An in-process CLI run exports its directory
    (``RETRIEVAL_RUN_DIR``); left behind by one test, it would pin the next test's in-process runs to it."""
    from lightning_modules import run_directory

    monkeypatch.delenv(run_directory.RUN_DIR_ENV, raising=False)
    monkeypatch.setattr(run_directory, "_exported", None)


@pytest.fixture
def cli_workdir(tmp_path):
    """A working directory where runs and generated data go."""
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_two_processes(worker, *args, timeout: float = 120) -> dict:
    """``{rank: result}`` of ``worker(rank, port, *args, queue)`` run in 2 spawned processes; the worker puts
    ``(rank, result)`` on the queue (numpy arrays: tensors would be shared through a file descriptor of an
    exiting process) within ``timeout`` seconds."""
    import torch.multiprocessing as mp

    context, port = mp.get_context("spawn"), free_port()
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=timeout) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    return results

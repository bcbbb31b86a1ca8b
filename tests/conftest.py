import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
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


CLI_COMMAND = [sys.executable, "-m", "lightning_modules.cli"]


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 300, fresh: bool = False
):
    """Run ``python -m lightning_modules.cli`` in a new process (as a user would) and return the result.

    ``env`` entries are added to the environment; a ``None`` value removes the variable. The process is forked
    from one that has already imported torch and Lightning (tests/cli_fork_server.py), which saves most of a small
    run's time; ``fresh=True`` starts a new interpreter instead.
    """
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    # WANDB_SERVICE: a W&B service started by an in-process test must not be shared with the subprocess.
    for name, value in {"RETRIEVAL_RUN_DIR": None, "WANDB_SERVICE": None, **(env or {})}.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    if fresh:
        command = [*CLI_COMMAND, *args]
        options = dict(capture_output=True, text=True, timeout=timeout)
        result = subprocess.run(command, cwd=cwd, env=environment, **options)
    else:
        result = _fork_server().run(list(args), cwd, environment, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def run_cli_together(*runs: tuple[list[str], dict | None], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Independent command-line runs ``(arguments, environment)``, started at the same time, each with an equal
    share of the cores as its torch threads (more threads than cores spin against each other); each must succeed."""
    from retrieval.search import usable_cpus

    share = {"OMP_NUM_THREADS": str(max(1, usable_cpus() // len(runs)))}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run_cli, *arguments, cwd=cwd, env={**share, **(env or {})}) for arguments, env in runs]
        return [future.result() for future in futures]


class CLIForkServer:
    """The client of tests/cli_fork_server.py: one server per test session, started on first use."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="cli-fork-"))
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
        server = [sys.executable, str(TESTS / "cli_fork_server.py"), str(self.directory / "socket")]
        self.process = subprocess.Popen(server, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the CLI fork server did not start (exit code {self.process.wait()})")

    def run(
        self, args: list[str], cwd: Path, environment: dict, timeout: float, log: Path | None = None
    ) -> subprocess.CompletedProcess:
        """The command's result; with ``log``, its output is appended to that file instead of returned."""
        command = [*CLI_COMMAND, *args]
        if log is not None:
            return subprocess.CompletedProcess(command, self._wait(args, cwd, environment, timeout, log, log), "", "")
        output = {name: tempfile.mkstemp(prefix=name, dir=self.directory)[1] for name in ("stdout", "stderr")}
        try:
            returncode = self._wait(args, cwd, environment, timeout, output["stdout"], output["stderr"])
        except subprocess.TimeoutExpired as timeout_error:
            timeout_error.output, timeout_error.stderr = self._read(output)
            raise
        return subprocess.CompletedProcess(command, returncode, *self._read(output))

    def _wait(self, args: list[str], cwd: Path, environment: dict, timeout: float, stdout, stderr) -> int:
        request = {
            "args": args,
            "cwd": str(cwd),
            "env": environment,
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(self.directory / "socket"))
            connection.sendall(json.dumps(request).encode() + b"\n")
            replies = connection.makefile("rb")
            pid = int(replies.readline())
            try:
                return int(replies.readline())
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)  # with the processes it started
                raise subprocess.TimeoutExpired([*CLI_COMMAND, *args], timeout) from None

    @staticmethod
    def _read(output: dict) -> tuple[str, str]:
        texts = tuple(Path(output[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
        for path in output.values():
            os.remove(path)
        return texts

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)


_server: CLIForkServer | None = None
_server_lock = threading.Lock()  # threads of one test may start runs together


def _fork_server() -> CLIForkServer:
    global _server
    with _server_lock:
        if _server is None:
            _server = CLIForkServer()
    return _server


def run_cli_command(command: list[str], environment: dict, output) -> int:
    """``benchmarks/cli_runs.run_command`` as the tests run it: the same command and environment, in the working
    directory, forked from the pre-imported process; its output appended to the open file ``output``."""
    if command[: len(CLI_COMMAND)] != CLI_COMMAND:
        raise ValueError(f"not a command-line run: {command}")
    output.flush()
    args = command[len(CLI_COMMAND) :]
    return _fork_server().run(args, Path.cwd(), environment, timeout=600, log=Path(output.name)).returncode


def pytest_sessionfinish(session, exitstatus):
    if _server is not None:
        _server.close()


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
    """``{rank: result}`` of ``worker(rank, port, *args, queue)`` run in 2 new processes; the worker puts
    ``(rank, result)`` on the queue (numpy arrays: tensors would be shared through a file descriptor of an
    exiting process) within ``timeout`` seconds.

    The processes are forked from a server that has imported torch and Lightning once per session (a spawned
    process imports them again: seconds each), with this process's environment of the moment, as spawned ones."""
    import torch.multiprocessing as mp

    context, port = mp.get_context("forkserver"), free_port()
    context.set_forkserver_preload(["torch", "lightning.pytorch"])
    queue = context.Queue()
    environment = dict(os.environ)
    processes = [
        context.Process(target=_in_environment, args=(environment, worker, rank, port, *args, queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=timeout) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    return results


def _in_environment(environment: dict, worker, *args) -> None:
    os.environ.clear()
    os.environ.update(environment)
    if "OMP_NUM_THREADS" in environment:  # read by torch when the server imported it
        import torch

        torch.set_num_threads(int(environment["OMP_NUM_THREADS"]))
    worker(*args)

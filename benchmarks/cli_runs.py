"""Running the command line from the benchmark scripts: one subprocess per command, its output appended to a
log, and ``fit`` resumed from its last checkpoint when an earlier attempt was interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.run_directory import LAST_CHECKPOINT, best_checkpoint, newest_finished_run  # noqa: E402
from retrieval.search import usable_cpus  # noqa: E402

_threads_per_run: int | None = None


@contextmanager
def share_cores(runs: int):
    """Within it, commands started ``runs`` at a time each get an equal share of the CPU cores as their torch
    threads (``OMP_NUM_THREADS``, unless set): more threads than cores spin against each other, several times
    slower on a small machine."""
    global _threads_per_run
    _threads_per_run = max(1, usable_cpus() // runs) if runs > 1 else None
    try:
        yield
    finally:
        _threads_per_run = None


def cli(subcommand: str, *args: str, log: Path) -> None:
    """``python -m lightning_modules.cli <subcommand> <args>``, output appended to ``log``; raises on failure."""
    command = [sys.executable, "-m", "lightning_modules.cli", subcommand, *args]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    environment.pop("RETRIEVAL_RUN_DIR", None)  # each command chooses its own run directory
    if _threads_per_run is not None:
        environment.setdefault("OMP_NUM_THREADS", str(_threads_per_run))
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        returncode = run_command(command, environment, output)
    if returncode != 0:
        raise RuntimeError(f"{subcommand} failed ({returncode}); see {log}")


def run_command(command: list[str], environment: dict, output) -> int:
    """Run ``command`` with its standard output and error into the open file ``output``; its exit code."""
    return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=environment).returncode


def fit_once(directory: Path, *args: str, log: Path) -> tuple[Path, Path]:
    """``fit`` with ``--trainer.default_root_dir=directory`` unless a run there finished (an interrupted one
    resumes from its last checkpoint); returns ``(run directory, best checkpoint)``."""
    directory.mkdir(parents=True, exist_ok=True)
    run = newest_finished_run(directory)
    if run is None:
        unfinished = sorted(directory.glob(f"version_*/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
        resume = ["--ckpt_path", "last"] if unfinished else []
        cli("fit", *args, f"--trainer.default_root_dir={directory}", *resume, log=log)
        run = newest_finished_run(directory)
    return run, best_checkpoint(run)


def split_overrides(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """``(the script's own arguments, the options after '--' that go to every command)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]

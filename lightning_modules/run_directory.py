"""Run directories: where one run's config, checkpoints, metrics and W&B files live.

``<trainer.default_root_dir>/version_<N>/`` holds ``config.yaml`` (the fully resolved config, seed
included), ``run.json`` (seed, W&B run id and sweep id, command lines, and once ``fit`` has finished its best checkpoint;
the resolved paths and hashes of inputs such as a teacher checkpoint), ``checkpoints/``, ``metrics.json`` and
``wandb/``. Every new run gets the next version, so a second run with the same config never collides with the
first.

* ``fit --ckpt_path last`` resumes the newest run under the root that has ``checkpoints/last.ckpt``, in its
  own directory and W&B run.
* ``validate`` / ``test`` / ``predict`` with a checkpoint inside a run directory write into that run
  (metrics and W&B run included), so one experiment stays in one place.
* ``validate`` / ``test`` without ``--ckpt_path`` evaluate the best checkpoint of the newest finished run under
  the root (in that run); with no finished run there, the model as configured, in a new run directory.
* A run's best checkpoint is the checkpoint callback's best on its monitor; without a monitor, its newest
  checkpoint (the last).

Processes of one DDP run must agree on the directory. The process that chooses it exports it as
``RETRIEVAL_RUN_DIR``; processes Lightning launches inherit it. Under torchrun or SLURM, where all processes
start at once, the directory is named after the launcher's job id. Setting ``RETRIEVAL_RUN_DIR`` by hand pins
the directory of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import string
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from retrieval.files import write_text_atomic

RUN_DIR_ENV = "RETRIEVAL_RUN_DIR"
RUN_FILE = "run.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
_VERSION = re.compile(r"^version_(\d+)$")
# The value this process exported itself: a later run in the same process must not mistake it for a pin.
_exported: str | None = None


@dataclass
class RunInfo:
    """What ``run.json`` records about a run."""

    directory: str
    wandb_id: str
    seed: int | None = None
    commands: list[str] | None = None
    #: the best checkpoint of the finished ``fit``, relative to the run directory, and what chose it
    best_checkpoint: str | None = None
    monitor: str | None = None
    finished: str | None = None
    #: inputs resolved at run time, e.g. ``{"teacher_checkpoint": {"path": ..., "sha256": ...}}``
    inputs: dict | None = None
    #: the W&B sweep the run belongs to (its id as W&B gives it; ``wandb_id`` is then the id the agent chose)
    wandb_sweep_id: str | None = None

    def save(self) -> None:
        write_text_atomic(Path(self.directory) / RUN_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> RunInfo | None:
        path = Path(directory) / RUN_FILE
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the run's record is damaged") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in content.items() if k in known})


def choose_run_directory(root: str | os.PathLike, subcommand: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """The run directory for this run, and the checkpoint path with ``"last"`` resolved.

    Called by every process; the choice is shared through ``RETRIEVAL_RUN_DIR`` (see the module docstring).
    """
    root = Path(root)
    pinned = os.environ.get(RUN_DIR_ENV)
    evaluating_without_checkpoint = subcommand in ("validate", "test") and not ckpt_path
    if pinned and pinned != _exported:
        directory = Path(pinned)
        if ckpt_path == "last":
            ckpt_path = str(directory / LAST_CHECKPOINT)
        elif evaluating_without_checkpoint:  # the same choice as the process that pinned the directory
            best = best_checkpoint(directory)
            ckpt_path = str(best) if best is not None else None
        return directory, ckpt_path
    if evaluating_without_checkpoint:
        found = newest_finished_run(root)
        if found is not None:
            info = RunInfo.load(found)
            print(
                f"{subcommand}: no --ckpt_path; using the best checkpoint of the newest finished run under {root}: "
                f"{best_checkpoint(found)} (monitor: {info.monitor or 'none, so the last checkpoint'})",
                flush=True,
            )
            return found, str(best_checkpoint(found))
        print(
            f"{subcommand}: no --ckpt_path and no finished run under {root}: evaluating the model as configured, "
            "without a checkpoint",
            flush=True,
        )
    if ckpt_path == "last":
        directory = newest_resumable_run(root)
        if directory is None:
            raise FileNotFoundError(
                f"--ckpt_path last: no run under {root} has {LAST_CHECKPOINT} "
                f"(expected {root}/version_<N>/{LAST_CHECKPOINT})"
            )
        return directory, str(directory / LAST_CHECKPOINT)
    if ckpt_path:
        owner = run_directory_of(Path(ckpt_path))
        if owner is not None:
            return owner, ckpt_path
    job = launcher_job_id()
    if job:  # all processes start together: a shared name instead of a race for the next version
        return root / f"job_{job}", ckpt_path
    return next_version(root), ckpt_path


def launcher_job_id() -> str | None:
    """The id shared by the processes of one torchrun / SLURM launch, if the launcher gives a unique one."""
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID")
    if torchrun and torchrun != "none":  # "none": torchrun without --rdzv-id / --standalone, not unique
        return torchrun
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID")
        return os.environ["SLURM_JOB_ID"] + (f".{step}" if step else "")
    if torchrun == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "torchrun without --rdzv-id (or --standalone) gives its processes no shared run id: "
            f"set {RUN_DIR_ENV} to the run directory, or pass --rdzv-id"
        )
    return None


def export_run_directory(directory: Path) -> None:
    global _exported
    _exported = str(directory)
    os.environ[RUN_DIR_ENV] = _exported


def next_version(root: Path) -> Path:
    """Create and return ``root/version_<N>`` with ``N`` one above the highest existing version."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
        candidate = root / f"version_{max(versions, default=-1) + 1}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # another run took it between listing and creating
            continue


def newest_resumable_run(root: Path) -> Path | None:
    """The most recently written run under ``root`` that has a last checkpoint."""
    if not root.is_dir():
        return None
    candidates = [p for p in root.iterdir() if (p / LAST_CHECKPOINT).is_file()]
    return max(candidates, key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime, default=None)


def best_checkpoint(directory: Path) -> Path | None:
    """The best checkpoint a finished ``fit`` recorded in the run's ``run.json``, if it still exists."""
    info = RunInfo.load(Path(directory))
    if info is None or not info.best_checkpoint:
        return None
    path = Path(directory) / info.best_checkpoint
    return path if path.is_file() else None


def newest_finished_run(root: Path) -> Path | None:
    """The run under ``root`` whose ``fit`` finished last (one with a recorded best checkpoint), if any."""
    if not Path(root).is_dir():
        return None
    finished = [p for p in Path(root).iterdir() if p.is_dir() and best_checkpoint(p) is not None]
    return max(finished, key=lambda p: (RunInfo.load(p).finished or "", p.stat().st_mtime), default=None)


def record_fit_result(directory: Path, best: Path | None, monitor: str | None) -> None:
    """Record a finished ``fit``'s best checkpoint in ``run.json`` (runs made by the CLI only)."""
    info = RunInfo.load(directory)
    if info is None:
        return
    if best is not None:
        best = Path(best).resolve()
        root = Path(directory).resolve()
        info.best_checkpoint = str(best.relative_to(root)) if best.is_relative_to(root) else str(best)
    info.monitor = monitor
    info.finished = time.strftime("%Y-%m-%dT%H:%M:%S")
    info.directory = str(directory)
    info.save()


def record_input(name: str, path: Path) -> str:
    """Record in the current run's ``run.json`` (rank 0) the resolved ``path`` of input ``name`` with its
    SHA-256, and return the hash."""
    digest = sha256_of(path)
    info = current_run()
    if info is not None and is_global_zero():
        info.inputs = {**(info.inputs or {}), name: {"path": str(Path(path).resolve()), "sha256": digest}}
        info.save()
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_directory_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/<file>``), if any."""
    directory = checkpoint.resolve().parent.parent
    return directory if (directory / RUN_FILE).is_file() else None


def prepare_run(directory: Path, seed: int | None) -> RunInfo:
    """Create the directory and record this invocation in ``run.json`` (rank 0 only writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    # A W&B sweep agent chooses the run's id (WANDB_RUN_ID): W&B would replace any other inside a sweep.
    wandb_id = os.environ.get("WANDB_RUN_ID") or new_wandb_id()
    info = RunInfo.load(directory) or RunInfo(directory=str(directory), wandb_id=wandb_id, commands=[])
    info.directory = str(directory)  # where the run is now, should it have been moved
    if is_global_zero():
        info.seed = seed
        command = " ".join(["python -m lightning_modules.cli", *sys.argv[1:]])
        info.commands = [*(info.commands or []), f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {command}"]
        info.save()
    return info


def current_run() -> RunInfo | None:
    """The run this process belongs to, when it was started by the project's CLI."""
    directory = os.environ.get(RUN_DIR_ENV)
    if not directory:
        return None
    info = RunInfo.load(Path(directory))
    if info is not None:
        info.directory = directory
    return info


def new_wandb_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def is_global_zero() -> bool:
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, "0")) == 0 for name in names)

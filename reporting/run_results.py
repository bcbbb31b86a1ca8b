"""Reading the metrics of finished runs, without any network access for local runs.

A run is named by any of:

* a run directory ``<root>/version_<N>`` (its ``metrics.json``, :mod:`reporting.metrics_record`);
* a root of run directories (its newest run with a ``metrics.json``);
* a local W&B run directory ``.../wandb/offline-run-*`` or ``run-*`` (or the ``wandb/`` folder, for its newest
  run): the copy of ``metrics.json`` the run keeps among its files (``files/metrics.json``);
* a W&B run path ``entity/project/run_id``, read through W&B's public API (``wandb.Api``): its
  ``metrics.json`` file, else its summary (the last value of each metric);
* a sweep directory (it holds ``sweep.yaml``): its best trial, chosen on the sweep's val metric
  (:mod:`reporting.sweep_results`).

W&B's binary run log (``run-<id>.wandb``) is not read: its format is private to W&B.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from reporting.metrics_record import (
    METHOD_KEY,
    METRICS_FILE,
    SIZE_KEY,
    MetricsRecordError,
    describe,
    load_record,
    select_evaluation,
)


class RunResultsError(ValueError):
    """A path that does not name a finished run with readable metrics."""


@dataclass
class RunMetrics:
    """The metrics of one evaluation of a run, and where they come from."""

    method: str | None
    embedding_size: int | None
    metrics: dict[str, float]
    source: str  # e.g. "runs/aesvc/embedded/version_0/metrics.json: best checkpoint checkpoints/... (fit)"
    record: dict = field(default_factory=dict, repr=False)
    location: str | None = None  # the run directory (or W&B run path) the metrics were read from


def read_run(path: str | Path, stage: str = "val", checkpoint: str = "best") -> RunMetrics:
    """The ``stage`` metrics of the run ``path`` names (see the module docstring), from the evaluation that
    :func:`reporting.metrics_record.select_evaluation` picks for ``checkpoint``."""
    location = Path(path)
    if location.is_dir():
        from reporting.sweep_results import best_trial, is_sweep_directory  # it reads its trials with read_run

        if is_sweep_directory(location):
            return read_run(best_trial(location).trial.run_directory, stage, checkpoint)
        file = _local_metrics_file(location)
        run = _from_record(load_record(file), str(file), stage, checkpoint)
        run.location = str(file.parent.parent if file.parent.name == "files" else file.parent)  # a W&B run: its dir
        return run
    if location.exists():
        raise RunResultsError(f"{path} is a file: name a run directory, a root of runs or a W&B run")
    if _looks_like_wandb_path(str(path)):
        return _read_wandb_api_run(str(path), stage, checkpoint)
    raise RunResultsError(
        f"{path} does not exist (expected a run directory, a root of runs, a W&B run directory, or a W&B run "
        "path entity/project/run_id)"
    )


def split_label(spec: str) -> tuple[str, str]:
    """``("LABEL", "PATH")`` from ``LABEL=PATH``; ``("", spec)`` for a plain path (or a path with ``=`` in it)."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.rpartition("=")
        return label, path
    return "", spec


def _local_metrics_file(path: Path) -> Path:
    if (path / METRICS_FILE).is_file():
        return path / METRICS_FILE
    if (path / "files" / METRICS_FILE).is_file():  # a W&B run directory
        return path / "files" / METRICS_FILE
    wandb_runs = [p for p in path.glob("*run-*") if (p / "files" / METRICS_FILE).is_file()]
    if wandb_runs:  # a wandb/ folder: its newest run (names are <kind>-run-<date>_<time>-<id>)
        return max(wandb_runs, key=lambda p: p.name.split("run-", 1)[1]) / "files" / METRICS_FILE
    runs = [p.parent for p in path.glob(f"*/{METRICS_FILE}")]
    if runs:
        return max(runs, key=lambda p: (p / METRICS_FILE).stat().st_mtime) / METRICS_FILE
    raise RunResultsError(
        f"{path} holds no {METRICS_FILE}, no run directory with one, and no W&B run with files/{METRICS_FILE}: "
        "name a finished run"
    )


def _from_record(record: dict, source: str, stage: str, checkpoint: str) -> RunMetrics:
    try:
        chosen = select_evaluation(record, stage, checkpoint)
    except MetricsRecordError as error:
        raise RunResultsError(f"{source}: {error}") from None
    size = record.get(SIZE_KEY)
    return RunMetrics(
        method=record.get(METHOD_KEY),
        embedding_size=int(size) if size is not None else None,
        metrics=dict(chosen["metrics"]),
        source=f"{source}: {stage} of {describe(chosen)}",
        record=record,
    )


def _looks_like_wandb_path(text: str) -> bool:
    """``entity/project/run_id``, and not a local path whose first folder exists (a mistyped run directory)."""
    parts = text.split("/")
    return len(parts) == 3 and all(parts) and not text.startswith(".") and not Path(parts[0]).exists()


def _read_wandb_api_run(run_path: str, stage: str, checkpoint: str) -> RunMetrics:
    """A synced W&B run through W&B's public API: its ``metrics.json``, else its summary."""
    import wandb

    try:
        run = wandb.Api().run(run_path)
    except Exception as error:  # W&B raises its own error types for unknown runs and missing credentials
        raise RunResultsError(f"{run_path} is no local path and W&B could not open it as a run: {error}") from None
    if any(f.name == METRICS_FILE for f in run.files()):
        with tempfile.TemporaryDirectory() as directory:
            run.file(METRICS_FILE).download(root=directory, replace=True)
            record = load_record(Path(directory) / METRICS_FILE)
        run = _from_record(record, f"W&B run {run_path} ({METRICS_FILE})", stage, checkpoint)
        run.location = run_path
        return run
    summary = dict(run.summary)
    metrics = {
        k: float(v)
        for k, v in summary.items()
        if k.startswith(stage + "/") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if not metrics:
        raise RunResultsError(f"W&B run {run_path} has no {stage}/* metrics in its summary")
    size = summary.get(SIZE_KEY)
    return RunMetrics(
        method=summary.get(METHOD_KEY),
        embedding_size=int(size) if size is not None else None,
        metrics=metrics,
        source=f"W&B run {run_path}: the summary (last logged {stage} values; checkpoint not recorded)",
        location=run_path,
    )

"""Reading a finished (or running) offline sweep: its definition, its trials, and its best configuration.

A sweep directory, as the offline sweep runner writes it, holds::

    <sweep dir>/sweep.yaml      the sweep definition as run (W&B form), with
                                metric: {name: val/<set>/<metric>, goal: maximize|minimize}
    <sweep dir>/summary.json    the trials: [{"number", "state" (COMPLETE|PRUNED|FAIL|RUNNING),
                                "params": {dotted.cli.path: value}, "value", "run_directory"}, ...]
    <sweep dir>/trial_<nnn>/    each trial an ordinary run directory (run.json, config.yaml, metrics.json, ...)

Its best configuration is the ``COMPLETE`` trial with the best value of the sweep's metric as the trial's own
``metrics.json`` records it: the val evaluation of the trial's best checkpoint. The ``value`` the runner summarised
is not used (the record says which evaluation it is), and a metric of any other stage is refused: nothing is ever
selected on test data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning_modules.sweep_definition import SweepDefinitionError, load_sweep
from reporting.run_results import RunMetrics, RunResultsError, read_run

SWEEP_FILE = "sweep.yaml"
SUMMARY_FILE = "summary.json"
COMPLETE = "COMPLETE"
SUMMARY_FORMAT = 'a JSON list of trials {"number", "state", "params": {...}, "value", "run_directory"}'


@dataclass
class SweepTrial:
    number: int
    state: str
    params: dict
    run_directory: Path


@dataclass
class SweepChoice:
    """The best trial of a sweep, its val metrics, and how it was chosen."""

    trial: SweepTrial
    metrics: RunMetrics  # the val evaluation of the trial's best checkpoint
    metric: str  # the sweep's metric, val/<set>/<metric>
    goal: str
    considered: int  # complete trials that recorded the metric
    notes: list[str] = field(default_factory=list)

    def describe(self, sweep_directory: str | Path) -> str:
        return (
            f"sweep {sweep_directory}: trial {self.trial.number}, the best of {self.considered} complete trials on "
            f"{self.metric} ({self.goal}; {self.metrics.metrics[self.metric]:.4f}), read from {self.metrics.source}"
        )


def is_sweep_directory(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def sweep_metric(directory: str | Path) -> tuple[str, str]:
    """``(metric, goal)`` of the sweep in ``directory``; a metric that is not a val metric is refused."""
    path = Path(directory) / SWEEP_FILE
    try:
        sweep = load_sweep(path)
    except SweepDefinitionError as error:
        raise RunResultsError(str(error)) from None
    if not sweep.metric.startswith("val/"):
        raise RunResultsError(
            f"{path}: the sweep selects on {sweep.metric}; a configuration is chosen on a val metric only"
        )
    return sweep.metric, sweep.goal


def read_trials(directory: str | Path) -> list[SweepTrial]:
    """The trials ``summary.json`` lists, each with its run directory resolved: as written (absolute, relative to
    the sweep directory or to the working directory), else the directory of that name in the sweep directory."""
    directory = Path(directory)
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise RunResultsError(f"{directory} holds {SWEEP_FILE} but no {SUMMARY_FILE} ({SUMMARY_FORMAT})")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunResultsError(f"{path} is not valid JSON ({error}); expected {SUMMARY_FORMAT}") from None
    required = ("number", "state", "params", "run_directory")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and all(k in e for k in required) for e in entries):
        raise RunResultsError(f"{path} is not {SUMMARY_FORMAT}")
    trials = []
    for entry in entries:
        if not isinstance(entry["params"], dict):
            raise RunResultsError(f"{path}: trial {entry['number']} has params {entry['params']!r}, not an object")
        run_directory = None
        if entry["run_directory"]:
            given = Path(entry["run_directory"])
            candidates = [given] if given.is_absolute() else [directory / given, given]
            candidates.append(directory / given.name)  # the sweep directory moved or read from elsewhere
            run_directory = next((c for c in candidates if c.is_dir()), candidates[0])
        trials.append(SweepTrial(int(entry["number"]), str(entry["state"]).upper(), entry["params"], run_directory))
    return trials


def best_trial(directory: str | Path) -> SweepChoice:
    """The complete trial with the best val value of the sweep's metric (see the module docstring)."""
    metric, goal = sweep_metric(directory)
    scored, notes = [], []
    for trial in read_trials(directory):
        if trial.state != COMPLETE:
            continue
        if trial.run_directory is None or not trial.run_directory.is_dir():
            notes.append(f"trial {trial.number}: its run directory {trial.run_directory} does not exist")
            continue
        try:
            run = read_run(trial.run_directory, "val", "best")
        except RunResultsError as error:
            notes.append(f"trial {trial.number}: {error}")
            continue
        if metric not in run.metrics:
            notes.append(f"trial {trial.number}: {run.source} has no {metric}")
            continue
        scored.append((trial, run))
    if not scored:
        raise RunResultsError(
            f"sweep {directory}: no complete trial recorded {metric} in its metrics.json"
            + "".join(f"; {n}" for n in notes)
        )
    sign = 1.0 if goal == "maximize" else -1.0
    # Ties go to the earlier trial.
    trial, run = max(scored, key=lambda pair: (sign * pair[1].metrics[metric], -pair[0].number))
    return SweepChoice(trial, run, metric, goal, len(scored), notes)


def describe_params(params: dict) -> str:
    """``key=value, ...`` with each key's last part (``model.init_args.lr`` -> ``lr``) unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    names = [short if last.count(short) == 1 else key for key, short in zip(params, last)]
    return ", ".join(f"{name}={value}" for name, value in zip(names, params.values()))

"""The offline sweep runner: a W&B sweep file run without a W&B server (air-gapped clusters, CI).

``python -m lightning_modules.sweep sweeps/<file>.yaml --count N [-- <extra CLI arguments>]``

runs the same file ``wandb agent`` runs (:mod:`lightning_modules.sweep_definition`): each trial is the sweep's
``command`` with the agent's argument forms, so what works here works under an agent and back. The search is
Optuna's:

* ``grid``: every combination in the file's order (the last parameter varies fastest), each run once;
* ``random``: Optuna's random sampler; ``bayes``: its Gaussian-process sampler (W&B's Bayesian search is a
  Gaussian process too), or ``--sampler tpe``;
* ``early_terminate: {type: hyperband, min_iter, eta}`` (or ``max_iter`` and ``s``): W&B's early termination is
  asynchronous successive halving (at ``min_iter``, ``min_iter * eta``, ... validations a run below the top
  ``1 / eta`` of the runs that got there stops), which is Optuna's ``SuccessiveHalvingPruner`` with one resource
  unit per validation; a stopped trial's process is ended, as W&B's agent ends a run, and the trial is "pruned".

Everything lives in the sweep directory (``--sweep-dir``, default ``runs/sweeps/<sweep name>``)::

    sweep.yaml        the sweep file as run (a restarted runner refuses a changed file)
    study.journal     Optuna's journal storage: several runners (machines sharing the directory) fill one study
    trial_<nnn>/      each trial's run directory (config, checkpoints, metrics.json, run.json, W&B files)
    summary.json      every trial: number, state, value, params, run directory, seconds
    summary.md        the same as a table, best first (also printed at the end)

A trial's value is the best value of the sweep metric over its validations (what its W&B summary holds), read
from the progress file the run appends to (:mod:`callbacks.sweep_metric`). Runs log to W&B offline
(``WANDB_MODE=offline`` unless set otherwise), grouped by the sweep's name: ``wandb sync <trial>/wandb`` uploads
them. ``--count N`` is the number of finished trials the study should hold (complete, pruned or failed): a runner
started again after a kill runs only the rest, and first finishes the trials it was running, resuming each
from its ``last.ckpt``. Arguments after ``--`` are added to every trial's command after the sweep's (so they
win), e.g. a dataset root.

Trials run as child processes (a failed trial never stops the sweep; DDP trials launch their own processes).
``--in-process`` runs them in the runner's own process instead: faster for tiny runs, single-process only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning_modules.sweep_definition import SweepDefinition, SweepDefinitionError, command_line, load_sweep
from reporting.tables import format_table
from retrieval.files import write_text_atomic

TRIAL_FILE = "sweep_trial.json"
PROGRESS_FILE = "sweep_progress.jsonl"
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30


class SweepRunError(RuntimeError):
    """A sweep directory or study that cannot be used as asked."""


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(sweep: SweepDefinition, directory: Path, sampler: str | None = None, seed: int | None = None):
    """The sweep's Optuna study in ``directory`` (created, or loaded to go on)."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    directory.mkdir(parents=True, exist_ok=True)
    stored = directory / "sweep.yaml"
    text = sweep.path.read_text()
    if stored.is_file() and stored.read_text() != text:
        raise SweepRunError(
            f"{directory} holds a study of another version of {sweep.path} ({stored} differs): "
            "a study's search space cannot change; use another --sweep-dir"
        )
    if not stored.is_file():
        write_text_atomic(stored, text)
    choice = sampler or {"grid": "grid", "random": "random", "bayes": "gp"}[sweep.method]
    samplers = {
        "grid": lambda: optuna.samplers.RandomSampler(seed=seed),  # combinations are enqueued in order
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }
    pruner = optuna.pruners.NopPruner()
    if sweep.early_terminate:
        early = sweep.early_terminate
        eta = int(early.get("eta", 3))
        # W&B's first bracket: min_iter, or max_iter / eta^s.
        first = (
            int(early["min_iter"]) if "min_iter" in early else max(1, int(early["max_iter"]) // eta ** int(early["s"]))
        )
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=eta)
    storage = JournalStorage(JournalFileBackend(str(directory / "study.journal")))
    return optuna.create_study(
        storage=storage,
        study_name=sweep.name,
        sampler=samplers[choice](),
        pruner=pruner,
        direction=sweep.goal,
        load_if_exists=True,
    )


def finished_trials(study) -> list:
    states = _optuna().trial.TrialState
    return [t for t in study.get_trials(deepcopy=False) if t.state in (states.COMPLETE, states.PRUNED, states.FAIL)]


def interrupted_trials(study, directory: Path) -> list:
    """Trials left running by a runner of this machine that is gone (killed): they are run again, resumed."""
    states, host = _optuna().trial.TrialState, socket.gethostname()
    interrupted = []
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        record = trial_directory(directory, trial.number) / TRIAL_FILE
        if not record.is_file():
            continue
        owner = json.loads(record.read_text())
        processes = [owner.get("pid", -1), owner.get("child_pid", -1)]
        if owner.get("host") == host and not any(_process_alive(pid) for pid in processes):
            interrupted.append(trial)
    return interrupted


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its new parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def trial_directory(directory: Path, number: int) -> Path:
    return directory / f"trial_{number:03d}"


def next_grid_point(sweep: SweepDefinition, study) -> dict | None:
    """The first grid combination no trial of the study has taken, or ``None`` when all are taken."""
    # a trial's values: suggested, or fixed when enqueued (not yet suggested while waiting or just started)
    trials = study.get_trials(deepcopy=False)
    taken = [{**trial.system_attrs.get("fixed_params", {}), **trial.params} for trial in trials]
    for combination in sweep.grid():
        if not any(_same_params(combination, params) for params in taken):
            return combination
    return None


def take_grid_point(sweep: SweepDefinition, study, directory: Path):
    """A new trial of the first grid combination no trial has taken (``None`` when all are taken). Runners that
    share the study take turns (a lock file beside its journal, safe on shared file systems as the journal's own):
    two that looked at the same moment would otherwise both take the same combination."""
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(directory / "grid"))
    lock.acquire()
    try:
        point = next_grid_point(sweep, study)
        if point is None:
            return None
        study.enqueue_trial({name: _optuna_value(value) for name, value in point.items()})
        return study.ask()
    finally:
        lock.release()


def _same_params(combination: dict, params: dict) -> bool:
    return all(name in params and params[name] == _optuna_value(value) for name, value in combination.items())


def run_sweep(
    path: str | os.PathLike,
    count: int,
    sweep_dir: str | os.PathLike | None = None,
    extra: list[str] = (),
    in_process: bool = False,
    sampler: str | None = None,
    seed: int | None = None,
) -> list[dict]:
    """Run trials until the study holds ``count`` finished ones (or a grid is done); the summary rows."""
    sweep = load_sweep(path)
    directory = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / sweep.name
    study = open_study(sweep, directory, sampler, seed)
    optuna = _optuna()
    for trial in interrupted_trials(study, directory):
        print(f"sweep: trial {trial.number} was interrupted; resuming it", flush=True)
        _run_trial(sweep, study, optuna.trial.Trial(study, trial._trial_id), directory, extra, in_process)
    while len(finished_trials(study)) < count:
        trial = take_grid_point(sweep, study, directory) if sweep.method == "grid" else study.ask()
        if trial is None:
            print(f"sweep: all {len(sweep.grid())} grid combinations are taken", flush=True)
            break
        _run_trial(sweep, study, trial, directory, extra, in_process)
    rows = summary_rows(sweep, study, directory)
    write_summary(sweep, rows, directory)
    return rows


def _optuna_value(value: Any) -> Any:
    """A value as Optuna stores it: a list or dict choice as its JSON text (``Parameter.suggest``)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _run_trial(sweep: SweepDefinition, study, trial, directory: Path, extra, in_process: bool) -> None:
    optuna = _optuna()
    params = {p.name: p.suggest(trial) for p in sweep.parameters}
    run_directory = trial_directory(directory, trial.number)
    run_directory.mkdir(parents=True, exist_ok=True)
    progress = run_directory / PROGRESS_FILE
    resume = (run_directory / "checkpoints" / "last.ckpt").is_file()
    arguments = [*extra, *(["--ckpt_path", "last"] if resume else [])]
    command = command_line(sweep, params, arguments)
    owner = {"number": trial.number, "host": socket.gethostname(), "pid": os.getpid(), "command": command}
    write_text_atomic(run_directory / TRIAL_FILE, json.dumps(owner) + "\n")
    reported = _report_progress(trial, progress, set())  # a resumed trial's earlier validations
    environment = {
        "RETRIEVAL_RUN_DIR": str(run_directory.resolve()),
        "RETRIEVAL_SWEEP_PROGRESS": str(progress.resolve()),
        "RETRIEVAL_SWEEP_METRIC": sweep.metric,
        "RETRIEVAL_SWEEP_GOAL": sweep.goal,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "WANDB_RUN_GROUP": sweep.name,
    }
    print(f"sweep: trial {trial.number}: {' '.join(command[command.index('-m') if '-m' in command else 0 :])}")
    started = time.time()
    if in_process:
        status, pruned = _run_in_process(command, environment, trial, progress, reported)
    else:
        status, pruned = _run_child(command, environment, trial, progress, reported, run_directory / TRIAL_FILE)
    _report_progress(trial, progress, reported)
    values = _values(progress)
    trial.set_user_attr("run_directory", str(run_directory))
    trial.set_user_attr("seconds", round(time.time() - started + trial.user_attrs.get("seconds", 0), 1))
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"sweep: trial {trial.number} stopped early (hyperband) after {len(values)} validations")
    elif status != 0 or not values:
        why = f"exit status {status}" if status != 0 else f"{sweep.metric} was never logged"
        trial.set_user_attr("failure", why)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"sweep: trial {trial.number} failed ({why}); see {run_directory}", flush=True)
    else:
        best = max(values) if sweep.goal == "maximize" else min(values)
        study.tell(trial, best)
        print(f"sweep: trial {trial.number}: {sweep.metric} = {best:.4f}", flush=True)


def _values(progress: Path) -> list[float]:
    if not progress.is_file():
        return []
    return [json.loads(line)["value"] for line in progress.read_text().splitlines() if line.strip()]


def _report_progress(trial, progress: Path, reported: set[int]) -> set[int]:
    """Report the validations not yet reported to Optuna (one resource unit each); the reported numbers."""
    for number, value in enumerate(_values(progress), start=1):
        if number not in reported:
            trial.report(value, step=number)
            reported.add(number)
    return reported


def _run_child(command, environment, trial, progress: Path, reported: set[int], owner: Path) -> tuple[int, bool]:
    """Run the trial's command in a child process (its own process group, with the processes it launches);
    stop it when Optuna prunes the trial."""
    child = subprocess.Popen(command, env={**os.environ, **environment}, start_new_session=True)
    # A runner killed outright leaves its child running: a new runner resumes the trial only once both are gone.
    write_text_atomic(owner, json.dumps({**json.loads(owner.read_text()), "child_pid": child.pid}) + "\n")
    pruned = False
    try:
        while child.poll() is None:
            time.sleep(POLL_SECONDS)
            _report_progress(trial, progress, reported)
            if not pruned and trial.should_prune():
                # Stopped while it runs: pruned, whatever its exit status (Lightning exits 0 on SIGTERM). A trial
                # that had already finished is complete.
                pruned = _stop(child)
    except BaseException:  # the runner is stopped: so are its trials (resumed when the runner starts again)
        _stop(child)
        raise
    return child.returncode, pruned


def _stop(child: subprocess.Popen) -> bool:
    """Stop a trial and the processes it launched (its own process group); whether it was still running."""
    if child.poll() is not None:
        return False
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        pass
    return True


def _run_in_process(command, environment, trial, progress: Path, reported: set[int]) -> tuple[int, bool]:
    from callbacks import sweep_metric
    from lightning_modules import cli, run_directory

    arguments = command[command.index("lightning_modules.cli") + 1 :]
    pruned = False

    def stop_requested(validation: int, value: float, final: bool) -> bool:
        nonlocal pruned
        _report_progress(trial, progress, reported)
        pruned = pruned or (not final and trial.should_prune())  # the last epoch's validation ends the run anyway
        return pruned

    run_directory._exported = None  # the previous trial's directory is not a pin for this one
    sweep_metric.stop_requested = stop_requested
    try:
        with _environment(environment):
            cli.main(arguments)
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    except Exception as error:  # a failed trial is recorded as failed, and the sweep goes on
        print(f"sweep: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        status = 1
    finally:
        sweep_metric.stop_requested = None
        run_directory._exported = None
    return status, pruned


@contextmanager
def _environment(variables: dict[str, str]):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def summary_rows(sweep: SweepDefinition, study, directory: Path) -> list[dict]:
    """Every trial of the study, best first (failed and running ones last)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        params = {}
        for parameter in sweep.parameters:
            value = trial.params.get(parameter.name)
            if parameter.distribution == "constant":
                value = parameter.values[0]
            elif isinstance(value, str) and parameter.distribution == "categorical" and value not in parameter.values:
                value = json.loads(value)
            params[parameter.name] = value
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value if trial.value is not None else _best_intermediate(trial, sweep.goal),
                "params": params,
                "run_directory": trial.user_attrs.get("run_directory", str(trial_directory(directory, trial.number))),
                "seconds": trial.user_attrs.get("seconds"),
                **({"failure": trial.user_attrs["failure"]} if "failure" in trial.user_attrs else {}),
            }
        )
    sign = -1 if sweep.goal == "maximize" else 1
    return sorted(
        rows,
        key=lambda r: (
            r["state"] not in ("COMPLETE", "PRUNED"),
            r["value"] is None,
            sign * (r["value"] or 0),
            r["number"],
        ),
    )


def _best_intermediate(trial, goal: str) -> float | None:
    values = list(trial.intermediate_values.values())
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def summary_table(sweep: SweepDefinition, rows: list[dict]) -> str:
    names = [p.name for p in sweep.parameters if p.distribution != "constant"]
    short = [name.replace("init_args.", "") for name in names]
    header = ["trial", "state", sweep.metric, *short, "seconds"]
    body = [
        [
            row["number"],
            row["state"],
            "" if row["value"] is None else f"{row['value']:.4f}",
            *(_cell(row["params"].get(name)) for name in names),
            "" if row["seconds"] is None else f"{row['seconds']:.0f}",
        ]
        for row in rows
    ]
    return format_table(header, body, title=f"sweep {sweep.name}: {sweep.metric} ({sweep.goal}), best first")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_summary(sweep: SweepDefinition, rows: list[dict]) -> str:
    names = [p.name for p in sweep.parameters if p.distribution != "constant"]
    lines = [
        f"Sweep `{sweep.name}` ({sweep.method}; {sweep.path}): `{sweep.metric}` ({sweep.goal}, the best validation "
        "of each trial), best first.",
        "",
        "| trial | state | " + " | ".join([sweep.metric, *names]) + " | run directory |",
        "|---" * (len(names) + 4) + "|",
    ]
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        cells = [str(row["number"]), row["state"], value, *(_cell(row["params"].get(n)) for n in names)]
        lines.append("| " + " | ".join([*cells, f"`{row['run_directory']}`"]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep: SweepDefinition, rows: list[dict], directory: Path) -> None:
    write_text_atomic(directory / "summary.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(directory / "summary.md", markdown_summary(sweep, rows))
    print(summary_table(sweep, rows), flush=True)
    print(f"sweep: wrote {directory / 'summary.md'} and summary.json", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.sweep",
        description="Run a W&B sweep file without a W&B server (Optuna search, offline W&B logging, resumable). "
        "Arguments after -- are added to every trial's command.",
    )
    parser.add_argument("sweep", help="a sweep file, e.g. sweeps/aesvc_sop.yaml")
    parser.add_argument("--count", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--sweep-dir", help="where the study and its trials live (default runs/sweeps/<name>)")
    parser.add_argument("--sampler", choices=("grid", "random", "gp", "tpe"), help="override the sweep's method")
    parser.add_argument("--seed", type=int, help="the sampler's seed (default: random)")
    parser.add_argument("--in-process", action="store_true", help="run trials in this process (tiny runs only)")
    args = parser.parse_args(argv)
    try:
        run_sweep(args.sweep, args.count, args.sweep_dir, extra, args.in_process, args.sampler, args.seed)
    except (SweepDefinitionError, SweepRunError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()

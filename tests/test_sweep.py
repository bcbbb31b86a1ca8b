"""The sweep files and the offline sweep runner: W&B's format, the agent's argument forms, grid / random /
Bayesian search, early termination, failures, resuming after a kill, and what a run records for its sweep.

The runner's logic is exercised with a stand-in trial program (plain Python, milliseconds per trial); every
shipped sweep file runs real trials through the CLI in tests/test_sweep_trials.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO

from callbacks.sweep_metric import SweepMetric
from lightning_modules import cli, run_directory, sweep
from lightning_modules.sweep import run_sweep
from lightning_modules.sweep_definition import SweepDefinitionError, check_sweep, command_arguments, load_sweep

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "${interpreter}", "-m", "lightning_modules.cli", "fit", "--config"]

# A stand-in for the CLI: reports `value * validation` for each of `--validations` validations (what a run's
# SweepMetric appends), sleeping `--sleep` seconds between them; exits with `--exit`; records its arguments and
# whether it was resumed, and leaves a last.ckpt after its first validation.
FAKE_TRIAL = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    run = Path(os.environ["RETRIEVAL_RUN_DIR"])
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "resumed": "--ckpt_path" in sys.argv}) + "\\n")
    for v in range(1, int(args.get("validations", 3)) + 1):
        time.sleep(float(args.get("sleep", 0)))
        with open(os.environ["RETRIEVAL_SWEEP_PROGRESS"], "a") as f:
            f.write(json.dumps({"validation": v, "value": float(args["x"]) * v}) + "\\n")
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_text("weights")
    sys.exit(int(args.get("exit", 0)))
    """
)


def fake_sweep(tmp_path: Path, parameters: dict, method: str = "grid", **extra) -> Path:
    (tmp_path / "fake_trial.py").write_text(FAKE_TRIAL)
    sweep = {
        "program": str(tmp_path / "fake_trial.py"),
        "method": method,
        "metric": {"name": "val/fake/score", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        **extra,
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def calls(trial_directory) -> list[dict]:
    return [json.loads(line) for line in (Path(trial_directory) / "calls.jsonl").read_text().splitlines()]


# ---- the sweep files ------------------------------------------------------------------------------------------


def config_of(sweep) -> dict:
    return yaml.safe_load((REPO / sweep.config_file()).read_text())


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_is_a_wandb_sweep_of_a_shipped_config(path):
    sweep = load_sweep(path)
    assert list(sweep.command[:-2]) == COMMAND and sweep.command[-1] == "${args}"
    assert (REPO / sweep.config_file()).is_file() and sweep.program == "lightning_modules/cli.py"
    config = config_of(sweep)
    constants = {p.name: p.values[0] for p in sweep.parameters if p.distribution == "constant"}
    checkpoint = config.get("checkpoint") or {}
    # The metric is what the run selects its best checkpoint on, so the sweep and the run agree on "best".
    assert sweep.metric == constants.get("checkpoint.monitor", checkpoint.get("monitor"))
    mode = constants.get("checkpoint.mode", checkpoint.get("mode"))
    assert sweep.goal == {"max": "maximize", "min": "minimize"}[mode]
    assert sweep.metric.startswith("val/"), "a sweep selects on validation data, never on test data"
    assert "seed_everything" in {p.name for p in sweep.parameters}


def printed_config(config: str, arguments: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit:
        cli.main(["fit", "--config", config, *arguments, "--print_config"])
    assert exit.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def value_at(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_the_cli_accepts_every_parameter_of_every_sweep_as_the_agent_sends_it(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the sweep's command names its config relative to the repository
    sweep = load_sweep(path)
    chosen = {}  # each parameter at one end of its range, alternately the first and the last
    for i, p in enumerate(sweep.parameters):
        if p.distribution in ("constant", "categorical"):
            chosen[p.name] = p.values[-(i % 2)]
        else:
            chosen[p.name] = p.high if i % 2 else p.low
    printed = printed_config(sweep.config_file(), command_arguments(chosen)["args"], capsys)
    for name, value in chosen.items():
        assert value_at(printed, name) == value and type(value_at(printed, name)) is type(value), name


def test_the_offline_runner_formats_arguments_exactly_as_the_wandb_agent():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"model.init_args.lr": 1e-05, "trainer.deterministic": False, "a.b": [1024, 512], "c": None, "d": "x"}
    theirs = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    ours = command_arguments(params)
    for form in ("args", "args_no_hyphens", "args_json", "args_no_boolean_flags"):
        assert ours[form] == theirs[form], form
    assert ours["args"][:3] == ["--model.init_args.lr=1e-05", "--trainer.deterministic=False", "--a.b=[1024, 512]"]


def test_the_cli_reads_the_agents_argument_forms(capsys):
    config = str(REPO / "configs/aesvc/sop.yaml")
    arguments = ["--model.init_args.lr=1e-05", "--model.init_args.hidden_dims=[64, 32]"]
    arguments += ["--model.init_args.prefix_sizes=None", "--trainer.deterministic=True", "--seed_everything=2"]
    printed = printed_config(config, arguments, capsys)
    model = printed["model"]["init_args"]
    assert model["lr"] == 1e-05 and model["hidden_dims"] == [64, 32] and model["prefix_sizes"] is None
    assert printed["trainer"]["deterministic"] is True and printed["seed_everything"] == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "hyperopt"}, "method must be one of"),
        ({"metric": {"name": "val/x", "goal": "up"}}, "metric.goal"),
        ({"parameters": {"lr": {"min": 1.0, "max": 0.1}}}, "min < max"),
        ({"parameters": {"lr": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "unknown keys"),
        ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": 0.0, "max": 1.0}}}, "min > 0"),
        ({"early_terminate": {"type": "median"}}, "hyperband"),
        ({"command": ["${interpreter}", "${nonsense}"]}, "unknown macro"),
        ({"sweep": 1}, "unknown keys"),
    ],
)
def test_a_sweep_file_w_and_b_would_refuse_is_refused_naming_the_file(change, message):
    raw = {"method": "random", "metric": {"name": "val/x", "goal": "maximize"}, "parameters": {"lr": {"values": [1]}}}
    raw["command"] = [*COMMAND, "c.yaml", "${args}"]
    with pytest.raises(SweepDefinitionError, match=message) as error:
        check_sweep({**raw, **change}, Path("sweeps/bad.yaml"))
    assert "sweeps/bad.yaml" in str(error.value)


# ---- the runner -----------------------------------------------------------------------------------------------


def test_grid_runs_every_combination_once_in_the_files_order_and_tabulates_best_first(tmp_path, capsys):
    path = fake_sweep(tmp_path, {"x": {"values": [0.3, 0.1, 0.2]}, "seed_everything": {"values": [0, 1]}})
    rows = run_sweep(path, count=100, sweep_dir=tmp_path / "sweep")  # stops when the grid is done
    assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows)
    order = sorted(rows, key=lambda r: r["number"])
    assert [(r["params"]["x"], r["params"]["seed_everything"]) for r in order] == [
        (0.3, 0), (0.3, 1), (0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)
    ]  # fmt: skip
    assert [r["value"] for r in rows] == pytest.approx([0.9, 0.9, 0.6, 0.6, 0.3, 0.3])  # best of 3 validations
    assert calls(order[0]["run_directory"])[0]["argv"] == ["--x=0.3", "--seed_everything=0"]
    summary = (tmp_path / "sweep/summary.md").read_text()
    assert summary.index("| 0 | COMPLETE | 0.9000 | 0.3 | 0 |") < summary.index("| 2 | COMPLETE | 0.3000 | 0.1 | 0 |")
    assert json.loads((tmp_path / "sweep/summary.json").read_text()) == rows
    assert "val/fake/score" in capsys.readouterr().out


def test_two_runners_sharing_a_grid_study_never_take_the_same_combination(tmp_path, monkeypatch):
    definition = load_sweep(fake_sweep(tmp_path, {"x": {"values": [0.3, 0.1, 0.2]}}))
    directory = tmp_path / "sweep"
    studies = [sweep.open_study(definition, directory) for _ in range(2)]  # two runners' handles on one journal
    both_looked = threading.Barrier(2)
    first_free = sweep.next_grid_point

    def next_point_then_wait_for_the_other(*args):
        point = first_free(*args)
        try:  # unlocked, both runners would look before either enqueues, and take the same combination
            both_looked.wait(timeout=1)
        except threading.BrokenBarrierError:  # the other runner waits for the lock instead
            pass
        return point

    monkeypatch.setattr(sweep, "next_grid_point", next_point_then_wait_for_the_other)
    with ThreadPoolExecutor(2) as pool:
        trials = list(pool.map(lambda study: sweep.take_grid_point(definition, study, directory), studies))
    assert sorted(definition.parameters[0].suggest(trial) for trial in trials) == [0.1, 0.3]


def test_random_and_bayesian_search_draw_within_the_bounds_and_arguments_after_the_sweeps_win(tmp_path):
    parameters = {"x": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0}, "n": {"min": 2, "max": 4}}
    for method in ("random", "bayes"):
        path = fake_sweep(tmp_path, parameters, method=method)
        rows = run_sweep(path, count=3, sweep_dir=tmp_path / method, seed=0, extra=["--validations=1"])
        assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)
        assert all(0.01 <= r["params"]["x"] <= 1.0 and r["params"]["n"] in (2, 3, 4) for r in rows)
        assert all(r["value"] == pytest.approx(r["params"]["x"]) for r in rows)  # one validation, as --validations=1
        # A second runner on the same study only adds what --count asks for.
        assert len(run_sweep(path, count=4, sweep_dir=tmp_path / method, seed=1)) == 4


def test_hyperband_stops_unpromising_trials_early(tmp_path):
    path = fake_sweep(
        tmp_path,
        {"x": {"values": [1.0, 0.9, 0.1, 0.05]}},
        early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
    )
    rows = run_sweep(path, count=4, sweep_dir=tmp_path / "sweep", extra=["--validations=4", "--sleep=0.4"])
    states = {r["params"]["x"]: r["state"] for r in rows}
    # At 1 validation only the top half of the trials that got there go on: each later trial is behind the first.
    assert states == {1.0: "COMPLETE", 0.9: "PRUNED", 0.1: "PRUNED", 0.05: "PRUNED"}
    for row in rows:  # a stopped trial's process was stopped before its 4 validations
        progress = (Path(row["run_directory"]) / "sweep_progress.jsonl").read_text().splitlines()
        assert (len(progress) < 4) == (row["state"] == "PRUNED")


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = fake_sweep(tmp_path, {"x": {"values": [0.5]}, "exit": {"values": [3, 0]}})
    rows = run_sweep(path, count=2, sweep_dir=tmp_path / "sweep")
    by_exit = {r["params"]["exit"]: r for r in rows}
    assert by_exit[3]["state"] == "FAIL" and by_exit[3]["failure"] == "exit status 3"
    assert by_exit[0]["state"] == "COMPLETE" and rows[0] is by_exit[0]


def test_a_killed_runner_resumes_its_interrupted_trial_from_its_last_checkpoint(tmp_path):
    path = fake_sweep(tmp_path, {"x": {"values": [0.5, 0.25]}})
    runner = [sys.executable, "-m", "lightning_modules.sweep", str(path), "--count", "2", "--sweep-dir", "sweep"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([*runner, "--", "--sleep=1"], cwd=tmp_path, env=environment)
    progress = tmp_path / "sweep/trial_000/sweep_progress.jsonl"
    deadline = time.time() + 60
    while not (progress.is_file() and progress.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    process.kill()  # the runner dies mid-trial (first validation done, last.ckpt written) ...
    process.wait()
    owner = json.loads((tmp_path / "sweep/trial_000/sweep_trial.json").read_text())
    os.killpg(owner["child_pid"], signal.SIGKILL)  # ... and so does its trial (a node lost)
    while sweep._process_alive(owner["child_pid"]) and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run([*runner, "--", "--sleep=0"], cwd=tmp_path, env=environment, check=True, capture_output=True)
    rows = json.loads((tmp_path / "sweep/summary.json").read_text())
    assert sorted((r["number"], r["state"]) for r in rows) == [(0, "COMPLETE"), (1, "COMPLETE")]
    first, again = calls(tmp_path / "sweep/trial_000")
    assert not first["resumed"] and again["resumed"] and again["argv"][-2:] == ["--ckpt_path", "last"]


def test_a_changed_sweep_file_is_not_run_on_the_old_study(tmp_path):
    path = fake_sweep(tmp_path, {"x": {"values": [0.5]}})
    run_sweep(path, count=1, sweep_dir=tmp_path / "sweep")
    fake_sweep(tmp_path, {"x": {"values": [0.5, 0.7]}})
    with pytest.raises(Exception, match="cannot change"):
        run_sweep(path, count=2, sweep_dir=tmp_path / "sweep")


# ---- what a run records for its sweep -------------------------------------------------------------------------


class FakeExperiment:
    def __init__(self, run_id="agent123", sweep_id="sweep456"):
        self.id, self.sweep_id, self.summary, self.disabled = run_id, sweep_id, {}, False


def test_a_run_keeps_its_best_value_in_the_wandb_summary_and_records_the_real_run_id(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_RUN_ID", "agent123")  # a W&B agent chooses the run's id
    monkeypatch.setenv(run_directory.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(run_directory, "_exported", None)
    info = run_directory.prepare_run(tmp_path / "run", seed=0)
    assert info.wandb_id == "agent123"
    logger = WandbLogger.__new__(WandbLogger)
    logger._experiment = experiment = FakeExperiment()
    metric = "val/sop/mAP@100"
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=[logger],
        checkpoint_callback=SimpleNamespace(monitor=metric, mode="max"),
        state=SimpleNamespace(fn="fit"),
        sanity_checking=False,
        world_size=1,
        current_epoch=0,
        max_epochs=10,
        global_step=0,
        callback_metrics={},
        should_stop=False,
    )
    callback = SweepMetric()
    callback.on_fit_start(trainer, None)
    assert run_directory.RunInfo.load(tmp_path / "run").wandb_sweep_id == "sweep456"
    for value in (0.4, 0.7, 0.5):
        trainer.callback_metrics = {metric: value}
        callback.on_validation_end(trainer, None)
    assert experiment.summary[metric] == 0.7  # the best, not the last (0.5)
    experiment.id = "replaced"  # W&B gave the run another id than run.json holds: run.json follows
    callback.on_fit_start(trainer, None)
    assert run_directory.RunInfo.load(tmp_path / "run").wandb_id == "replaced"

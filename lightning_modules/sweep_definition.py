"""W&B sweep definitions (the YAML files in ``sweeps/``): reading, checking and sampling them.

A sweep file is in the form ``wandb sweep`` and ``wandb agent`` expect, so the same file drives a W&B sweep and the
offline runner (:mod:`lightning_modules.sweep`)::

    program: lightning_modules/cli.py
    method: bayes                      # grid | random | bayes
    metric: {name: val/sop/mAP@100, goal: maximize}   # a key the run logs (its checkpoint monitor)
    parameters:
      model.init_args.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}
      seed_everything: {values: [0, 1, 2]}
    early_terminate: {type: hyperband, min_iter: 2, eta: 2}
    command: [${env}, ${interpreter}, -m, lightning_modules.cli, fit, --config, configs/aesvc/sop.yaml, ${args}]

:func:`check_sweep` refuses what W&B would refuse (unknown keys, distributions, bounds) and what the offline runner
cannot run, naming the file. :func:`command_arguments` formats parameters exactly as the W&B agent does
(``--name=value`` with Python's ``str`` of the value: ``True``, ``[1024, 512]``, ``1e-05``), so the offline runner
sends the command line an agent would.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = {
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "early_terminate",
    "name",
    "description",
    "project",
    "entity",
    "run_cap",
}
METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
# W&B's distributions that the offline runner samples (W&B has more: normal, beta, ...; refused by check_sweep).
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
)
PARAMETER_KEYS = {"value", "values", "distribution", "min", "max", "q", "probabilities"}
EARLY_TERMINATE_KEYS = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
# The macros of W&B's command, and what each expands to (see command_line).
MACRO = re.compile(r"^\$\{(\w+)\}$")
MACROS = ("env", "interpreter", "program", "args", "args_no_hyphens", "args_json", "args_no_boolean_flags")


class SweepDefinitionError(ValueError):
    """A sweep file that W&B or the offline runner would refuse."""


@dataclass(frozen=True)
class Parameter:
    """One swept parameter: its dotted CLI name and what values it takes."""

    name: str
    distribution: str
    values: tuple | None = None  # constant: one value; categorical: the choices
    low: float | None = None
    high: float | None = None
    q: float | None = None

    def grid_values(self) -> list:
        if self.distribution in ("constant", "categorical"):
            return list(self.values)
        if self.distribution == "int_uniform":  # W&B's grid enumerates integer ranges too
            return list(range(int(self.low), int(self.high) + 1))
        raise SweepDefinitionError(
            f"grid search needs `values` (or an int_uniform range) for {self.name}, got distribution {self.distribution}"
        )

    def suggest(self, trial) -> Any:
        """The value of this parameter in an Optuna trial (lists and dicts pass through Optuna as JSON)."""
        if self.distribution == "constant":
            return self.values[0]
        if self.distribution == "categorical":
            if all(v is None or isinstance(v, (bool, int, float, str)) for v in self.values):
                return trial.suggest_categorical(self.name, list(self.values))
            encoded = [json.dumps(v) for v in self.values]
            return json.loads(trial.suggest_categorical(self.name, encoded))
        if self.distribution == "int_uniform":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        if self.distribution == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.distribution == "q_uniform":
            return trial.suggest_float(self.name, self.low, self.high, step=self.q)
        if self.distribution == "log_uniform":  # W&B: min and max are natural logarithms of the bounds
            return trial.suggest_float(self.name, math.exp(self.low), math.exp(self.high), log=True)
        value = trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.distribution == "q_log_uniform_values":  # Optuna has no step on a log scale: rounded as W&B does
            value = round(value / self.q) * self.q
        return value


@dataclass(frozen=True)
class SweepDefinition:
    path: Path
    raw: dict
    method: str
    metric: str
    goal: str
    parameters: tuple[Parameter, ...]
    command: tuple[str, ...]
    program: str | None
    early_terminate: dict | None

    @property
    def name(self) -> str:
        return self.raw.get("name") or self.path.stem

    def grid(self) -> list[dict]:
        """Every combination of a grid search, in the file's order (the last parameter varies fastest)."""
        names = [p.name for p in self.parameters]
        return [dict(zip(names, combo)) for combo in itertools.product(*(p.grid_values() for p in self.parameters))]

    def config_file(self) -> str | None:
        """The ``--config`` file of the command, if it names one."""
        command = list(self.command)
        return command[command.index("--config") + 1] if "--config" in command[:-1] else None


def load_sweep(path: str | os.PathLike) -> SweepDefinition:
    """Read and check a sweep file (see :func:`check_sweep`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sweep file (expected a W&B sweep YAML, e.g. sweeps/aesvc_sop.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepDefinitionError(f"{path} is not valid YAML: {error}") from None
    return check_sweep(raw, path)


def check_sweep(raw: Any, path: Path) -> SweepDefinition:
    """The sweep in ``raw`` (read from ``path``), or a :class:`SweepDefinitionError` naming what is wrong."""

    def fail(message: str):
        raise SweepDefinitionError(f"{path}: {message} (see the sweep format in lightning_modules/sweep_definition.py)")

    if not isinstance(raw, dict):
        fail("expected a mapping with program, method, metric, parameters and command")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        fail(f"unknown keys {sorted(unknown)}; W&B accepts {sorted(SWEEP_KEYS)}")
    for key in ("method", "metric", "parameters", "command"):
        if key not in raw:
            fail(f"missing `{key}`")
    if raw["method"] not in METHODS:
        fail(f"method must be one of {METHODS}, got {raw['method']!r}")
    metric = raw["metric"]
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or set(metric) - {"name", "goal"}:
        fail("metric must be {name: <logged key>, goal: maximize|minimize}")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in GOALS:
        fail(f"metric.goal must be one of {GOALS}, got {goal!r}")
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        fail("parameters must be a non-empty mapping of dotted CLI names to distributions")
    parameters = tuple(_parameter(name, spec, fail) for name, spec in raw["parameters"].items())
    command = raw["command"]
    if not isinstance(command, list) or not all(isinstance(part, str) for part in command):
        fail("command must be a list of strings")
    for part in command:
        macro = MACRO.match(part)
        if macro and macro.group(1) not in MACROS:
            fail(f"unknown macro {part} in command; W&B's are {['${' + m + '}' for m in MACROS]}")
    if "${program}" in command and not raw.get("program"):
        fail("command uses ${program} but there is no `program`")
    early = raw.get("early_terminate")
    if early is not None:
        if not isinstance(early, dict) or early.get("type") != "hyperband" or set(early) - EARLY_TERMINATE_KEYS:
            fail(f"early_terminate must be {{type: hyperband, ...}} with keys from {sorted(EARLY_TERMINATE_KEYS)}")
        if "min_iter" not in early and not ("max_iter" in early and "s" in early):
            fail("early_terminate needs min_iter (or max_iter with s)")
        if int(early.get("eta", 3)) < 2:
            fail("early_terminate.eta must be at least 2")
    sweep = SweepDefinition(
        path=path,
        raw=raw,
        method=raw["method"],
        metric=metric["name"],
        goal=goal,
        parameters=parameters,
        command=tuple(command),
        program=raw.get("program"),
        early_terminate=early,
    )
    if sweep.method == "grid":
        try:
            sweep.grid()
        except SweepDefinitionError as error:
            fail(str(error))
    return sweep


def _parameter(name: str, spec: Any, fail) -> Parameter:
    if not isinstance(spec, dict):
        fail(f"parameter {name} must be a mapping (value, values, or distribution with min/max)")
    if "parameters" in spec:
        fail(f"parameter {name}: nested parameters are sent as one dict; name each by its full dotted CLI path")
    unknown = set(spec) - PARAMETER_KEYS
    if unknown:
        fail(f"parameter {name}: unknown keys {sorted(unknown)}; W&B accepts {sorted(PARAMETER_KEYS)}")
    if "value" in spec:
        return Parameter(name, "constant", values=(spec["value"],))
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            fail(f"parameter {name}: values must be a non-empty list")
        if "probabilities" in spec:
            fail(f"parameter {name}: probabilities are not supported by the offline runner")
        return Parameter(name, "categorical", values=tuple(values))
    if "min" not in spec or "max" not in spec:
        fail(f"parameter {name}: needs value, values, or min and max")
    low, high = spec["min"], spec["max"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        fail(f"parameter {name}: min and max must be numbers with min < max, got {low!r}, {high!r}")
    default = "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
    distribution = spec.get("distribution", default)
    if distribution not in DISTRIBUTIONS or distribution in ("constant", "categorical"):
        fail(f"parameter {name}: distribution {distribution!r} not supported; use one of {DISTRIBUTIONS[2:]}")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
        fail(f"parameter {name}: {distribution} needs min > 0 (the values themselves)")
    if distribution.startswith("q_") and not spec.get("q"):
        fail(f"parameter {name}: {distribution} needs q")
    return Parameter(name, distribution, low=low, high=high, q=spec.get("q"))


def command_arguments(params: dict[str, Any]) -> dict[str, list[str]]:
    """The argument forms of W&B's agent for ``params`` (``${args}``, ``${args_no_hyphens}``, ...)."""
    flags = [f"--{name}={value}" for name, value in params.items()]
    return {
        "args": flags,
        "args_no_hyphens": [flag[2:] for flag in flags],
        "args_json": [json.dumps(params)],
        "args_no_boolean_flags": [
            f"--{name}" if value is True else f"--{name}={value}"
            for name, value in params.items()
            if value is not False
        ],
    }


def command_line(sweep: SweepDefinition, params: dict[str, Any], extra: list[str] = ()) -> list[str]:
    """The command the W&B agent would run for ``params``, with ``extra`` arguments after the sweep's."""
    forms = command_arguments(params)
    command: list[str] = []
    for part in sweep.command:
        macro = MACRO.match(part)
        name = macro.group(1) if macro else None
        if name == "env":
            command += ["/usr/bin/env"] if os.path.exists("/usr/bin/env") else []
        elif name == "interpreter":
            command.append(sys.executable)
        elif name == "program":
            command.append(sweep.program)
        elif name in forms:
            command += forms[name] + (list(extra) if name.startswith("args") else [])
        else:
            command.append(part)
    if not any(MACRO.match(p) and MACRO.match(p).group(1).startswith("args") for p in sweep.command):
        command += list(extra)
    return command

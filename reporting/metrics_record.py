"""``metrics.json``: every evaluation of a run, each with the checkpoint it scored.

The file is one JSON object, meant to be read by people as well as by ``compare``::

    {
      "method": "AE-SVC",
      "embedding_size": 64,
      "bytes_per_image": 256,
      "timing": {"val/embedded/ms_per_query": 0.031, ...},
      "headline": {"val": "best checkpoint checkpoints/epoch012-step000130.ckpt (fit)"},
      "val/embedded/recall@1": 0.462,                    <- headline numbers, one set per stage
      ...
      "evaluations": [
        {"stage": "val", "subcommand": "fit", "checkpoint": "checkpoints/epoch012-step000130.ckpt",
         "roles": ["best"], "epoch": 12, "step": 130, "time": "...", "metrics": {"val/embedded/recall@1": 0.462, ...}},
        {"stage": "val", "subcommand": "fit", "checkpoint": "checkpoints/last.ckpt", "roles": ["last"], ...},
        {"stage": "val", "subcommand": "validate", "checkpoint": "/elsewhere/other.ckpt", "roles": [], ...}
      ]
    }

* ``evaluations`` keeps one entry per (stage, subcommand, checkpoint, datasets); evaluating the same checkpoint
  again in the same way on the same datasets replaces its entry, any other evaluation is added (a checkpoint
  tested on two benchmarks keeps both, and is read as one evaluation with the metrics of both). ``checkpoint`` is relative to the run
  directory when the file is inside it, ``null`` for weights never saved (a model evaluated as configured, or
  the end of training when no checkpoint holds it). ``roles`` says what the checkpoint is to the run: ``best``
  (the checkpoint callback's best on its monitor; without a monitor, the newest checkpoint), ``last``.
* The top-level ``<stage>/...`` keys repeat, for each stage, the metrics of one well-defined evaluation
  (:func:`select_evaluation` with ``"best"``), and ``headline`` says which: a ``validate`` of another
  checkpoint is recorded but never replaces them.
* ``bytes_per_image``: what one database image takes in the search of a global-descriptor method (its largest
  embedding as float32, the dtype the evaluation searches); a re-ranker logs its own per configuration as the
  metric ``<stage>/<set>/bytes_per_image``.
* ``timing``: wall-clock milliseconds per query of the newest evaluation of each stage and set, on the process
  and device that searched: ``<stage>/<set>/ms_per_query`` (search, plus re-ranking where there is one, plus
  scoring the ranking; ``@d<size>`` / ``@q<L_q>x<L_x>`` for other sizes, ``<stage>/<set>/global/ms_per_query``
  the global search alone). Not a metric: it changes from run to run, so it is kept out of ``evaluations``
  (which two runs of the same training reproduce exactly) and never selects anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from retrieval.files import write_text_atomic

METRICS_FILE = "metrics.json"
#: Key of the method's display name in ``metrics.json`` and in the W&B run summary.
METHOD_KEY = "method"
#: Key of the embedding size (the largest, for a multi-size method).
SIZE_KEY = "embedding_size"
EVALUATIONS_KEY = "evaluations"
HEADLINE_KEY = "headline"
#: Key of a global-descriptor method's bytes per database image (see the module docstring).
BYTES_KEY = "bytes_per_image"
#: Key of the query times, and the name of a query time within it (``<stage>/<set>/ms_per_query``).
TIMING_KEY = "timing"
QUERY_TIME = "ms_per_query"


class MetricsRecordError(ValueError):
    """A ``metrics.json`` that cannot be read as a record of evaluations."""


def load_record(path: str | Path) -> dict:
    """The record in ``path`` (an empty one when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {EVALUATIONS_KEY: []}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MetricsRecordError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise MetricsRecordError(f"{path} must hold a JSON object (see reporting.metrics_record)")
    if EVALUATIONS_KEY not in record:  # a flat file of metrics: one evaluation of unknown checkpoint
        metrics = {k: float(v) for k, v in record.items() if "/" in k and isinstance(v, (int, float))}
        stages = sorted({k.split("/", 1)[0] for k in metrics})
        record[EVALUATIONS_KEY] = [
            evaluation(stage, None, None, [], {k: v for k, v in metrics.items() if k.startswith(stage + "/")})
            for stage in stages
        ]
    return record


def evaluation(
    stage: str,
    subcommand: str | None,
    checkpoint: str | None,
    roles: list[str],
    metrics: dict[str, float],
    epoch: int | None = None,
    step: int | None = None,
) -> dict:
    """One entry of ``evaluations``."""
    entry = {"stage": stage, "subcommand": subcommand, "checkpoint": checkpoint, "roles": list(roles)}
    if epoch is not None:
        entry.update(epoch=int(epoch), step=int(step))
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    entry["metrics"] = {k: float(v) for k, v in metrics.items()}
    return entry


def add_evaluations(path: str | Path, entries: list[dict], timing: dict[str, float] | None = None, **fields) -> dict:
    """Add ``entries`` to the record in ``path`` (replacing entries with the same stage, subcommand and
    checkpoint), set the top-level ``fields`` (e.g. ``method``), refresh the headline and write it atomically.
    ``timing`` (``<stage>/<set>/...`` query times) replaces the recorded times of its stages' sets (a test on
    another benchmark keeps the first one's)."""
    record = load_record(path)
    same = lambda a, b: _identity(a) == _identity(b)
    kept = [old for old in record[EVALUATIONS_KEY] if not any(same(old, new) for new in entries)]
    record = {k: v for k, v in record.items() if "/" not in k}  # headline numbers are recomputed below
    record.update(fields)
    if timing:
        timed = {_stage_and_set(key) for key in timing}
        older = {k: v for k, v in record.get(TIMING_KEY, {}).items() if _stage_and_set(k) not in timed}
        record[TIMING_KEY] = {**older, **{k: float(v) for k, v in sorted(timing.items())}}
    record[EVALUATIONS_KEY] = kept + list(entries)
    record[HEADLINE_KEY] = {}
    for stage in sorted({e["stage"] for e in record[EVALUATIONS_KEY]}):
        chosen = select_evaluation(record, stage)
        record[HEADLINE_KEY][stage] = describe(chosen)
        record.update(chosen["metrics"])
    evaluations = record.pop(EVALUATIONS_KEY)
    record[EVALUATIONS_KEY] = evaluations  # last, after the headline numbers, for people reading the file
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return record


def _stage_and_set(key: str) -> tuple[str, ...]:
    return tuple(key.split("/")[:2])


def _datasets(entry: dict) -> tuple[str, ...]:
    """The datasets an evaluation scored (the second part of ``<stage>/<dataset>/...`` metric names)."""
    return tuple(sorted({k.split("/")[1] for k in entry.get("metrics", {}) if k.count("/") >= 2}))


def _identity(entry: dict) -> tuple:
    return tuple(entry.get(k) for k in ("stage", "subcommand", "checkpoint")) + (_datasets(entry),)


def select_evaluation(record: dict, stage: str, checkpoint: str = "best") -> dict:
    """The evaluation of ``stage`` that stands for the run.

    ``checkpoint="best"``: the newest evaluation of the best checkpoint, else of the last checkpoint, else the
    newest evaluation of the stage. ``"last"``: the newest of the last checkpoint. Anything else is a checkpoint
    file name (or path relative to the run), whose newest evaluation is taken. The metrics of the same
    checkpoint's evaluations on other datasets (same stage and subcommand) are merged in.
    """
    chosen = _select_one(record, stage, checkpoint)
    peers = [
        e
        for e in record.get(EVALUATIONS_KEY, [])
        if _identity(e)[:3] == _identity(chosen)[:3] and _datasets(e) != _datasets(chosen)
    ]
    if not peers:
        return chosen
    metrics = {}
    for entry in peers:  # older first, so that a dataset scored twice keeps its newest figures
        metrics.update(entry["metrics"])
    return {**chosen, "metrics": {**metrics, **chosen["metrics"]}}


def _select_one(record: dict, stage: str, checkpoint: str) -> dict:
    candidates = [e for e in record.get(EVALUATIONS_KEY, []) if e.get("stage") == stage]
    if not candidates:
        raise MetricsRecordError(f"no {stage} evaluation recorded")
    if checkpoint in ("best", "last"):
        for role in ("best", "last") if checkpoint == "best" else ("last",):
            with_role = [e for e in candidates if role in e.get("roles", [])]
            if with_role:
                return with_role[-1]
        if checkpoint == "last":
            raise MetricsRecordError(f"no {stage} evaluation of the last checkpoint recorded")
        return candidates[-1]
    named = [e for e in candidates if e.get("checkpoint") and _names(e["checkpoint"], checkpoint)]
    if not named:
        recorded = sorted({str(e.get("checkpoint")) for e in candidates})
        raise MetricsRecordError(f"no {stage} evaluation of checkpoint {checkpoint!r}; recorded: {recorded}")
    return named[-1]


def _names(recorded: str, wanted: str) -> bool:
    return recorded == wanted or Path(recorded).name == wanted


def describe(entry: dict) -> str:
    """e.g. ``best checkpoint checkpoints/epoch012-step000130.ckpt (fit; epoch 12, step 130)``."""
    roles = " and ".join(entry.get("roles") or [])
    where = entry.get("checkpoint")
    if where is None:
        subcommand = entry.get("subcommand")
        what = {"fit": "end of training, in no checkpoint", None: "no checkpoint recorded"}.get(
            subcommand, "model as configured, no checkpoint"
        )
    else:
        what = f"{roles + ' ' if roles else ''}checkpoint {where}"
    details = [entry["subcommand"]] if entry.get("subcommand") else []
    if entry.get("epoch") is not None:
        details.append(f"epoch {entry['epoch']}, step {entry['step']}")
    return what + (f" ({'; '.join(details)})" if details else "")

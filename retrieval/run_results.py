"""Reading the final metrics of finished runs: from a run directory's ``metrics.json`` or from a W&B run's
own log file (offline or synced runs keep it), so results can be compared without any network access.

A run is named by any of:

* a run directory ``<root>/version_<N>`` (its ``metrics.json``);
* a root of run directories (its newest run with a ``metrics.json``);
* a W&B run directory ``.../wandb/offline-run-*`` or ``run-*`` (or the ``wandb/`` folder, for its newest
  run), or its ``run-<id>.wandb`` file: the last logged value of every metric, and the method's name
  from the run summary.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

METRICS_FILE = "metrics.json"
#: Key of the method's display name in ``metrics.json`` and in the W&B run summary.
METHOD_KEY = "method"

# The W&B transaction log is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records,
# each with a 7-byte header (CRC32, little-endian length, type); a record longer than a block's remainder
# is split into FIRST / MIDDLE / LAST pieces.
_WANDB_MAGIC = b":W&B"
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class RunResultsError(ValueError):
    """A path that does not name a finished run with readable metrics."""


def read_run(path: str | Path) -> tuple[str | None, dict[str, float]]:
    """``(method name or None, {metric key: value})`` of the run ``path`` names (see the module docstring)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".wandb":
        return read_wandb_log(path)
    if not path.is_dir():
        raise RunResultsError(f"{path} does not exist (expected a run directory, a root of runs or a W&B run)")
    if (path / METRICS_FILE).is_file():
        return _read_metrics_file(path / METRICS_FILE)
    logs = sorted(path.glob("run-*.wandb"))
    if logs:
        return read_wandb_log(logs[-1])
    wandb_runs = sorted(p for p in path.glob("*run-*") if p.is_dir() and list(p.glob("run-*.wandb")))
    if wandb_runs:  # a wandb/ folder: its newest run (names start with the date and time)
        return read_run(max(wandb_runs, key=lambda p: p.name.split("-", 1)[1]))
    runs = [p.parent for p in path.glob(f"*/{METRICS_FILE}")]
    if runs:
        return _read_metrics_file(max(runs, key=lambda p: (p / METRICS_FILE).stat().st_mtime) / METRICS_FILE)
    raise RunResultsError(
        f"{path} holds no {METRICS_FILE}, no run directory with one, and no W&B run (run-*.wandb): name a finished run"
    )


def _read_metrics_file(path: Path) -> tuple[str | None, dict[str, float]]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunResultsError(f"{path} is not valid JSON: {error}") from None
    method = content.pop(METHOD_KEY, None)
    return method, {k: float(v) for k, v in content.items() if isinstance(v, (int, float))}


def wandb_log_records(path: str | Path):
    """The raw records (protobuf bytes) of a W&B run's ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[: len(_WANDB_MAGIC)] != _WANDB_MAGIC:
        raise RunResultsError(f"{path} is not a W&B run log (it does not start with {_WANDB_MAGIC!r})")
    position, pieces = _HEADER, []
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # block trailer: zero padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        payload = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pieces = [payload]
        elif kind == _MIDDLE:
            pieces.append(payload)
        elif kind == _LAST:
            yield b"".join([*pieces, payload])
        elif kind == 0:  # zero padding up to the end of the block
            position += left_in_block - _HEADER - length


def read_wandb_log(path: str | Path) -> tuple[str | None, dict[str, float]]:
    """The last value of every numeric metric logged in a W&B run log, and the summary's method name."""
    from wandb.proto import wandb_internal_pb2

    metrics: dict[str, float] = {}
    method = None
    for payload in wandb_log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else ()
        for item in items:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json)
            if key == METHOD_KEY and isinstance(value, str):
                method = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("_"):
                metrics[key] = float(value)
    return method, metrics

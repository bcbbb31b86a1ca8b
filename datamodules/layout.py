"""Checks of a dataset's published layout, with errors that name the file and show the expected tree."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path


class DatasetLayoutError(FileNotFoundError):
    """A file of a dataset's published layout is missing."""


class DatasetFormatError(ValueError):
    """A file of a dataset's published layout does not have the published format."""


def require_file(path: str | Path, dataset: str, expected_tree: str) -> Path:
    """``path`` if it is a file, else a :class:`DatasetLayoutError` naming it and showing the expected tree."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{dataset}: {path} not found. Expected layout:\n{expected_tree.rstrip()}")
    return path


def read_csv_rows(path: Path, columns: list[str], dataset: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV whose header must be exactly ``columns``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != columns:
            raise DatasetFormatError(f"{dataset}: {path}:1 has header {header}; expected {','.join(columns)}")
        for line, values in enumerate(reader, start=2):
            if len(values) != len(columns):
                raise DatasetFormatError(
                    f"{dataset}: {path}:{line} has {len(values)} fields; expected {len(columns)} ({','.join(columns)})"
                )
            yield line, dict(zip(columns, values))

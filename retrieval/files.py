"""Small file helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename: readers never see half a file."""
    with replace_atomically(path) as temporary:
        temporary.write_text(text)


@contextmanager
def replace_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; renamed to ``path`` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_format_attributes(attrs, path, expected_format: str, newest_version: int, layout: str, error: type) -> None:
    """Refuse an HDF5 file whose optional ``format`` attribute names another format, or whose ``format_version``
    is newer than this code reads (files written by hand may omit both)."""
    found = attrs.get("format")
    found = found.decode() if isinstance(found, bytes) else found
    if found is not None and str(found) != expected_format:
        raise error(f"{path} has format={str(found)!r}, not '{expected_format}'; expected {layout}")
    if int(attrs.get("format_version", 0)) > newest_version:
        raise error(
            f"{path} has format_version {attrs['format_version']}, newer than this code reads ({newest_version}); "
            "update the package"
        )

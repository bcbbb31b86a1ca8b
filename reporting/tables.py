"""Plain-text tables for the terminal."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table; floats shown with 4 decimals."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = "+".join("-" * (w + 2) for w in widths)
    render = lambda row: " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    out = ([title] if title else []) + [render(header), line] + [render(r) for r in cells]
    return "\n".join(out)

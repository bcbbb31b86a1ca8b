"""Accuracy against embedding size: per-size metrics as curves, a table and a plot, for one run or several.

Methods with embeddings of several sizes log ``<stage>/<set>/<metric>@d<size>``
(:meth:`RetrievalModule.size_views`). This module turns such keys into curves ``{metric: {size: value}}``,
draws them (one panel per metric, one line per method, sizes on a log2 axis) and tabulates them.

``python -m lightning_modules.cli compare RUN [RUN ...]`` (or ``python -m retrieval.size_curves``) reads
finished runs (:mod:`retrieval.run_results`) and draws all methods on the same axes: the figure a paper shows.
A run may be given as ``LABEL=PATH`` to name its line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from retrieval.files import replace_atomically, write_text_atomic
from retrieval.run_results import RunResultsError, read_run

SIZE_KEY = re.compile(r"^(?P<stage>[^/]+)/(?P<metric>.+)@d(?P<size>\d+)$")
Curves = dict[str, dict[int, float]]  # metric ("<set>/<metric>") -> size -> value


def curves_from_metrics(metrics: dict[str, float], stage: str) -> Curves:
    """``{"<set>/<metric>": {size: value}}`` from the ``<stage>/<set>/<metric>@d<size>`` keys of ``metrics``."""
    curves: Curves = {}
    for key, value in metrics.items():
        match = SIZE_KEY.match(key)
        if match and match["stage"] == stage:
            curves.setdefault(match["metric"], {})[int(match["size"])] = float(value)
    return {metric: dict(sorted(by_size.items())) for metric, by_size in sorted(curves.items())}


def markdown_table(curves_by_method: dict[str, Curves], metric: str) -> str:
    """One row per method, one column per size, for ``metric`` (empty cells where a method lacks a size)."""
    sizes = sorted({size for curves in curves_by_method.values() for size in curves.get(metric, {})})
    lines = [f"| {metric} | " + " | ".join(f"d{size}" for size in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for method, curves in curves_by_method.items():
        values = curves.get(metric, {})
        cells = [f"{values[size]:.4f}" if size in values else "" for size in sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_size_curves(
    curves_by_method: dict[str, Curves], path: str | Path, metrics: list[str] | None = None, title=None
):
    """Draw ``metrics`` (default: all) against size, one panel each, one line per method; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or sorted({m for curves in curves_by_method.values() for m in curves})
    if not metrics:
        raise ValueError("no per-size metrics to plot (keys like <stage>/<set>/<metric>@d<size>)")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        sizes = set()
        for method, curves in curves_by_method.items():
            by_size = curves.get(metric)
            if by_size:
                axis.plot(list(by_size), list(by_size.values()), marker="o", label=method)
                sizes.update(by_size)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(sizes), [str(s) for s in sorted(sizes)])
        axis.set_xlabel("embedding size")
        axis.set_ylabel(metric)
        axis.grid(True, alpha=0.3)
    # One legend under all panels, so it never hides a curve.
    legend = {}
    for axis in axes[0]:
        handles, names = axis.get_legend_handles_labels()
        legend.update(zip(names, handles))
    columns = min(4, len(legend))
    figure.legend(
        list(legend.values()), list(legend), loc="lower center", ncol=columns, fontsize="small", frameon=False
    )
    if title:
        figure.suptitle(title)
    legend_rows = -(-len(legend) // columns)
    figure.tight_layout(rect=(0, 0.06 * legend_rows + 0.02, 1, 1))
    with replace_atomically(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return Path(path)


def compare_runs(runs: list[str], stage: str = "val") -> dict[str, Curves]:
    """``{label: curves}`` of each run (``PATH`` or ``LABEL=PATH``); the label defaults to the method's name."""
    curves_by_method: dict[str, Curves] = {}
    for run in runs:
        label, _, path = run.rpartition("=") if "=" in run and not Path(run).exists() else ("", "", run)
        method, metrics = read_run(path)
        curves = curves_from_metrics(metrics, stage)
        if not curves:
            raise RunResultsError(f"{path} has no per-size {stage} metrics ({stage}/<set>/<metric>@d<size>)")
        label = label or method or Path(path).name
        while label in curves_by_method:  # two runs of one method: keep both lines
            label += "'"
        curves_by_method[label] = curves
    return curves_by_method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.cli compare",
        description="Plot and tabulate accuracy against embedding size for several runs on the same axes.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, roots of runs or W&B runs; LABEL=PATH names a line")
    parser.add_argument("--stage", default="val", help="which stage's metrics (val or test)")
    parser.add_argument("--metric", action="append", help="'<set>/<metric>', e.g. embedded/mAP@100 (repeatable)")
    parser.add_argument("--output", default="size_comparison.png", help="the PNG to write")
    parser.add_argument("--table", help="also write the tables as Markdown to this file")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        curves_by_method = compare_runs(args.runs, args.stage)
    except RunResultsError as error:
        parser.exit(2, f"compare: {error}\n")
    available = sorted({m for curves in curves_by_method.values() for m in curves})
    unknown = [m for m in args.metric or [] if m not in available]
    if unknown:
        parser.exit(2, f"compare: no runs have {unknown}; available: {available}\n")
    metrics = args.metric or available
    tables = "\n\n".join(markdown_table(curves_by_method, metric) for metric in metrics)
    print(tables)
    plot_size_curves(curves_by_method, args.output, metrics, args.title)
    print(f"\nwrote {args.output}")
    if args.table:
        write_text_atomic(args.table, tables + "\n")


if __name__ == "__main__":
    main()

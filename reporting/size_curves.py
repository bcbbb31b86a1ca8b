"""Accuracy against embedding size: per-size metrics as curves, a table and a plot, for one run or several.

Methods with embeddings of several sizes log ``<stage>/<set>/<metric>@d<size>``
(:meth:`RetrievalModule.size_views`). This module turns such keys into curves ``{metric: {size: value}}``,
draws them (one panel per metric, one line per method, sizes on a log2 axis) and tabulates them. A method of
one size (raw embeddings, PCA, an AE-SVC without ``prefix_sizes``) is one point at its size.

``python -m lightning_modules.cli compare RUN [RUN ...] --output PNG [--table MD]`` (or ``python -m
reporting.size_curves RUN [RUN ...]``) reads finished runs (:mod:`reporting.run_results`) and draws all methods on
the same axes: the figure a paper shows. (Without ``--output`` / ``--table``, ``compare`` writes the cross-method
report instead: :mod:`reporting.method_comparison`.)
A run may be given as ``LABEL=PATH`` to name its line. Each run contributes one evaluation, the best
checkpoint's by default (``--checkpoint``), and the command prints which.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from reporting.run_results import RunMetrics, RunResultsError, read_run, split_label
from retrieval.files import replace_atomically, write_text_atomic

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


def point_from_metrics(metrics: dict[str, float], stage: str, size: int) -> Curves:
    """A single-size run as curves of one point: ``{"<set>/<metric>": {size: value}}`` from its plain keys."""
    prefix = f"{stage}/"
    return {
        key.removeprefix(prefix): {int(size): float(value)}
        for key, value in sorted(metrics.items())
        if key.startswith(prefix) and not SIZE_KEY.match(key)
    }


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
    """Draw ``metrics`` (default: all) against size, one panel each, one line per method (a method with one
    size: a star at its size); PNG written atomically."""
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
                style = {"marker": "o"} if len(by_size) > 1 else {"marker": "*", "markersize": 11, "linestyle": ""}
                axis.plot(list(by_size), list(by_size.values()), label=method, **style)
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


def run_curves(run: RunMetrics, stage: str, path: str) -> Curves:
    """A run's curves: its per-size metrics, or one point at its embedding size for a single-size method."""
    curves = curves_from_metrics(run.metrics, stage)
    if curves:
        return curves
    if run.embedding_size is None:
        raise RunResultsError(
            f"{path} has no per-size {stage} metrics ({stage}/<set>/<metric>@d<size>) and records no embedding_size"
        )
    curves = point_from_metrics(run.metrics, stage, run.embedding_size)
    if not curves:
        raise RunResultsError(f"{path} has no {stage} metrics")
    return curves


def compare_runs(runs: list[str], stage: str = "val", checkpoint: str = "best") -> tuple[dict[str, Curves], list[str]]:
    """``{label: curves}`` of each run (``PATH`` or ``LABEL=PATH``; the label defaults to the method's name),
    and one line per run saying which evaluation it contributed."""
    curves_by_method: dict[str, Curves] = {}
    sources = []
    for run in runs:
        label, path = split_label(run)
        result = read_run(path, stage, checkpoint)
        label = label or result.method or Path(path).name
        while label in curves_by_method:  # two runs of one method: keep both lines
            label += "'"
        curves_by_method[label] = run_curves(result, stage, path)
        sources.append(f"{label}: {result.source}")
    return curves_by_method, sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runs and the size-curve options (shared with ``compare``, :mod:`reporting.method_comparison`)."""
    parser.add_argument(
        "runs",
        nargs="+",
        help="run directories, roots of runs, W&B run directories, W&B run paths entity/project/id, or sweep "
        "directories (their best trial on the sweep's val metric); LABEL=PATH names a line",
    )
    parser.add_argument("--stage", default="val", help="which stage's metrics (val or test)")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="which evaluation of each run: best (default: the best checkpoint's, else the last's), last, "
        "or a checkpoint file name",
    )
    parser.add_argument("--metric", action="append", help="'<set>/<metric>', e.g. embedded/mAP@100 (repeatable)")
    parser.add_argument(
        "--output", default="size_comparison.png", help="the PNG of accuracy against embedding size to write"
    )
    parser.add_argument("--table", help="also write the accuracy-against-embedding-size tables as Markdown here")
    parser.add_argument("--title", help="title of the accuracy-against-embedding-size figure")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m reporting.size_curves",
        description="Plot and tabulate accuracy against embedding size for several runs on the same axes "
        "(a method of one size is drawn as a point at its size).",
    )
    add_arguments(parser)
    write_size_curves(parser.parse_args(argv), parser)


def write_size_curves(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Print the sources and tables of accuracy against embedding size, write the PNG (and the Markdown)."""
    try:
        curves_by_method, sources = compare_runs(args.runs, args.stage, args.checkpoint)
    except RunResultsError as error:
        parser.exit(2, f"compare: {error}\n")
    available = sorted({m for curves in curves_by_method.values() for m in curves})
    unknown = [m for m in args.metric or [] if m not in available]
    if unknown:
        parser.exit(2, f"compare: no runs have {unknown}; available: {available}\n")
    metrics = args.metric or available
    tables = "\n\n".join(markdown_table(curves_by_method, metric) for metric in metrics)
    print("\n".join(sources) + "\n")
    print(tables)
    plot_size_curves(curves_by_method, args.output, metrics, args.title)
    print(f"\nwrote {args.output}")
    if args.table:
        write_text_atomic(args.table, tables + "\n")


if __name__ == "__main__":
    main()

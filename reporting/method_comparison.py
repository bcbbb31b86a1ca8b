"""The cross-method report of ``python -m lightning_modules.cli compare``: per dataset, every method's best
configuration with its metrics, size, bytes per image and query time, and accuracy against bytes per image.

``compare RUN [RUN ...]`` takes run directories, roots of runs, W&B runs (:mod:`reporting.run_results`) and sweep
directories (:mod:`reporting.sweep_results`), of any methods, each as ``PATH`` or ``LABEL=PATH``. For every dataset
(the ``<set>`` of the ``<stage>/<set>/<metric>`` keys; a run may have several) it writes into ``--output-dir``:

* ``<set>.md``: one row per method (its label, else its ``method`` name): the configuration (a sweep's best trial
  with its parameters, else the run directory), the stage's metrics, the embedding size, the bytes one database
  image takes and the milliseconds per query;
* ``<set>.png``: the plotted metric against bytes per image on a log2 axis, one point per method, or its curve
  for a method scored at several sizes (``@d<size>``) or local-descriptor budgets (``@q<L_q>x<L_x>``).

Which configuration stands for a method is decided on val only: a sweep's best trial on its own val metric, and
among several inputs with the same label the one with the best val value of the plotted metric. ``--stage test``
then shows the test metrics of that configuration's checkpoint chosen on val (its best checkpoint), and says so.
Bytes per image: a re-ranker's ``<stage>/<set>/bytes_per_image`` metric, else the run's ``bytes_per_image`` (its
largest embedding as float32), else 4 x its embedding size. Query time: the run's ``timing`` (wall clock of its
newest evaluation of the stage, :mod:`reporting.metrics_record`), so it compares runs made on the same machine.

With ``--wandb`` the tables and plots are also logged to a W&B run (``WANDB_MODE`` honoured; without it online
when W&B is reachable, else offline under ``--output-dir``, as the training runs choose).
``--output PNG`` / ``--table MD`` write the accuracy-against-embedding-size curves of :mod:`reporting.size_curves`
instead (as ``compare`` did before the report existed); with ``--output-dir`` as well, both.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from reporting import size_curves
from reporting.metrics_record import BYTES_KEY, QUERY_TIME, TIMING_KEY
from reporting.run_results import RunMetrics, RunResultsError, read_run, split_label
from reporting.sweep_results import best_trial, describe_params, is_sweep_directory
from retrieval.files import replace_atomically, write_text_atomic

DEFAULT_OUTPUT_DIR = "comparison"
#: Values logged under ``<stage>/<set>/`` that are not accuracy metrics.
NOT_METRICS = ("bytes_per_image", "cos_var", "fusion_lambda", "fusion_gamma", "fusion_depth")
#: Another size of the same metric: ``@d<size>`` (embedding size) or ``@q<L_q>x<L_x>`` (local descriptors).
VARIANT = re.compile(r"@(d\d+|q\d+x\d+)$")
#: The metric plotted when ``--metric`` names none for a dataset: the first of these it has.
PREFERRED_METRICS = ("mAP@100", "public/mAP@100", "medium/mAP", "mAP", "mAP@4", "recall@1")
FLOAT32_BYTES = 4


@dataclass
class Candidate:
    """One input: a run (or a sweep's best trial) with the metrics to show and those to choose on."""

    label: str
    configuration: str
    shown: RunMetrics  # the chosen stage's evaluation
    selection: RunMetrics | None  # its val evaluation (the same as ``shown`` for --stage val)
    source: str


@dataclass
class Row:
    method: str
    configuration: str
    metrics: dict[str, float]  # within the dataset: "<metric>" -> value
    dims: int | None
    bytes_per_image: float | None
    ms_per_query: float | None
    curve: dict[float, float]  # bytes per image -> the plotted metric
    source: str


@dataclass
class DatasetReport:
    dataset: str
    stage: str
    metric: str  # plotted
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    chosen_on: str = ""  # the val metric that chooses among a method's configurations (default: ``metric``)

    @property
    def header(self) -> list[str]:
        return ["method", "configuration", *self.columns, "dims", "bytes per image", "ms per query"]

    def values(self) -> list[list]:
        """The table's cells as values (``None`` where a method has none)."""
        return [
            [row.method, row.configuration, *(row.metrics.get(c) for c in self.columns)]
            + [row.dims, row.bytes_per_image, row.ms_per_query]
            for row in self.rows
        ]


# ---- reading the inputs ------------------------------------------------------------------------------------------


def read_candidate(spec: str, stage: str = "val", checkpoint: str = "best") -> Candidate:
    """The input ``spec`` (``PATH`` or ``LABEL=PATH``) with its ``stage`` metrics and, for choosing, its val ones."""
    label, path = split_label(spec)
    if Path(path).is_dir() and is_sweep_directory(path):
        choice = best_trial(path)
        trial = choice.trial
        same = stage == "val" and checkpoint == "best"
        shown = choice.metrics if same else read_run(trial.run_directory, stage, checkpoint)
        params = describe_params(trial.params)
        configuration = f"{path} trial {trial.number}" + (f": {params}" if params else "")
        source = choice.describe(path) + ("" if same else f"; shown: {shown.source}")
        selection = choice.metrics
    else:
        shown = read_run(path, stage, checkpoint)
        configuration, source = shown.location or path, shown.source
        selection = shown if stage == "val" else _val_or_none(path, checkpoint)
    return Candidate(label or shown.method or Path(path).name, configuration, shown, selection, source)


def _val_or_none(path: str, checkpoint: str) -> RunMetrics | None:
    try:
        return read_run(path, "val", checkpoint)
    except RunResultsError:  # e.g. a benchmark without validation data: nothing to choose on
        return None


# ---- one dataset -------------------------------------------------------------------------------------------------


def datasets_of(metrics: dict[str, float], stage: str) -> list[str]:
    """The ``<set>`` of every ``<stage>/<set>/<metric>`` key, in order of appearance."""
    found = [key.split("/")[1] for key in metrics if key.count("/") >= 2 and key.startswith(stage + "/")]
    return list(dict.fromkeys(found))


def dataset_metrics(metrics: dict[str, float], stage: str, dataset: str) -> dict[str, float]:
    """``{"<metric>": value}`` of ``dataset``: its accuracy metrics at the main size (no ``@d`` / ``@q`` variant)
    and those of the global ranking a re-ranker starts from (``global/<metric>``)."""
    prefix = f"{stage}/{dataset}/"
    return {
        key.removeprefix(prefix): value
        for key, value in metrics.items()
        if key.startswith(prefix) and not VARIANT.search(key) and key.removeprefix(prefix) not in NOT_METRICS
    }


def bytes_per_image(run: RunMetrics, stage: str, dataset: str, variant: str = "") -> float | None:
    """Bytes of one database image: the logged metric (a re-ranker's), else the recorded float32 size of a global
    descriptor (``@d<size>``: that size's share), else 4 x the embedding size; ``None`` when nothing says."""
    logged = run.metrics.get(f"{stage}/{dataset}/bytes_per_image{variant}")
    if logged is not None:
        return float(logged)
    if variant.startswith("@q"):
        return None
    recorded, dims = run.record.get(BYTES_KEY), run.embedding_size
    per_value = recorded / dims if recorded and dims else FLOAT32_BYTES
    if variant.startswith("@d"):
        return float(int(variant[2:]) * per_value)
    if recorded:
        return float(recorded)
    return float(dims * per_value) if dims else None


def curve(run: RunMetrics, stage: str, dataset: str, metric: str) -> dict[float, float]:
    """``{bytes per image: metric}`` over every size the run was scored at (one point for a single size); of
    configurations with the same bytes per image, the first logged."""
    points = {}
    prefix = f"{stage}/{dataset}/{metric}"
    for key, value in run.metrics.items():
        if not key.startswith(prefix):
            continue
        variant = key.removeprefix(prefix)
        if variant and not VARIANT.fullmatch(variant):
            continue  # another metric that starts the same (mAP@100 after mAP)
        size = bytes_per_image(run, stage, dataset, variant)
        # At equal bytes (configurations that differ on the query side only), the first the run logged: its main
        # configuration's query size, never a choice by the values shown.
        if size is not None and size not in points:
            points[size] = float(value)
    return dict(sorted(points.items()))


def query_time(run: RunMetrics, stage: str, dataset: str) -> float | None:
    value = run.record.get(TIMING_KEY, {}).get(f"{stage}/{dataset}/{QUERY_TIME}")
    return None if value is None else float(value)


def default_metric(names) -> str:
    names = list(names)
    return next((m for m in PREFERRED_METRICS if m in names), sorted(names)[0] if names else "")


def selection_metric(candidates: list[Candidate], dataset: str, metric: str) -> str:
    """The val metric that chooses among configurations: ``metric`` itself, else (a test metric that validation
    has not, e.g. GLDv2's Private mAP@100) the dataset's main val metric."""
    names = [m for c in candidates if c.selection for m in dataset_metrics(c.selection.metrics, "val", dataset)]
    return metric if metric in names or not names else default_metric(dict.fromkeys(names))


def choose(candidates: list[Candidate], dataset: str, metric: str) -> tuple[Candidate, str | None]:
    """The candidate of one label with the best val value of ``metric`` on ``dataset`` (a note when there was a
    choice to make)."""
    if len(candidates) == 1:
        return candidates[0], None
    key = f"val/{dataset}/{metric}"
    scored = [c for c in candidates if c.selection is not None and key in c.selection.metrics]
    if not scored:
        raise RunResultsError(
            f"{len(candidates)} inputs are labelled {candidates[0].label!r} and none has {key} to choose between "
            "them: give fewer, or name them apart with LABEL=PATH"
        )
    best = max(scored, key=lambda c: c.selection.metrics[key])  # the first of equals: the order given
    return best, f"{best.label}: the best of {len(scored)} configurations on {key} ({best.configuration})"


def dataset_report(
    candidates: list[Candidate], stage: str, dataset: str, wanted: list[str] | None = None
) -> DatasetReport | None:
    """The report of one dataset over every label that has ``stage`` metrics on it (``None``: no label has)."""
    by_label: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        if dataset in datasets_of(candidate.shown.metrics, stage):
            by_label.setdefault(candidate.label, []).append(candidate)
    if not by_label:
        return None
    names = [m for c in candidates for m in dataset_metrics(c.shown.metrics, stage, dataset) if "global/" not in m]
    names = list(dict.fromkeys(names))
    metric = wanted[0] if wanted else default_metric(names)
    chosen_on = selection_metric([c for group in by_label.values() for c in group], dataset, metric)
    columns = list(wanted) if wanted else names
    notes, rows = [], []
    for label, group in by_label.items():
        chosen, note = choose(group, dataset, chosen_on)
        if note:
            notes.append(note)
        run = chosen.shown
        rows.append(
            Row(
                method=label,
                configuration=chosen.configuration,
                metrics=dataset_metrics(run.metrics, stage, dataset),
                dims=run.embedding_size,
                bytes_per_image=bytes_per_image(run, stage, dataset),
                ms_per_query=query_time(run, stage, dataset),
                curve=curve(run, stage, dataset, metric),
                source=chosen.source,
            )
        )
    if any(f"global/{metric}" in row.metrics for row in rows) and f"global/{metric}" not in columns:
        columns.append(f"global/{metric}")  # what re-ranking started from
    return DatasetReport(dataset, stage, metric, columns, rows, notes, chosen_on)


def build_reports(
    candidates: list[Candidate], stage: str = "val", wanted_metrics: list[str] | None = None
) -> list[DatasetReport]:
    """One report per dataset of the candidates; ``wanted_metrics``: ``<set>/<metric>`` names to show (the first
    of a set is plotted and chooses), an unknown one is an error."""
    datasets = list(dict.fromkeys(d for c in candidates for d in datasets_of(c.shown.metrics, stage)))
    wanted: dict[str, list[str]] = {}
    for name in wanted_metrics or []:
        dataset, _, metric = name.partition("/")
        known = {m for c in candidates for m in dataset_metrics(c.shown.metrics, stage, dataset)}
        if dataset not in datasets or metric not in known:
            available = {
                f"{d}/{m}" for d in datasets for c in candidates for m in dataset_metrics(c.shown.metrics, stage, d)
            }
            raise RunResultsError(f"no run has {stage}/{name}; available: {sorted(available)}")
        wanted.setdefault(dataset, []).append(metric)
    reports = [dataset_report(candidates, stage, d, wanted.get(d)) for d in datasets]
    return [r for r in reports if r is not None]


# ---- writing -----------------------------------------------------------------------------------------------------


def format_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "bytes per image":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if column == "ms per query":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(report: DatasetReport) -> str:
    header = report.header
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for values in report.values():
        lines.append("| " + " | ".join(format_cell(c, v) for c, v in zip(header, values)) + " |")
    return "\n".join(lines)


def describe_stage(report: DatasetReport) -> str:
    chosen = f"`val/{report.dataset}/{report.chosen_on or report.metric}`"
    if report.stage == "val":
        return (
            f"**val** metrics of each run's chosen evaluation (by default its best checkpoint on its val monitor); "
            f"a sweep stands for its best trial on the sweep's val metric, several inputs of one method for the best "
            f"of them on {chosen}."
        )
    return (
        f"**{report.stage}** metrics of the checkpoint chosen on val (by default each run's best checkpoint on its "
        f"val monitor); a sweep stands for its best trial on its val metric, several inputs of one method for the "
        f"best on {chosen}: nothing is chosen on {report.stage} data."
    )


def report_markdown(report: DatasetReport, plot_name: str | None) -> str:
    lines = [
        f"# Methods compared on `{report.dataset}` ({report.stage})",
        "",
        describe_stage(report)
        + " Bytes per image: what one database image takes in the search (a global descriptor as float32, or a "
        "re-ranker's global and local descriptors as stored). Milliseconds per query: wall clock of the run's "
        f"newest {report.stage} evaluation (search, re-ranking, scoring), comparable between runs on one machine.",
        "",
        markdown_table(report),
        "",
    ]
    if plot_name:
        lines += [f"![{report.metric} against bytes per image on {report.dataset}]({plot_name})", ""]
    lines += ["Where each row comes from:", ""]
    lines += [f"- **{row.method}**: {row.source}" for row in report.rows]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def human_bytes(value: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def plot_accuracy_against_bytes(report: DatasetReport, path: str | Path, title: str | None = None) -> Path | None:
    """The plotted metric against bytes per image (log2 axis), one point or curve per method; PNG written
    atomically. ``None`` when no method has a known size."""
    rows = [row for row in report.rows if row.curve]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 4.4))
    for row in rows:
        sizes, values = list(row.curve), list(row.curve.values())
        style = {"marker": "o"} if len(sizes) > 1 else {"marker": "*", "markersize": 12, "linestyle": ""}
        axis.plot(sizes, values, label=row.method, **style)
    everything = [size for row in rows for size in row.curve]
    low, high = math.floor(math.log2(min(everything))), math.ceil(math.log2(max(everything)))
    step = max(1, math.ceil((high - low + 1) / 10))
    ticks = [2.0**e for e in range(low, high + 1, step)]
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [human_bytes(t) for t in ticks])
    axis.minorticks_off()
    axis.set_xlabel("bytes per database image (log2 scale)")
    axis.set_ylabel(f"{report.stage}/{report.dataset}/{report.metric}")
    axis.set_title(title or f"{report.dataset}: {report.metric} against memory per image ({report.stage})")
    axis.grid(True, alpha=0.3)
    # The legend under the axes, so that it never hides a point.
    columns = min(4, len(rows))
    figure.legend(loc="lower center", ncol=columns, fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.06 * -(-len(rows) // columns) + 0.02, 1, 1))
    with replace_atomically(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return Path(path)


def write_reports(reports: list[DatasetReport], output_dir: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """``<dataset>.md`` and ``<dataset>.png`` of every report in ``output_dir``: ``{dataset: (md, png or None)}``."""
    output_dir = Path(output_dir)
    written = {}
    for report in reports:
        plot = plot_accuracy_against_bytes(report, output_dir / f"{report.dataset}.png")
        markdown = output_dir / f"{report.dataset}.md"
        write_text_atomic(markdown, report_markdown(report, plot.name if plot else None))
        written[report.dataset] = (markdown, plot)
    return written


def log_to_wandb(reports: list[DatasetReport], written: dict, output_dir: str | Path, project: str, inputs: list[str]):
    """Each dataset's table as a ``wandb.Table`` and its plot as an image, in one W&B run of job type ``compare``;
    returns the run's mode."""
    import wandb

    from lightning_modules.loggers import choose_wandb_mode

    mode = choose_wandb_mode()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    stage = reports[0].stage if reports else "val"
    run = wandb.init(
        project=project, job_type="compare", mode=mode, dir=str(output_dir), config={"inputs": inputs, "stage": stage}
    )
    for report in reports:
        logged = {f"compare/{report.dataset}/table": wandb.Table(columns=report.header, data=report.values())}
        plot = written.get(report.dataset, (None, None))[1]
        if plot is not None:
            logged[f"compare/{report.dataset}/accuracy_vs_bytes"] = wandb.Image(str(plot))
        run.log(logged)
    run.finish()
    return mode


# ---- the command -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.cli compare",
        description="Compare methods: per dataset, every method's best configuration with its metrics, size, bytes "
        "per image and query time (a Markdown table) and accuracy against bytes per image (a PNG), written to "
        "--output-dir. --output / --table draw accuracy against embedding size instead.",
    )
    size_curves.add_arguments(parser)
    parser.set_defaults(output=None)  # the size curves only when asked for
    parser.add_argument(
        "--output-dir",
        help=f"where the report goes: <dataset>.md and <dataset>.png (default: {DEFAULT_OUTPUT_DIR}/, unless only "
        "--output / --table are given)",
    )
    parser.add_argument("--wandb", action="store_true", help="also log the tables and plots to a W&B run")
    parser.add_argument("--wandb-project", default="image-retrieval", help="the W&B project (with --wandb)")
    args = parser.parse_args(argv)
    size_curves_asked = args.output is not None or args.table is not None
    if size_curves_asked:
        args.output = args.output or "size_comparison.png"
        size_curves.write_size_curves(args, parser)
        if args.output_dir is None:
            return
    try:
        candidates = [read_candidate(spec, args.stage, args.checkpoint) for spec in args.runs]
        reports = build_reports(candidates, args.stage, args.metric)
    except RunResultsError as error:
        parser.exit(2, f"compare: {error}\n")
    if not reports:
        parser.exit(2, f"compare: no {args.stage} metrics (<stage>/<set>/<metric>) in {args.runs}\n")
    output_dir = Path(args.output_dir or DEFAULT_OUTPUT_DIR)
    written = write_reports(reports, output_dir)
    for report in reports:
        chosen_on = f"val/{report.dataset}/{report.chosen_on}"
        print(f"{report.stage} on {report.dataset} (plotted: {report.metric}; chosen on {chosen_on})")
        print(markdown_table(report))
        for row in report.rows:
            print(f"  {row.method}: {row.source}")
        for note in report.notes:
            print(f"  {note}")
        print()
    for markdown, plot in written.values():
        print(f"wrote {markdown}" + (f" and {plot}" if plot else ""))
    if args.wandb:
        mode = log_to_wandb(reports, written, output_dir, args.wandb_project, args.runs)
        if mode == "offline":
            print(f"logged to W&B offline; upload with: wandb sync {output_dir / 'wandb'}/offline-run-*")

"""The cross-method report of `compare`: inputs (runs, sweeps), each method's configuration chosen on val, bytes per
image, query times recorded by the evaluation, the Markdown tables, the plots and the W&B logging."""

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SMALL_BENCHMARK

from callbacks.reranking_stage import rerank_eval_sets
from datamodules.base import EvalSet
from datamodules.feature_store import EmbeddingDataset
from lightning_modules import run_directory
from reporting.method_comparison import main as compare_main
from reporting.metrics_record import add_evaluations, evaluation
from reporting.run_results import RunResultsError, read_run
from reporting.sweep_results import best_trial
from retrieval.feature_store import FeatureStore, write_feature_store
from retrieval.ground_truth import LabelGroundTruth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory: Path, metrics: dict, timing: dict | None = None, **fields) -> Path:
    """A run directory whose metrics.json holds one evaluation per stage in ``metrics`` (the best checkpoint's)."""
    stages = sorted({key.split("/")[0] for key in metrics})
    entries = [
        evaluation(stage, "fit" if stage == "val" else stage, "checkpoints/best.ckpt", ["best"], of_stage)
        for stage in stages
        for of_stage in [{k: v for k, v in metrics.items() if k.startswith(stage + "/")}]
    ]
    add_evaluations(directory / "metrics.json", entries, timing, **fields)
    return directory


def embedded(stage: str, recall: float, average_precision: float, suffix: str = "") -> dict:
    return {f"{stage}/embedded/recall@1{suffix}": recall, f"{stage}/embedded/mAP@100{suffix}": average_precision}


def test_report_rows_with_sizes_bytes_and_query_times(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    aesvc = {
        **embedded("val", 0.5, 0.25),
        **embedded("val", 0.125, 0.0625, "@d8"),
        **embedded("val", 0.5, 0.25, "@d64"),
    }
    aesvc["val/other/mAP@100"] = 0.75  # a second benchmark of the same run: its own report
    write_run(
        Path("runs/aesvc"),
        aesvc,
        {"val/embedded/ms_per_query": 0.0123, "val/embedded/ms_per_query@d8": 0.004},
        method="AE-SVC",
        embedding_size=64,
        bytes_per_image=256,
    )
    # Recorded before bytes were: 4 bytes (float32) x 32 dimensions; no time recorded: an empty cell.
    write_run(Path("runs/pca"), embedded("val", 0.375, 0.125), method="PCA", embedding_size=32)
    ames = {**embedded("val", 0.75, 0.5), "val/embedded/global/mAP@100": 0.25, "val/embedded/bytes_per_image": 1056}
    ames.update({"val/embedded/mAP@100@q8x8": 0.375, "val/embedded/bytes_per_image@q8x8": 544.0})
    # the same database bytes with fewer query descriptors: the first logged is plotted, whatever its value
    ames.update({"val/embedded/mAP@100@q4x8": 0.4375, "val/embedded/bytes_per_image@q4x8": 544.0})
    ames["val/embedded/fusion_lambda"] = 0.5  # not an accuracy metric: no column
    write_run(Path("runs/ames"), ames, {"val/embedded/ms_per_query": 2.5}, method="AMES", embedding_size=None)

    compare_main(["runs/aesvc", "whitened=runs/pca", "runs/ames", "--output-dir", "out"])
    table = Path("out/embedded.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows == [
        "| method | configuration | recall@1 | mAP@100 | global/mAP@100 | dims | bytes per image | ms per query |",
        "|---|---|---|---|---|---|---|---|",
        "| AE-SVC | runs/aesvc | 0.5000 | 0.2500 |  | 64 | 256 | 0.0123 |",
        "| whitened | runs/pca | 0.3750 | 0.1250 |  | 32 | 128 |  |",
        "| AMES | runs/ames | 0.7500 | 0.5000 | 0.2500 |  | 1056 | 2.5 |",
    ]
    assert "![mAP@100 against bytes per image on embedded](embedded.png)" in table
    assert "**val** metrics" in table and "`val/embedded/mAP@100`" in table
    assert "- **whitened**: runs/pca/metrics.json: val of best checkpoint checkpoints/best.ckpt (fit)" in table
    assert Path("out/embedded.png").read_bytes()[:8] == PNG_MAGIC
    other = [line for line in Path("out/other.md").read_text().splitlines() if line.startswith("| AE")]
    assert other == ["| AE-SVC | runs/aesvc | 0.7500 | 64 | 256 |  |"]
    printed = capsys.readouterr().out
    assert rows[2] in printed and "wrote out/embedded.md and out/embedded.png" in printed

    from reporting.method_comparison import build_reports, read_candidate

    candidates = [read_candidate(spec) for spec in ("runs/aesvc", "runs/pca", "runs/ames")]
    (report, _) = build_reports(candidates, "val")
    # The plot's points: AE-SVC at every size (4 bytes a dimension), a re-ranker at every local budget.
    assert [row.curve for row in report.rows] == [
        {32.0: 0.0625, 256.0: 0.25},
        {128.0: 0.125},
        {544.0: 0.375, 1056.0: 0.5},
    ]
    only, other = build_reports(candidates, "val", ["embedded/recall@1"])  # shown, plotted and chosen on
    assert (only.metric, only.columns, other.metric, other.columns) == (
        "recall@1",
        ["recall@1"],
        "mAP@100",
        ["mAP@100"],
    )
    with pytest.raises(RunResultsError, match=r"no run has val/embedded/mAP@5; available: \['embedded/global/mAP"):
        build_reports(candidates, "val", ["embedded/mAP@5"])


def write_sweep(directory: Path, trials: list[tuple[str, dict, float, dict]], metric="val/embedded/mAP@100") -> Path:
    """A sweep directory as the offline runner writes it; ``trials``: (state, params, runner's value, metrics)."""
    directory.mkdir(parents=True)
    (directory / "sweep.yaml").write_text(
        f"method: random\nmetric: {{name: {metric}, goal: maximize}}\n"
        "parameters:\n  model.init_args.lr: {values: [0.1, 0.01]}\ncommand: [fit]\n"
    )
    summary = []
    for number, (state, params, value, metrics) in enumerate(trials):
        write_run(directory / f"trial_{number:03d}", metrics, method="AE-SVC", embedding_size=16)
        summary.append(
            {
                "number": number,
                "state": state,
                "params": params,
                "value": value,
                "run_directory": f"elsewhere/trial_{number:03d}",
            }
        )
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def test_a_sweep_stands_for_its_best_trial_on_val_and_test_shows_that_trials_test_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lr = "model.init_args.lr"
    write_sweep(
        Path("sweep"),
        [
            # the best on test, and the runner's summary says it is the best: neither may choose it
            (
                "COMPLETE",
                {lr: 0.1, "seed_everything": 0},
                0.99,
                {**embedded("val", 0.25, 0.25), **embedded("test", 0.9, 0.9)},
            ),
            (
                "COMPLETE",
                {lr: 0.01, "seed_everything": 1},
                0.1,
                {**embedded("val", 0.5, 0.5), **embedded("test", 0.3, 0.3)},
            ),
            (
                "PRUNED",
                {lr: 0.001, "seed_everything": 2},
                0.9,
                {**embedded("val", 0.75, 0.75), **embedded("test", 1.0, 1.0)},
            ),
        ],
    )
    choice = best_trial("sweep")
    assert (choice.trial.number, choice.considered, choice.trial.params[lr]) == (1, 2, 0.01)
    assert read_run("sweep", "test").metrics == embedded("test", 0.3, 0.3)  # every reader: the best trial

    # A plain run with the same label competes on val too: 0.375 < 0.5, so the sweep's trial stands for AE-SVC.
    write_run(Path("runs/plain"), {**embedded("val", 0.375, 0.375), **embedded("test", 0.95, 0.95)}, method="AE-SVC")
    compare_main(["sweep", "runs/plain", "--stage", "test", "--output-dir", "out"])
    table = Path("out/embedded.md").read_text()
    assert [line for line in table.splitlines() if line.startswith("| AE")] == [
        "| AE-SVC | sweep trial 1: lr=0.01, seed_everything=1 | 0.3000 | 0.3000 | 16 | 64 |  |"
    ]
    assert table.startswith("# Methods compared on `embedded` (test)")
    assert "**test** metrics of the checkpoint chosen on val" in table and "nothing is chosen on test data" in table
    assert "AE-SVC: the best of 2 configurations on val/embedded/mAP@100 (sweep trial 1" in table
    assert "trial 1, the best of 2 complete trials on val/embedded/mAP@100 (maximize; 0.5000)" in table


def test_a_test_metric_that_validation_lacks_chooses_on_the_main_val_metric(tmp_path, monkeypatch):
    """GLDv2's layout: Public queries validate, Private ones test; two runs of one method are told apart on val."""
    monkeypatch.chdir(tmp_path)
    for name, public, private in (("a", 0.25, 0.9), ("b", 0.375, 0.125)):
        metrics = {"val/landmarks/public/mAP@100": public, "test/landmarks/private/mAP@100": private}
        write_run(Path(name), metrics, {"test/landmarks/ms_per_query": 1.5}, method="GeM", embedding_size=8)
    compare_main(["a", "b", "--stage", "test", "--output-dir", "out"])
    table = Path("out/landmarks.md").read_text()
    assert [line for line in table.splitlines() if line.startswith("| GeM")] == ["| GeM | b | 0.1250 | 8 | 32 | 1.5 |"]
    assert "for the best on `val/landmarks/public/mAP@100`: nothing is chosen on test data" in table
    assert "GeM: the best of 2 configurations on val/landmarks/public/mAP@100 (b)" in table


def test_query_times_are_replaced_per_stage_and_set(tmp_path):
    path = tmp_path / "metrics.json"
    test_of = lambda name: [evaluation("test", "test", "best.ckpt", ["best"], {f"test/{name}/mAP": 0.5})]
    add_evaluations(path, test_of("a"), {"test/a/ms_per_query": 1.0, "test/a/ms_per_query@d8": 0.5})
    add_evaluations(path, test_of("b"), {"test/b/ms_per_query": 2.0})  # another benchmark: a's times stay
    add_evaluations(path, test_of("a"), {"test/a/ms_per_query": 3.0})  # a again: all of a's replaced
    assert json.loads(path.read_text())["timing"] == {"test/a/ms_per_query": 3.0, "test/b/ms_per_query": 2.0}


def test_bad_sweep_directories_are_refused_naming_the_file(tmp_path):
    sweep = write_sweep(tmp_path / "s", [("COMPLETE", {}, 0.0, embedded("val", 0.5, 0.5))])
    (sweep / "summary.json").write_text('{"trials": []}')
    with pytest.raises(RunResultsError, match=f"{sweep / 'summary.json'} is not a JSON list of trials"):
        best_trial(sweep)
    (sweep / "summary.json").unlink()
    with pytest.raises(RunResultsError, match="holds sweep.yaml but no summary.json"):
        best_trial(sweep)
    (sweep / "sweep.yaml").write_text("method: random\nparameters: {}\n")
    with pytest.raises(RunResultsError, match=re.escape(f"{sweep / 'sweep.yaml'}: missing `metric`")):
        best_trial(sweep)
    on_test = write_sweep(tmp_path / "t", [("COMPLETE", {}, 0.0, embedded("test", 0.5, 0.5))], "test/embedded/mAP@100")
    with pytest.raises(RunResultsError, match="selects on test/embedded/mAP@100; .* on a val metric only"):
        best_trial(on_test)
    failed = write_sweep(tmp_path / "f", [("FAIL", {}, 0.0, embedded("val", 0.5, 0.5))])
    with pytest.raises(RunResultsError, match="no complete trial recorded val/embedded/mAP@100"):
        best_trial(failed)


def test_the_report_is_logged_to_wandb_as_tables_and_images(tmp_path, monkeypatch):
    logged, runs = {}, []

    class Run:
        def log(self, values):
            logged.update(values)

        def finish(self):
            runs.append("finished")

    def init(**kwargs):
        runs.append(kwargs)
        return Run()

    fake = types.SimpleNamespace(
        init=init,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_run(tmp_path / "pca", embedded("val", 0.375, 0.125), method="PCA", embedding_size=32)
    compare_main([str(tmp_path / "pca"), "--output-dir", str(tmp_path / "out"), "--wandb"])
    assert runs[0]["mode"] == "offline" and runs[0]["job_type"] == "compare" and runs[-1] == "finished"
    assert runs[0]["dir"] == str(tmp_path / "out")
    assert logged["compare/embedded/table"] == (
        "table",
        ["method", "configuration", "recall@1", "mAP@100", "dims", "bytes per image", "ms per query"],
        [["PCA", str(tmp_path / "pca"), 0.375, 0.125, 32, 128.0, None]],
    )
    assert logged["compare/embedded/accuracy_vs_bytes"] == ("image", str(tmp_path / "out/embedded.png"))


def test_the_size_curve_flags_alone_still_write_only_the_size_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(Path("pca"), embedded("val", 0.375, 0.125), method="PCA", embedding_size=32)
    compare_main(["pca", "--output", "sizes.png"])
    assert Path("sizes.png").read_bytes()[:8] == PNG_MAGIC and not Path("comparison").exists()
    assert "| PCA | 0.3750 |" in capsys.readouterr().out
    compare_main(["pca", "--table", "sizes.md", "--output-dir", "report"])  # both
    assert Path("size_comparison.png").is_file() and Path("sizes.md").is_file() and Path("report/embedded.md").is_file()
    compare_main(["pca"])  # the report, where it goes by default
    assert Path("comparison/embedded.md").is_file() and Path("comparison/embedded.png").is_file()
    with pytest.raises(SystemExit) as bad:
        compare_main(["nothing"])
    assert bad.value.code == 2 and "nothing does not exist" in capsys.readouterr().err


class OneProcessTesting:
    """The pieces of a trainer the re-ranking stage uses: one process, running ``test``."""

    world_size, global_rank, is_global_zero = 1, 0, True

    class strategy:  # noqa: N801 - stands in for the trainer's strategy
        root_device = torch.device("cpu")
        broadcast = staticmethod(lambda value, src=0: value)

    class state:  # noqa: N801
        fn = "test"


def test_reranking_is_timed_per_query_with_the_global_search_in_it(tmp_path):
    """The re-ranking stage's times: the global search alone, and search + pair scoring + fusion for each local
    budget; never among the metrics."""
    from lightning_modules.ames import AMES

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3)
    local = np.zeros((12, 4, 5 + 6), dtype=np.float32)
    local[..., 5:] = rng.standard_normal((12, 4, 6))
    write_feature_store(tmp_path / "db.h5", [f"i{n}" for n in range(12)], rng.standard_normal((12, 8)), local, labels)
    store = FeatureStore(tmp_path / "db.h5")
    eval_set = EvalSet("tiny", EmbeddingDataset.from_store(store, with_locals=True), LabelGroundTruth(labels))
    torch.manual_seed(0)
    module = AMES(
        local_dim=6,
        num_layers=1,
        ffn_dim=16,
        shortlist=5,
        query_locals=4,
        database_locals=4,
        tune_fusion=False,
        eval_local_sizes=[[2, 2]],
    ).eval()
    timing = {}
    gathered = {"tiny/database": store.global_descriptors()}
    metrics = rerank_eval_sets(OneProcessTesting(), module, [eval_set], "test", gathered, None, timing)
    assert set(timing) == {"test/tiny/global/ms_per_query", "test/tiny/ms_per_query", "test/tiny/ms_per_query@q2x2"}
    assert 0 < timing["test/tiny/global/ms_per_query"] < timing["test/tiny/ms_per_query"]
    assert timing["test/tiny/global/ms_per_query"] < timing["test/tiny/ms_per_query@q2x2"]
    assert not any("ms_per_query" in key for key in metrics) and "test/tiny/mAP@100@q2x2" in metrics


@pytest.mark.slow
def test_a_real_run_records_query_times_and_bytes_and_the_report_shows_them(tmp_path, monkeypatch, capsys):
    from lightning_modules.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_directory, "_exported", None)
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/aesvc/embedded.yaml"),
            *SMALL_BENCHMARK,
            *quiet,
            "--trainer.max_epochs=1",
        ]
    )
    monkeypatch.delenv("RETRIEVAL_RUN_DIR", raising=False)
    run = Path("runs/aesvc/embedded/version_0")
    record = json.loads((run / "metrics.json").read_text())
    sizes = (8, 16, 32, 64)  # the shipped AE-SVC: 64-d latent, also scored truncated
    assert (record["embedding_size"], record["bytes_per_image"]) == (64, 4 * 64)
    assert set(record["timing"]) == {"val/embedded/ms_per_query"} | {f"val/embedded/ms_per_query@d{s}" for s in sizes}
    assert all(value > 0 for value in record["timing"].values())
    assert record["timing"]["val/embedded/ms_per_query"] == record["timing"]["val/embedded/ms_per_query@d64"]
    assert not any("ms_per_query" in key for e in record["evaluations"] for key in [*e, *e["metrics"]])

    capsys.readouterr()
    cli_main(["compare", "runs/aesvc/embedded", "--output-dir", "report"])
    row = next(line for line in Path("report/embedded.md").read_text().splitlines() if line.startswith("| AE-SVC"))
    milliseconds = f"{record['timing']['val/embedded/ms_per_query']:.3g}"
    metrics = [f"{record[f'val/embedded/{m}']:.4f}" for m in ("recall@1", "recall@10", "mAP@4", "mAP@100")]
    assert row == f"| AE-SVC | {run} | {' | '.join(metrics)} | 64 | 256 | {milliseconds} |"
    assert Path("report/embedded.png").read_bytes()[:8] == PNG_MAGIC

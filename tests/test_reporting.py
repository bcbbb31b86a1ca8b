"""The record of a run's evaluations (metrics.json), reading runs back, and `compare` with single-size runs."""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.retrieval_evaluation import fit_evaluations
from reporting.metrics_record import add_evaluations, evaluation, load_record, select_evaluation
from reporting.run_results import RunResultsError, read_run
from reporting.size_curves import compare_runs, markdown_table
from reporting.size_curves import main as compare_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def val(recall: float, sizes=()) -> dict:
    metrics = {"val/set/recall@1": recall}
    metrics.update({f"val/set/recall@1@d{size}": recall * size / 64 for size in sizes})
    return metrics


def test_every_evaluation_is_kept_and_the_headline_is_the_best_checkpoints(tmp_path):
    path = tmp_path / "metrics.json"
    fit = [
        evaluation("val", "fit", "checkpoints/epoch001.ckpt", ["best"], val(0.5), epoch=1, step=20),
        evaluation("val", "fit", "checkpoints/last.ckpt", ["last"], val(0.4), epoch=2, step=30),
    ]
    add_evaluations(path, fit, method="AE-SVC", embedding_size=64)
    # `validate --ckpt_path <another checkpoint>` is recorded, and never replaces the headline
    add_evaluations(path, [evaluation("val", "validate", "/elsewhere/other.ckpt", [], val(0.9))], method="AE-SVC")
    record = json.loads(path.read_text())
    assert [(e["subcommand"], e["checkpoint"]) for e in record["evaluations"]] == [
        ("fit", "checkpoints/epoch001.ckpt"),
        ("fit", "checkpoints/last.ckpt"),
        ("validate", "/elsewhere/other.ckpt"),
    ]
    assert record["val/set/recall@1"] == 0.5 and record["embedding_size"] == 64
    assert record["headline"] == {"val": "best checkpoint checkpoints/epoch001.ckpt (fit; epoch 1, step 20)"}
    # the same evaluation again replaces its entry; a test adds its own stage to the headline
    add_evaluations(path, [evaluation("val", "validate", "/elsewhere/other.ckpt", [], val(0.8))])
    add_evaluations(
        path, [evaluation("test", "test", "checkpoints/epoch001.ckpt", ["best"], {"test/set/recall@1": 0.3})]
    )
    record = load_record(path)
    assert len(record["evaluations"]) == 4 and record["test/set/recall@1"] == 0.3
    assert select_evaluation(record, "val", "other.ckpt")["metrics"]["val/set/recall@1"] == 0.8
    assert select_evaluation(record, "val", "last")["metrics"]["val/set/recall@1"] == 0.4
    assert select_evaluation(record, "val", "checkpoints/epoch001.ckpt")["step"] == 20
    with pytest.raises(ValueError, match="no val evaluation of checkpoint 'nothing.ckpt'"):
        select_evaluation(record, "val", "nothing.ckpt")
    with pytest.raises(ValueError, match="no predict evaluation recorded"):
        select_evaluation(record, "predict")


def test_one_checkpoint_tested_on_two_benchmarks_keeps_both_and_reads_as_one_evaluation(tmp_path):
    path, best = tmp_path / "metrics.json", "checkpoints/epoch001.ckpt"
    add_evaluations(path, [evaluation("test", "test", best, ["best"], {"test/gldv2/private/mAP@100": 0.3})])
    add_evaluations(path, [evaluation("test", "test", best, ["best"], {"test/roxford5k/medium/mAP": 0.6})])
    add_evaluations(path, [evaluation("test", "test", best, ["best"], {"test/roxford5k/medium/mAP": 0.7})])
    record = load_record(path)
    assert len(record["evaluations"]) == 2, "the re-test on roxford5k replaces its entry, gldv2's stays"
    expected = {"test/gldv2/private/mAP@100": 0.3, "test/roxford5k/medium/mAP": 0.7}
    assert select_evaluation(record, "test")["metrics"] == expected
    assert read_run(tmp_path, "test", "epoch001.ckpt").metrics == expected
    assert {k: v for k, v in record.items() if k.startswith("test/")} == expected


def test_without_a_best_checkpoint_the_last_then_the_newest_evaluation_stands_for_the_run(tmp_path):
    record = {"evaluations": [evaluation("val", "validate", "a.ckpt", [], val(0.1))]}
    assert select_evaluation(record, "val")["checkpoint"] == "a.ckpt"
    record["evaluations"].append(evaluation("val", "validate", "b.ckpt", [], val(0.2)))
    assert select_evaluation(record, "val")["checkpoint"] == "b.ckpt"
    record["evaluations"].insert(0, evaluation("val", "fit", "last.ckpt", ["last"], val(0.3)))
    assert select_evaluation(record, "val")["checkpoint"] == "last.ckpt"


def test_a_flat_metrics_file_of_an_older_run_is_read_as_one_evaluation_per_stage(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"method": "PCA", "val/s/m": 0.25, "test/s/m": 0.5}))
    run = read_run(tmp_path, "test")
    assert run.method == "PCA" and run.metrics == {"test/s/m": 0.5}
    assert "no checkpoint recorded" in run.source


def stub_trainer(tmp_path, best_step: int | None, last_step: int | None, monitor="val/set/recall@1"):
    """A trainer as the end of fit sees it: its checkpoint callback's best and last files, saved at steps."""
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    paths = {}
    for name, step in (("epoch001-step000020.ckpt", best_step), ("last.ckpt", last_step)):
        if step is not None:
            paths[name] = tmp_path / "checkpoints" / name
            torch.save({"global_step": step, "state_dict": {}}, paths[name])
    callback = SimpleNamespace(
        best_model_path=str(paths.get("epoch001-step000020.ckpt", "")),
        last_model_path=str(paths.get("last.ckpt", "")),
        monitor=monitor,
    )
    return SimpleNamespace(checkpoint_callback=callback)


VALIDATIONS = {10: (0, val(0.3)), 20: (1, val(0.5)), 30: (2, val(0.4))}  # step -> (epoch, metrics)


def test_the_end_of_fit_records_the_best_checkpoints_metrics_and_the_last(tmp_path):
    entries, notes = fit_evaluations(stub_trainer(tmp_path, 20, 30), tmp_path, VALIDATIONS)
    assert [(e["checkpoint"], e["roles"], e["step"], e["metrics"]["val/set/recall@1"]) for e in entries] == [
        ("checkpoints/epoch001-step000020.ckpt", ["best"], 20, 0.5),
        ("checkpoints/last.ckpt", ["last"], 30, 0.4),
    ]
    assert notes == ["metrics.json also records the last checkpoint checkpoints/last.ckpt (fit; epoch 2, step 30)"]


def test_without_a_top_k_checkpoint_the_last_is_the_best(tmp_path):
    entries, notes = fit_evaluations(stub_trainer(tmp_path, None, 30, monitor=None), tmp_path, VALIDATIONS)
    assert [(e["checkpoint"], e["roles"], e["step"]) for e in entries] == [
        ("checkpoints/last.ckpt", ["best", "last"], 30)
    ]
    assert notes == []


def test_a_best_checkpoint_validated_before_a_resume_is_named_not_invented(tmp_path):
    entries, notes = fit_evaluations(stub_trainer(tmp_path, 5, 30), tmp_path, VALIDATIONS)
    assert [(e["roles"], e["step"]) for e in entries] == [(["last"], 30)]
    assert "epoch001-step000020.ckpt was not validated in this process" in notes[0]
    # no checkpoint callback at all: the end of training, in no checkpoint
    entries, _ = fit_evaluations(SimpleNamespace(checkpoint_callback=None), tmp_path, VALIDATIONS)
    assert [(e["checkpoint"], e["roles"], e["step"]) for e in entries] == [(None, [], 30)]


def write_run(directory: Path, method: str, size: int, metrics: dict) -> Path:
    add_evaluations(
        directory / "metrics.json",
        [evaluation("val", "fit", "checkpoints/best.ckpt", ["best"], metrics)],
        method=method,
        embedding_size=size,
    )
    return directory


def test_wandb_runs_are_read_from_their_files_and_through_the_public_api(tmp_path, monkeypatch):
    # a local W&B run directory keeps a copy of metrics.json among its files
    for name, recall in (("offline-run-20260101_100000-aaaa", 0.1), ("run-20260102_100000-bbbb", 0.2)):
        (tmp_path / "wandb" / name / "files").mkdir(parents=True)
        write_run(tmp_path / "wandb" / name / "files", "M", 64, val(recall))
    assert read_run(tmp_path / "wandb").metrics == val(0.2)  # the newest run of a wandb/ folder
    assert read_run(tmp_path / "wandb/offline-run-20260101_100000-aaaa").metrics == val(0.1)

    # a synced run named entity/project/id, through wandb.Api (replaced here: no network in tests)
    record = load_record(write_run(tmp_path / "remote", "M", 32, val(0.7)) / "metrics.json")

    class File:
        name = "metrics.json"

        def download(self, root, replace):
            Path(root, self.name).write_text(json.dumps(record))

    runs = {
        "team/proj/withfile": SimpleNamespace(files=lambda: [File()], file=lambda name: File(), summary={}),
        "team/proj/summary": SimpleNamespace(
            files=lambda: [], summary={"method": "PCA", "embedding_size": 16, "val/set/recall@1": 0.6, "_step": 3}
        ),
    }

    def api():
        return SimpleNamespace(run=lambda path: runs[path] if path in runs else (_ for _ in ()).throw(ValueError(path)))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=api))
    remote = read_run("team/proj/withfile")
    assert (remote.method, remote.embedding_size, remote.metrics) == ("M", 32, val(0.7))
    assert "best checkpoint checkpoints/best.ckpt" in remote.source
    summary = read_run("team/proj/summary")
    assert (summary.method, summary.embedding_size, summary.metrics) == ("PCA", 16, {"val/set/recall@1": 0.6})
    with pytest.raises(RunResultsError, match="team/proj/missing is no local path and W&B could not open it"):
        read_run("team/proj/missing")


def test_reading_a_run_that_is_not_one_names_the_path(tmp_path):
    with pytest.raises(RunResultsError, match=f"{tmp_path} holds no metrics.json"):
        read_run(tmp_path)
    with pytest.raises(RunResultsError, match="nowhere does not exist"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "run-x.wandb").write_bytes(b":W&B")
    with pytest.raises(RunResultsError, match="run-x.wandb is a file: name a run directory"):
        read_run(tmp_path / "run-x.wandb")


def test_compare_draws_a_single_size_run_as_a_point_at_its_size(tmp_path, capsys):
    write_run(tmp_path / "ss2d", "(SS)2D", 256, val(0.5, sizes=(8, 64, 256)))
    write_run(tmp_path / "pca", "PCA", 64, val(0.3))  # no per-size keys: one point at d64
    curves, sources = compare_runs([str(tmp_path / "ss2d"), f"whitened={tmp_path / 'pca'}"])
    assert curves["whitened"] == {"set/recall@1": {64: 0.3}}
    assert curves["(SS)2D"] == {"set/recall@1": {8: 0.0625, 64: 0.5, 256: 2.0}}
    assert markdown_table(curves, "set/recall@1").splitlines()[2:] == [
        "| (SS)2D | 0.0625 | 0.5000 | 2.0000 |",
        "| whitened |  | 0.3000 |  |",
    ]
    assert (
        sources[1]
        == f"whitened: {tmp_path / 'pca' / 'metrics.json'}: val of best checkpoint checkpoints/best.ckpt (fit)"
    )
    compare_main([str(tmp_path / "ss2d"), str(tmp_path / "pca"), "--output", str(tmp_path / "sizes.png")])
    printed = capsys.readouterr().out
    assert "PCA: " in printed and "| PCA |  | 0.3000 |  |" in printed
    assert (tmp_path / "sizes.png").read_bytes()[:8] == PNG_MAGIC

"""Every method's training and evaluation through the command line on 1 process and on 2 DDP processes (gloo,
CPU), on tiny generated data: the same evaluations wherever training is deterministic.

The 1-process runs are in-process CLI calls. The 2-process runs are the same calls in 2 worker processes that carry
the torchrun environment (rank, world size, rendezvous address), so Lightning joins their process group instead
of launching processes: one pair of workers for every method, as each DDP launch costs seconds. Each run's directory is
pinned (``RETRIEVAL_RUN_DIR``), so both processes write into it, and the evaluation names its checkpoint.

Related tests: AE-SVC ``fit`` on 1 vs 2 processes launched as a user launches them, by Lightning
(tests/test_cli.py::test_one_and_two_ddp_processes_log_identical_metrics), the AMES evaluation with its longer
curve of sizes on 1 vs 2 (tests/test_ames.py), the box mAP of real detections scored on 1 vs 2
(tests/test_d2r_detector.py), extraction on 1 vs 2 (tests/test_extraction.py), and each training sampler's share
of every global batch per process (tests/test_sampling.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from pathlib import Path

import pytest
from conftest import REPO, run_in_two_processes
from test_d2r_detector import SMALL_DETECTOR
from test_generated_landmarks import TINY as TINY_LANDMARKS

from lightning_modules import run_directory

CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
ON_PROCESSES = {
    1: ["--trainer.accelerator=cpu", "--trainer.devices=1"],
    2: ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"],
}
# float64: the runs then differ only in the order of floating-point sums, which cannot flip a ranking.
FLOAT64 = ["--trainer.precision=64-true"]
# 400 training embeddings of 32 dimensions in 4 global batches; 50 queries and 200 database embeddings per split.
EMBEDDED = [
    "--data.init_args.spec.dim=32",
    "--data.init_args.spec.semantic_dim=16",
    "--data.init_args.spec.nuisance_dim=4",
    "--data.init_args.spec.train_classes=20",
    "--data.init_args.spec.eval_classes=10",
    "--data.init_args.batch_size=100",
    "--data.init_args.eval_batch_size=100",
    "--trainer.max_epochs=1",
    *FLOAT64,
]
# 96 training images, 3 global batches of 16 mined triplets trained on; 16 queries and 40 database images per split,
# the global top 10 re-ranked with the first 16 local descriptors of each image.
# Float32: the re-rankers cast their inputs to float32. The gradients of 1 and 2 processes then differ in the last
# bits, too little to change a ranking on these few pairs (a change would show as a different recall or mAP).
LOCAL_SPEC = {"train_objects": 24, "eval_objects": 8}
EMBEDDED_LOCAL = [
    *[f"--data.init_args.spec.{key}={value}" for key, value in LOCAL_SPEC.items()],
    "--data.init_args.batch_size=16",
    "--model.init_args.shortlist=10",
    "--model.init_args.query_locals=16",
    "--model.init_args.database_locals=16",
    "--model.init_args.eval_local_sizes=[]",
    "--model.init_args.pair_batch_size=64",
]
TRAIN_RERANKER = [*EMBEDDED_LOCAL, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"]
SMALL_AMES = [
    *TRAIN_RERANKER,
    "--model.init_args.num_layers=1",
    "--model.init_args.ffn_dim=64",
    "--model.init_args.itq_samples=1000",
    "--model.init_args.query_train_locals=[8,17]",  # universal: sizes drawn per step
    "--model.init_args.database_train_locals=[8,17]",
]
# 48-pixel generated landmarks, 12 training images of 4 landmarks, 2 global batches of 4 trained on.
LANDMARKS = [
    "--data.init_args.root=data/generated_landmarks",
    *[
        f"--data.init_args.spec.{f.name}={getattr(TINY_LANDMARKS, f.name)}"
        for f in dataclasses.fields(TINY_LANDMARKS)
        if getattr(TINY_LANDMARKS, f.name) != f.default
    ],
    "--data.init_args.batch_size=4",
    "--data.init_args.eval_batch_size=8",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
]
TINY_RESNET = '--model.init_args.model_kwargs={"layers": [1, 1, 1, 1]}'


@dataclasses.dataclass
class Method:
    """A method's two commands, in one run directory: ``train`` (``fit``; ``validate`` for a method with nothing to
    train) and ``evaluate`` (``test`` of the last checkpoint; ``validate`` where the benchmark has no test split).
    ``{runs}`` in an argument is the directory of the runs on the same number of processes (teachers)."""

    name: str
    args: list[str]
    train: str = "fit"
    evaluate: str = "test"
    #: Trains alike on 1 and 2 processes. Image methods do not: each process draws its own augmentations and its
    #: BatchNorm normalises its own half of the global batch (the detector also samples its own proposals).
    deterministic: bool = True
    #: For a method that does not, the metric keys of ``train``'s validation.
    val_metrics: tuple[str, ...] = ()


METHODS = [
    Method(
        "aesvc",
        ["--config", str(CONFIGS / "aesvc/embedded.yaml"), *EMBEDDED, "--model.init_args.latent_dim=16"]
        + ["--model.init_args.hidden_dims=[32]", "--model.init_args.prefix_sizes=[8]"],
    ),
    Method(
        "ss2d",
        ["--config", str(CONFIGS / "ss2d/embedded.yaml"), *EMBEDDED, "--model.init_args.sizes=[8,16]"]
        + ["--model.init_args.teacher_checkpoint={runs}/aesvc/checkpoints/last.ckpt"],
    ),
    Method("ames", ["--config", str(CONFIGS / "ames/embedded_local.yaml"), *SMALL_AMES]),
    Method("ames_binary", ["--config", str(CONFIGS / "ames/embedded_local_binary.yaml"), *SMALL_AMES]),
    Method(
        "ames_specific",
        ["--config", str(CONFIGS / "ames/embedded_local_specific.yaml"), *SMALL_AMES]
        + ["--model.init_args.query_train_locals=16", "--model.init_args.database_train_locals=16"],
    ),
    Method(
        "ames_distilled",
        ["--config", str(CONFIGS / "ames/embedded_local_distilled.yaml"), *SMALL_AMES]
        + ["--model.init_args.teacher={runs}/ames/checkpoints/last.ckpt", "--model.init_args.teacher_locals=16"],
    ),
    Method(
        "rrt",
        ["--config", str(CONFIGS / "rrt/embedded_local.yaml"), *TRAIN_RERANKER, "--model.init_args.num_layers=1"]
        + ["--model.init_args.ffn_dim=64", "--model.init_args.train_locals=16"],
    ),
    Method(
        "asmk",
        ["--config", str(CONFIGS / "asmk/embedded_local.yaml"), *EMBEDDED_LOCAL]
        + ["--model.init_args.codebook_path=data/embedded_local/codebook_32.npy"],
        train="validate",  # tunes the fusion; test applies it
    ),
    Method(
        "spatial_context",
        ["--config", str(CONFIGS / "spatial_context/generated_landmarks.yaml"), *LANDMARKS, TINY_RESNET]
        + ["--model.init_args.embedding_dim=16", '--model.init_args.pooling={"num_nodes": 3, "num_neighbors": 2}'],
        deterministic=False,
        val_metrics=("val/generated_landmarks/public/mAP@100",),
    ),
    Method(
        "delf",
        ["--config", str(CONFIGS / "delf/generated_landmarks.yaml"), *LANDMARKS, TINY_RESNET]
        + ["--model.init_args.attention_hidden=16", "--model.init_args.num_local=20"]
        + ["--model.init_args.projection_dim=8", "--model.init_args.pca_images=4"],
        deterministic=False,
        val_metrics=("val/generated_landmarks/public/mAP@100",),
    ),
    Method(
        "d2r_detector",
        ["--config", str(CONFIGS / "d2r/detector_generated.yaml"), *LANDMARKS, "--model.init_args.min_size=48"]
        + ["--model.init_args.max_size=48", f"--model.init_args.detector_options={json.dumps(SMALL_DETECTOR)}"]
        # one checkpoint, of the weights alone: the detector's 19 M parameters and optimiser state take seconds
        + ["--checkpoint.save_top_k=0", "--checkpoint.save_weights_only=true"],
        evaluate="validate",
        deterministic=False,
        val_metrics=("val/generated_landmark_boxes/box_mAP", "val/generated_landmark_boxes/box_mAP@0.5"),
    ),
]
BY_NAME = {method.name: method for method in METHODS}
# Methods whose 2-process checkpoint is evaluated again on 1 process. Not the detector: barely trained, it scores
# box mAP 0 on this tiny split whatever the processes; tests/test_d2r_detector.py scores real detections on 1 and 2.
REEVALUATED = ["spatial_context", "delf"]
# Every method's runs on 2 processes take about 30 s on 2 idle cores: room for busy ones.
TWO_PROCESS_TIMEOUT = 600


def prepare_data(workdir: Path) -> None:
    """The benchmarks and the ASMK codebook, written once before any run (so that no two processes race to)."""
    from datamodules.embedded import EmbeddedBenchmarkSpec, generate_embedded_benchmark
    from datamodules.embedded_local import EmbeddedLocalBenchmarkSpec, generate_embedded_local_benchmark
    from datamodules.generated_landmarks import generate_landmark_benchmark
    from retrieval.codebook import main as codebook

    spec = EmbeddedBenchmarkSpec(dim=32, semantic_dim=16, nuisance_dim=4, train_classes=20, eval_classes=10)
    generate_embedded_benchmark(workdir / "data/embedded", spec)
    local = generate_embedded_local_benchmark(workdir / "data/embedded_local", EmbeddedLocalBenchmarkSpec(**LOCAL_SPEC))
    codebook(["--stores", str(local / "train.h5"), "--size", "32", "--output", str(local / "codebook_32.npy")])
    generate_landmark_benchmark(workdir / "data/generated_landmarks", TINY_LANDMARKS)


def run_methods(workdir: Path, processes: int, names: list[str]) -> None:
    """Each method's two commands on ``processes`` processes (this one being one of them), in
    ``workdir/runs/<processes>/<method>``."""
    runs = workdir / "runs" / str(processes)
    for name in names:
        method = BY_NAME[name]
        directory = runs / name
        args = [arg.replace("{runs}", str(runs)) for arg in method.args]
        checkpoint = [] if method.train == "validate" else [f"--ckpt_path={directory}/checkpoints/last.ckpt"]
        run_cli_in_process(directory, processes, method.train, *args)
        run_cli_in_process(directory, processes, method.evaluate, *args, *checkpoint)


def run_cli_in_process(directory: Path, processes: int, subcommand: str, *args: str) -> None:
    """``python -m lightning_modules.cli <subcommand> <args>`` in this process (one of ``processes``), in the run
    directory ``directory``."""
    from lightning_modules.cli import main as cli_main

    # as separate commands would: the pinned directory is the user's, not one this process exported
    os.environ[run_directory.RUN_DIR_ENV] = str(directory)
    run_directory._exported = None
    cli_main([subcommand, *args, *QUIET, *ON_PROCESSES[processes]])


def evaluations_of(directory: Path) -> list[dict]:
    """The evaluations a run's ``metrics.json`` records, without their time."""
    record = json.loads((directory / "metrics.json").read_text())
    return [{k: v for k, v in entry.items() if k != "time"} for entry in record["evaluations"]]


def _two_process_worker(rank: int, port: int, workdir: Path, names: list[str], queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.chdir(workdir)
    try:
        run_methods(workdir, 2, names)
        queue.put((rank, None))
    except BaseException:  # the parent waits for every rank: report instead of leaving it waiting
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[int, dict[str, list[dict]]]:
    """``{processes: {method: evaluations}}``: every method trained and evaluated on 2 processes; on 1, the
    deterministic ones trained and evaluated too, the others' 2-process checkpoint evaluated (``REEVALUATED``)."""
    import torch

    workdir = tmp_path_factory.mktemp("ddp_methods")
    deterministic = [m.name for m in METHODS if m.deterministic]
    threads = torch.get_num_threads()
    # One thread per process: tensors this small gain nothing from more, whose threads spin (and, beside another
    # process's, slow it several times over on 2 busy cores).
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(workdir)
            patch.setattr(run_directory, "_exported", None)
            patch.delenv(run_directory.RUN_DIR_ENV, raising=False)
            prepare_data(workdir)
            run_methods(workdir, 1, deterministic)
            for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # the workers'
                patch.setenv(variable, "1")
            names = [m.name for m in METHODS]
            failures = run_in_two_processes(_two_process_worker, workdir, names, timeout=TWO_PROCESS_TIMEOUT)
            assert failures == {0: None, 1: None}, "\n".join(f"rank {r}:\n{f}" for r, f in failures.items() if f)
            for name in REEVALUATED:
                method, trained = BY_NAME[name], workdir / "runs/2" / name / "checkpoints/last.ckpt"
                arguments = (method.evaluate, *method.args, f"--ckpt_path={trained}")
                run_cli_in_process(workdir / "runs/1" / name, 1, *arguments)
    finally:
        torch.set_num_threads(threads)
    return {
        processes: {name: evaluations_of(workdir / "runs" / str(processes) / name) for name in names}
        for processes, names in ((1, deterministic + REEVALUATED), (2, [m.name for m in METHODS]))
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in METHODS if m.deterministic])
def test_two_processes_train_and_evaluate_as_one(evaluations, name):
    """The same metrics, of the same checkpoints (names, steps, roles)."""
    one, two = evaluations[1][name], evaluations[2][name]
    method = BY_NAME[name]
    assert [(e["subcommand"], e["stage"]) for e in one] == [(method.train, "val"), (method.evaluate, "test")]
    assert all(len(e["metrics"]) >= 3 for e in one)
    assert one == two


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in METHODS if not m.deterministic])
def test_image_methods_train_on_two_processes_and_their_checkpoint_evaluates_alike_on_one(evaluations, name):
    method = BY_NAME[name]
    trained, evaluated = evaluations[2][name]
    assert (trained["subcommand"], trained["step"], evaluated["subcommand"]) == ("fit", 2, method.evaluate)
    assert trained["metrics"].keys() == set(method.val_metrics)
    for entry in (trained, evaluated):
        assert entry["metrics"] and all(0 <= value <= 1 for value in entry["metrics"].values()), entry
    if name in REEVALUATED:
        (again,) = evaluations[1][name]
        assert again["metrics"] == evaluated["metrics"] and max(again["metrics"].values()) > 0

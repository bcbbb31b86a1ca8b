"""Every sweep file in ``sweeps/`` runs two trials through the offline runner (:mod:`lightning_modules.sweep`), in
process, on tiny generated data in the real formats: both trials finish with a finite value of the sweep's metric,
each trial's run really used the values the runner sampled (its saved ``config.yaml``), and the summary is written.

Each sweep gets only the overrides that make it tiny (data roots, data and batch sizes, two training steps, small
networks) or that a CPU without downloads needs (no pretrained weights, 32-bit precision), never one of its swept
parameters (the runner appends these overrides after the sweep's arguments, so they would win). The data of a family
is built once and shared by its sweeps; the teachers of the (SS)2D and distilled AMES sweeps are the trials of the
AE-SVC / full-precision AMES sweep of the same dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from layouts import gldv2_id, write_gldv2, write_pittsburgh_mat, write_sop

from datamodules.embedded import EmbeddedBenchmarkSpec, generate_embedded_benchmark
from datamodules.embedded_local import EmbeddedLocalBenchmarkSpec, generate_embedded_local_benchmark
from datamodules.generated_landmarks import GeneratedLandmarksSpec, generate_landmark_benchmark
from datamodules.gldv2 import GoogleLandmarksV2
from datamodules.pittsburgh import Pittsburgh30k
from datamodules.sop import StanfordOnlineProducts
from lightning_modules.sweep import run_sweep
from lightning_modules.sweep_definition import load_sweep
from reporting.run_results import read_run
from retrieval.feature_store import write_feature_store

SWEEP_FILES = sorted(p for p in (REPO / "sweeps").iterdir() if p.suffix in (".yaml", ".yml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# Two training steps, then the validation that scores the trial (max_steps would end the run before it).
TWO_STEPS = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]

EMBEDDED = EmbeddedBenchmarkSpec(
    dim=32, semantic_dim=12, nuisance_dim=4, train_classes=20, train_per_class=5, eval_classes=8, database_per_class=4
)
# 32-d locals: the binary AMES's ITQ initialisation then rotates 32 bits, not 64 (its SVDs dominate a tiny run).
EMBEDDED_LOCAL = EmbeddedLocalBenchmarkSpec(local_dim=32, train_objects=24, eval_objects=8)
LANDMARKS = GeneratedLandmarksSpec(
    image_size=64,
    train_landmarks=4,
    train_images_per_landmark=4,
    boxes_validation_fraction=0.25,
    query_landmarks=2,
    queries_per_landmark=2,
    index_images_per_landmark=2,
    index_distractor_landmarks=2,
    ignored_queries=1,
    revisited_landmarks=1,
    revisited_queries_per_landmark=1,
    revisited_database_per_landmark=1,
    revisited_distractor_landmarks=1,
    background_pool=3,
    distractor_pool=3,
)
GLOBAL_DIM, NUM_LOCALS, LOCAL_DIM = 32, 16, 32  # the stored descriptors of the image benchmarks
TINY_RESNET = json.dumps({"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16})


def spec_overrides(spec) -> list[str]:
    """``--data.init_args.spec.<field>=<value>`` for every field of ``spec`` that differs from the default."""
    default = type(spec)()
    return [
        f"--data.init_args.spec.{f.name}={json.dumps(getattr(spec, f.name))}"
        for f in dataclasses.fields(spec)
        if getattr(spec, f.name) != getattr(default, f.name)
    ]


def write_stores(data, features: Path, with_locals: bool, seed: int = 0) -> None:
    """A feature store of random descriptors for every list of ``data`` (an image benchmark), as extraction writes
    them: ids = the list's paths, globals ``[N, 32]``, and with ``with_locals`` 16 locals ``[N, 16, 5 + 32]`` with
    integer scale indices, the last 4 rows padding, sorted by decreasing weight."""
    rng = np.random.default_rng(seed)
    for name, images in data.lists.items():
        n = len(images)
        local = None
        if with_locals:
            local = np.zeros((n, NUM_LOCALS, 5 + LOCAL_DIM), dtype=np.float32)
            local[..., :2] = rng.uniform(0, 48, (n, NUM_LOCALS, 2))
            local[..., 2] = rng.integers(0, 7, (n, NUM_LOCALS))
            local[..., 4] = np.linspace(1, 0.1, NUM_LOCALS)
            local[..., 5:] = rng.standard_normal((n, NUM_LOCALS, LOCAL_DIM))
            local[:, -4:, 3], local[:, -4:, 4] = 1, 0
        write_feature_store(
            features / f"{name}.h5",
            images.ids,
            rng.standard_normal((n, GLOBAL_DIM)).astype(np.float32),
            local,
            labels=images.labels,
        )


class TinyData:
    """The tiny data of every family, built on first use and shared by all sweeps."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def _once(self, name: str, build) -> Path:
        if name not in self._built:
            directory = self.root / name
            directory.mkdir(parents=True)
            build(directory)
            self._built[name] = directory
        return self._built[name]

    def embedded(self) -> Path:
        return self._once("embedded", lambda d: generate_embedded_benchmark(d, EMBEDDED))

    def embedded_local(self) -> Path:
        return self._once("embedded_local", lambda d: generate_embedded_local_benchmark(d, EMBEDDED_LOCAL))

    def landmarks(self) -> Path:
        return self._once("generated_landmarks", lambda d: generate_landmark_benchmark(d, LANDMARKS))

    def gldv2(self) -> Path:
        """GLDv2 with 4 landmarks of 11 training images (the configs keep landmarks with at least 11), 8 scored
        queries (4 Public) and an index of 12, the Google Landmark Boxes files of its training images (split 1
        trains the detector, split 2 of other landmarks validates), and feature stores with locals of every list."""

        def build(directory: Path) -> None:
            root = directory / "gldv2"
            solution = [("Public", [0, 1]), ("Private", [2]), ("Public", [3]), ("Private", [4, 5]), ("Ignored", None)]
            solution += [("Public", [6]), ("Private", [7]), ("Public", [8]), ("Private", [9])]
            write_gldv2(root, {10 + landmark: 11 for landmark in range(4)}, solution, num_index=12)
            # 'ymin xmin ymax xmax', normalised: 6 images of landmark 10 train the detector, 4 of landmark 12 validate
            boxes = {1: range(6), 2: range(22, 26)}
            for split, images in boxes.items():
                rows = [f"{gldv2_id(n, 'a')},0.{1 + n % 3} 0.2 0.8 0.9" for n in images]
                (root / f"boxes_split{split}.csv").write_text("\n".join(["id,box", *rows]) + "\n")
            write_stores(GoogleLandmarksV2(str(root), min_images_per_class=11), directory / "features", True)

        return self._once("gldv2", build)

    def sop(self) -> Path:
        """SOP with 10 training classes of 4 images (one class held out to validate) and 3 test classes, with
        global feature stores of its lists."""

        def build(directory: Path) -> None:
            write_sop(directory / "sop", train_classes=10, test_classes=3, per_class=4)
            write_stores(StanfordOnlineProducts(str(directory / "sop")), directory / "features", False)

        return self._once("sop", build)

    def pitts30k(self) -> Path:
        """Pittsburgh30k's ``.mat`` layout, 24 database images 100 m apart and 6 queries per split (each 5 m from a
        database image), with global feature stores of its lists."""

        def build(directory: Path) -> None:
            root = directory / "pitts30k"
            for offset, split in enumerate(("train", "val", "test")):
                database = np.stack([np.arange(24) * 100.0 + 10_000 * offset, np.zeros(24)], axis=1)
                write_pittsburgh_mat(root, split, database, database[::4] + 5)
            write_stores(Pittsburgh30k(str(root), layout="mat"), directory / "features", False)

        return self._once("pitts30k", build)


# ---- the tiny overrides of every sweep ------------------------------------------------------------------------------


def embedded(data: TinyData) -> list[str]:
    return [f"--data.init_args.root={data.embedded()}", *spec_overrides(EMBEDDED), "--data.init_args.batch_size=50"]


def embedded_local(data: TinyData) -> list[str]:
    return [
        f"--data.init_args.root={data.embedded_local()}",
        *spec_overrides(EMBEDDED_LOCAL),
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=64",
    ]


def stored_features(data: TinyData, family: str, batch_size: int) -> list[str]:
    """An image benchmark read from its tiny feature stores."""
    directory = getattr(data, family)()
    return [
        f"--data.init_args.root={directory / family}",
        f"--data.init_args.features={directory / 'features'}",
        "--data.init_args.num_workers=0",
        f"--data.init_args.batch_size={batch_size}",
    ]


def images(data: TinyData, family: str) -> list[str]:
    return [f"--data.init_args.root={getattr(data, family)() / family}", "--data.init_args.num_workers=0"]


def landmarks(data: TinyData) -> list[str]:
    return [f"--data.init_args.root={data.landmarks()}", *spec_overrides(LANDMARKS), "--data.init_args.num_workers=0"]


def teacher(sweeps: Sweeps, name: str) -> str:
    """The directory of sweep ``name`` (a root of finished runs), run first if it has not run yet."""
    return str(sweeps.run(name)[1])


def train_crops(config: str, image_size: int) -> str:
    """The config's training augmentation with crops of ``image_size`` pixels, as one argument: a dotted override
    (``train_augmentation.image_size=96``) of this untyped dict would arrive as the string '96'."""
    augmentation = yaml.safe_load((REPO / "configs" / config).read_text())["data"]["init_args"]["train_augmentation"]
    return f"--data.init_args.train_augmentation={json.dumps({**augmentation, 'image_size': image_size})}"


# AE-SVC needs a batch larger than its latent (the covariance constraint): a 16-d latent for batches of 16 to 50,
# scored at that size only (the plot of metric against prefix size takes a second).
AESVC_TINY = [
    "--model.init_args.latent_dim=16",
    "--model.init_args.hidden_dims=[64]",
    "--model.init_args.prefix_sizes=null",
]
# A one-layer AMES re-ranking a short shortlist; the binary one's ITQ start on a sample (on more descriptors ITQ takes
# seconds of BLAS on busy cores).
AMES_TINY = [
    "--model.init_args.num_layers=1",
    "--model.init_args.ffn_dim=64",
    "--model.init_args.shortlist=10",
    "--model.init_args.pair_batch_size=64",
    "--model.init_args.itq_samples=512",
]
# The GLDv2 configs read the 400 locals per image of the real extraction; the tiny stores hold 16.
STORED_LOCALS = [
    f"--model.init_args.query_locals={NUM_LOCALS}",
    f"--model.init_args.database_locals={NUM_LOCALS}",
    f"--model.init_args.eval_local_sizes=[[{NUM_LOCALS}, 8], [8, 8]]",
]
UNIVERSAL_LOCALS = [
    f"--model.init_args.query_train_locals=[4, {NUM_LOCALS + 1}]",
    f"--model.init_args.database_train_locals=[4, {NUM_LOCALS + 1}]",
]
RRT_TINY = ["--model.init_args.num_layers=1", "--model.init_args.ffn_dim=64", "--model.init_args.shortlist=10"]
# Images: 96 px (128 px on the longer side for GLDv2's 48 x 40 images) give a map of 3 x 3 or more at stride 32, so
# the sampled smoothing kernels (3, 5) and GCN neighbours (2, 4, 8 of at most 9 nodes) are all really used.
SPATIAL_CONTEXT_TINY = [
    f"--model.init_args.model_kwargs={TINY_RESNET}",
    "--model.init_args.pretrained=false",  # no download here
    "--trainer.precision=32-true",  # the GLDv2 and SOP configs' bf16 autocast is slow or missing on a CPU
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16",
]
DELF_TINY = [
    f"--model.init_args.model_kwargs={TINY_RESNET}",
    "--model.init_args.attention_hidden=16",
    "--model.init_args.num_local=40",
    "--model.init_args.projection_dim=16",  # a PCA fitted on the locals of a handful of images
    "--model.init_args.pca_images=6",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
]
# Few proposals and sampled regions on 48-px images (as tests/test_d2r_detector.py).
DETECTOR_TINY = [
    "--model.init_args.weights=none",  # no download here
    "--model.init_args.min_size=48",
    "--model.init_args.max_size=48",
    "--model.init_args.detector_options="
    + json.dumps(
        {
            "rpn_pre_nms_top_n_train": 50,
            "rpn_post_nms_top_n_train": 20,
            "rpn_pre_nms_top_n_test": 50,
            "rpn_post_nms_top_n_test": 20,
            "box_batch_size_per_image": 16,
        }
    ),
    "--data.init_args.batch_size=3",
    "--data.init_args.eval_batch_size=4",
    # With the optimizer's state a checkpoint of the detector's 19M parameters is up to 230 MB, written twice per
    # trial (best and last); the weights alone are a third of that, and nothing here resumes a trial.
    "--checkpoint.save_weights_only=true",
]

# Every sweep file's tiny overrides: (tiny data, the sweeps run so far) -> CLI arguments.
TINY = {
    "aesvc_embedded": lambda data, sweeps: [*embedded(data), *AESVC_TINY],
    "aesvc_sop": lambda data, sweeps: [*stored_features(data, "sop", 16), *AESVC_TINY],
    "aesvc_pitts30k": lambda data, sweeps: [*stored_features(data, "pitts30k", 16), *AESVC_TINY],
    "aesvc_gldv2": lambda data, sweeps: [*stored_features(data, "gldv2", 22), *AESVC_TINY],
    "ss2d_embedded": lambda data, sweeps: [
        *embedded(data),
        f"--model.init_args.teacher_checkpoint={teacher(sweeps, 'aesvc_embedded')}",
    ],
    "ss2d_sop": lambda data, sweeps: [
        *stored_features(data, "sop", 16),
        f"--model.init_args.teacher_checkpoint={teacher(sweeps, 'aesvc_sop')}",
    ],
    "ss2d_pitts30k": lambda data, sweeps: [
        *stored_features(data, "pitts30k", 16),
        f"--model.init_args.teacher_checkpoint={teacher(sweeps, 'aesvc_pitts30k')}",
    ],
    "ames_embedded_local": lambda data, sweeps: [*embedded_local(data), *AMES_TINY],
    "ames_binary_embedded_local": lambda data, sweeps: [*embedded_local(data), *AMES_TINY],
    "ames_specific_embedded_local": lambda data, sweeps: [*embedded_local(data), *AMES_TINY],
    "ames_distilled_embedded_local": lambda data, sweeps: [
        *embedded_local(data),
        *AMES_TINY,
        f"--model.init_args.teacher={teacher(sweeps, 'ames_embedded_local')}",
    ],
    "rrt_embedded_local": lambda data, sweeps: [*embedded_local(data), *RRT_TINY],
    "ames_gldv2": lambda data, sweeps: [
        *stored_features(data, "gldv2", 8),
        *AMES_TINY,
        *STORED_LOCALS,
        *UNIVERSAL_LOCALS,
    ],
    "ames_binary_gldv2": lambda data, sweeps: [
        *stored_features(data, "gldv2", 8),
        *AMES_TINY,
        *STORED_LOCALS,
        *UNIVERSAL_LOCALS,
    ],
    "ames_specific_gldv2": lambda data, sweeps: [
        *stored_features(data, "gldv2", 8),
        *AMES_TINY,
        *STORED_LOCALS,
        "--model.init_args.query_train_locals=8",
        "--model.init_args.database_train_locals=8",
    ],
    "ames_distilled_gldv2": lambda data, sweeps: [
        *stored_features(data, "gldv2", 8),
        *AMES_TINY,
        *STORED_LOCALS,
        *UNIVERSAL_LOCALS,
        f"--model.init_args.teacher_locals={NUM_LOCALS}",
        f"--model.init_args.teacher={teacher(sweeps, 'ames_gldv2')}",
    ],
    "rrt_gldv2": lambda data, sweeps: [
        *stored_features(data, "gldv2", 8),
        *RRT_TINY,
        f"--model.init_args.train_locals={NUM_LOCALS}",
        f"--model.init_args.query_locals={NUM_LOCALS}",
        f"--model.init_args.database_locals={NUM_LOCALS}",
    ],
    "spatial_context_generated_landmarks": lambda data, sweeps: [
        *landmarks(data),
        *SPATIAL_CONTEXT_TINY,
        "--data.init_args.image_size=96",
    ],
    "spatial_context_gldv2": lambda data, sweeps: [
        *images(data, "gldv2"),
        *SPATIAL_CONTEXT_TINY,
        "--data.init_args.image_size=128",
        train_crops("spatial_context/gldv2.yaml", 128),
    ],
    "spatial_context_sop": lambda data, sweeps: [
        *images(data, "sop"),
        *SPATIAL_CONTEXT_TINY,
        "--data.init_args.image_size=96",
        train_crops("spatial_context/sop.yaml", 96),
        "--data.init_args.class_balanced.classes_per_batch=2",  # 2 classes x 4 images = the batch of 8
        "--data.init_args.class_balanced.images_per_class=4",
    ],
    "delf_generated_landmarks": lambda data, sweeps: [*landmarks(data), *DELF_TINY],
    "delf_gldv2": lambda data, sweeps: [
        *images(data, "gldv2"),
        *DELF_TINY,
        "--model.init_args.pretrained=false",  # no download here
        "--model.init_args.backbone=resnet18",  # the tiny ResNet of basic blocks (the config's ResNet-50 is 25M)
        "--trainer.precision=32-true",
        "--data.init_args.image_size=64",
        train_crops("delf/gldv2.yaml", 64),
    ],
    "d2r_detector_generated": lambda data, sweeps: [*landmarks(data), *DETECTOR_TINY],
    "d2r_detector_gld": lambda data, sweeps: [
        *images(data, "gldv2"),
        *DETECTOR_TINY,
        # The config's ResNet-50 FPN (41M parameters) makes a trial 2.5 times as long; the generated boxes' config
        # trains this one.
        "--model.init_args.architecture=mobilenet_v3_large_fpn",
        "--data.init_args.image_size=48",
    ],
}


class Sweeps:
    """Runs each sweep once (two trials, in process) and keeps its summary rows and directory."""

    def __init__(self, root: Path, data: TinyData):
        self.root, self.data = root, data
        self._done: dict[str, tuple[list[dict], Path]] = {}

    def run(self, name: str) -> tuple[list[dict], Path]:
        if name not in self._done:
            extra = TINY[name](self.data, self)  # may run a teacher's sweep first
            directory = self.root / name
            # The sweep's command names its config relative to the working directory, as from the repository root.
            work = self.root / "work"
            if not work.exists():
                work.mkdir()
                (work / "configs").symlink_to(REPO / "configs")
            previous, threads = Path.cwd(), torch.get_num_threads()
            os.chdir(work)
            # Tiny steps on shared cores: one intra-op thread is several times faster than two competing ones.
            torch.set_num_threads(1)
            try:
                rows = run_sweep(
                    REPO / "sweeps" / f"{name}.yaml",
                    2,
                    sweep_dir=directory,
                    extra=[*extra, *TWO_STEPS, *QUIET],
                    in_process=True,
                    seed=0,
                )
            finally:
                os.chdir(previous)
                torch.set_num_threads(threads)
            self._done[name] = rows, directory
        return self._done[name]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    yield Sweeps(root, TinyData(root / "data"))
    # 0.8 GB, mostly the detectors', that pytest would keep with its last temporary directories; the rest stays.
    for checkpoint in root.rglob("*.ckpt"):
        checkpoint.unlink()


def test_every_sweep_file_has_tiny_overrides_here():
    """A new sweep file must be added to TINY (and so be run below)."""
    assert {p.stem for p in SWEEP_FILES} == set(TINY)
    assert len(SWEEP_FILES) >= 24


def config_value(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_runs_two_trials_through_the_offline_runner(path, sweeps):
    sweep = load_sweep(path)
    rows, directory = sweeps.run(path.stem)
    failures = {r["number"]: r for r in rows if r["state"] != "COMPLETE"}
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], failures
    for row in rows:
        run = Path(row["run_directory"])
        assert run.parent == directory and math.isfinite(row["value"])
        # the trial's value is the sweep metric of its (single) validation, as the run recorded it
        assert row["value"] == pytest.approx(read_run(run, "val", "best").metrics[sweep.metric])
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert set(row["params"]) == {p.name for p in sweep.parameters}
        for name, value in row["params"].items():
            assert config_value(config, name) == value, f"trial {row['number']}: {name}"
    assert rows[0]["params"] != rows[1]["params"]
    assert json.loads((directory / "summary.json").read_text()) == rows
    table = (directory / "summary.md").read_text()
    assert sweep.metric in table and all(f"`{r['run_directory']}`" in table for r in rows)

"""No model selection on test data: every shipped config monitors a validation key, and the data a datamodule
validates on (and hence selects checkpoints on) is never data its test scores."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from layouts import write_gldv2, write_pittsburgh_folders, write_revisited, write_sop

from datamodules.embedded import EmbeddedBenchmarkSpec
from datamodules.embedded_local import EmbeddedLocalBenchmarkSpec
from datamodules.landmark_boxes import LandmarkBoxes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("extract", "data", "logger", "trainer")
)
GND = [{"easy": [0, 3], "hard": [5], "junk": [1]}, {"easy": [2], "hard": [4], "junk": []}]


def data_section(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    data = config["data"]
    return yaml.safe_load((path.parent / data).read_text()) if isinstance(data, str) else data


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_monitor_validation_keys_only(path):
    monitor = (yaml.safe_load(path.read_text()).get("checkpoint") or {}).get("monitor")
    assert monitor is None or monitor.startswith("val/"), f"{path} selects checkpoints on {monitor}"
    if "Revisited" in data_section(path)["class_path"]:
        assert monitor is None, f"{path}: Revisited Oxford/Paris is test data only; nothing may be selected on it"


def write_layout(family: str, root: Path) -> None:
    if family == "sop":
        write_sop(root, train_classes=10, test_classes=3, per_class=2)
    elif family == "pittsburgh":
        utm = np.array([[0.0, 0.0], [100.0, 0.0]])
        for split in ("train", "val", "test"):  # the folder layout: the splits' file names differ, as in Pitts30k
            write_pittsburgh_folders(root, split, utm + {"train": 0, "val": 1000, "test": 2000}[split], utm + 5)
    elif family == "gldv2":
        write_gldv2(root, {7: 3}, [("Public", [0]), ("Private", [1]), ("Public", [2]), ("Private", [0])], num_index=3)
    elif family == "revisited":
        for name in ("roxford5k", "rparis6k"):
            write_revisited(root, name, num_database=6, gnd=GND)
    elif family == "landmark_boxes":  # the detector's Google Landmark Boxes: images of other landmarks validate
        (root / "boxes_split1.csv").write_text("id,box\naaa1,0.1 0.1 0.9 0.9\naaa2,0.2 0.2 0.8 0.8\n")
        (root / "boxes_split2.csv").write_text("id,box\nbbb1,0.1 0.1 0.9 0.9\n")


def scored_ids(data, stage: str) -> set[str]:
    """What a stage scores: its queries, or the database of a leave-one-out protocol."""
    ids = set()
    for eval_set in data.eval_sets(stage):
        parts = eval_set.query_parts or eval_set.database_parts
        for dataset in parts.values():
            ids |= set(dataset.ids)
    return ids


DATAMODULES = sorted({data_section(p)["class_path"] for p in TRAINING_CONFIGS})


@pytest.mark.parametrize("class_path", DATAMODULES)
def test_validation_never_scores_test_data(class_path, tmp_path):
    module, _, name = class_path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    family = cls.__module__.rsplit(".", 1)[-1]
    if family == "embedded":
        data = cls(root=str(tmp_path), spec=EmbeddedBenchmarkSpec(train_classes=10, eval_classes=4, seed=0))
        data.prepare_data()
    elif family == "embedded_local":
        data = cls(root=str(tmp_path), spec=EmbeddedLocalBenchmarkSpec(train_objects=10, eval_objects=4))
        data.prepare_data()
    elif family == "generated_landmarks":
        from test_generated_landmarks import TINY

        data = cls(root=str(tmp_path), spec=TINY)
        data.prepare_data()
    else:
        write_layout(family, tmp_path)
        data = cls(root=str(tmp_path), **({"layout": "folders"} if family == "pittsburgh" else {}))
    if isinstance(data, LandmarkBoxes):  # no retrieval sets: the detector validates on boxes of other images
        assert data.eval_sets("val") == data.eval_sets("test") == []
        validated, trained = set(data.boxes("val")), set(data.boxes("train"))
        assert validated and trained and not validated & trained, f"{class_path} validates on training images"
        return
    validated, tested = scored_ids(data, "val"), scored_ids(data, "test")
    assert tested, f"{class_path} scores nothing at test time"
    assert not validated & tested, f"{class_path} validates on {len(validated & tested)} test examples"
    if family == "revisited" or cls.__name__ == "GeneratedLandmarksRevisited":
        assert not validated


def test_fit_on_revisited_validates_nothing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The Revisited configs have no validation data: fit trains and checkpoints, and selects nothing."""
    for name in ("roxford5k", "rparis6k"):
        write_revisited(tmp_path / "data/revisited", name, num_database=6, gnd=GND)
    from datamodules.revisited import RevisitedOxfordParis
    from lightning_modules.cli import main
    from retrieval.feature_store import write_feature_store

    data = RevisitedOxfordParis(str(tmp_path / "data/revisited"), train_on="rparis6k_database")
    rng = np.random.default_rng(0)
    for list_name, images in data.lists.items():
        write_feature_store(
            tmp_path / "features" / f"{list_name}.h5", images.paths, rng.standard_normal((len(images), 6))
        )
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "aesvc/revisited.yaml"),
            "--data.init_args.root=data/revisited",
            "--data.init_args.features=features",
            "--data.init_args.train_on=rparis6k_database",
            "--data.init_args.batch_size=6",
            "--data.init_args.num_workers=0",
            "--model.init_args.latent_dim=4",
            "--model.init_args.hidden_dims=[8]",
            "--trainer.max_epochs=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.default_root_dir=runs",
        ]
    )
    checkpoints = sorted(p.name for p in (tmp_path / "runs/version_0/checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2  # the last epoch's, and last.ckpt
    assert (
        not (tmp_path / "runs/version_0/metrics.json").exists()
        or "val/" not in (tmp_path / "runs/version_0/metrics.json").read_text()
    )

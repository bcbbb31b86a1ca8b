"""Tiny copies of the benchmarks in their exact published layouts, with real JPEG files.

Each writer returns what it wrote, so tests can compare the readers' output with it. Images are small JPEGs
whose colour depends on the class/place, so a backbone sees some signal.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def truncate_file(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut a file short (a download that broke off)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


# ---- Stanford Online Products --------------------------------------------------------------------------------


def write_sop(root: Path, train_classes: int = 4, test_classes: int = 3, per_class: int = 3) -> dict:
    """``Ebay_train.txt`` / ``Ebay_test.txt`` with classes numbered as in SOP (test classes follow train)."""
    super_classes = ["bicycle", "cabinet", "chair"]
    written = {}
    image_id, class_id = 1, 1
    for split, count in (("train", train_classes), ("test", test_classes)):
        lines, classes = ["image_id class_id super_class_id path"], []
        for _ in range(count):
            super_class = (class_id - 1) % len(super_classes)
            for n in range(per_class):
                relative = f"{super_classes[super_class]}_final/{100000 + class_id}_{n}.JPG"
                write_jpeg(root / relative, seed=class_id)
                lines.append(f"{image_id} {class_id} {super_class + 1} {relative}")
                classes.append(class_id)
                image_id += 1
            class_id += 1
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        written[split] = classes
    return written


# ---- Pittsburgh ------------------------------------------------------------------------------------------------


def write_pittsburgh_mat(root: Path, split: str, database_utm: np.ndarray, query_utm: np.ndarray) -> dict:
    """``datasets/pitts30k_<split>.mat`` (NetVLAD dbStruct, fields in the published order) and the images."""
    from scipy.io import savemat

    database = [f"{i // 1000:03d}/{i:06d}_pitch1_yaw1.jpg" for i in range(len(database_utm))]
    queries = [f"{i // 1000:03d}/{i:06d}_pitch2_yaw3.jpg" for i in range(len(query_utm))]
    for i, path in enumerate(database):
        write_jpeg(root / path, seed=i)
    for i, path in enumerate(queries):
        write_jpeg(root / "queries_real" / path, seed=1000 + i)
    cell = lambda names: np.array([[n] for n in names], dtype=object)  # noqa: E731 - a MATLAB cell column
    struct = {
        "whichSet": split,
        "dbImageFns": cell(database),
        "utmDb": np.asarray(database_utm, dtype=np.float64).T,
        "qImageFns": cell(queries),
        "utmQ": np.asarray(query_utm, dtype=np.float64).T,
        "numImages": float(len(database)),
        "numQueries": float(len(queries)),
        "posDistThr": 25.0,
        "posDistSqThr": 625.0,
        "nonTrivPosDistSqThr": 100.0,
    }
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    savemat(str(root / "datasets" / f"pitts30k_{split}.mat"), {"dbStruct": struct})
    return {"database": database, "queries": [f"queries_real/{q}" for q in queries]}


def write_pittsburgh_folders(root: Path, split: str, database_utm: np.ndarray, query_utm: np.ndarray) -> dict:
    """``images/<split>/{database,queries}/@<east>@<north>@17@T@<lat>@<lon>@<pano>@...@.jpg``."""
    written = {}
    for part, utm in (("database", database_utm), ("queries", query_utm)):
        names = []
        for i, (east, north) in enumerate(utm):
            name = f"@{east:.2f}@{north:.2f}@17@T@40.44{i:04d}@-79.99{i:04d}@pano{i:05d}@@@@@@2012@@.jpg"
            write_jpeg(root / "images" / split / part / name, seed=i)
            names.append(f"images/{split}/{part}/{name}")
        written[part] = names
    return written


# ---- Google Landmarks v2 ----------------------------------------------------------------------------------------


def gldv2_id(n: int, prefix: str) -> str:
    """A 16-character hexadecimal id, as in GLDv2 (``prefix`` one hex digit, to keep the splits apart)."""
    return f"{prefix}{n:015x}"


def write_gldv2(
    root: Path, train_per_class: dict[int, int], solution: list[tuple[str, list[int] | None]], num_index: int
) -> dict:
    """The five CSV files and the images.

    ``solution`` is one ``(usage, index positions or None)`` per test query; usage is Public, Private or Ignored.
    """
    root.mkdir(parents=True, exist_ok=True)
    train_rows, clean_rows, n = ["id,url,landmark_id"], ["landmark_id,images"], 0
    for landmark, count in train_per_class.items():
        ids = []
        for _ in range(count):
            image_id = gldv2_id(n, "a")
            write_jpeg(root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", seed=landmark)
            train_rows.append(f"{image_id},http://example.org/{image_id}.jpg,{landmark}")
            ids.append(image_id)
            n += 1
        clean_rows.append(f"{landmark},{' '.join(ids)}")
    index_ids = [gldv2_id(i, "b") for i in range(num_index)]
    test_ids = [gldv2_id(i, "c") for i in range(len(solution))]
    for split, ids in (("index", index_ids), ("test", test_ids)):
        for i, image_id in enumerate(ids):
            write_jpeg(root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", seed=i)
        (root / f"{split}.csv").write_text("\n".join(["id", *ids]) + "\n")
    solution_rows = ["id,images,Usage"]
    for query_id, (usage, positions) in zip(test_ids, solution):
        images = "None" if positions is None else " ".join(index_ids[p] for p in positions)
        solution_rows.append(f"{query_id},{images},{usage}")
    (root / "train.csv").write_text("\n".join(train_rows) + "\n")
    (root / "train_clean.csv").write_text("\n".join(clean_rows) + "\n")
    (root / "retrieval_solution_v2.1.csv").write_text("\n".join(solution_rows) + "\n")
    return {"index_ids": index_ids, "test_ids": test_ids}


# ---- Revisited Oxford / Paris -------------------------------------------------------------------------------------


def write_revisited(
    root: Path, name: str, num_database: int, gnd: list[dict], size=(64, 48), database_sizes: list | None = None
) -> dict:
    """``<name>/gnd_<name>.pkl`` (imlist, qimlist, gnd) and ``<name>/jpg/*.jpg``; query boxes inside ``size``.

    ``database_sizes``: (width, height) of the database images, cycled (default: all ``size``)."""
    prefix = "oxford" if name == "roxford5k" else "paris"
    imlist = [f"{prefix}_{i:06d}" for i in range(num_database)]
    qimlist = [f"{prefix}_query_{j:06d}" for j in range(len(gnd))]
    for i, image in enumerate(imlist):
        image_size = database_sizes[i % len(database_sizes)] if database_sizes else size
        write_jpeg(root / name / "jpg" / f"{image}.jpg", size=image_size, seed=i)
    for j, image in enumerate(qimlist):
        write_jpeg(root / name / "jpg" / f"{image}.jpg", size=size, seed=500 + j)
    entries = [{"bbx": [4.5, 2.0, size[0] - 8.5, size[1] - 3.0], **g} for g in gnd]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": entries}, f)
    return {"imlist": imlist, "qimlist": qimlist}


def write_distractors(root: Path, count: int) -> list[str]:
    entries = [f"{i // 100:02d}/{i:07d}.jpg" for i in range(count)]
    for i, entry in enumerate(entries):
        write_jpeg(root / "revisitop1m" / "jpg" / entry, seed=900 + i)
    (root / "revisitop1m").mkdir(parents=True, exist_ok=True)
    (root / "revisitop1m" / "revisitop1m.txt").write_text("\n".join(entries) + "\n")
    return entries

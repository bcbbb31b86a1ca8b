"""Detect-to-Retrieve on the generated landmarks benchmark, end to end through the command line, and its table:
the global descriptor alone, ASMK* without detection, R-ASMK* with the trained detector's boxes, R-ASMK* with a
fixed grid, R-ASMK* with the true boxes (an upper bound on what detection can give), and R-VLAD, all with the same
local features, codebook and seed, scored on the Revisited-layout split (``rlandmarks``, easy / medium / hard).

    python benchmarks/d2r_comparison.py                                     # CPU, the shipped configs
    python benchmarks/d2r_comparison.py -- --trainer.accelerator=gpu --trainer.precision=bf16-mixed

Steps (each skipped when its output exists, so the command resumes after a stop):

1. ``fit`` the local features (``--local-config``: the DELF-style module on the GLDv2-layout training images)
   and the detector (``--detector-config``: Faster R-CNN on the training images' boxes, ``boxes_split1.csv``,
   validated on ``boxes_split2.csv``); each keeps its best checkpoint on its own validation split.
2. ``predict`` the detector's boxes on the Revisited-layout database images (``rlandmarks_database.boxes.csv``).
3. ``predict`` the local features of the queries (cropped to their box, no detection, as in the paper), of the
   database images, of their regions (whole image + detected boxes with score >= ``--min-score``; the grid; the
   true boxes of ``boxes_eval.csv``), and of the GLDv2-layout index images, which train the codebook (a separate
   image set: no query or database image is in it).
4. k-means codebook (``--codebook-size`` words), aggregation, inverted-file search, the Revisited protocol.

Arguments after ``--`` go to every command (trainer settings); ``--spec key=value`` changes the generated
benchmark for every command. The table goes to ``<output>/d2r.md`` and ``d2r.json``, the commands' output to
``<output>/*.log``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from cli_runs import REPO, cli, fit_once, share_cores, split_overrides

from datamodules.generated_landmarks import GeneratedLandmarksRevisited, GeneratedLandmarksSpec  # noqa: E402
from datamodules.landmark_boxes import read_landmark_boxes, read_scored_boxes  # noqa: E402
from retrieval.codebook import Codebook, sample_store_descriptors  # noqa: E402
from retrieval.evaluation import evaluate_embeddings  # noqa: E402
from retrieval.feature_store import FeatureStore  # noqa: E402
from retrieval.files import write_text_atomic  # noqa: E402
from retrieval.localisation import box_iou  # noqa: E402
from retrieval.regional_search import KernelSettings, evaluate_kernel  # noqa: E402

DATASET = "generated_landmarks.GeneratedLandmarksRevisited"
QUERIES, DATABASE = "rlandmarks_query", "rlandmarks_database"
# (row label, kernel, database store) of the table, after the global descriptor's row.
ROWS = [
    ("ASMK* (no detection)", "asmk*", f"{DATABASE}_detected"),
    ("R-ASMK* detected boxes", "r-asmk*", f"{DATABASE}_detected"),
    ("R-ASMK* grid", "r-asmk*", f"{DATABASE}_grid"),
    ("R-ASMK* true boxes", "r-asmk*", f"{DATABASE}_true_boxes"),
    ("R-VLAD detected boxes", "r-vlad", f"{DATABASE}_detected"),
]
METRICS = ("easy/mAP", "medium/mAP", "hard/mAP")


def spec_arguments(spec: dict[str, str]) -> list[str]:
    return [f"--data.init_args.spec.{key}={value}" for key, value in spec.items()]


def revisited_data(args) -> list[str]:
    """Options that make a training config's datamodule the generated Revisited layout (same root and spec)."""
    return [f"--data=datamodules.{DATASET}", f"--data.init_args.root={args.root}", *spec_arguments(args.spec)]


def run_pipeline(args, overrides: list[str]) -> dict[str, Path]:
    """Steps 1-3: the two trained checkpoints, the boxes and the feature stores (paths by name). The local features'
    chain (fit, the codebook images' features) and the detector's (fit, boxes) run side by side with
    ``--parallel 2``, each with its own log."""
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    common = [f"--data.init_args.root={args.root}", *spec_arguments(args.spec), *overrides]
    features = out / "features"
    codebook_store = features / "codebook" / "index.h5"
    boxes = out / "boxes" / f"{DATABASE}.boxes.csv"

    def local_features() -> Path:
        log = out / "local_features.log"
        config = ["--config", str(args.local_config)]
        _, checkpoint = fit_once(out / "local_features", *config, *common, *args.local_fit, log=log)
        if not codebook_store.is_file():
            predict = ["--data.init_args.predict_lists=[index]", "--predictions.neighbours=0"]
            cli("predict", *config, *common, *predict, f"--predictions.output_dir={codebook_store.parent}",
                "--ckpt_path", str(checkpoint), log=log)  # fmt: skip
        return checkpoint

    def detector() -> None:
        log = out / "detector.log"
        config = ["--config", str(args.detector_config)]
        _, checkpoint = fit_once(out / "detector", *config, *common, *args.detector_fit, log=log)
        if not boxes.is_file():
            predict = [*revisited_data(args), f"--data.init_args.predict_lists=[{DATABASE}]"]
            cli("predict", *config, *predict, f"--predictions.output_dir={boxes.parent}", "--ckpt_path",
                str(checkpoint), *overrides, log=log)  # fmt: skip

    with share_cores(args.parallel), ThreadPoolExecutor(max(1, args.parallel)) as pool:
        chains = [pool.submit(local_features), pool.submit(detector)]
        local_checkpoint = chains[0].result()
        chains[1].result()

    regions = [
        {"lists": [DATABASE], "boxes": str(boxes), "min_score": args.min_score, "suffix": "detected"},
        {"lists": [DATABASE], "grid": args.grid, "suffix": "grid"},
        {"lists": [DATABASE], "boxes": str(Path(args.root) / "boxes/boxes_eval.csv"), "suffix": "true_boxes"},
    ]
    revisited_lists = [QUERIES, DATABASE] + [f"{DATABASE}_{r['suffix']}" for r in regions]
    if not all((features / f"{name}.h5").is_file() for name in revisited_lists):
        cli(
            "predict",
            "--config",
            str(args.local_config),
            *revisited_data(args),
            f"--data.init_args.regions={json.dumps(regions)}",
            f"--data.init_args.predict_lists={json.dumps(revisited_lists)}",
            f"--predictions.output_dir={features}",
            "--predictions.neighbours=0",
            "--ckpt_path",
            str(local_checkpoint),
            *overrides,
            log=out / "extraction.log",
        )
    return {"features": features, "codebook_store": codebook_store, "boxes": boxes}


def comparison(args, paths: dict[str, Path]) -> list[dict]:
    """Step 4: the table's rows (metrics of the Revisited-layout split, medium / hard as in the paper)."""
    features = paths["features"]
    codebook_path = args.output / f"codebook_{args.codebook_size}.npy"
    if not codebook_path.is_file():
        # as the codebook command samples them: at most 256 per word, seeded
        descriptors = sample_store_descriptors([paths["codebook_store"]], 256 * args.codebook_size, args.seed)
        Codebook.train(descriptors, args.codebook_size, seed=args.seed).save(codebook_path)
    codebook = Codebook.load(codebook_path)
    spec = GeneratedLandmarksSpec(**{k: _parsed(v) for k, v in args.spec.items()})
    data = GeneratedLandmarksRevisited(str(args.root), spec=spec)
    data.setup("test")
    (eval_set,) = data.eval_sets("test")
    ground_truth = eval_set.ground_truth
    query_store, database_store = FeatureStore(features / f"{QUERIES}.h5"), FeatureStore(features / f"{DATABASE}.h5")
    global_metrics = evaluate_embeddings(
        query_store.global_descriptors(), database_store.global_descriptors(), ground_truth
    )
    rows = [{"method": "global descriptor", **{k: global_metrics[k] for k in METRICS}}]
    for label, kernel, store in ROWS:
        settings = KernelSettings(kernel, normalisation=args.normalisation, query_assignments=args.query_assignments)
        started = time.time()
        metrics = evaluate_kernel(
            features / f"{QUERIES}.h5",
            [features / f"{store}.h5"],
            codebook,
            settings,
            ground_truth,
            database_ids=data.lists[DATABASE].paths,
        )
        regions = FeatureStore(features / f"{store}.h5").num_images / database_store.num_images
        rows.append(
            {
                "method": label,
                **{k: metrics[k] for k in METRICS},
                "regions_per_image": round(regions if kernel.startswith("r-") else 1.0, 2),
                "bytes_per_image": round(metrics.get("bytes_per_image", codebook.size * codebook.dim * 4)),
                "seconds": round(time.time() - started, 1),
            }
        )
    return rows


def detection_quality(boxes_file: Path, true_boxes_file: Path, image_ids: list[str], min_score: float) -> dict:
    """How well the detector's boxes (score >= ``min_score``) cover the true landmark of each database image: the
    mean number of boxes, the share of images with one, and of images whose best box has IoU > 0.5 with the truth."""
    detected = read_scored_boxes(boxes_file)
    truth = read_landmark_boxes(true_boxes_file)
    counts, best = [], []
    for image_id in image_ids:
        boxes, scores = detected.get(image_id, (np.zeros((0, 4)), np.zeros(0)))
        boxes = boxes[scores >= min_score]
        counts.append(len(boxes))
        true = truth.get(Path(image_id).stem)
        if true is not None:
            swap = [1, 0, 3, 2]  # ymin xmin ymax xmax -> x1 y1 x2 y2 (IoU does not depend on the image's size)
            best.append(max((box_iou(b[swap], true[0][swap]) for b in boxes), default=0.0))
    return {
        "boxes_per_image": round(float(np.mean(counts)), 2),
        "images_with_a_box": round(float(np.mean(np.array(counts) > 0)), 3),
        "best_box_iou@0.5": round(float(np.mean(np.array(best) > 0.5)), 3),
    }


def _parsed(value: str):
    return json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value


def table(rows: list[dict]) -> str:
    columns = ["method", *METRICS, "regions_per_image", "bytes_per_image"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            f"{row[c]:.3f}" if isinstance(row.get(c), float) and c in METRICS else str(row.get(c, "")) for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/generated_landmarks"))
    parser.add_argument("--spec", nargs="*", default=[], help="generated benchmark changes, key=value")
    parser.add_argument("--local-config", type=Path, default=REPO / "configs/delf/generated_landmarks.yaml")
    parser.add_argument("--detector-config", type=Path, default=REPO / "configs/d2r/detector_generated.yaml")
    parser.add_argument("--output", type=Path, default=Path("runs/d2r/comparison"))
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--query-assignments", type=int, default=5)
    parser.add_argument("--normalisation", choices=("none", "word_counts"), default="none")
    parser.add_argument("--min-score", type=float, default=0.1)
    parser.add_argument("--grid", type=int, nargs="+", default=[2])
    parser.add_argument("--seed", type=int, default=0, help="of the codebook's k-means")
    parser.add_argument("--parallel", type=int, choices=(1, 2), default=2, help="the two training chains side by side")
    parser.add_argument(
        "--local-fit",
        action="append",
        default=[],
        help="an option of the local features' fit only (repeat; --local-fit=--key=value)",
    )
    parser.add_argument(
        "--detector-fit", action="append", default=[], help="an option of the detector's fit only (repeat)"
    )
    args = parser.parse_args(argv)
    args.spec = dict(item.split("=", 1) for item in args.spec)

    paths = run_pipeline(args, overrides)
    rows = comparison(args, paths)
    database_ids = FeatureStore(paths["features"] / f"{DATABASE}.h5").ids
    detection = detection_quality(paths["boxes"], args.root / "boxes/boxes_eval.csv", database_ids, args.min_score)
    report = table(rows) + (
        f"\ndetected boxes on the database images (score >= {args.min_score}): {detection['boxes_per_image']} per image, "
        f"{detection['images_with_a_box']:.1%} of images with one, {detection['best_box_iou@0.5']:.1%} whose best box "
        "overlaps the true landmark box at IoU > 0.5\n"
    )
    write_text_atomic(args.output / "d2r.json", json.dumps({"rows": rows, "detection": detection}, indent=2) + "\n")
    write_text_atomic(args.output / "d2r.md", report)
    print(report, end="")
    return rows


if __name__ == "__main__":
    main()

"""The spatial-context ablation: every pooling variant trained through the command line with the same config,
seed and budget, then scored with its best checkpoint (chosen on the validation split) on the test split and on the
Revisited-layout split. The table goes to ``<output>/ablation.md`` and ``ablation.json``.

    python benchmarks/spatial_context_ablation.py                          # the shipped generated-landmarks config
    python benchmarks/spatial_context_ablation.py --parallel 5 -- --trainer.accelerator=gpu \\
        --trainer.precision=bf16-mixed --data.init_args.num_workers=3     # one GPU, five runs side by side

Arguments after ``--`` are passed to every ``fit`` and ``test`` (the data ones that only training uses are left out
of the Revisited-layout test). Each variant runs in ``<output>/<variant>``; a variant whose result is recorded is
skipped and an interrupted one resumes from its last checkpoint, so the command can be run again after a stop.
Variants run side by side share the benchmark: its generation is locked, so it is drawn once.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cli_runs import REPO, cli, fit_once, share_cores, split_overrides

from lightning_modules.spatial_context import ABLATIONS as VARIANTS  # noqa: E402
from reporting.run_results import read_run  # noqa: E402
from retrieval.files import write_text_atomic  # noqa: E402

# Data options of the training datamodule that the Revisited-layout datamodule does not take.
TRAINING_ONLY = (
    "--data.init_args.train_augmentation",
    "--data.init_args.class_balanced",
    "--data.init_args.batch_size",
)
RESULT = "ablation_result.json"


def training_objective(run: Path, checkpoint: Path, batches: int | None = None) -> dict:
    """The objective each variant trains for, reached by its checkpoint: ArcFace cross-entropy and top-1
    accuracy over one augmented pass of the training images (seed 0, the same images and draws for every
    variant), in evaluation mode. A variant whose extra blocks can express plain GeM (smoothing tends to the
    identity as the self-confidence grows; the GCN's write-back can pass nodes through) but ends above plain
    GeM's loss has not reached its own objective; one below it that still retrieves worse over-fits."""
    import torch
    import torch.nn.functional as F
    import yaml
    from jsonargparse import ArgumentParser

    from datamodules.base import RetrievalDataModule
    from lightning_modules.base import RetrievalModule

    config = yaml.safe_load((run / "config.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(RetrievalModule, "model", required=True)
    parser.add_subclass_arguments(RetrievalDataModule, "data", required=True)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    built = instantiate(parser.parse_object({"model": config["model"], "data": config["data"]}))
    module, data = built.model, built.data
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    module.eval()
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(0)
    loss = correct = count = 0.0
    with torch.no_grad():
        for index, batch in enumerate(data.train_dataloader()):
            if batches is not None and index >= batches:
                break
            classes = module.label_map.encode(batch["label"])
            logits = module.classifier(module.embed(batch), classes)
            loss += F.cross_entropy(logits, classes, reduction="sum").item()
            correct += (logits.argmax(dim=1) == classes).sum().item()
            count += len(classes)
    return {"loss": loss / count, "accuracy": correct / count, "images": int(count)}


def run_variant(name: str, args, overrides: list[str]) -> dict:
    directory = args.output / name
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / RESULT).is_file():
        result = json.loads((directory / RESULT).read_text())
        if "train_objective" not in result:  # recorded by an earlier version of this script
            run = Path(result["run"])
            result["train_objective"] = training_objective(run, run / result["checkpoint"], args.objective_batches)
            write_json(directory / RESULT, result)
        return result
    log = directory / "ablation.log"
    pooling = [f"--model.init_args.pooling.{key}={value}" for key, value in VARIANTS[name].items()]
    common = ["--config", str(args.config), f"--trainer.default_root_dir={directory}", *pooling, *overrides]
    started = time.time()
    run, checkpoint = fit_once(directory, *common, log=log)
    fit_seconds = time.time() - started
    relative = str(checkpoint.relative_to(run))
    cli("test", *common, "--ckpt_path", str(checkpoint), log=log)
    revisited = [o for o in overrides if not o.startswith(TRAINING_ONLY)]
    cli("test", "--config", str(args.revisited_config), *revisited, "--ckpt_path", str(checkpoint), log=log)

    validation = read_run(run, "val", relative).metrics
    tested = read_run(run, "test", relative).metrics
    result = {
        "variant": name,
        **VARIANTS[name],
        "run": str(run),
        "checkpoint": relative,
        "fit_seconds": round(fit_seconds, 1),
        "val": {k: v for k, v in validation.items() if k.startswith("val/")},
        "test": {k: v for k, v in tested.items() if k.startswith("test/")},
        "train_objective": training_objective(run, checkpoint, args.objective_batches),
    }
    write_json(directory / RESULT, result)
    return result


def write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def table(results: list[dict]) -> str:
    columns = {
        "val Public mAP@100": "val/generated_landmarks/public/mAP@100",
        "test Private mAP@100": "test/generated_landmarks/private/mAP@100",
        "rlandmarks medium mAP": "test/rlandmarks/medium/mAP",
        "rlandmarks hard mAP": "test/rlandmarks/hard/mAP",
        "train loss": "train/loss",
        "train accuracy": "train/accuracy",
    }
    lines = [
        "| variant | smoothing | refinement | " + " | ".join(columns) + " | fit (s) |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for r in results:
        objective = {f"train/{k}": v for k, v in r["train_objective"].items()}
        metrics = {**r["val"], **r["test"], **objective}
        values = " | ".join(f"{metrics[key]:.3f}" if key in metrics else "-" for key in columns.values())
        lines.append(f"| {r['variant']} | {r['smoothing']} | {r['refinement']} | {values} | {r['fit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs/spatial_context/generated_landmarks.yaml")
    parser.add_argument(
        "--revisited-config", type=Path, default=REPO / "configs/spatial_context/generated_rlandmarks.yaml"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/spatial_context/ablation"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=1, help="variants trained side by side")
    parser.add_argument(
        "--objective-batches", type=int, help="training batches the objective is measured on (default: all)"
    )
    args = parser.parse_args(argv)

    with share_cores(args.parallel), ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda name: run_variant(name, args, overrides), args.variants))
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "ablation.json", results)
    write_text_atomic(args.output / "ablation.md", table(results))
    print(table(results), end="")
    return results


if __name__ == "__main__":
    main()

"""Training throughput (images/s) of the spatial-context variants against plain GeM, and the Lightning module
against a bare ``torch`` loop on the same backbone, measured side by side in one run.

Every variant is :class:`lightning_modules.SpatialContextRetrieval` with the same backbone (random weights: the
speed does not depend on them), batch and image size; a training step is forward, ArcFace cross-entropy,
backward and an AdamW step on images already on the device (no decoding, no copy: the model's cost alone). The
Lightning figure is ``Trainer.fit`` over the same batches (no logger, no checkpointing, no progress bar, no
validation); the bare loop calls the module's own ``embed``, head and optimiser in a plain loop.
Warm-up steps are not timed.

    python benchmarks/spatial_context_throughput.py                      # resnet18, 32 x 112 px, CPU
    python benchmarks/spatial_context_throughput.py --backbone resnet50 --image-size 512 --batch-size 64 --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(args, pooling: dict):
    from lightning_modules import SpatialContextRetrieval
    from lightning_modules.nn.margin_heads import ContiguousLabels

    module = SpatialContextRetrieval(
        args.backbone,
        pretrained=False,
        channels_last=args.device == "cuda",
        embedding_dim=args.embedding_dim,
        pooling={**pooling, "num_nodes": args.num_nodes, "num_neighbors": args.num_neighbors},
        lr_schedule="constant",  # the same optimiser in both loops, no scheduler to step
    )
    module._build_head(ContiguousLabels(torch.arange(args.classes)))
    return module.to(args.device)


def batches(args, count: int):
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
            "label": torch.randint(0, args.classes, (args.batch_size,), generator=generator),
        }
        for _ in range(count)
    ]


def autocast(args):
    enabled = args.precision == "bf16-mixed"
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=enabled)


def bare_loop(args, module, data) -> float:
    """Seconds per timed step of a plain loop: the module's blocks, its optimiser's parameter groups."""
    module.train()
    optimizer = module.configure_optimizers()
    elapsed = 0.0
    for step, batch in enumerate(data):
        images, labels = batch["image"].to(args.device), batch["label"].to(args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(args):
            classes = module.label_map.encode(labels)
            loss = F.cross_entropy(module.classifier(module.embed({"image": images}), classes), classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
    return elapsed / (len(data) - args.warmup)


def lightning_fit(args, module, data) -> float:
    """Seconds per timed step of ``Trainer.fit`` (between the warm-up's end and the last step's end)."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def __init__(self):
            self.start = self.end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.end = time.perf_counter()

    clock = StepClock()
    module.log_dict = lambda *a, **k: None  # the bare loop logs nothing either
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return (clock.end - clock.start) / (len(data) - args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--num-nodes", type=int, default=9)
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=12, help="steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--output", help="write the figures as JSON")
    args = parser.parse_args()

    torch.manual_seed(0)
    # On the device for both loops: neither times the host-to-device copy, which the bare loop would do outside
    # its clock and Lightning inside (a pageable 64 x 512 px float32 batch, 200 MB, took about 30 ms on an H200).
    data = [{key: value.to(args.device) for key, value in batch.items()} for batch in batches(args, args.steps)]
    results = {
        "variants": {},
        "settings": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(f"{args.backbone}, batch {args.batch_size} x {args.image_size} px, {args.device}, {args.precision}")
    from lightning_modules.spatial_context import ABLATIONS

    for name, pooling in ABLATIONS.items():
        seconds = bare_loop(args, build(args, pooling), data)
        results["variants"][name] = args.batch_size / seconds
    plain = results["variants"]["plain_gem"]
    for name, rate in results["variants"].items():
        print(f"  {name:28s} {rate:8.1f} images/s  ({rate / plain:.2f} x plain GeM)")
    full = ABLATIONS["learnable_smoothing_gcn"]
    bare, lightning = bare_loop(args, build(args, full), data), lightning_fit(args, build(args, full), data)
    results["bare_loop_images_per_s"], results["lightning_images_per_s"] = (
        args.batch_size / bare,
        args.batch_size / lightning,
    )
    results["lightning_overhead"] = lightning / bare - 1
    print(
        f"  bare torch loop {args.batch_size / bare:.1f} images/s, Lightning {args.batch_size / lightning:.1f} images/s: "
        f"overhead {100 * (lightning / bare - 1):+.1f}%"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

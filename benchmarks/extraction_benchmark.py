"""Descriptor extraction: images/s and peak memory of ``predict`` through the real pipeline.

JPEG files in the Stanford Online Products layout -> ``datamodules.sop.StanfordOnlineProducts`` (decoding,
center crop, resize in the dataloader workers) -> ``lightning_modules.extraction.FeatureExtractor``
(DINOv2 ViT-S/14 by default) -> ``callbacks.prediction_writer.PredictionWriter`` (the HDF5 feature store),
driven by ``Trainer.predict``. Configurations: global descriptors only (CLS), and global + ``--num-local``
local descriptors.

Each configuration runs in a fresh subprocess: the model is built (not timed), a warm-up ``predict`` runs
``--warmup`` batches (first calls into the kernels, allocator growth; not timed), then the timed ``predict``
runs over all images with a new trainer and a new, empty output directory. The timed run includes starting
the dataloader workers, decoding, resizing, the model and writing the store. Memory (over both runs):

* ``peak_rss_mib``: highest sampled sum of the resident memory of the process and its dataloader workers
  (sampled every 20 ms from ``/proc``); pages the forked workers share with the parent count once per process.
* ``peak_pss_mib``: the same with proportional set size, which counts shared pages once overall: the
  memory the extraction really occupies.
* ``main_maxrss_mib`` / ``worker_maxrss_mib``: the kernel's peak marks, ``getrusage`` ``RUSAGE_SELF`` and
  ``RUSAGE_CHILDREN`` (the largest single worker, not a sum).

The random weights of ``pretrained=False`` run at the same speed as the pretrained ones.

    python benchmarks/extraction_benchmark.py                        # 256 images, batch 32, 2 workers, CPU
    python benchmarks/extraction_benchmark.py --images 64 --num-local 0          # a quick look
    python benchmarks/extraction_benchmark.py --device cuda --precision bf16-mixed --channels-last --workers 8

``--merge`` measures instead what finishing a multi-process extraction costs: joining ``--merge-shards``
complete shards (``--merge-images`` rows in all, global 384-d float32 and ``--merge-locals`` local
descriptors of 5 + 384 float16 columns) into the final store, by copying every row into a new file (the
previous merge, rebuilt here as it was) and by :func:`retrieval.feature_store.write_virtual_store` (virtual
datasets pointing at the shards), side by side in one run, with the bytes each writes and a check that both
read back the same descriptors. ``--header-sizes N`` times reading the sizes of N JPEGs from their headers
(what batching by shape reads) against decoding them.

    python benchmarks/extraction_benchmark.py --merge --merge-images 8000 --merge-locals 100
    python benchmarks/extraction_benchmark.py --header-sizes 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---- data -----------------------------------------------------------------------------------------------------


def write_images(root: Path, num_images: int, width: int = 640, height: int = 480, per_class: int = 4) -> None:
    """``num_images`` photo-like JPEGs (smooth colour fields plus grain, ~40-80 KB at quality 90) listed in
    ``Ebay_test.txt``; ``Ebay_train.txt`` lists the first few (the reader needs both files)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    super_classes = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle"]
    lines = ["image_id class_id super_class_id path"]
    for i in range(num_images):
        class_id = 11319 + i // per_class  # SOP's test classes start at 11,319
        super_class = (class_id - 1) % len(super_classes)
        relative = f"{super_classes[super_class]}_final/{111085122871 + class_id}_{i % per_class}.JPG"
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / relative, format="JPEG", quality=90)
        lines.append(f"{i + 1} {class_id} {super_class + 1} {relative}")
    (root / "Ebay_test.txt").write_text("\n".join(lines) + "\n")
    (root / "Ebay_train.txt").write_text("\n".join(lines[: min(len(lines), 9)]) + "\n")


# ---- memory ---------------------------------------------------------------------------------------------------


class TreeMemorySampler:
    """Peak of the summed RSS and PSS of this process and its children, sampled from ``/proc``."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for pid in [os.getpid(), *_children(os.getpid())]:
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        for line in f:
                            if line.startswith("Rss:"):
                                rss += int(line.split()[1])
                            elif line.startswith("Pss:"):
                                pss += int(line.split()[1])
                except OSError:  # a worker that just exited
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def _maxrss_mib(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


# ---- one configuration (child process) ------------------------------------------------------------------------


def measure(args) -> dict:
    import lightning.pytorch as pl
    import torch

    from callbacks.prediction_writer import PredictionWriter
    from datamodules.sop import StanfordOnlineProducts
    from lightning_modules.extraction import FeatureExtractor

    torch.manual_seed(0)
    model = FeatureExtractor(backbone=args.backbone, pretrained=False, num_local=args.num_local)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    callbacks = [ChannelsLastInput()] if args.channels_last else []
    runs = []
    with TreeMemorySampler() as sampler, tempfile.TemporaryDirectory(prefix="extraction_bench_out_") as out:
        for run in ("warmup", "timed"):
            if run == "warmup" and not args.warmup:
                continue
            datamodule = StanfordOnlineProducts(
                args.root,
                image_size=args.image_size,
                resize="center_crop",
                multiple_of=14,
                eval_batch_size=args.batch_size,
                num_workers=args.workers,
                predict_lists=["test"],
            )
            trainer = pl.Trainer(
                accelerator="cpu" if args.device == "cpu" else "gpu",
                devices=1,
                precision=args.precision,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_predict_batches=args.warmup if run == "warmup" else None,
                # The warm-up writes nothing: the writer refuses a store left incomplete on purpose.
                callbacks=([] if run == "warmup" else [PredictionWriter(output_dir=str(Path(out) / run))]) + callbacks,
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        written = sorted(p.name for p in (Path(out) / "timed").iterdir())
    result = {
        "config": "global + local" if args.num_local else "global",
        "backbone": args.backbone,
        "num_local": args.num_local,
        "images": args.images,
        "batch": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "torch_threads": torch.get_num_threads(),
        "warmup_batches": args.warmup,
        "seconds": round(runs[-1], 2),
        "images_per_s": round(args.images / runs[-1], 2),
        "peak_rss_mib": round(sampler.peak_rss / 1024),
        "peak_pss_mib": round(sampler.peak_pss / 1024),
        "main_maxrss_mib": round(_maxrss_mib(resource.RUSAGE_SELF)),
        "worker_maxrss_mib": round(_maxrss_mib(resource.RUSAGE_CHILDREN)),
        "written": written,
    }
    if args.device == "cuda":
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def ChannelsLastInput():  # noqa: N802 - a callback class built lazily (lightning imported in the child only)
    import lightning.pytorch as pl
    import torch

    class _ChannelsLastInput(pl.Callback):
        """Hand the (already device-resident) image batch to the model in channels-last layout."""

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    return _ChannelsLastInput()


def run_child(args, num_local: int) -> dict:
    command = [sys.executable, __file__, "--child", "--root", args.root, "--images", str(args.images)]
    command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--num-local", str(num_local)]
    command += ["--backbone", args.backbone, "--image-size", str(args.image_size), "--device", args.device]
    command += ["--precision", args.precision, "--warmup", str(args.warmup)] + (
        ["--channels-last"] if args.channels_last else []
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    config = "global + local" if num_local else "global"
    if result.returncode != 0:
        return {
            "config": config,
            "images": args.images,
            "error": f"exit {result.returncode}: {result.stderr.strip()[-500:]}",
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def merge_benchmark(args) -> list[dict]:
    import h5py
    import numpy as np

    sys.path.insert(0, str(REPO))
    from retrieval.feature_store import FeatureStore, FeatureStoreWriter, write_feature_store, write_virtual_store

    rows = []
    with tempfile.TemporaryDirectory(prefix="merge_bench_") as directory:
        directory = Path(directory)
        n, dim = args.merge_images, 384
        ids = [f"{i:08d}.jpg" for i in range(n)]
        rng = np.random.default_rng(0)
        starts = [r * n // args.merge_shards for r in range(args.merge_shards)]
        shards = []
        for rank, (start, stop) in enumerate(zip(starts, starts[1:] + [n])):
            count = stop - start
            local = rng.standard_normal((count, args.merge_locals, 5 + dim), dtype=np.float32).astype(np.float16)
            shard = directory / ".shards" / f"list.rank{rank}of{args.merge_shards}.h5"
            write_feature_store(shard, ids[start:stop], rng.standard_normal((count, dim), dtype=np.float32), local)
            shards.append((start, shard))
        shard_bytes = sum(path.stat().st_size for _, path in shards)

        start_time = time.perf_counter()  # before: one process copies every row into a new file
        local_shape = (args.merge_locals, 5 + dim)
        with FeatureStoreWriter(directory / "copied.h5", ids, global_dim=dim, local_shape=local_shape) as writer:
            for first, path in shards:
                with h5py.File(path, "r") as f:
                    for chunk in range(0, f["global"].shape[0], 4096):
                        part = slice(chunk, min(chunk + 4096, f["global"].shape[0]))
                        writer.write(first + np.arange(part.start, part.stop), f["global"][part], f["local"][part])
        copy_seconds = time.perf_counter() - start_time

        start_time = time.perf_counter()  # after: virtual datasets pointing at the shards
        write_virtual_store(directory / "joined.h5", ids, shards)
        join_seconds = time.perf_counter() - start_time

        copied, joined = FeatureStore(directory / "copied.h5"), FeatureStore(directory / "joined.h5")
        sample = rng.choice(n, size=min(n, 256), replace=False)
        same = bool(
            np.array_equal(copied.global_descriptors(), joined.global_descriptors())
            and np.array_equal(copied.local_descriptors(sample), joined.local_descriptors(sample))
        )
        methods = (
            ("copy into one file (before)", copy_seconds, "copied.h5"),
            ("virtual join (after)", join_seconds, "joined.h5"),
        )
        for method, seconds, path in methods:
            rows.append(
                {
                    "method": method,
                    "images": n,
                    "shards": args.merge_shards,
                    "shard_mib": round(shard_bytes / 2**20),
                    "seconds": round(seconds, 3),
                    "written_mib": round((directory / path).stat().st_size / 2**20, 2),
                    "same_descriptors": same,
                }
            )
    return rows


def header_size_benchmark(args) -> list[dict]:
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory(prefix="header_bench_") as root:
        write_images(Path(root), args.header_sizes)
        paths = sorted(Path(root).rglob("*.JPG"))
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.size
        header = time.perf_counter() - start
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")
        decode = time.perf_counter() - start
    for method, seconds in (("size from the header", header), ("full decode", decode)):
        rate = round(len(paths) / seconds)
        rows.append({"method": method, "images": len(paths), "seconds": round(seconds, 3), "images_per_s": rate})
    return rows


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="dataloader worker processes")
    parser.add_argument(
        "--num-local", type=int, default=100, help="local descriptors of the second configuration (0: skip it)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="batches of the untimed warm-up predict (0: none)")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--channels-last", action="store_true", help="model and input batches in channels-last layout")
    parser.add_argument("--output", help="also write the rows to this JSON file")
    parser.add_argument("--merge", action="store_true", help="measure joining shards instead (see above)")
    parser.add_argument("--merge-images", type=int, default=8000)
    parser.add_argument("--merge-shards", type=int, default=2)
    parser.add_argument("--merge-locals", type=int, default=100)
    parser.add_argument("--header-sizes", type=int, default=0, help="measure reading N image sizes instead")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # images already written (child processes)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    if args.merge or args.header_sizes:
        rows = merge_benchmark(args) if args.merge else header_size_benchmark(args)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
        print_table(rows)
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="extraction_bench_images_") as root:
        start = time.perf_counter()
        write_images(Path(root), args.images)
        print(f"# wrote {args.images} 640x480 JPEGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        args.root = root
        rows = [run_child(args, 0)]
        if args.num_local:
            rows.append(run_child(args, args.num_local))
    import torch

    print(
        f"# {args.backbone} at {args.image_size} px, {args.device} ({args.precision}"
        f"{', channels-last' if args.channels_last else ''}), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    columns = ["config", "images", "batch", "workers", "seconds", "images_per_s", "peak_rss_mib"]
    columns += ["peak_pss_mib", "main_maxrss_mib", "worker_maxrss_mib", "error"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

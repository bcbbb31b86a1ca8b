"""Training on stored descriptors: one indexed read per batch against one read per row, side by side.

Writes a feature store of random float32 descriptors (default 200,000 x 768) into a temporary directory, then
measures, for both ways of reading (``EmbeddingDataset`` reads each batch with one indexed read through
``__getitems__``; the row-by-row variant is the same dataset with ``__getitems__`` switched off, PyTorch's
fallback of one ``__getitem__`` per example):

1. the training dataloader alone (``LabelledFeatureStores.train_dataloader``: the shuffled global batches),
   embeddings/s over whole epochs (the median of ``--repeats``);
2. one full AE-SVC training epoch through ``Trainer.fit`` (default AE-SVC: 256-d latent, MLP 1024/512, no
   validation), embeddings/s.

    python benchmarks/loader_benchmark.py                      # 200,000 x 768, batch 512
    python benchmarks/loader_benchmark.py --rows 20000         # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def variants(batched_first: bool = False):
    from datamodules.feature_store import EmbeddingDataset, LabelledFeatureStores

    class RowByRowDataset(EmbeddingDataset):
        __getitems__ = None  # PyTorch's DataLoader then reads one example at a time

    class RowByRowStores(LabelledFeatureStores):
        def train_dataset(self):
            return RowByRowDataset.from_store(self._store("train"))

    order = [("row by row", RowByRowStores), ("one read per batch", LabelledFeatureStores)]
    return dict(order[::-1] if batched_first else order)


def loader_epoch(datamodule_class, store: str, batch_size: int, workers: int) -> tuple[float, int]:
    """Seconds to iterate one epoch of the training dataloader, and the embeddings it gave."""
    loader = datamodule_class(train=store, batch_size=batch_size, num_workers=workers).train_dataloader()
    start = time.perf_counter()
    rows = 0
    for batch in loader:
        rows += len(batch["index"])
    return time.perf_counter() - start, rows


def aesvc_epoch(datamodule_class, store: str, batch_size: int, workers: int) -> tuple[float, int]:
    import lightning.pytorch as pl

    from lightning_modules import AESVC

    pl.seed_everything(0, verbose=False)
    data = datamodule_class(train=store, batch_size=batch_size, num_workers=workers)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    model = AESVC(latent_dim=256, hidden_dims=[1024, 512])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    return seconds, trainer.global_step * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="loader epochs per variant (the median is kept)")
    parser.add_argument("--skip-training", action="store_true", help="measure the loader alone")
    parser.add_argument("--batched-first", action="store_true", help="measure the batched reads first")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()

    import numpy as np
    import torch

    from retrieval.feature_store import write_feature_store

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads",
        "rows": args.rows,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }
    with tempfile.TemporaryDirectory() as directory:
        store = str(Path(directory) / "train.h5")
        rng = np.random.default_rng(0)
        descriptors = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        ids = [f"{i}" for i in range(args.rows)]
        write_feature_store(store, ids, descriptors, labels=np.arange(args.rows) % 1000)
        del descriptors
        for name, datamodule_class in variants(args.batched_first).items():
            timings = [
                loader_epoch(datamodule_class, store, args.batch_size, args.workers) for _ in range(args.repeats)
            ]
            seconds = statistics.median(t for t, _ in timings)
            rows = timings[0][1]
            results[f"loader: {name}"] = {"seconds": round(seconds, 3), "embeddings_per_s": round(rows / seconds)}
            print(name, "loader", results[f"loader: {name}"], flush=True)
        if not args.skip_training:
            for name, datamodule_class in variants(args.batched_first).items():
                seconds, rows = aesvc_epoch(datamodule_class, store, args.batch_size, args.workers)
                speed = {"seconds": round(seconds, 2), "embeddings_per_s": round(rows / seconds)}
                results[f"AE-SVC epoch: {name}"] = speed
                print(name, "AE-SVC epoch", results[f"AE-SVC epoch: {name}"], flush=True)
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

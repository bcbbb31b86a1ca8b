"""Why adaptive sizes matter, and what they cost to train.

1. Training throughput (embeddings/s) of (SS)2D with 6 nested sizes against AE-SVC alone, side by side in one
   process: full training steps (forward, loss, backward, AdamW) on random foundation-size embeddings; the
   (SS)2D step includes its frozen AE-SVC teacher's forward.
2. Exact search time per query against embedding size: faiss flat inner-product index over a 1M-row
   database, the same queries at every size (the database is a prefix of one random embedding, like a
   nested (SS)2D embedding), searched in one batch and one query at a time.

    python benchmarks/size_benchmark.py                        # 768-d inputs, batch 512; 1M x sizes 8..768
    python benchmarks/size_benchmark.py --database 100000      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def training_throughput(input_dim: int, batch_size: int, steps: int, warmup: int = 3) -> dict[str, float]:
    import torch

    from lightning_modules import AESVC, SS2D

    torch.manual_seed(0)
    batch = {"embedding": torch.randn(batch_size, input_dim), "index": torch.arange(batch_size)}
    aesvc = AESVC(latent_dim=256, input_dim=input_dim)
    ss2d = SS2D(sizes=[8, 16, 32, 64, 128, 256], teacher_embeddings="unused", input_dim=input_dim)
    ss2d._teacher.append(AESVC(latent_dim=256, input_dim=input_dim).eval().requires_grad_(False))
    results = {}
    for name, model in (("AE-SVC (256)", aesvc), ("(SS)2D (6 sizes, linear student, AE-SVC teacher)", ss2d)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            optimizer.zero_grad()
            model.training_step(batch, step).backward()
            optimizer.step()
        results[name] = steps * batch_size / (time.perf_counter() - start)
    return results


def search_time_per_query(num_database: int, num_queries: int, single: int, sizes: list[int], k: int, repeats: int = 3):
    """Per size: seconds per query searching ``num_queries`` at once (faiss' BLAS path), and searching ``single``
    queries one at a time (faiss' scan path, an online request); the best of ``repeats``."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    largest = max(sizes)
    database = rng.standard_normal((num_database, largest), dtype=np.float32)
    queries = database[:num_queries] + 0.1 * rng.standard_normal((num_queries, largest), dtype=np.float32)
    results = {}
    for size in sizes:
        index = faiss.IndexFlatIP(size)
        index.add(np.ascontiguousarray(database[:, :size]))
        query_prefix = np.ascontiguousarray(queries[:, :size])
        index.search(query_prefix[:1], k)  # warm-up
        batched, one_at_a_time = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            index.search(query_prefix, k)
            batched.append((time.perf_counter() - start) / num_queries)
            start = time.perf_counter()
            for row in range(single):
                index.search(query_prefix[row : row + 1], k)
            one_at_a_time.append((time.perf_counter() - start) / single)
        results[size] = {"batched": min(batched), "one_at_a_time": min(one_at_a_time)}
        del index
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-dim", type=int, default=768, help="foundation embedding size (DINOv2 ViT-B: 768)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="queries searched at once")
    parser.add_argument("--single", type=int, default=50, help="queries searched one at a time")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 768])
    args = parser.parse_args()
    import faiss
    import torch

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)"
    )
    throughput = training_throughput(args.input_dim, args.batch_size, args.steps)
    print(f"\ntraining throughput, {args.input_dim}-d inputs, batch {args.batch_size}, {args.steps} steps")
    print("| method | embeddings/s |\n|---|---|")
    for name, value in throughput.items():
        print(f"| {name} | {value:,.0f} |")
    times = search_time_per_query(args.database, args.queries, args.single, args.sizes, args.k)
    print(f"\nexact search (faiss IndexFlatIP), {args.database:,} database rows, top-{args.k}, best of 3")
    print(f"| size | ms / query, {args.queries} at once | ms / query, one at a time | database GB (float32) |")
    print("|---|---|---|---|")
    for size, seconds in times.items():
        print(
            f"| {size} | {seconds['batched'] * 1e3:.2f} | {seconds['one_at_a_time'] * 1e3:.2f} | "
            f"{args.database * size * 4 / 1e9:.2f} |"
        )
    print(json.dumps({"training_embeddings_per_s": throughput, "search_s_per_query": times}))


if __name__ == "__main__":
    main()

"""Exact search + metrics: ``retrieval.search.knn`` against a naive full-matrix torch search with argsort.

Each measurement runs in a fresh subprocess. Memory is resident memory above the interpreter and libraries:
``inputs_gb`` once the database and queries exist, ``peak_gb`` the highest mark while searching and scoring
(the kernel's peak mark is reset after the inputs are made). Both
paths rank a random, L2-normalised database and score the top-k with ``recall_at_k`` against random labels.
The naive path builds the whole ``queries x database`` score matrix and argsorts it; where that does not
fit in memory, it is reported as such and also measured on a slice of the queries.

    python benchmarks/search_benchmark.py                          # 200k x 768 database, 10k queries
    python benchmarks/search_benchmark.py --database 20000 --queries 1000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(method: str, num_database: int, num_queries: int, dim: int, k: int, memory_limit_gb: float) -> dict:
    """Run one measurement in this process (called in a child process)."""
    import numpy as np
    import torch

    from retrieval.metrics import positives_from_labels, recall_at_k
    from retrieval.search import knn

    if memory_limit_gb:
        limit = int(memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = np.random.default_rng(0)
    base_rss = rss_gb()  # interpreter and libraries
    database = rng.standard_normal((num_database, dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    # Query i is a perturbed copy of database item i, whose label it shares: recall@1 should be ~1 on both paths.
    queries = database[:num_queries] + 0.05 * rng.standard_normal((num_queries, dim), dtype=np.float32)
    labels = rng.integers(0, num_database // 10, num_database)
    positives = positives_from_labels(labels[:num_queries], labels)
    inputs_rss = rss_gb()
    reset_peak()  # so the peak below is the search's, not the data generation's
    start = time.perf_counter()
    try:
        if method == "knn":
            _, ranks = knn(queries, database, k)
        else:
            scores = torch.from_numpy(queries) @ torch.from_numpy(database).T
            ranks = torch.argsort(scores, dim=1, descending=True)[:, :k].numpy()
        recall = recall_at_k(ranks, positives, [1, k])
    except (MemoryError, RuntimeError) as error:
        return {"method": method, "queries": num_queries, "error": f"out of memory ({type(error).__name__})"}
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "queries": num_queries,
        "seconds": round(seconds, 2),
        "ms_per_query": round(1000 * seconds / num_queries, 3),
        "database_gb": round(database.nbytes / 2**30, 3),
        "inputs_gb": round(inputs_rss - base_rss, 3),
        # Peak memory above the interpreter and libraries: inputs plus everything the search allocates.
        "peak_gb": round(peak_gb() - base_rss, 3),
        "peak_over_database": round((peak_gb() - base_rss) / (database.nbytes / 2**30), 2),
        "recall@1": round(recall[1], 4),
    }


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(method, database, queries, dim, k, memory_limit_gb) -> dict:
    command = [sys.executable, __file__, "--child", method, "--database", str(database), "--queries", str(queries)]
    command += ["--dim", str(dim), "--k", str(k), "--memory-limit-gb", str(memory_limit_gb)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        return {
            "method": method,
            "queries": queries,
            "error": f"exit {result.returncode}: {result.stderr.strip()[-300:]}",
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--naive-slice", type=int, default=2_000, help="queries for the naive path if all do not fit")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space limit of each child")
    parser.add_argument("--child", choices=["knn", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.database, args.queries, args.dim, args.k, args.memory_limit_gb)))
        return
    rows = [run_child("knn", args.database, args.queries, args.dim, args.k, args.memory_limit_gb)]
    rows.append(run_child("naive", args.database, args.queries, args.dim, args.k, args.memory_limit_gb))
    if "error" in rows[-1] and args.naive_slice < args.queries:
        rows.append(run_child("knn", args.database, args.naive_slice, args.dim, args.k, args.memory_limit_gb))
        rows.append(run_child("naive", args.database, args.naive_slice, args.dim, args.k, args.memory_limit_gb))
    print(
        f"# {args.database} x {args.dim} database, top-{args.k}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    columns = [
        "method",
        "queries",
        "seconds",
        "ms_per_query",
        "database_gb",
        "inputs_gb",
        "peak_gb",
        "peak_over_database",
    ]
    columns += ["recall@1", "error"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()

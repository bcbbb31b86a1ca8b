"""Revisited Oxford/Paris +1M scoring: counting the labelled images' places against sorting the whole ranking.

The Revisited protocol scores the full ranking of the database (1M distractors included). Two evaluations
per embedding size, each in a fresh subprocess, one after the other for each size (side by side in one run):

* ``full sort`` (before): ``knn`` to the whole database depth, then ``revisited_map`` on the ranking;
* ``positions`` (after): ``evaluate_embeddings``, which counts the places of each query's easy, hard and junk
  images in its ranking (``retrieval.search.ranking_positions``) and scores them. The same process also
  times the score matrix alone (``queries @ database.T`` in the chunks the evaluation uses), alternating
  with the evaluation, so ``scoring = positions - score matrix`` compares like with like, and, for scale, the
  search a top-k protocol runs: ``knn`` top-100 (faiss).

``positions`` and the score matrix are timed ``--repeats`` times and the fastest run is kept (the full sort,
~1 min per size on 2 cores, once): on shared cores the fastest run is the least disturbed one.

Data are random: L2-normalised Gaussian queries and database, and per query random easy / hard / junk sets
about the size of RParis6k's (2-200 easy, 30-300 hard, 0-200 junk). Memory is resident memory above the
interpreter and libraries (see ``search_benchmark.py``): ``inputs_gb`` once the data exist, ``peak_gb`` the
highest mark while evaluating.

    python benchmarks/revisited_eval_benchmark.py                               # 70 queries x 1M, sizes 8..256
    python benchmarks/revisited_eval_benchmark.py --database 100000 --sizes 8 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from search_benchmark import peak_gb, reset_peak, rss_gb

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full sort", "positions")


def random_ground_truth(num_queries: int, num_database: int, seed: int = 0) -> list[dict]:
    """Per query disjoint random easy, hard and junk database indices, about RParis6k's sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(num_queries):
        easy, hard, junk = rng.integers(2, 201), rng.integers(30, 301), rng.integers(0, 201)
        labelled = rng.choice(num_database, easy + hard + junk, replace=False)
        gnd.append({"easy": labelled[:easy], "hard": labelled[easy : easy + hard], "junk": labelled[easy + hard :]})
    return gnd


def measure(method: str, num_database: int, num_queries: int, dim: int, repeats: int) -> dict:
    """Run one measurement in this process (called in a child process)."""
    import numpy as np

    from retrieval import RevisitedGroundTruth, evaluate_embeddings
    from retrieval.search import DENSE_CHUNK_BYTES, knn

    base_rss = rss_gb()
    rng = np.random.default_rng(dim)
    database = rng.standard_normal((num_database, dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ground_truth = RevisitedGroundTruth(random_ground_truth(num_queries, num_database), num_database)
    inputs_rss = rss_gb()
    reset_peak()
    seconds, matrix_seconds, top100_seconds = [], [], []
    for _ in range(repeats if method == "positions" else 1):
        if method == "positions":
            start = time.perf_counter()
            chunk = max(1, DENSE_CHUNK_BYTES // (4 * num_database))  # the chunks of ranking_positions
            for first in range(0, num_queries, chunk):
                queries[first : first + chunk] @ database.T
            matrix_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            knn(queries, database, 100)
            top100_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        if method == "full sort":
            _, ranks = knn(queries, database, ground_truth.depth)
            metrics = ground_truth.evaluate(ranks)
            del ranks
        else:
            metrics = evaluate_embeddings(queries, database, ground_truth)
        seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "dim": dim,
        "seconds": round(min(seconds), 2),
        "score_matrix_seconds": round(min(matrix_seconds), 2) if matrix_seconds else None,
        "top100_seconds": round(min(top100_seconds), 2) if top100_seconds else None,
        "inputs_gb": round(inputs_rss - base_rss, 3),
        "peak_gb": round(peak_gb() - base_rss, 3),
        "metrics": metrics,
    }


def run_child(method: str, num_database: int, num_queries: int, dim: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", method, "--database", str(num_database)]
    command += ["--queries", str(num_queries), "--sizes", str(dim), "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        return {"method": method, "dim": dim, "error": f"exit {result.returncode}: {result.stderr.strip()[-300:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.database, args.queries, args.sizes[0], args.repeats)))
        return
    started = time.time()
    rows = []
    for dim in args.sizes:
        by_method = {method: run_child(method, args.database, args.queries, dim, args.repeats) for method in METHODS}
        before, after = by_method["full sort"].get("metrics"), by_method["positions"].get("metrics")
        same = before is not None and before == after
        rows.append((dim, by_method, same))
        print(json.dumps({"dim": dim, **by_method}), file=sys.stderr)
    print(
        f"# {args.queries} queries x {args.database} database, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s in all"
    )
    print(
        "| size | score matrix s | top-100 search s | full sort s | full sort peak GB | positions s "
        "| positions peak GB | inputs GB | scoring s (positions - score matrix) | speed-up | same metrics |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {"matrix": 0.0, "top100": 0.0, "full sort": 0.0, "positions": 0.0}
    for dim, by_method, same in rows:
        if any("error" in row for row in by_method.values()):
            print(f"| {dim} | " + " ; ".join(row.get("error", "") for row in by_method.values()) + " |")
            continue
        before, after = by_method["full sort"], by_method["positions"]
        matrix = after["score_matrix_seconds"]
        totals["matrix"] += matrix
        totals["top100"] += after["top100_seconds"]
        totals["full sort"] += before["seconds"]
        totals["positions"] += after["seconds"]
        print(
            f"| {dim} | {matrix:.2f} | {after['top100_seconds']:.2f} | {before['seconds']:.2f} "
            f"| {before['peak_gb']:.2f} | {after['seconds']:.2f} | {after['peak_gb']:.2f} | {after['inputs_gb']:.2f} "
            f"| {after['seconds'] - matrix:.2f} | {before['seconds'] / after['seconds']:.0f}x "
            f"| {'yes' if same else 'NO'} |"
        )
    speedup = totals["full sort"] / max(totals["positions"], 1e-9)
    print(
        f"| all | {totals['matrix']:.2f} | {totals['top100']:.2f} | {totals['full sort']:.2f} | "
        f"| {totals['positions']:.2f} | | | {totals['positions'] - totals['matrix']:.2f} | {speedup:.0f}x | |"
    )


if __name__ == "__main__":
    main()

"""Exact search at GLDv2 scale on one GPU: 117,577 queries x 761,757 database images, 768-d, with the project's
search (``retrieval.search.knn``, ``device="cuda"``, the evaluation's GPU path): time and peak GPU memory, top-100
and top-1600, and the top-10 of a sample checked against a float64 CPU ranking.

    python benchmarks/gldv2_gpu_search.py        # needs a GPU with about 4 GiB free and 12 GB of host memory
"""

import time

import numpy as np
import torch

from retrieval.search import knn

rng = np.random.default_rng(0)
DIM, DATABASE, QUERIES = 768, 761_757, 117_577
t = time.time()
database = rng.standard_normal((DATABASE, DIM), dtype=np.float32)
database /= np.linalg.norm(database, axis=1, keepdims=True)
queries = rng.standard_normal((QUERIES, DIM), dtype=np.float32)
queries /= np.linalg.norm(queries, axis=1, keepdims=True)
print(f"data {time.time() - t:.1f} s", flush=True)
device = torch.device("cuda")
for k in (100, 1600):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    scores, ids = knn(queries, database, k, device=device)
    torch.cuda.synchronize()
    seconds = time.time() - t
    print(
        f"k={k}: {seconds:.1f} s for {QUERIES} queries x {DATABASE} ({1000 * seconds / QUERIES:.3f} ms/query), "
        f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
        flush=True,
    )
    # check a sample against a float64 CPU reference (ties aside)
    sample = np.arange(0, QUERIES, QUERIES // 20)
    reference = np.argsort(-(queries[sample].astype(np.float64) @ database.T.astype(np.float64)), axis=1)[:, :10]
    print(
        f"  top-10 agreement with a float64 CPU reference on {len(sample)} queries: "
        f"{np.mean(reference == ids[sample, :10]):.4f}",
        flush=True,
    )
print("done", flush=True)

"""What each stage costs at Google Landmarks v2 scale, measured on scaled synthetic data and extrapolated.

GLDv2 (Weyand et al., CVPR 2020): 761,757 index images, 117,577 test queries, 1,580,470 training images. The
stages after extraction are measured here at several database sizes on synthetic descriptors of the real
shapes, each with its time and peak memory, then extrapolated to those counts:

* **feature store** (``retrieval.feature_store``): writing global descriptors (768-d DINOv2 ViT-B/14, 2048-d
  ResNet) through ``FeatureStoreWriter`` as extraction does (blocks of rows, any order), opening the store (its
  memory map, every row checked finite) and reading it into memory; AMES local descriptors, 100 per image,
  128-d float16 (``[N, 100, 5 + 128]``) and their 128-bit binary codes (``compress_feature_store``), and the
  random reads of 64 images' locals that training and re-ranking make. Linear in the number of images.
* **AE-SVC training**: steps of the AE-SVC network and objective from the plain blocks
  (``lightning_modules.nn.mlp``, ``variance_constraint_losses``; 768 or 2048 -> 1024 -> 512 -> 256 and back,
  AdamW, global batch 512 as ``configs/aesvc/gldv2.yaml``), embeddings/s; an epoch is linear in the training
  images.
* **exact search** (``retrieval.search.knn``, faiss' flat inner-product search): a sample of queries against
  database prefixes, top-100 (the mAP@100 protocol) and top-1600 (AMES' shortlist, the neighbours extraction
  writes); linear in queries x database.
* **IVF-PQ** (``retrieval.approximate_search``, 768-d): trained once on a sample, filled up to each size, then
  searched at each ``nprobe``, with PQ scores only and with the top ``--refine`` candidates re-scored exactly
  from the float rows; recall@100 of the exact top-100 (from the exact stage), mAP@100, ms/query,
  bytes/image.
* **AMES re-ranking**: pairs/s of ``AMESTransformer`` at 100 x 100 locals (``benchmarks/ames_rerank_benchmark.py``'s
  measurement, reused), and the cost per query of re-ranking a shortlist of 100 or 1600.
* **metrics**: ``GLDv2GroundTruth.evaluate`` (mAP@100, public and private subsets) of random top-100 rankings of
  all 117,577 queries at full scale (nothing to extrapolate).

Synthetic descriptors follow the embedded benchmark's model (``datamodules/embedded.py``), L2-normalised
``B_sem (S c_y + w) + B_nui a + e``: landmark centres ``c_y`` over 96 semantic directions with the decaying
spectrum ``S``, half of each centre shared by a group of 50 landmarks (so a query's top-100 beyond its own
landmark are similar landmarks, not noise), within-landmark variation ``w`` (std 0.2), 12 nuisance directions
(std 0.3), noise ``e`` (std 0.05 per dimension), 20 images per landmark; queries are drawn from the landmarks
of the smallest database, and their landmark's 20 images are the positives of the mAP@100 column. Unlike the
embedded benchmark there is no common offset and the nuisance is weak: images of one landmark have cosine
about 0.43, and exact search scores mAP@100 about 0.6 at 50k. Times and memory depend on the shapes only; the
recall of IVF-PQ depends on the data, so it is a property of this model, not a prediction for DINOv2
descriptors of GLDv2 (``python -m retrieval.approximate_search`` measures it on real stores).

Peak memory is the process's resident high-water mark above its resident memory when the stage starts (the
kernel's mark is reset before each stage, Linux), so it counts what the stage allocates, inputs excluded.

    python benchmarks/gldv2_scale_benchmark.py --output gldv2_scale.json
    python benchmarks/gldv2_scale_benchmark.py --sizes 10000 20000 --local-sizes 1000 2000 --queries 200   # a quick look
"""

from __future__ import annotations

import os

# faiss' and torch's OpenMP threads spin while they wait; on a few cores shared with other work that spinning
# makes k-means many times slower than one thread. Passive waiting must be set before the libraries load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from search_benchmark import peak_gb, reset_peak, rss_gb  # noqa: E402

INDEX_IMAGES, TEST_QUERIES, TRAIN_IMAGES = 761_757, 117_577, 1_580_470
NUM_LOCALS, LOCAL_DIM, LOCAL_BITS = 100, 128, 128


class Stage:
    """Seconds and peak memory (GiB above the resident memory at the start) of a block of work."""

    def __enter__(self):
        reset_peak()
        self.base = rss_gb()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak_gb = max(0.0, peak_gb() - self.base)


class LandmarkLikeDescriptors:
    """The generative model of the module docstring in ``dim`` dimensions, sampled in chunks."""

    def __init__(
        self,
        dim: int,
        seed: int = 0,
        semantic_dim: int = 96,
        nuisance_dim: int = 12,
        per_class: int = 20,
        per_group: int = 50,
        within_std: float = 0.2,
        noise_std: float = 0.05,
    ):
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, semantic_dim + nuisance_dim)))
        self.semantic_basis = basis[:, :semantic_dim].T.astype(np.float32)
        self.nuisance_basis = basis[:, semantic_dim:].T.astype(np.float32)
        self.spectrum = ((1.0 + np.arange(semantic_dim)) ** -0.5).astype(np.float32)
        self.dim, self.semantic_dim, self.per_class, self.seed = dim, semantic_dim, per_class, seed
        self.per_group, self.within_std, self.noise_std = per_group, within_std, noise_std

    def centres(self, labels: np.ndarray) -> np.ndarray:
        """Half of a landmark's centre is its own, half its group's: similar landmarks neighbour each other."""

        def drawn(key: int) -> np.ndarray:  # depends on the key only, so queries and database share landmarks
            return np.random.default_rng([self.seed, key]).standard_normal(self.semantic_dim)

        out = np.empty((len(labels), self.semantic_dim), dtype=np.float32)
        for i, label in enumerate(labels):
            out[i] = (drawn(int(label)) + drawn(10**9 + int(label) // self.per_group)) / np.sqrt(2)
        return out

    def sample(self, labels: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = len(labels)
        unique, inverse = np.unique(labels, return_inverse=True)
        semantic = self.centres(unique)[inverse] * self.spectrum + self.within_std * rng.standard_normal(
            (n, self.semantic_dim), dtype=np.float32
        )
        x = semantic @ self.semantic_basis
        x += 0.3 * rng.standard_normal((n, self.nuisance_basis.shape[0]), dtype=np.float32) @ self.nuisance_basis
        x += self.noise_std * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def database(self, num: int, chunk: int = 50_000) -> np.ndarray:
        out = np.empty((num, self.dim), dtype=np.float32)
        for start in range(0, num, chunk):
            stop = min(start + chunk, num)
            out[start:stop] = self.sample(np.arange(start, stop) // self.per_class, seed=1_000_000 + start)
        return out

    def queries(self, num: int, num_database: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Queries of landmarks of the smallest database (so every size holds all their images) and, per query,
        its positives: the database images of its landmark."""
        labels = np.random.default_rng(self.seed + 1).integers(0, num_database // self.per_class, num)
        positives = [np.arange(label * self.per_class, (label + 1) * self.per_class) for label in labels]
        return self.sample(labels, seed=2), positives


# ---- stages ------------------------------------------------------------------------------------------------------


def store_rows(database: np.ndarray, sizes: list[int], directory: Path, rows_per_write: int) -> list[dict]:
    from retrieval.feature_store import FeatureStore, FeatureStoreWriter

    rows = []
    for size in sizes:
        path = directory / f"global_{database.shape[1]}_{size}.h5"
        with Stage() as write:
            writer = FeatureStoreWriter(path, [str(i) for i in range(size)], global_dim=database.shape[1])
            for start in range(0, size, rows_per_write):
                stop = min(start + rows_per_write, size)
                writer.write(np.arange(start, stop), database[start:stop])
            writer.finalize()
        with Stage() as open_checked:
            store = FeatureStore(path)
            mapped = store.global_descriptors()
        with Stage() as read:
            in_memory = np.array(mapped)
        assert np.array_equal(in_memory, database[:size])
        rows.append(
            {
                "stage": f"global store {database.shape[1]}-d",
                "images": size,
                "write_s": write.seconds,
                "write_peak_gb": write.peak_gb,
                "open_checked_s": open_checked.seconds,
                "read_s": read.seconds,
                "read_peak_gb": read.peak_gb,
                "file_bytes_per_image": path.stat().st_size / size,
            }
        )
        del in_memory, mapped, store
        path.unlink()
    return rows


def local_store_rows(sizes: list[int], directory: Path, rows_per_write: int, seed: int) -> list[dict]:
    """AMES locals: 100 x (5 + 128) float16 per image, then their 128-bit codes; writes, compression, reads."""
    from retrieval.compression import itq_projection
    from retrieval.feature_store import FeatureStore, FeatureStoreWriter, compress_feature_store

    rng = np.random.default_rng(seed)
    block = np.empty((rows_per_write, NUM_LOCALS, 5 + LOCAL_DIM), dtype=np.float16)
    block[..., :5] = rng.random((rows_per_write, NUM_LOCALS, 5))
    block[..., 3] = 0  # no padding
    block[..., 5:] = rng.standard_normal((rows_per_write, NUM_LOCALS, LOCAL_DIM)) / np.sqrt(LOCAL_DIM)
    projection = itq_projection(block[:20, :, 5:].reshape(-1, LOCAL_DIM).astype(np.float32), LOCAL_BITS, 10)
    rows = []
    for size in sizes:
        path, binary = directory / f"local_{size}.h5", directory / f"local_binary_{size}.h5"
        with Stage() as write:
            writer = FeatureStoreWriter(path, [str(i) for i in range(size)], local_shape=block.shape[1:])
            for start in range(0, size, rows_per_write):
                stop = min(start + rows_per_write, size)
                writer.write(np.arange(start, stop), local_descriptors=block[: stop - start])
            writer.finalize()
        with Stage() as compress:
            compress_feature_store(path, binary, local_projection=projection)
        reads = {}
        for name, store_path in (("fp16", path), ("binary", binary)):
            store = FeatureStore(store_path)
            picks = [np.sort(rng.choice(size, 64, replace=False)) for _ in range(20)]
            with Stage() as read:
                for rows_read in picks:
                    store.local_descriptors(rows_read)
            reads[name] = 1000 * read.seconds / (20 * 64)
        rows.append(
            {
                "stage": "local store (100 x 128)",
                "images": size,
                "write_s": write.seconds,
                "write_peak_gb": write.peak_gb,
                "compress_s": compress.seconds,
                "compress_peak_gb": compress.peak_gb,
                "fp16_bytes_per_image": path.stat().st_size / size,
                "binary_bytes_per_image": binary.stat().st_size / size,
                "fp16_read_ms_per_image": reads["fp16"],
                "binary_read_ms_per_image": reads["binary"],
            }
        )
        path.unlink()
        binary.unlink()
    return rows


def aesvc_rows(dims: list[int], batch: int, steps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from lightning_modules.nn import mlp, variance_constraint_losses

    rows = []
    for dim in dims:
        torch.manual_seed(0)
        encoder, decoder = mlp(dim, [1024, 512], 256), mlp(256, [512, 1024], dim)
        parameters = [*encoder.parameters(), *decoder.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3)
        x = F.normalize(torch.randn(batch, dim), dim=1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            z = encoder(x)
            terms = variance_constraint_losses(z)
            loss = 25 * F.mse_loss(decoder(z), x) + terms["covariance"] + 15 * terms["variance"] + terms["mean"]
            loss.backward()
            optimizer.step()

        for _ in range(2):
            step()
        with Stage() as timed:
            for _ in range(steps):
                step()
        rows.append(
            {
                "stage": f"AE-SVC training {dim}-d",
                "batch": batch,
                "embeddings_per_s": steps * batch / timed.seconds,
                "peak_gb": timed.peak_gb,
                "parameters": sum(p.numel() for p in parameters),
            }
        )
    return rows


def exact_rows(database, queries, positives, sizes: list[int], ks: list[int]) -> tuple[list, dict]:
    from retrieval.metrics import map_at_k
    from retrieval.search import knn

    rows, top100 = [], {}
    for size in sizes:
        for k in ks:
            with Stage() as search:
                _, ids = knn(queries, database[:size], k)
            if k == 100:
                top100[size] = ids
            rows.append(
                {
                    "stage": f"exact top-{k} {database.shape[1]}-d",
                    "images": size,
                    "queries": len(queries),
                    "ms_per_query": 1000 * search.seconds / len(queries),
                    "ns_per_pair": 1e9 * search.seconds / (len(queries) * size),
                    "peak_gb": search.peak_gb,
                    "mAP@100": map_at_k(ids, positives, 100),
                }
            )
    return rows, top100


def ivfpq_rows(database, queries, positives, sizes, exact_top100, settings, nprobes, refine_depth):
    from retrieval.approximate_search import IVFPQIndex, recall_against_exact
    from retrieval.metrics import map_at_k

    index = IVFPQIndex(database.shape[1], settings)
    sample = np.sort(np.random.default_rng(settings.seed).choice(max(sizes), settings.training_size, replace=False))
    with Stage() as train:
        index.train(database[sample])
    training = {"train_s": train.seconds, "train_peak_gb": train.peak_gb, "training_rows": settings.training_size}
    rows, added, add_seconds = [], 0, 0.0
    for size in sizes:
        with Stage() as add:
            for start in range(added, size, 65536):
                index.add(database[start : min(start + 65536, size)])
        added, add_seconds = size, add_seconds + add.seconds
        index.database = database[:size]
        for nprobe, refine in ((nprobe, refine) for nprobe in nprobes for refine in sorted({0, refine_depth})):
            index.nprobe = nprobe
            index.settings = replace(settings, refine=refine)
            with Stage() as search:
                _, ids = index.search(queries, 100)
            rows.append(
                {
                    "stage": f"IVF-PQ {settings.factory_string}",
                    "images": size,
                    "nprobe": nprobe,
                    "refine": refine,
                    "add_s_total": add_seconds,
                    "add_peak_gb": add.peak_gb,
                    "ms_per_query": 1000 * search.seconds / len(queries),
                    "recall@100": recall_against_exact(ids, exact_top100[size], 100),
                    "recall@10": recall_against_exact(ids, exact_top100[size], 10),
                    "mAP@100": map_at_k(ids, positives, 100),
                    "exact_mAP@100": map_at_k(exact_top100[size], positives, 100),
                    "bytes_per_image": index.bytes_per_image,
                    "index_mib": index.index_bytes() / 2**20,
                }
            )
    return training, rows


def ames_row(repeats: int, batch: int) -> dict:
    import torch
    from ames_rerank_benchmark import rerank_throughput

    from lightning_modules.nn.ames import AMESTransformer

    torch.manual_seed(0)
    args = argparse.Namespace(batch=batch, dim=768, repeats=repeats)
    network = AMESTransformer(768).eval()
    with Stage() as measured:
        result = rerank_throughput({"AMESTransformer": network}, [(100, 100)], args, torch.Generator().manual_seed(0))
    return {"stage": "AMES re-ranking 100 x 100", "pairs_per_s": result[0]["pairs_per_s"], "peak_gb": measured.peak_gb}


def metrics_row(seed: int) -> dict:
    from retrieval.ground_truth import GLDv2GroundTruth

    rng = np.random.default_rng(seed)
    positives = [rng.choice(INDEX_IMAGES, rng.integers(1, 20), replace=False) for _ in range(TEST_QUERIES)]
    subsets = np.where(rng.random(TEST_QUERIES) < 0.5, "public", "private")
    truth = GLDv2GroundTruth(positives, subsets, INDEX_IMAGES)
    # Rankings that hit: each query's positives placed at random among random database items.
    ranks = rng.integers(0, INDEX_IMAGES, (TEST_QUERIES, 100))
    for query, row in enumerate(positives):
        ranks[query, rng.choice(100, len(row), replace=False)] = row
    with Stage() as scored:
        metrics = truth.evaluate(ranks)
    return {
        "stage": "GLDv2 mAP@100",
        "queries": TEST_QUERIES,
        "seconds": scored.seconds,
        "peak_gb": scored.peak_gb,
        **metrics,
    }


# ---- extrapolation and report ----------------------------------------------------------------------------------


def linear_fit(sizes, values):
    """``(intercept, slope)`` of the least-squares line through ``(size, value)``."""
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
    return intercept, slope


def print_report(result: dict) -> None:
    def table(header, rows):
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()

    print(f"\n{result['machine']}; {result['seconds']:.0f} s in all\n")
    table(
        ["store", "images", "write s", "write peak GB", "open + check s", "read s", "read peak GB", "bytes/image"],
        [
            [r["stage"], f"{r['images']:,}", f"{r['write_s']:.2f}", f"{r['write_peak_gb']:.3f}",
             f"{r['open_checked_s']:.2f}", f"{r['read_s']:.2f}", f"{r['read_peak_gb']:.3f}",
             f"{r['file_bytes_per_image']:,.0f}"]
            for r in result["global_store"]
        ],
    )  # fmt: skip
    table(
        ["locals", "images", "write s", "write peak GB", "compress s", "compress peak GB", "fp16 B/image",
         "binary B/image", "fp16 read ms/image", "binary read ms/image"],
        [
            [r["stage"], f"{r['images']:,}", f"{r['write_s']:.2f}", f"{r['write_peak_gb']:.3f}",
             f"{r['compress_s']:.2f}", f"{r['compress_peak_gb']:.3f}", f"{r['fp16_bytes_per_image']:,.0f}",
             f"{r['binary_bytes_per_image']:,.0f}", f"{r['fp16_read_ms_per_image']:.3f}",
             f"{r['binary_read_ms_per_image']:.3f}"]
            for r in result["local_store"]
        ],
    )  # fmt: skip
    table(
        ["training", "batch", "embeddings/s", "peak GB", "parameters"],
        [[r["stage"], str(r["batch"]), f"{r['embeddings_per_s']:,.0f}", f"{r['peak_gb']:.3f}", f"{r['parameters']:,}"]
         for r in result["aesvc"]],
    )  # fmt: skip
    table(
        ["search", "images", "queries", "ms/query", "ns per query x image", "peak GB", "mAP@100"],
        [[r["stage"], f"{r['images']:,}", f"{r['queries']:,}", f"{r['ms_per_query']:.2f}", f"{r['ns_per_pair']:.2f}",
          f"{r['peak_gb']:.3f}", f"{r['mAP@100']:.4f}"] for r in result["exact"]],
    )  # fmt: skip
    t = result["ivfpq_training"]
    print(f"IVF-PQ training on {t['training_rows']:,} rows: {t['train_s']:.1f} s, peak {t['train_peak_gb']:.3f} GB\n")
    table(
        ["index", "images", "nprobe", "refine", "add s (cumulative)", "add peak GB", "ms/query", "recall@100 vs exact",
         "recall@10 vs exact", "mAP@100 (exact)", "bytes/image", "index MiB"],
        [[r["stage"], f"{r['images']:,}", str(r["nprobe"]), str(r["refine"]), f"{r['add_s_total']:.1f}",
          f"{r['add_peak_gb']:.3f}",
          f"{r['ms_per_query']:.3f}", f"{r['recall@100']:.3f}", f"{r['recall@10']:.3f}",
          f"{r['mAP@100']:.4f} ({r['exact_mAP@100']:.4f})",
          str(r["bytes_per_image"]), f"{r['index_mib']:.1f}"] for r in result["ivfpq"]],
    )  # fmt: skip
    a, m = result["ames"], result["metrics"]
    print(
        f"AMES 100 x 100: {a['pairs_per_s']:.1f} pairs/s; GLDv2 mAP@100 of {m['queries']:,} queries: {m['seconds']:.2f} s\n"
    )
    table(["stage at GLDv2 scale", "how extrapolated", "time", "memory"], result["extrapolated"])


def extrapolate(result: dict, args) -> list[list[str]]:
    """Rows ``[stage, model, time, memory]`` at 761,757 index / 117,577 queries / 1,580,470 training images."""

    def hours(seconds):
        return (
            f"{seconds / 3600:.1f} h"
            if seconds >= 3600
            else f"{seconds / 60:.1f} min"
            if seconds >= 60
            else f"{seconds:.1f} s"
        )

    rows = []
    for dim in args.dims:
        stores = [r for r in result["global_store"] if r["stage"].endswith(f"{dim}-d")]
        sizes = [r["images"] for r in stores]
        for count, what in ((INDEX_IMAGES, "index"), (TEST_QUERIES, "test queries"), (TRAIN_IMAGES, "train")):
            write = sum(linear_fit(sizes, [r["write_s"] for r in stores])[i] * (1, count)[i] for i in range(2))
            read = sum(
                linear_fit(sizes, [r["read_s"] + r["open_checked_s"] for r in stores])[i] * (1, count)[i]
                for i in range(2)
            )
            size_gb = stores[-1]["file_bytes_per_image"] * count / 2**30
            rows.append([f"global store {dim}-d, {what} ({count:,})", "line through the sizes",
                         f"write {hours(write)}, open + read {hours(read)}", f"{size_gb:.2f} GB on disk and in memory"])  # fmt: skip
    local = result["local_store"]
    sizes = [r["images"] for r in local]
    for count, what in ((INDEX_IMAGES, "index"), (TRAIN_IMAGES, "train")):
        write = sum(linear_fit(sizes, [r["write_s"] for r in local])[i] * (1, count)[i] for i in range(2))
        compress = sum(linear_fit(sizes, [r["compress_s"] for r in local])[i] * (1, count)[i] for i in range(2))
        rows.append([f"locals 100 x 128, {what} ({count:,})", "line through the sizes",
                     f"write fp16 {hours(write)}, compress to binary {hours(compress)}",
                     f"{local[-1]['fp16_bytes_per_image'] * count / 2**30:.1f} GB fp16, "
                     f"{local[-1]['binary_bytes_per_image'] * count / 2**30:.2f} GB binary on disk"])  # fmt: skip
    for r in result["aesvc"]:
        rows.append([f"{r['stage']}, one epoch of {TRAIN_IMAGES:,}", "training images / embeddings per s",
                     hours(TRAIN_IMAGES / r["embeddings_per_s"]), f"{r['peak_gb']:.2f} GB (batch {r['batch']})"])  # fmt: skip
    for k in args.ks:
        for dim in args.dims:
            exact = [r for r in result["exact"] if r["stage"] == f"exact top-{k} {dim}-d"]
            if not exact:
                continue
            per_pair = exact[-1]["ns_per_pair"] * 1e-9  # the largest size: the per-pair cost settles as N grows
            database_gb = INDEX_IMAGES * dim * 4 / 2**30
            rows.append([f"exact top-{k} {dim}-d, {TEST_QUERIES:,} x {INDEX_IMAGES:,}",
                         f"queries x images x {exact[-1]['ns_per_pair']:.2f} ns (largest size)",
                         hours(per_pair * TEST_QUERIES * INDEX_IMAGES),
                         f"{database_gb:.2f} GB database (float32) + {exact[-1]['peak_gb']:.2f} GB working"])  # fmt: skip
    ivf = result["ivfpq"]
    train = result["ivfpq_training"]
    for nprobe, refine in ((nprobe, refine) for nprobe in args.nprobe for refine in sorted({0, args.refine})):
        at = [r for r in ivf if r["nprobe"] == nprobe and r["refine"] == refine]
        sizes = [r["images"] for r in at]
        intercept, slope = linear_fit(sizes, [r["ms_per_query"] for r in at])
        per_query = intercept + slope * INDEX_IMAGES
        add_intercept, add_slope = linear_fit(sizes, [r["add_s_total"] for r in at])
        build = train["train_s"] + add_intercept + add_slope * INDEX_IMAGES
        index_gb = (at[-1]["bytes_per_image"] * INDEX_IMAGES) / 2**30
        rows.append([f"{at[0]['stage']}, nprobe {nprobe}, refine {refine}, {TEST_QUERIES:,} queries", "ms/query and add: lines through the sizes",
                     f"build {hours(build)}, search {hours(per_query * 1e-3 * TEST_QUERIES)} ({per_query:.2f} ms/query)",
                     f"{index_gb:.3f} GB index; recall@100 {at[-1]['recall@100']:.3f} at {sizes[-1]:,} (measured)"])  # fmt: skip
    pairs = result["ames"]["pairs_per_s"]
    for shortlist in (100, 1600):
        rows.append([f"AMES re-ranking of the top-{shortlist}, {TEST_QUERIES:,} queries", "queries x shortlist / pairs per s",
                     f"{hours(TEST_QUERIES * shortlist / pairs)} ({1000 * shortlist / pairs:,.0f} ms/query)",
                     f"{result['ames']['peak_gb']:.2f} GB (batch of {args.ames_batch} pairs)"])  # fmt: skip
    metrics = result["metrics"]
    rows.append([f"mAP@100 of {TEST_QUERIES:,} queries", "measured at full scale", hours(metrics["seconds"]),
                 f"{metrics['peak_gb']:.2f} GB"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 2048])
    parser.add_argument("--max-size-2048", type=int, default=100_000, help="largest 2048-d database")
    parser.add_argument("--local-sizes", type=int, nargs="+", default=[2_000, 4_000, 8_000])
    parser.add_argument("--queries", type=int, default=1000, help="query sample of the search stages")
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1600])
    parser.add_argument("--rows-per-write", type=int, default=1024)
    parser.add_argument("--aesvc-steps", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--refine", type=int, default=1000, help="candidates re-scored exactly (also run without)")
    parser.add_argument("--training-size", type=int, default=16384)
    parser.add_argument("--kmeans-iterations", type=int, default=10)
    parser.add_argument("--ames-batch", type=int, default=32)
    parser.add_argument("--ames-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    import faiss
    import h5py
    import torch

    from retrieval.approximate_search import IVFPQSettings
    from retrieval.files import write_text_atomic

    start = time.perf_counter()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, numpy {np.__version__}, h5py {h5py.__version__}",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    databases = {}
    result["global_store"] = []
    with tempfile.TemporaryDirectory(prefix="gldv2_scale_") as directory:
        for dim in args.dims:
            sizes = [s for s in args.sizes if dim != 2048 or s <= args.max_size_2048]
            print(f"generating {max(sizes):,} x {dim} ...", flush=True)
            databases[dim] = LandmarkLikeDescriptors(dim, args.seed).database(max(sizes))
            result["global_store"] += store_rows(databases[dim], sizes, Path(directory), args.rows_per_write)
        print("local descriptor stores ...", flush=True)
        result["local_store"] = local_store_rows(args.local_sizes, Path(directory), args.rows_per_write, args.seed)
    print("AE-SVC training ...", flush=True)
    result["aesvc"] = aesvc_rows(args.dims, 512, args.aesvc_steps)
    print("exact search ...", flush=True)
    result["exact"], top100 = [], {}
    for dim, database in databases.items():
        sizes = [s for s in args.sizes if s <= len(database)]
        queries, positives = LandmarkLikeDescriptors(dim, args.seed).queries(args.queries, min(sizes))
        rows, found = exact_rows(database, queries, positives, sizes, args.ks if dim == 768 else [100])
        result["exact"] += rows
        if dim == 768:
            top100, queries_768, positives_768 = found, queries, positives
    databases.pop(2048, None)  # only the 768-d database is indexed
    print("IVF-PQ ...", flush=True)
    settings = IVFPQSettings(
        nlist=args.nlist,
        m=args.m,
        nprobe=args.nprobe[0],
        training_size=args.training_size,
        kmeans_iterations=args.kmeans_iterations,
        seed=args.seed,
    )
    result["settings"] = settings.describe()
    result["ivfpq_training"], result["ivfpq"] = ivfpq_rows(
        databases[768], queries_768, positives_768, args.sizes, top100, settings, args.nprobe, args.refine
    )
    del databases
    print("AMES re-ranking ...", flush=True)
    result["ames"] = ames_row(args.ames_repeats, args.ames_batch)
    print("metrics ...", flush=True)
    result["metrics"] = metrics_row(args.seed)
    result["seconds"] = time.perf_counter() - start
    result["extrapolated"] = extrapolate(result, args)
    print_report(result)
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

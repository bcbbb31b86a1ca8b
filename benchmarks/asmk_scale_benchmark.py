"""Detect-to-Retrieve search at scale: index bytes per image, build time and query time of the ASMK* and R-ASMK*
inverted file (``retrieval.inverted_file.InvertedFile``) against database size, extrapolated to 1M images, and
the inverted file against brute-force kernel similarity (``retrieval.asmk.kernel_similarities``).

Memory and time depend on how many words each image has, how the words are distributed over the codebook and
the code size, not on image content, so the images are generated directly in the aggregated domain (assigning
100M real 128-d descriptors to 65,536 words is beyond 2 CPU cores). The model, per image, in the paper's
setting (``--codebook-size 65536 --dim 128 --descriptors 1000``):

- Word frequencies: the codebook's words ranked by frequency follow ``p(r) ~ r^-zipf`` (``--zipf 0.5``: the
  most frequent word takes 1/510 of all descriptors and is in about 3/4 of the images, the median word 1/181 of
  that). Word ids are a random permutation of the ranks.
- Descriptors come in bursts: repeated structures and the same keypoint at adjacent scales of DELF's image
  pyramid fall into the same word. An image draws patterns (a word from the frequencies above), each observed
  by a geometric number of descriptors of mean ``--burst 1.5``, until ``--descriptors`` are drawn. ASMK* keeps
  one entry per distinct word, so 1000 descriptors give ~658 words (the script prints the measured mean).
- Database images (ASMK*): one word per descriptor (single assignment); per word a random ``dim / 8``-byte
  code, which is what the signs of the residual sums of unrelated images are (each bit 0 or 1 with
  probability 1/2, independent between images).
- R-ASMK* database images: the whole image plus ``--boxes 3`` detected boxes, each with ``--box-fraction 0.3``
  of the descriptors (300) extracted again from the crop, as the D2R release does. A fraction
  ``--box-overlap 0.6`` of a box's descriptors see patterns the whole image already has (same words); the
  rest are new bursty patterns (finer detail of the enlarged crop) that may add words. The R-ASMK* image has
  the union of the words (~892, 1.36x those of ASMK*), codes as above.
- Queries: multiple assignment, each pattern sends its descriptors to its word and 4 more (the ``asmk``
  package's 5 nearest words): 4 of a fixed list of 8 neighbours of the word, drawn among words of nearby
  frequency rank (dense regions of descriptor space hold many frequent words next to each other). 1000
  descriptors give ~3,130 query words. Each query has ``--relevant 5`` relevant images in the first 1,000 of
  the database, which share 30% of the query's patterns with codes equal to the query's up to 15% of flipped
  bits (so the top of each ranking is meaningful); every other pair shares words only by chance.

Every database size is a prefix of the same generated database, so the sizes differ only by the images
added. For each of ASMK* and R-ASMK* and each size: ``InvertedFile.bytes_per_image`` and its parts (packed
codes, 4-byte image ids, posting words and offsets, word counts), the build time, and the time of one query
(``search([query], 100)``, one query at a time as an online request), the median over ``--queries``; at
``--brute-size`` the rankings of the first ``--brute-queries`` queries are checked against
``kernel_similarities`` (top-100 identical, scores equal to 1e-9) and both are timed on them. The previous
inverted-file scan (``LegacyInvertedFile``: ``np.add.at`` over byte-table popcounts and ``selectivity`` per
entry) is timed on the same queries, alternating with the current one, and checked to give the same scores.
Memory and query time are fitted linearly in the database size (least squares over the measured sizes) and
extrapolated to 1M images.

    python benchmarks/asmk_scale_benchmark.py                                   # 1k ... 100k, 50 queries
    python benchmarks/asmk_scale_benchmark.py --sizes 1000 5000 10000 50000 --output asmk_scale.json
    python benchmarks/asmk_scale_benchmark.py --quick                           # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.asmk import AggregatedImage, kernel_similarities, selectivity, word_similarities  # noqa: E402
from retrieval.inverted_file import InvertedFile  # noqa: E402

EXTRAPOLATE_TO = 1_000_000
QUERY_ASSIGNMENTS = 5  # word + 4 neighbours per query descriptor, as the asmk package
NEIGHBOURS = 8  # fixed neighbour list per word the 4 extra words are drawn from
NEIGHBOUR_WINDOW = 64  # neighbours are within this many frequency ranks of the word
RELEVANT_SHARE = 0.3  # share of a query's patterns a relevant image has
RELEVANT_FLIP = 0.15  # probability that a bit of a shared word's code differs from the query's


class WordModel:
    """The codebook's word frequencies (Zipf over ranks), the rank -> word id permutation and each rank's
    neighbour words (for the queries' multiple assignment)."""

    def __init__(self, size: int, zipf: float, rng: np.random.Generator):
        probabilities = np.arange(1, size + 1, dtype=np.float64) ** -zipf
        probabilities /= probabilities.sum()
        self.size = size
        self.probabilities = probabilities
        self.cdf = np.cumsum(probabilities)
        self.word_of_rank = rng.permutation(size).astype(np.int64)
        window = min(NEIGHBOUR_WINDOW, max(1, size // 4))
        offsets = rng.integers(1, window + 1, (size, NEIGHBOURS)) * rng.choice([-1, 1], (size, NEIGHBOURS))
        neighbour_ranks = np.abs(np.arange(size)[:, None] + offsets)  # reflect at rank 0
        neighbour_ranks = np.where(neighbour_ranks >= size, 2 * (size - 1) - neighbour_ranks, neighbour_ranks)
        self.neighbours = self.word_of_rank[neighbour_ranks]

    def draw_ranks(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(count), side="right"), self.size - 1)

    def patterns(self, rng: np.random.Generator, descriptors: int, burst: float) -> np.ndarray:
        """Ranks of the patterns observed by ``descriptors`` descriptors in bursts of geometric length, mean
        ``burst`` (a rank may repeat: two patterns can fall into the same word)."""
        if descriptors <= 0:
            return np.zeros(0, dtype=np.int64)
        lengths = rng.geometric(1.0 / burst, size=int(descriptors / burst * 1.5) + 16)
        while lengths.sum() < descriptors:
            lengths = np.r_[lengths, rng.geometric(1.0 / burst, size=lengths.size)]
        count = int(np.searchsorted(np.cumsum(lengths), descriptors)) + 1
        return self.draw_ranks(rng, count)


def random_codes(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    return rng.integers(0, 256, (count, dim // 8), dtype=np.uint8)


def correlated_codes(rng: np.random.Generator, codes: np.ndarray) -> np.ndarray:
    """``codes`` with each bit flipped with probability :data:`RELEVANT_FLIP`."""
    flips = np.packbits(rng.random((codes.shape[0], codes.shape[1] * 8)) < RELEVANT_FLIP, axis=1)
    return np.bitwise_xor(codes, flips)


def generate_queries(rng, model: WordModel, args) -> tuple[list[AggregatedImage], list[np.ndarray]]:
    """Queries with multiple assignment, and each query's pattern words (what its relevant images share)."""
    queries, primary = [], []
    for _ in range(args.queries):
        ranks = model.patterns(rng, args.descriptors, args.burst)
        chosen = np.argsort(rng.random((ranks.size, NEIGHBOURS)), axis=1)[:, : QUERY_ASSIGNMENTS - 1]
        extra = np.take_along_axis(model.neighbours[ranks], chosen, axis=1)
        words = np.unique(np.r_[model.word_of_rank[ranks], extra.ravel()])
        queries.append(AggregatedImage(words, random_codes(rng, words.size, args.dim)))
        primary.append(np.unique(model.word_of_rank[ranks]))
    return queries, primary


def generate_database(rng, model: WordModel, args, queries, query_patterns, num_images: int):
    """``(asmk_star, regional)``: two lists of ``num_images`` images, the ASMK* and the R-ASMK* aggregation of
    the same generated images, and ``relevant``: per query, the database indices of its relevant images."""
    first = min(num_images, 1000)
    picked = rng.choice(first, min(first, args.queries * args.relevant), replace=False)
    relevant = [picked[q * args.relevant : (q + 1) * args.relevant] for q in range(args.queries)]
    query_of = {int(image): q for q, images in enumerate(relevant) for image in images}
    box_descriptors = int(round(args.box_fraction * args.descriptors))
    asmk_star, regional = [], []
    for image in range(num_images):
        ranks = model.patterns(rng, args.descriptors, args.burst)
        shared = np.zeros(0, dtype=np.int64)
        if image in query_of:  # a relevant image: part of its patterns are the query's
            q = query_of[image]
            keep = rng.random(ranks.size) >= RELEVANT_SHARE
            candidates = query_patterns[q]
            shared = np.unique(rng.choice(candidates, int(RELEVANT_SHARE * candidates.size), replace=False))
            ranks = ranks[keep]
        words = np.union1d(model.word_of_rank[ranks], shared)
        codes = random_codes(rng, words.size, args.dim)
        if shared.size:
            query = queries[query_of[image]]
            rows = np.searchsorted(words, shared)
            codes[rows] = correlated_codes(rng, query.vectors[np.searchsorted(query.words, shared)])
        asmk_star.append(AggregatedImage(words, codes))
        # R-ASMK*: each box's descriptors are extracted again from its crop; the new patterns may add words.
        new = [model.patterns(rng, rng.binomial(box_descriptors, 1 - args.box_overlap), args.burst)]
        new += [
            model.patterns(rng, rng.binomial(box_descriptors, 1 - args.box_overlap), args.burst)
            for _ in range(args.boxes - 1)
        ]
        added = np.setdiff1d(model.word_of_rank[np.concatenate(new)], words)
        all_words = np.r_[words, added]
        order = np.argsort(all_words, kind="stable")
        all_codes = np.concatenate([codes, random_codes(rng, added.size, args.dim)])[order]
        regional.append(AggregatedImage(all_words[order], all_codes))
    return asmk_star, regional, relevant


class LegacyInvertedFile(InvertedFile):
    """The inverted file's posting-list scan before this benchmark (2026-11-26), kept to time it side by side:
    per entry, a 16-lookup byte-table popcount and ``selectivity`` on ``u``, and a search of the owning list by
    ``np.searchsorted``."""

    def _accumulate(self, query, scores, alpha, threshold):
        slots = np.searchsorted(self.posting_words, query.words)
        found = slots < self.posting_words.size
        found[found] = self.posting_words[slots[found]] == query.words[found]
        query_rows = np.flatnonzero(found)
        slots = slots[found]
        starts = self.posting_offsets[slots]
        lengths = self.posting_offsets[slots + 1] - starts
        ends = np.cumsum(lengths)
        begins = ends - lengths
        total = int(ends[-1]) if ends.size else 0
        row_bytes = self.entry_vectors.shape[1] * self.entry_vectors.itemsize
        chunk = max(1, 64 * 2**20 // (row_bytes * (4 if self.binary else 6)))
        for first in range(0, total, chunk):
            positions = np.arange(first, min(total, first + chunk))
            owner = np.searchsorted(ends, positions, side="right")
            entries = starts[owner] + (positions - begins[owner])
            u = word_similarities(query.vectors[query_rows[owner]], self.entry_vectors[entries])
            weights = selectivity(u, alpha, threshold)
            kept = np.flatnonzero(weights)
            np.add.at(scores, self.entry_images[entries[kept]], weights[kept])


def legacy_view(index: InvertedFile) -> LegacyInvertedFile:
    """The same posting arrays, scanned by the legacy code (no copy)."""
    legacy = LegacyInvertedFile.__new__(LegacyInvertedFile)
    legacy.__dict__.update(index.__dict__)
    return legacy


def timed_query(index: InvertedFile, query: AggregatedImage, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    start = time.perf_counter()
    scores, ids = index.search([query], k)
    return time.perf_counter() - start, scores[0], ids[0]


def expected_order(scores: np.ndarray) -> np.ndarray:
    """Ranking by descending score, equal scores by ascending index (the knn contract)."""
    return np.lexsort((np.arange(scores.size), -scores))


def measure_size(name, database, queries, relevant, size, args) -> dict:
    gc.collect()
    start = time.perf_counter()
    index = InvertedFile(database[:size])
    build = time.perf_counter() - start
    legacy = legacy_view(index)
    count = index.num_images
    row = {
        "method": name,
        "images": size,
        "words_per_image": index.num_entries / count,
        "bytes_per_image": index.bytes_per_image,
        "codes_per_image": index.entry_vectors.nbytes / count,
        "ids_per_image": index.entry_images.nbytes / count,
        "lists_per_image": (index.posting_words.nbytes + index.posting_offsets.nbytes) / count,
        "counts_per_image": index.image_word_counts.nbytes / count,
        "index_mb": index.memory_bytes / 2**20,
        "build_s": build,
    }
    # Posting entries a query visits: the lengths of its words' lists.
    lengths = np.diff(index.posting_offsets)
    visited = []
    for query in queries:
        slots = np.searchsorted(index.posting_words, query.words)
        found = slots < index.posting_words.size
        found[found] = index.posting_words[slots[found]] == query.words[found]
        visited.append(int(lengths[slots[found]].sum()))
    row["entries_per_query"] = float(np.mean(visited))
    row["longest_list_share"] = float(lengths.max() / count)
    timed_query(index, queries[0], args.k)  # warm-up
    timed_query(legacy, queries[0], args.k)
    times, legacy_times, same, hits = [], [], True, []
    for number, query in enumerate(queries):
        seconds, scores, ids = timed_query(index, query, args.k)
        legacy_seconds, legacy_scores, legacy_ids = timed_query(legacy, query, args.k)
        times.append(seconds)
        legacy_times.append(legacy_seconds)
        same &= bool(np.array_equal(ids, legacy_ids) and np.array_equal(scores, legacy_scores))
        present = relevant[number][relevant[number] < size]
        hits.append(np.isin(present, ids[:10]).mean() if present.size else np.nan)
    row["query_ms"] = 1000 * float(np.median(times))
    row["legacy_query_ms"] = 1000 * float(np.median(legacy_times))
    row["same_as_legacy"] = same
    row["relevant_in_top10"] = float(np.nanmean(hits))
    if size == args.brute_size:
        row.update(brute_force(index, database[:size], queries[: args.brute_queries], args.k))
    return row


def brute_force(index: InvertedFile, database, queries, k: int) -> dict:
    """Rankings of ``queries`` by brute force and by the inverted file, checked equal, and both timed."""
    brute_times, index_times, agree, worst = [], [], True, 0.0
    for query in queries:
        start = time.perf_counter()
        reference = kernel_similarities([query], database)[0]
        brute_times.append(time.perf_counter() - start)
        seconds, scores, ids = timed_query(index, query, k)
        index_times.append(seconds)
        agree &= bool(np.array_equal(ids, expected_order(reference)[:k]))
        worst = max(worst, float(np.max(np.abs(scores - reference[ids]) / np.maximum(np.abs(reference[ids]), 1e-30))))
        exact = index.query_scores(query)
        agree &= bool(np.allclose(exact, reference, rtol=1e-9, atol=1e-15))
    brute_ms, index_ms = 1000 * float(np.median(brute_times)), 1000 * float(np.median(index_times))
    return {
        "brute_queries": len(queries),
        "brute_ms": brute_ms,
        "index_ms_on_brute_queries": index_ms,
        "speedup_over_brute": brute_ms / index_ms,
        "rankings_agree": agree,
        "max_rel_score_diff_float32": worst,
    }


def extrapolate(rows: list[dict]) -> dict:
    """Least-squares lines of index bytes, build time and query time against the number of images, at 1M."""
    images = np.array([row["images"] for row in rows], dtype=np.float64)
    out = {"method": rows[0]["method"], "images": EXTRAPOLATE_TO, "extrapolated": True}
    if images.size < 2:
        return out
    for key, value in (
        ("index_mb", [row["index_mb"] for row in rows]),
        ("build_s", [row["build_s"] for row in rows]),
        ("query_ms", [row["query_ms"] for row in rows]),
        ("legacy_query_ms", [row["legacy_query_ms"] for row in rows]),
        ("entries_per_query", [row["entries_per_query"] for row in rows]),
    ):
        slope, intercept = np.polyfit(images, np.asarray(value, dtype=np.float64), 1)
        out[key] = float(slope * EXTRAPOLATE_TO + intercept)
    out["bytes_per_image"] = out["index_mb"] * 2**20 / EXTRAPOLATE_TO
    out["words_per_image"] = rows[-1]["words_per_image"]
    return out


def print_table(rows: list[dict]) -> None:
    columns = [
        ("method", "{}"),
        ("images", "{:,}"),
        ("words_per_image", "{:.0f}"),
        ("bytes_per_image", "{:,.0f}"),
        ("codes_per_image", "{:,.0f}"),
        ("ids_per_image", "{:,.0f}"),
        ("lists_per_image", "{:,.1f}"),
        ("index_mb", "{:,.1f}"),
        ("build_s", "{:.2f}"),
        ("entries_per_query", "{:,.0f}"),
        ("query_ms", "{:.1f}"),
        ("legacy_query_ms", "{:.1f}"),
        ("same_as_legacy", "{}"),
        ("relevant_in_top10", "{:.2f}"),
    ]
    print("| " + " | ".join(name for name, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for name, form in columns:
            value = row.get(name)
            cells.append("" if value is None else form.format(value))
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebook-size", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=128, help="descriptor dimension; ASMK* codes take dim / 8 bytes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 5_000, 10_000, 50_000, 100_000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--descriptors", type=int, default=1000, help="local descriptors per image")
    parser.add_argument("--burst", type=float, default=1.5, help="mean descriptors per pattern")
    parser.add_argument("--zipf", type=float, default=0.5, help="exponent of the word-frequency power law")
    parser.add_argument("--boxes", type=int, default=3, help="detected boxes per R-ASMK* database image")
    parser.add_argument("--box-fraction", type=float, default=0.3, help="descriptors of a box / of the image")
    parser.add_argument("--box-overlap", type=float, default=0.6, help="share of a box's descriptors on old words")
    parser.add_argument("--relevant", type=int, default=5, help="relevant database images per query")
    parser.add_argument("--brute-size", type=int, default=5_000, help="database size of the brute-force check")
    parser.add_argument("--brute-queries", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8,192 words, 500 and 1,000 images")
    args = parser.parse_args()
    if args.quick:
        args.codebook_size, args.sizes, args.queries = 8192, [500, 1000], 5
        args.brute_size, args.brute_queries = 1000, 2
    if args.dim % 8:
        parser.error("--dim must be a multiple of 8 (ASMK* packs 8 signs to a byte)")
    args.sizes = sorted(set(args.sizes))

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    model = WordModel(args.codebook_size, args.zipf, rng)
    queries, query_patterns = generate_queries(rng, model, args)
    start = time.perf_counter()
    asmk_star, regional, relevant = generate_database(rng, model, args, queries, query_patterns, args.sizes[-1])
    generation = time.perf_counter() - start
    query_words = np.mean([query.num_words for query in queries])
    print(
        f"# {args.sizes[-1]:,} images generated in {generation:.1f} s: {args.codebook_size:,} words, d = {args.dim}, "
        f"{args.descriptors} descriptors per image; words per image: ASMK* "
        f"{np.mean([image.num_words for image in asmk_star]):.0f}, R-ASMK* "
        f"{np.mean([image.num_words for image in regional]):.0f}, query (x{QUERY_ASSIGNMENTS} assignment) "
        f"{query_words:.0f}",
        flush=True,
    )
    results = {"measured": [], "extrapolated": []}
    for name, database in (("ASMK*", asmk_star), ("R-ASMK*", regional)):
        rows = []
        for size in args.sizes:
            rows.append(measure_size(name, database, queries, relevant, size, args))
            print(json.dumps(rows[-1]), flush=True)
        results["measured"] += rows
        results["extrapolated"].append(extrapolate(rows))
    del asmk_star, regional
    results["settings"] = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    results["settings"]["query_words"] = float(query_words)
    results["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_s": time.perf_counter() - started,
    }
    print_table(results["measured"] + results["extrapolated"])
    for row in results["measured"]:
        if "brute_ms" in row:
            print(
                f"# {row['method']} at {row['images']:,} images, {row['brute_queries']} queries: brute force "
                f"{row['brute_ms']:.0f} ms/query, inverted file {row['index_ms_on_brute_queries']:.1f} ms/query, "
                f"{row['speedup_over_brute']:.0f}x; rankings agree: {row['rankings_agree']}"
            )
    print(f"# total {results['machine']['total_s']:.0f} s")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

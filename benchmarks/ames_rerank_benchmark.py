"""AMES pair-scoring throughput on the CPU: ``AMESTransformer`` against the ``nn.MultiheadAttention`` reference.

Both networks hold the same weights (768-d locals, the authors' full-precision configuration: d 128, 2 heads,
5 layers, FFN 1024) and run in one process, alternating, each repeat timing every network once in turn:

* **re-ranking**: eval mode under ``torch.inference_mode``, pairs/s for a batch of pairs at each
  ``(L_q, L_x)``; the reference as the authors call it (``need_weights`` left on) and, to separate that cost
  from the rest, with ``need_weights=False``. The logits of each network are compared with ``AMESTransformer``'s.
* **training**: triplets/s of forward + backward for a batch of triplets, two pairs each (anchor-positive,
  anchor-negative, one batch of ``2 x triplets`` pairs) with binary cross-entropy on the logits.

Each pair has a random number of valid descriptors in ``[L / 2, L]`` per image, the rest padding, as in stores
of images with fewer than ``L`` local features. Figures are the fastest of the repeats: on a machine shared with
other work, the least disturbed run.

    python benchmarks/ames_rerank_benchmark.py                  # defaults: 2 threads, 32 pairs, 7 repeats
    python benchmarks/ames_rerank_benchmark.py --repeats 2 --train-repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ames_reference import AMESReference, reference_to_ames  # noqa: E402


def random_sets(batch: int, length: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors ``[batch, length, dim]`` and padding: each set keeps a random ``[length / 2, length]`` prefix."""
    descriptors = torch.randn(batch, length, dim, generator=generator)
    valid = torch.randint(length // 2, length + 1, (batch, 1), generator=generator)
    return descriptors, torch.arange(length)[None] >= valid


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_shares(model, *inputs) -> dict:
    """Shares of one profiled forward's CPU time in the Linear layers and in the attention kernel: the Linear
    layers are the same computation in both networks, so they bound what a faster attention can gain."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(*inputs)
    totals = {event.key: event.cpu_time_total for event in profile.key_averages()}
    whole = sum(event.self_cpu_time_total for event in profile.key_averages())
    return {
        "linear_share": totals.get("aten::linear", 0.0) / whole,
        "attention_share": totals.get("aten::scaled_dot_product_attention", 0.0) / whole,
    }


def rerank_throughput(networks: dict, sizes: list[tuple[int, int]], args, generator) -> list[dict]:
    rows = []
    for query_len, database_len in sizes:
        query, query_pad = random_sets(args.batch, query_len, args.dim, generator)
        database, database_pad = random_sets(args.batch, database_len, args.dim, generator)
        seconds = {name: [] for name in networks}
        with torch.inference_mode():
            logits = {name: network(query, query_pad, database, database_pad) for name, network in networks.items()}
            for _ in range(args.repeats):
                for name, network in networks.items():
                    seconds[name].append(timed(lambda: network(query, query_pad, database, database_pad)))
            shares = time_shares(networks["AMESTransformer"], query, query_pad, database, database_pad)
        for name in networks:
            rows.append(
                {
                    "sizes": f"{query_len} x {database_len}",
                    "network": name,
                    "pairs_per_s": args.batch / min(seconds[name]),
                    "max_abs_diff": (logits[name] - logits["AMESTransformer"]).abs().max().item(),
                    **(shares if name == "AMESTransformer" else {}),
                }
            )
    return rows


def train_throughput(networks: dict, args, generator) -> list[dict]:
    anchor, anchor_pad = random_sets(args.triplets, args.train_len, args.dim, generator)
    others, others_pad = random_sets(2 * args.triplets, args.train_len, args.dim, generator)
    query, query_pad = anchor.repeat(2, 1, 1), anchor_pad.repeat(2, 1)
    targets = torch.cat([torch.ones(args.triplets), torch.zeros(args.triplets)])
    seconds = {name: [] for name in networks}
    losses = {}

    def step(name, network):
        network.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(network(query, query_pad, others, others_pad), targets)
        loss.backward()
        losses[name] = loss.item()

    for network in networks.values():
        network.train()
    for name, network in networks.items():
        step(name, network)
    for _ in range(args.train_repeats):
        for name, network in networks.items():
            seconds[name].append(timed(lambda: step(name, network)))
    return [
        {
            "sizes": f"{args.train_len} x {args.train_len}",
            "network": name,
            "triplets_per_s": args.triplets / min(seconds[name]),
            "loss_diff": abs(losses[name] - losses["AMESTransformer"]),
        }
        for name in networks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768, help="local descriptor dimension")
    parser.add_argument("--batch", type=int, default=32, help="pairs per re-ranking batch")
    parser.add_argument("--sizes", default="600x50,100x100", help="comma-separated L_q x L_x")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--triplets", type=int, default=32, help="triplets per training batch")
    parser.add_argument("--train-len", type=int, default=100, help="descriptors per image in training")
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]

    reference = AMESReference(args.dim).eval()
    reference_without_weights = AMESReference(args.dim, need_weights=False).eval()
    reference_without_weights.load_state_dict(reference.state_dict())
    networks = {
        "AMESTransformer": reference_to_ames(reference),
        "reference": reference,
        "reference, need_weights=False": reference_without_weights,
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dim}-d locals")
    rerank = rerank_throughput(networks, sizes, args, generator)
    print(f"\nre-ranking, batch of {args.batch} pairs, fastest of {args.repeats}")
    print("| L_q x L_x | network | pairs/s | speed-up of AMESTransformer | max abs logit diff |")
    print("|---|---|---|---|---|")
    ours = {row["sizes"]: row["pairs_per_s"] for row in rerank if row["network"] == "AMESTransformer"}
    for row in rerank:
        print(
            f"| {row['sizes']} | {row['network']} | {row['pairs_per_s']:.1f} | "
            f"{ours[row['sizes']] / row['pairs_per_s']:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    for row in rerank:
        if "linear_share" in row:
            print(
                f"AMESTransformer at {row['sizes']}: {row['linear_share']:.0%} of the time in Linear layers, "
                f"{row['attention_share']:.0%} in attention"
            )

    training = train_throughput({name: networks[name] for name in ("AMESTransformer", "reference")}, args, generator)
    print(
        f"\ntraining, batch of {args.triplets} triplets (2 pairs each), forward + backward, fastest of "
        f"{args.train_repeats}"
    )
    print("| L_q x L_x | network | triplets/s | speed-up of AMESTransformer | loss diff |")
    print("|---|---|---|---|---|")
    ours = training[0]["triplets_per_s"]
    for row in training:
        print(
            f"| {row['sizes']} | {row['network']} | {row['triplets_per_s']:.1f} | "
            f"{ours / row['triplets_per_s']:.2f}x | {row['loss_diff']:.1e} |"
        )
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()

"""Does a trained re-ranker reach its own objective? Its BCE next to the hand-written matcher's, on the same pairs.

On the embedded local-descriptor benchmark, counting mutual nearest neighbours (``datamodules.embedded_local``)
needs no training and ranks better than the trained AMES models. This script tells "AMES does not reach its
objective" apart from "AMES reaches it but generalises less": the matcher's count, turned into a logit by a
1-d logistic fit on the same pairs, is a feasible solution of AMES's objective, so both are scored by the same
label-balanced BCE:

* on training triplets (the sampler's draws of epoch 0: ``(anchor, positive)`` and ``(anchor, negative)``
  pairs), at the evaluation's set sizes: BCE and accuracy of each;
* on the VAL split's shortlists (each val query against its top-``shortlist`` global neighbours in the val
  database, the pairs the re-ranking stage scores): the AUC of each score, same object = positive.

    python benchmarks/ames_objective.py --checkpoint runs/ames/embedded_local/version_0/checkpoints/last.ckpt
    python benchmarks/ames_objective.py --checkpoint A.ckpt --checkpoint B.ckpt --triplets 2000 --output out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # Triplets give as many positive as negative pairs, so the plain mean is the label-balanced loss.
    return float(F.binary_cross_entropy_with_logits(logits, labels))


def fitted_logits(counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``a * count + b`` with ``(a, b)`` minimising the BCE on these pairs (the matcher's best logit)."""
    weights = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")
    x, y = counts.double(), labels.double()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(weights[0] * x + weights[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return (weights[0] * x + weights[1]).detach().float()


def mutual_nn_counts(query_locals: np.ndarray, database_locals: np.ndarray) -> np.ndarray:
    """Per pair, the hand-written matcher's count (``[P, L, 5 + D]`` stored rows on each side)."""
    from datamodules.embedded_local import descriptor_similarities, mutual_nn_scores

    return np.array(
        [mutual_nn_scores(descriptor_similarities(q, x[None]))[0] for q, x in zip(query_locals, database_locals)]
    )


@torch.no_grad()
def reranker_logits(model, query_locals: np.ndarray, database_locals: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(query_locals), batch):
        q = torch.from_numpy(query_locals[start : start + batch].astype(np.float32))
        x = torch.from_numpy(database_locals[start : start + batch].astype(np.float32))
        out.append(model.score_pairs(None, q, None, x).float().reshape(-1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="an AMES checkpoint (repeatable)")
    parser.add_argument("--root", default="data/embedded_local", help="the embedded local benchmark's directory")
    parser.add_argument("--triplets", type=int, default=2000, help="training triplets scored")
    parser.add_argument("--locals", type=int, default=64, help="L_q = L_x of the scored pairs")
    parser.add_argument("--shortlist", type=int, default=50, help="val shortlist depth")
    parser.add_argument("--neighbours", type=int, default=100, help="training neighbours (as the shipped config)")
    parser.add_argument("--output", help="write the figures as JSON")
    args = parser.parse_args()

    from datamodules.embedded_local import generate_embedded_local_benchmark
    from datamodules.pair_sampling import MinedTriplets
    from lightning_modules.base import load_frozen_module
    from retrieval.feature_store import FeatureStore
    from retrieval.search import knn

    root = generate_embedded_local_benchmark(args.root)
    train = FeatureStore(root / "train.h5")
    train_global = np.asarray(train.global_descriptors(), dtype=np.float32)
    scores, indices = knn(train_global, train_global, args.neighbours + 1)
    sampler = MinedTriplets(indices[:, 1:], scores[:, 1:], train.labels, min_positives=1, min_negatives=5, seed=0)
    sampler.set_epoch(0)
    triplets = np.array(list(sampler)[: args.triplets])
    train_locals = train.local_descriptors(np.unique(triplets))[:, : args.locals]
    row = {index: i for i, index in enumerate(np.unique(triplets))}
    anchors = np.concatenate([triplets[:, 0], triplets[:, 0]])
    others = np.concatenate([triplets[:, 1], triplets[:, 2]])
    pair_q = train_locals[[row[i] for i in anchors]]
    pair_x = train_locals[[row[i] for i in others]]
    pair_labels = torch.cat([torch.ones(len(triplets)), torch.zeros(len(triplets))])

    queries, database = FeatureStore(root / "val_query.h5"), FeatureStore(root / "val_database.h5")
    _, shortlist = knn(
        np.asarray(queries.global_descriptors(), dtype=np.float32),
        np.asarray(database.global_descriptors(), dtype=np.float32),
        args.shortlist,
    )
    query_locals = queries.local_descriptors(slice(None))[:, : args.locals]
    database_locals = database.local_descriptors(slice(None))[:, : args.locals]
    val_q = np.repeat(query_locals, args.shortlist, axis=0)
    val_x = database_locals[shortlist.reshape(-1)]
    val_positive = (queries.labels[:, None] == database.labels[shortlist]).reshape(-1)

    counts = torch.from_numpy(mutual_nn_counts(pair_q, pair_x)).float()
    matcher = fitted_logits(counts, pair_labels)
    results = {
        "mutual NN count (fitted logit)": {
            "train_bce": balanced_bce(matcher, pair_labels),
            "train_accuracy": float(((matcher > 0).float() == pair_labels).float().mean()),
            "val_shortlist_auc": auc(mutual_nn_counts(val_q, val_x), val_positive),
        }
    }
    for path in args.checkpoint:
        model = load_frozen_module(path)
        logits = torch.from_numpy(reranker_logits(model, pair_q, pair_x))
        results[path] = {
            "train_bce": balanced_bce(logits, pair_labels),
            "train_accuracy": float(((logits > 0).float() == pair_labels).float().mean()),
            "val_shortlist_auc": auc(reranker_logits(model, val_q, val_x), val_positive),
        }
    print(
        f"{len(triplets)} training triplets (epoch 0), L_q = L_x = {args.locals}; val shortlists top-{args.shortlist}"
    )
    print(f"{'scorer':60s} {'train BCE':>9s} {'train acc':>9s} {'val AUC':>8s}")
    for name, r in results.items():
        print(f"{name[-60:]:60s} {r['train_bce']:9.4f} {r['train_accuracy']:9.4f} {r['val_shortlist_auc']:8.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

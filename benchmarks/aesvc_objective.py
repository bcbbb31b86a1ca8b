"""Does AE-SVC reach its own optimum? Its objective at the PCA-whitening solution next to trained models'.

PCA-whitening is a feasible point of the AE-SVC objective with a linear encoder and decoder: encoder = the
whitening projection fitted on the training set, decoder = its least-squares inverse (also fitted on the
training set). This script computes, with the loss code AE-SVC trains with (``AESVC.objective_terms``), every
term of the objective of that solution and of trained AE-SVC checkpoints on the same batches: the training
set in the shuffled batches of one epoch (``--batch-size``, the training batch) and a held-out set (the
validation database) in consecutive batches of the same size; plus the covariance term on the whole set at
once (without the batch-noise floor) and where the latent comes from: the share of its variance that the
generator's nuisance directions and strongest class directions (those a PCA of the latent's size keeps)
explain linearly. Retrieval is scored on the VAL split by the evaluation every method goes through.

Beside the checkpoints it trains, with the loop ``fit`` runs (AdamW, the same batch order), the closed-form
solution further on the objective and a linear AE-SVC from a random start (``--epochs``), and any
``--trial`` (the first checkpoint's settings with some changed). Every model is scored with the first
checkpoint's objective (``--loss-of`` picks another).

    python benchmarks/aesvc_objective.py --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt
    python benchmarks/aesvc_objective.py --checkpoint A.ckpt --checkpoint B.ckpt --output /tmp/objective.json
    python benchmarks/aesvc_objective.py --checkpoint A.ckpt --trial '{"lr": 3e-4}' --trial '{"lr_schedule": "cosine"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_split(root: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    from retrieval.feature_store import FeatureStore

    store = FeatureStore(root / f"{split}.h5")
    return torch.from_numpy(np.asarray(store.global_descriptors(), dtype=np.float32)), store.labels


def whitening_autoencoder(x_train: torch.Tensor, hparams: dict):
    """An AE-SVC with a linear encoder = PCA-whitening and a linear decoder = its least-squares inverse."""
    from lightning_modules import AESVC, PCAProjection

    pca = PCAProjection(dim=hparams["latent_dim"], whiten=True)
    pca.observe({"embedding": x_train.double()})
    pca.solve()
    loss_settings = {k: v for k, v in hparams.items() if k not in ("hidden_dims", "decoder_hidden_dims", "input_dim")}
    model = AESVC(**{**loss_settings, "hidden_dims": [], "input_dim": x_train.shape[1]})
    projection, mean = pca.projection.double(), pca.mean.double()
    z = (x_train.double() - mean) @ projection
    # Least squares x ~ [z, 1] @ A: the decoder's weight and bias.
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, x_train.double()).solution
    with torch.no_grad():
        encoder, decoder = model.encoder[-1], model.decoder[-1]
        encoder.weight.copy_(projection.T)
        encoder.bias.copy_(-mean @ projection)
        decoder.weight.copy_(solution[:-1].T)
        decoder.bias.copy_(solution[-1])
    return model.eval()


def load_model(path: str):
    from lightning_modules.base import load_frozen_module

    return load_frozen_module(path)


@torch.no_grad()
def objective_on_batches(model, loss_of, x: torch.Tensor, batch_size: int, seed: int | None) -> dict[str, float]:
    """Mean over batches of every term (and the weighted total) of ``loss_of``'s objective at ``model``."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if seed is not None else None
    batches = (x[order] if order is not None else x).split(batch_size)
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        if len(batch) < batch_size:  # training drops the incomplete last batch
            continue
        x_in = loss_of.input_embeddings({"embedding": batch})
        z = model.encode(x_in)
        terms = loss_of.objective_terms(x_in, z, model.decode(model.hparams.latent_dim, z))
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: value / count for name, value in totals.items()}


@torch.no_grad()
def population_covariance(model, loss_of, x: torch.Tensor) -> float:
    """The covariance term on the whole set at once (no batch noise), in ``loss_of``'s normalisation."""
    from lightning_modules.nn import variance_constraint_losses

    z = model.encode(loss_of.input_embeddings({"embedding": x})).double()
    hp = loss_of.hparams
    return float(variance_constraint_losses(z, hp.covariance_target, hp.covariance_reduction)["covariance"])


@torch.no_grad()
def variance_shares(model, loss_of, x: torch.Tensor, bases: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of the latent's variance that a linear map of the data's coordinates in each basis explains (R^2)."""
    z = model.encode(loss_of.input_embeddings({"embedding": x})).double()
    z = z - z.mean(0)
    shares = {}
    for name, basis in bases.items():
        a = x.double() @ basis
        a = torch.cat([a - a.mean(0), torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
        fitted = a @ torch.linalg.lstsq(a, z).solution
        shares[name] = float((fitted**2).sum() / (z**2).sum())
    return shares


def train_on_objective(model, x: torch.Tensor, batch_size: int, epochs: int, seed: int = 0):
    """``model`` trained on its own objective as ``fit`` trains it: AdamW with its settings, the shuffled
    batches of ``EpochPermutation`` (seed + epoch), the incomplete last batch dropped."""
    hp = model.hparams
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    steps = epochs * (len(x) // batch_size)
    # As RetrievalModule.build_optimizer: a per-step cosine decay over the whole run, or a constant rate.
    cosine = hp.lr_schedule == "cosine"
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if cosine else None
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
            for step in range(len(x) // batch_size):
                batch = model.input_embeddings({"embedding": x[order[step * batch_size : (step + 1) * batch_size]]})
                z = model.encode(batch)
                loss = model.objective_terms(batch, z, model.decode(hp.latent_dim, z))["objective"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
    return model.eval()


@torch.no_grad()
def val_retrieval(model, root: Path) -> dict[str, float]:
    from retrieval.evaluation import evaluate_embeddings
    from retrieval.ground_truth import LabelGroundTruth

    queries, query_labels = load_split(root, "val_query")
    database, database_labels = load_split(root, "val_database")
    ground_truth = LabelGroundTruth(query_labels, database_labels, recall_ks=(1,), map_ks=(4, 100))
    embed = lambda rows: model.embed({"embedding": rows}).numpy()  # noqa: E731
    return evaluate_embeddings(embed(queries), embed(database), ground_truth)


def generator_bases(root: Path, latent_dim: int) -> dict[str, torch.Tensor]:
    """The generator's directions (regenerated from the spec's seed, as the generator draws them): the
    nuisance directions, and the signal (class + nuisance) directions; the rest of the space is noise."""
    from datamodules.embedded import EmbeddedBenchmarkSpec
    from retrieval.feature_store import FeatureStore

    config = FeatureStore(root / "train.h5").config
    spec = EmbeddedBenchmarkSpec(**{k: v for k, v in config.items() if k in EmbeddedBenchmarkSpec.__dataclass_fields__})
    rng = np.random.default_rng(spec.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((spec.dim, spec.semantic_dim + spec.nuisance_dim)))
    basis = torch.from_numpy(basis)
    semantic, nuisance = basis[:, : spec.semantic_dim], basis[:, spec.semantic_dim :]
    # The class directions of largest class variance that a 64-d PCA keeps beside the nuisance (the generator
    # orders them by decreasing class variance).
    strongest = semantic[:, : max(latent_dim - spec.nuisance_dim, 0)]
    return {
        "nuisance": nuisance,
        "class + nuisance": basis,
        "strongest class + nuisance": torch.cat([strongest, nuisance], dim=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="a trained AE-SVC checkpoint (repeatable)")
    parser.add_argument("--label", action="append", help="a name for each checkpoint, in order")
    parser.add_argument("--loss-of", type=int, default=0, help="whose loss settings score the whitening solution")
    parser.add_argument("--root", default=str(REPO / "data/embedded"), help="the embedded benchmark's directory")
    parser.add_argument("--batch-size", type=int, default=500, help="the training batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training-set batch order")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the linear AE-SVCs trained here (0: none)")
    parser.add_argument(
        "--trial",
        action="append",
        help="also train an AE-SVC with the first checkpoint's settings changed, e.g. '{\"lr\": 3e-4}' or "
        '\'{"constraint_estimator": "split_halves", "batch_size": 2000, "epochs": 60}\' (scored with the same loss)',
    )
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    root = Path(args.root)
    from datamodules.embedded import EmbeddedBenchmarkSpec, generate_embedded_benchmark

    generate_embedded_benchmark(root, EmbeddedBenchmarkSpec())
    x_train, _ = load_split(root, "train")
    x_held_out, _ = load_split(root, "val_database")
    labels = args.label or [str(Path(p)) for p in args.checkpoint]
    trained = [load_model(path) for path in args.checkpoint]
    loss_of = trained[args.loss_of]
    whitening = whitening_autoencoder(x_train, dict(loss_of.hparams))
    bases = generator_bases(root, loss_of.hparams.latent_dim)
    models = {"PCA-whitening as an AE-SVC (closed form)": whitening}
    if args.epochs:
        from lightning_modules import AESVC

        # Does the objective keep PCA-whitening, or move away from it, and is a linear AE-SVC led to it?
        further = whitening_autoencoder(x_train, dict(loss_of.hparams))
        models[f"PCA-whitening, then {args.epochs} epochs on the objective"] = train_on_objective(
            further, x_train, args.batch_size, args.epochs, args.seed
        )
        torch.manual_seed(args.seed)
        linear = AESVC(**dict(whitening.hparams))
        models[f"linear AE-SVC, random init, {args.epochs} epochs"] = train_on_objective(
            linear, x_train, args.batch_size, args.epochs, args.seed
        )
    models.update(zip(labels, trained))
    for trial in args.trial or []:
        # A trained AE-SVC with other settings: the first checkpoint's, changed by the trial's keys.
        from lightning_modules import AESVC

        settings = json.loads(trial)
        batch_size, epochs = settings.pop("batch_size", args.batch_size), settings.pop("epochs", args.epochs or 15)
        torch.manual_seed(args.seed)
        model = AESVC(**{**dict(loss_of.hparams), **settings})
        models[f"trial {trial} (batch {batch_size}, {epochs} epochs)"] = train_on_objective(
            model, x_train, batch_size, epochs, args.seed
        )
    results = []
    for name, model in models.items():
        scorer = loss_of  # every model scored by the same objective
        row = {"model": name, "checkpoint": args.checkpoint[labels.index(name)] if name in labels else None}
        for split, x, seed in (("train", x_train, args.seed), ("held-out", x_held_out, None)):
            row[split] = objective_on_batches(model, scorer, x, args.batch_size, seed)
            row[split]["covariance (whole set)"] = population_covariance(model, scorer, x)
        row["covariance floor"] = scorer.covariance_floor(args.batch_size)
        row["share of latent variance"] = variance_shares(model, scorer, x_held_out, bases)
        row["val"] = val_retrieval(model, root)
        results.append(row)
        print(json.dumps(row), flush=True)
    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


def print_table(results: list[dict]) -> None:
    """Markdown: the objective's terms per batch (mean over batches), on the training and held-out sets."""
    terms = ["reconstruction", "covariance", "variance", "mean", "objective"]
    header = ["model", "set", *terms, "covariance, whole set", "outside PCA's directions"]
    header += ["val R@1", "val mAP@4", "val mAP@100"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in results:
        for split in ("train", "held-out"):
            values = [f"{row[split][t]:.4f}" for t in terms] + [f"{row[split]['covariance (whole set)']:.3f}"]
            extra = [f"{1 - row['share of latent variance']['strongest class + nuisance']:.3f}"]
            extra += [f"{row['val'][k]:.4f}" for k in ("recall@1", "mAP@4", "mAP@100")]
            first = row["model"] if split == "train" else ""
            print("| " + " | ".join([first, split, *values, *(extra if split == "train" else [""] * 4)]) + " |")


if __name__ == "__main__":
    main()

"""AE-SVC losses, the linear baselines' closed forms, and the global-batch gradient under DDP."""

import logging
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import run_in_two_processes

from lightning_modules import AESVC, PCAProjection
from lightning_modules.nn import gather_with_grad, variance_constraint_losses
from lightning_modules.nn.variance_constraints import covariance_noise_floor
from retrieval.diagnostics import RunningMoments, constraint_errors, cosine_similarity_variance


def test_constraint_losses_hand_computed():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    # mean 0, covariance diag(0.5, 2)
    losses = variance_constraint_losses(z, "full")
    assert losses["covariance"].item() == pytest.approx(0.25 + 1.0)
    assert losses["variance"].item() == pytest.approx((0.25 + 1.0) / 2)
    assert losses["mean"].item() == pytest.approx(0.0)
    assert variance_constraint_losses(z, "off_diagonal")["covariance"].item() == pytest.approx(0.0)
    correlated = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, 0.0])
    # covariance [[1, 1], [1, 1]], mean (3, 0)
    losses = variance_constraint_losses(correlated, "full")
    assert losses["covariance"].item() == pytest.approx(2.0)
    assert variance_constraint_losses(correlated, "off_diagonal")["covariance"].item() == pytest.approx(2.0)
    assert losses["variance"].item() == pytest.approx(0.0)
    assert losses["mean"].item() == pytest.approx(4.5)


def correlated_data(n=4000, dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) * torch.linspace(3, 0.1, dim)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing.double() + 5.0


def fitted_pca(x, dim, whiten):
    pca = PCAProjection(dim=dim, whiten=whiten)
    for batch in x.split(700):
        pca.observe({"embedding": batch})
    pca.solve()
    return pca


def test_pca_whitening_satisfies_the_three_constraints_on_its_fit_set():
    x = correlated_data()
    pca = fitted_pca(x, 6, whiten=True)
    moments = RunningMoments(6)
    moments.update(pca.project(x.float()))
    errors = constraint_errors(moments)
    assert errors["cov_offdiag_rms"] < 1e-4 and errors["var_rms_error"] < 1e-4 and errors["mean_norm"] < 1e-4


def test_pca_keeps_the_top_variance_directions_unscaled():
    x = correlated_data()
    pca = fitted_pca(x, 4, whiten=False)
    projection = pca.projection.double()
    torch.testing.assert_close(projection.T @ projection, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    variances = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)[:4]
    torch.testing.assert_close(pca.eigenvalues.double(), variances, rtol=1e-4, atol=1e-6)


def test_pca_refuses_more_components_than_inputs():
    with pytest.raises(ValueError, match="dim=20 exceeds the input embedding size 12"):
        fitted_pca(correlated_data(), 20, whiten=False)


def test_cosine_variance_of_isotropic_embeddings_is_one_over_dim():
    z = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0))
    assert cosine_similarity_variance(z) == pytest.approx(1 / 64, rel=0.05)
    # A few dominant directions inflate it (sum of squared eigenvalues over squared sum): what AE-SVC removes.
    scale = torch.ones(64)
    scale[:4] = 4.0
    assert cosine_similarity_variance(z * scale) > 3 / 64


def test_aesvc_reads_its_input_size_from_the_data_and_embeds_normalised_latents():
    model = AESVC(latent_dim=8, hidden_dims=[16])
    assert model.encoder is None
    model._build(12)
    assert model.hparams.input_dim == 12  # recorded so a checkpoint rebuilds the same network
    embeddings = model.embed({"embedding": torch.randn(5, 12)})
    assert embeddings.shape == (5, 8)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))


def test_non_finite_loss_stops_training_with_a_clear_message():
    model = AESVC(latent_dim=4, input_dim=6, hidden_dims=[])
    with pytest.raises(FloatingPointError, match=r"loss became non-finite at epoch 0, step 0 \(loss=nan"):
        model.training_step({"embedding": torch.full((8, 6), float("nan")), "index": torch.arange(8)}, 0)


# ---- the global-batch loss: 1 process vs 2 DDP processes ---------------------------------------------------------


def global_batch_loss(model, x):
    z = model(x)
    constraints = variance_constraint_losses(gather_with_grad(z))
    return ((model(x) - x[:, :3]) ** 2).mean() + sum(constraints.values())


def _two_process_gradients(rank, port, x, state, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.Linear(6, 3).double()
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = x.chunk(2)[rank]
    global_batch_loss(ddp, shard).backward()
    # numpy arrays travel by value; tensors would be shared through a file descriptor of an exiting process
    queue.put((rank, [p.grad.numpy().copy() for p in model.parameters()]))
    dist.destroy_process_group()


def test_gathered_constraints_give_the_single_process_gradient_under_ddp():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64) * torch.arange(1, 7)
    model = torch.nn.Linear(6, 3).double()
    global_batch_loss(model, x).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    results = run_in_two_processes(_two_process_gradients, x, model.state_dict())
    for rank in range(2):
        for got, want in zip(results[rank], expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-10, atol=1e-12)


# ---- the weighted objective, its batch-noise floor, the batch and size checks ------------------------------------

# Inputs whose linear AE-SVC (encoder = identity, decoder = 2 * identity) has terms computable by hand:
# z = x, mean (1, 0), covariance diag(0.5, 2); reconstruction error mean((2x - x)^2) = mean(x^2) = 14 / 8.
HAND_X = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, -2.0]])
HAND_TERMS = {"reconstruction": 14 / 8, "covariance": 0.5**2 + 1.0**2, "variance": (0.5**2 + 1.0**2) / 2, "mean": 0.5}


def hand_set_aesvc(**kwargs):
    model = AESVC(latent_dim=2, input_dim=2, hidden_dims=[], **kwargs)
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.eye(2))
        model.encoder[0].bias.zero_()
        model.decoder[0].weight.copy_(2 * torch.eye(2))
        model.decoder[0].bias.zero_()
    return model


def module_loss(model):
    return float(model.training_step({"embedding": HAND_X, "index": torch.arange(4)}, 0).detach())


def test_the_training_loss_is_the_weighted_sum_of_the_hand_computed_terms():
    defaults = {"reconstruction": 25.0, "covariance": 1.0, "variance": 15.0, "mean": 1.0}
    expected = sum(defaults[name] * HAND_TERMS[name] for name in defaults)
    assert expected == pytest.approx(54.875)
    assert module_loss(hand_set_aesvc()) == pytest.approx(expected)
    terms = hand_set_aesvc().objective_terms(HAND_X, HAND_X, 2 * HAND_X)
    assert {name: float(terms[name]) for name in HAND_TERMS} == pytest.approx(HAND_TERMS)
    for name in defaults:  # each weight changed alone moves the loss by its own term only
        changed = module_loss(hand_set_aesvc(**{f"{name}_weight": defaults[name] + 2.0}))
        assert changed - expected == pytest.approx(2.0 * HAND_TERMS[name]), name
    # The covariance as a mean over its k^2 = 4 entries.
    assert module_loss(hand_set_aesvc(covariance_reduction="mean")) == pytest.approx(expected - 1.25 + 1.25 / 4)


def test_split_halves_multiply_the_errors_of_the_two_halves():
    # Halves [[2, 0], [0, 0]] and [[1, 2], [1, -2]]: unbiased covariances diag(2, 0) and diag(0, 8),
    # means (1, 0) and (1, 0).
    losses = variance_constraint_losses(HAND_X, "full", estimator="split_halves")
    # (C_A - I) . (C_B - I) = diag(1, -1) . diag(-1, 7) = -1 - 7; variances the same entries over k = 2.
    assert losses["covariance"].item() == pytest.approx(-8.0)
    assert losses["variance"].item() == pytest.approx(-4.0)
    assert losses["mean"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("target", ["full", "off_diagonal"])
def test_the_batch_covariance_floor_and_the_unbiased_split_halves(target):
    """Batches of Gaussian latents with covariance S: the batch term averages ||S - I||^2 (on the constrained
    entries) plus about the floor; the split-halves term averages ||S - I||^2 alone."""
    generator = torch.Generator().manual_seed(0)
    k, n, trials = 16, 200, 400
    scale = torch.linspace(0.8, 1.2, k, dtype=torch.float64)  # S = diag(scale^2)
    population = float(((scale**2 - 1) ** 2).sum()) if target == "full" else 0.0
    batch, halves = [], []
    for _ in range(trials):
        z = torch.randn(n, k, generator=generator, dtype=torch.float64) * scale
        batch.append(float(variance_constraint_losses(z, target)["covariance"]))
        halves.append(float(variance_constraint_losses(z, target, estimator="split_halves")["covariance"]))
    floor = covariance_noise_floor(n, k, target)
    assert floor == pytest.approx(k * (k + 1) / n if target == "full" else k * (k - 1) / n)
    # The floor is for S = I; S near I changes it by a few per cent.
    assert np.mean(batch) == pytest.approx(population + floor, rel=0.1)
    assert abs(np.mean(halves) - population) < 0.1 * floor
    assert covariance_noise_floor(n, k, target, "mean") == pytest.approx(floor / k**2)
    assert covariance_noise_floor(n, k, target, estimator="split_halves") == 0.0


def test_a_global_batch_smaller_than_the_latent_is_refused():
    model = AESVC(latent_dim=8, input_dim=6, hidden_dims=[])
    with pytest.raises(ValueError, match="global batch of 5 examples is smaller than the 8-d latent"):
        model.training_step({"embedding": torch.randn(5, 6), "index": torch.arange(5)}, 0)
    model.training_step({"embedding": torch.randn(8, 6), "index": torch.arange(8)}, 0)


def test_prefix_sizes_at_or_above_the_latent_are_dropped_with_a_note(caplog):
    with caplog.at_level(logging.INFO):
        model = AESVC(latent_dim=16, prefix_sizes=[8, 16, 32])
    assert "prefix_sizes [16, 32] are not smaller than latent_dim=16" in caplog.text
    assert model.hparams.prefix_sizes == [8]
    assert model.size_views() == {8: slice(0, 8), 16: slice(0, 16)}
    assert AESVC(latent_dim=8, prefix_sizes=[8, 16]).size_views() is None  # nothing left below: one size


@pytest.mark.slow
def test_the_shipped_config_trains_a_latent_smaller_than_its_prefix_sizes(tmp_path):
    """configs/aesvc/embedded.yaml evaluates prefixes [8, 16, 32]; a 16-d latent keeps 8 and the latent."""
    from conftest import REPO, SMALL_BENCHMARK, run_cli

    from reporting.run_results import read_run

    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    result = run_cli(
        "fit",
        "--config",
        str(REPO / "configs/aesvc/embedded.yaml"),
        *SMALL_BENCHMARK,
        *quiet,
        "--trainer.max_epochs=1",
        "--model.init_args.latent_dim=16",
        cwd=tmp_path,
    )
    assert "prefix_sizes [16, 32] are not smaller than latent_dim=16" in result.stdout + result.stderr
    metrics = read_run(tmp_path / "runs/aesvc/embedded/version_0").metrics
    sizes = sorted(int(key.rsplit("@d", 1)[1]) for key in metrics if key.startswith("val/embedded/recall@1@d"))
    assert sizes == [8, 16]
    assert metrics["val/embedded/recall@1"] == metrics["val/embedded/recall@1@d16"]

"""AE-SVC losses, the linear baselines' closed forms, and the global-batch gradient under DDP."""

import os

import pytest
import torch
import torch.distributed as dist

from conftest import run_in_two_processes
from lightning_modules import AESVC, PCAProjection
from lightning_modules.nn import gather_with_grad, variance_constraint_losses
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

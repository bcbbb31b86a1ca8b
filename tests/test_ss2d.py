"""(SS)2D, SSD and the multi-size baselines: the loss, nesting, the teacher, per-size evaluation."""

import hashlib
import math
import os
import stat
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_two_processes

from callbacks.retrieval_evaluation import _size_columns, _unit_rows
from datamodules.feature_store import LabelledFeatureStores
from lightning_modules import AESVC, SS2D, SSD, AESVCPerSize, MatryoshkaAESVC, PCAProjection, VAEPerSize
from lightning_modules.nn.similarity_distillation import similarity_distillation_loss
from retrieval.feature_store import write_feature_store

# ---- the loss ------------------------------------------------------------------------------------------------


def kl_by_hand(teacher, student, tau, keep_diagonal):
    """The loss written out with scalar loops: mean over rows of sum_j p_ij (log p_ij - log q_ij)."""

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def row_distribution(vectors, i):
        columns = [j for j in range(len(vectors)) if keep_diagonal or j != i]
        weights = {j: math.exp(cosine(vectors[i], vectors[j]) / tau) for j in columns}
        total = sum(weights.values())
        return {j: w / total for j, w in weights.items()}

    rows = []
    for i in range(len(teacher)):
        p, q = row_distribution(teacher, i), row_distribution(student, i)
        rows.append(sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in p))
    return sum(rows) / len(rows)


TEACHER = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [-0.6, 0.0, 0.8]]
STUDENT = [[1.0, 1.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 0.5]]


@pytest.mark.parametrize("diagonal", ["mask", "keep"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_distillation_loss_matches_a_direct_computation_on_a_hand_made_batch(diagonal, tau):
    got = similarity_distillation_loss(torch.tensor(TEACHER), torch.tensor(STUDENT), tau, diagonal)
    assert float(got) == pytest.approx(kl_by_hand(TEACHER, STUDENT, tau, diagonal == "keep"), rel=1e-5)


def test_same_similarities_give_zero_loss_whatever_the_size_and_scale():
    teacher = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    student = 3.0 * torch.cat([teacher @ rotation, torch.zeros(16, 4)], dim=1)  # same cosines, other basis and size
    assert float(similarity_distillation_loss(teacher, student)) == pytest.approx(0.0, abs=1e-5)
    assert float(similarity_distillation_loss(teacher, torch.randn(16, 8))) > 0.1


def test_the_model_loss_is_the_weighted_sum_over_nested_prefixes():
    model = SS2D(sizes=[2, 4], size_weights=[0.5, 2.0], teacher_embeddings="unused.h5", input_dim=6, temperature=0.3)
    x, teacher = torch.randn(10, 6), torch.randn(10, 5)
    model._teacher.append(_FixedTeacher(teacher))
    loss = model.training_step({"embedding": x, "index": torch.arange(10)}, 0)
    output = model.student(x)
    expected = 0.5 * similarity_distillation_loss(teacher, output[:, :2], 0.3) + 2.0 * similarity_distillation_loss(
        teacher, output, 0.3
    )
    torch.testing.assert_close(loss, expected)


class _FixedTeacher:
    """Stands in for a loaded teacher: returns given embeddings."""

    def __init__(self, embeddings):
        self.embeddings = embeddings

    def to(self, device=None, dtype=None):
        return self

    def embed(self, batch):
        return self.embeddings[batch["index"]]


# ---- nesting and per-size embeddings -----------------------------------------------------------------------------


def test_nested_sizes_share_weights_and_ssd_students_do_not():
    ss2d = SS2D(sizes=[2, 4, 8], teacher_embeddings="unused.h5", input_dim=6)
    ssd = SSD(sizes=[2, 4, 8], teacher_embeddings="unused.h5", input_dim=6)
    # one 6 -> 8 linear map, against three maps 6 -> 2, 6 -> 4, 6 -> 8
    assert sum(p.numel() for p in ss2d.parameters()) == 6 * 8 + 8
    assert sum(p.numel() for p in ssd.parameters()) == sum(6 * m + m for m in (2, 4, 8))
    batch = {"embedding": torch.randn(5, 6)}
    before = ss2d.embed(batch)[:, :2]
    with torch.no_grad():
        ss2d.student.network[-1].weight[2:] += 1.0  # later dimensions only
    torch.testing.assert_close(
        ss2d.embed(batch)[:, :2] / ss2d.embed(batch)[:, :2].norm(dim=1, keepdim=True),
        before / before.norm(dim=1, keepdim=True),
    )
    # the size-2 loss trains exactly the shared rows that size 2 reads
    x, teacher = torch.randn(12, 6), torch.randn(12, 3)
    similarity_distillation_loss(teacher, ss2d.student(x)[:, :2]).backward()
    gradient = ss2d.student.network[-1].weight.grad
    assert gradient[:2].abs().sum() > 0 and gradient[2:].abs().sum() == 0


def test_every_size_is_a_renormalised_view_of_one_forward():
    model = SS2D(sizes=[2, 4, 8], teacher_embeddings="unused.h5", input_dim=6)
    calls = []
    model.student.register_forward_hook(lambda *args: calls.append(1))
    full = model.embed({"embedding": torch.randn(7, 6)}).detach().numpy()
    assert len(calls) == 1
    columns = dict(_size_columns(model.size_views()))
    assert set(columns) == {"@d2", "@d4", "@d8"}
    for size in (2, 4, 8):
        np.testing.assert_allclose(
            _unit_rows(full, columns[f"@d{size}"]),
            F.normalize(torch.from_numpy(full[:, :size]), dim=-1).numpy(),
            rtol=1e-6,
        )
    ssd = SSD(sizes=[2, 4], teacher_embeddings="unused.h5", input_dim=6)
    out = ssd.embed({"embedding": torch.randn(3, 6)})
    assert out.shape == (3, 6) and ssd.size_views() == {2: slice(0, 2), 4: slice(2, 6)}
    torch.testing.assert_close(out[:, 2:].norm(dim=1), torch.ones(3))


def test_pca_prefix_of_each_size_is_the_pca_of_that_size():
    x = torch.randn(400, 10, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.5, 10)
    prefix, alone = PCAProjection(sizes=[2, 5]), PCAProjection(dim=2)
    for module in (prefix, alone):
        module.observe({"embedding": x})
        module.solve()
    assert prefix.hparams.dim == 5 and prefix.size_views() == {2: slice(0, 2), 5: slice(0, 5)}
    full = prefix.embed({"embedding": x}).numpy()
    np.testing.assert_allclose(_unit_rows(full, slice(0, 2)), alone.embed({"embedding": x}).numpy(), atol=1e-5)


def test_aesvc_per_size_trains_each_size_exactly_as_its_own_aesvc():
    torch.manual_seed(0)
    per_size = AESVCPerSize(sizes=[3, 5], input_dim=8, hidden_dims=[16])
    singles = [AESVC(latent_dim=m, input_dim=8, hidden_dims=[16]) for m in (3, 5)]
    for i, single in enumerate(singles):
        single.encoder.load_state_dict(per_size.encoder.networks[i].state_dict())
        single.decoder.load_state_dict(per_size.decoder[i].state_dict())
    batch = {"embedding": torch.randn(32, 8), "index": torch.arange(32)}
    total = per_size.training_step(batch, 0)
    torch.testing.assert_close(total, sum(single.training_step(batch, 0) for single in singles))
    assert "latent_dim" not in per_size.hparams and "prefix_sizes" not in per_size.hparams
    assert per_size.hparams.sizes == [3, 5]
    assert per_size.size_views() == {3: slice(0, 3), 5: slice(3, 8)}


def test_aesvc_per_size_with_the_mean_covariance_keeps_one_balance_at_every_size():
    """The covariance as a mean over its k^2 entries, weighted 5^2 here, is the summed (paper's) loss at size 5,
    and its batch-noise floor weighs the same at every size (summed, it grows with k^2)."""
    torch.manual_seed(0)
    per_size = AESVCPerSize(
        sizes=[3, 5], input_dim=8, hidden_dims=[], covariance_reduction="mean", covariance_weight=25.0
    )
    single = AESVC(latent_dim=5, input_dim=8, hidden_dims=[])
    single.encoder.load_state_dict(per_size.encoder.networks[1].state_dict())
    single.decoder.load_state_dict(per_size.decoder[1].state_dict())
    x = torch.randn(32, 8)
    z = single.encode(x)
    reconstruction = single.decoder(z)
    torch.testing.assert_close(
        per_size.objective_terms(x, z, reconstruction)["objective"],
        single.objective_terms(x, z, reconstruction)["objective"],
    )
    weight = per_size.hparams.covariance_weight
    floors = [weight * per_size.covariance_floor(500, size) for size in (8, 64, 256)]
    assert floors == pytest.approx([25.0 * (k + 1) / (k * 500) for k in (8, 64, 256)])
    assert max(floors) / min(floors) < 1.2  # summed: 8 * 9 / 500 against 256 * 257 / 500, a factor of 900
    assert single.covariance_floor(500, 256) / single.covariance_floor(500, 8) == pytest.approx(256 * 257 / 72)


def test_matryoshka_aesvc_decodes_each_prefix_with_the_later_dimensions_zeroed():
    model = MatryoshkaAESVC(sizes=[2, 4], input_dim=6, hidden_dims=[])
    z = torch.randn(5, 4)
    torch.testing.assert_close(model.decode(2, z[:, :2]), model.decoder[0](torch.cat([z[:, :2], torch.zeros(5, 2)], 1)))
    assert model.size_views() == {2: slice(0, 2), 4: slice(0, 4)}
    assert len(model.decoder) == 1


def test_vae_embeds_the_normalised_posterior_mean():
    model = VAEPerSize(sizes=[2, 3], input_dim=6, hidden_dims=[])
    x = torch.randn(4, 6)
    (mu2, _), (mu3, _) = model.posteriors(x)
    torch.testing.assert_close(
        model.embed({"embedding": x}), torch.cat([F.normalize(mu2, dim=-1), F.normalize(mu3, dim=-1)], 1)
    )


def test_vae_loss_is_the_hand_computed_reconstruction_plus_beta_times_the_gaussian_kl():
    """Encoder set to a fixed posterior mu = (0.5, -1), log-variance = (ln 2, 0); decoder set to output the
    constant (1, 0) whatever the sample, so the sampling noise does not matter."""
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])

    def loss(beta):
        model = VAEPerSize(sizes=[2], input_dim=2, hidden_dims=[], beta=beta)
        with torch.no_grad():
            model.encoders[0][0].weight.zero_()
            model.encoders[0][0].bias.copy_(torch.tensor([0.5, -1.0, math.log(2.0), 0.0]))
            model.decoders[0][0].weight.zero_()
            model.decoders[0][0].bias.copy_(torch.tensor([1.0, 0.0]))
        return float(model.training_step({"embedding": x, "index": torch.arange(3)}, 0).detach())

    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - ln s^2) / 2 per dimension, summed.
    kl = (0.25 + 2.0 - 1.0 - math.log(2.0)) / 2 + (1.0 + 1.0 - 1.0 - 0.0) / 2
    # Squared error summed over dimensions, averaged over examples: (0 + 4, 4 + 0, 1 + 0) / 3.
    reconstruction = (4.0 + 4.0 + 1.0) / 3
    assert kl == pytest.approx(0.778426, abs=1e-6)
    assert loss(0.0) == pytest.approx(reconstruction)
    assert loss(1.0) == pytest.approx(reconstruction + kl)
    assert loss(0.01) == pytest.approx(reconstruction + 0.01 * kl)


# ---- the teacher -------------------------------------------------------------------------------------------------


def small_stores(tmp_path, dim=12, n=60, seed=0):
    rng = np.random.default_rng(seed)
    paths = {}
    for split in ("train", "val_query", "val_database"):
        labels = rng.integers(0, 6, n)
        paths[split] = write_feature_store(
            tmp_path / f"{split}.h5",
            [f"{split}{i}" for i in range(n)],
            rng.normal(size=(n, dim)).astype(np.float32),
            labels=labels,
        )
    return paths


def stores_datamodule(paths, batch_size=20):
    return LabelledFeatureStores(
        train=str(paths["train"]),
        val_query=str(paths["val_query"]),
        val_database=str(paths["val_database"]),
        batch_size=batch_size,
    )


def fit(model, datamodule, root, epochs=1):
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule)
    return trainer


@pytest.fixture
def teacher_checkpoint(tmp_path):
    paths = small_stores(tmp_path)
    trainer = fit(AESVC(latent_dim=4, hidden_dims=[8]), stores_datamodule(paths), tmp_path / "teacher")
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return paths, path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_teacher_checkpoint_is_loaded_read_only_and_stays_out_of_the_student(tmp_path, teacher_checkpoint):
    paths, path = teacher_checkpoint
    before, mtime = digest(path), path.stat().st_mtime_ns
    path.chmod(stat.S_IRUSR | stat.S_IRGRP)  # a teacher one may only read
    try:
        model = SS2D(sizes=[2, 4], teacher_checkpoint=str(path), hidden_dims=[])
        fit(model, stores_datamodule(paths), tmp_path / "student", epochs=2)
        teacher = model._teacher[0]
        reloaded = AESVC.load_from_checkpoint(path)
        for (name, value), (_, original) in zip(teacher.state_dict().items(), reloaded.state_dict().items()):
            torch.testing.assert_close(value, original, msg=f"teacher parameter {name} changed")
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert all(key.startswith("student.") for key in model.state_dict())
        optimised = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
        assert optimised == {id(p) for p in model.student.parameters()}
        assert digest(path) == before and path.stat().st_mtime_ns == mtime
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_a_run_stands_for_its_best_checkpoint_and_a_root_for_its_newest_finished_run(tmp_path, monkeypatch):
    from lightning_modules.run_directory import RUN_DIR_ENV, RunInfo
    from lightning_modules.ss2d import resolve_checkpoint

    runs, best = tmp_path / "runs", "checkpoints/epoch001-step000010.ckpt"
    finished_at = {"version_0": "2026-01-01T00:00:00", "version_1": "2026-01-02T00:00:00", "version_2": None}
    for version, finished in finished_at.items():
        run = runs / version
        (run / "checkpoints").mkdir(parents=True)
        for name in ("last.ckpt", Path(best).name):
            (run / "checkpoints" / name).write_bytes(f"{version}/{name}".encode())
        RunInfo(directory=str(run), wandb_id="x", best_checkpoint=best if finished else None, finished=finished).save()
    student = tmp_path / "student"
    student.mkdir()
    RunInfo(directory=str(student), wandb_id="y").save()
    monkeypatch.setenv(RUN_DIR_ENV, str(student))
    # version_2 is newer but still training (no best checkpoint recorded): not a teacher
    assert resolve_checkpoint(str(runs)) == runs / "version_1" / best
    assert resolve_checkpoint(str(runs / "version_0")) == runs / "version_0" / best  # its best, not last.ckpt
    recorded = RunInfo.load(student).inputs["teacher_checkpoint"]
    digest = hashlib.sha256(f"version_0/{Path(best).name}".encode()).hexdigest()
    assert recorded == {"path": str((runs / "version_0" / best).resolve()), "sha256": digest}
    with pytest.raises(FileNotFoundError, match="version_2 has not finished"):
        resolve_checkpoint(str(runs / "version_2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no finished run"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_bad_teacher_path_and_mismatched_dimensions_give_clear_errors(tmp_path, teacher_checkpoint):
    paths, path = teacher_checkpoint
    datamodule = stores_datamodule(paths)
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match=f"teacher_checkpoint {missing} does not exist"):
        fit(SS2D(sizes=[2], teacher_checkpoint=str(missing)), datamodule, tmp_path / "a")
    not_a_checkpoint = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.zeros(2)}, not_a_checkpoint)
    with pytest.raises(ValueError, match="weights.ckpt is not a checkpoint of this framework"):
        fit(SS2D(sizes=[2], teacher_checkpoint=str(not_a_checkpoint)), datamodule, tmp_path / "b")
    (tmp_path / "other").mkdir()
    other_paths = small_stores(tmp_path / "other", dim=10)
    with pytest.raises(ValueError, match="was trained on 12-d embeddings but the datamodule gives 10-d"):
        fit(SS2D(sizes=[2], teacher_checkpoint=str(path)), stores_datamodule(other_paths), tmp_path / "c")
    with pytest.raises(ValueError, match="set exactly one of teacher_checkpoint and teacher_embeddings"):
        SS2D(sizes=[2])
    with pytest.raises(ValueError, match="strictly increasing"):
        SS2D(sizes=[8, 4], teacher_checkpoint=str(path))


def test_stored_teacher_embeddings_are_matched_to_the_training_rows(tmp_path):
    paths = small_stores(tmp_path)
    rng = np.random.default_rng(1)
    train_ids = [f"train{i}" for i in range(60)]
    good = write_feature_store(tmp_path / "teacher.h5", train_ids, rng.normal(size=(60, 5)).astype(np.float32))
    model = SS2D(sizes=[2, 4], teacher_embeddings=str(good))
    fit(model, stores_datamodule(paths), tmp_path / "run")
    rows = model._teacher[0].rows(torch.tensor([3, 0]))
    with h5py.File(good) as f:
        np.testing.assert_array_equal(rows.numpy(), f["global"][[0, 3]][[1, 0]])
    shuffled = write_feature_store(
        tmp_path / "shuffled.h5", train_ids[::-1], rng.normal(size=(60, 5)).astype(np.float32)
    )
    with pytest.raises(ValueError, match="row 0 is 'train59' but training example 0 is 'train0'"):
        fit(SS2D(sizes=[2], teacher_embeddings=str(shuffled)), stores_datamodule(paths), tmp_path / "run2")
    short = write_feature_store(tmp_path / "short.h5", train_ids[:50], rng.normal(size=(50, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="has 50 rows but the training set has 60 examples"):
        fit(SS2D(sizes=[2], teacher_embeddings=str(short)), stores_datamodule(paths), tmp_path / "run3")


# ---- 1 process vs 2 DDP processes --------------------------------------------------------------------------------


def distillation_loss_of(student, x, teacher):
    from lightning_modules.nn import gather_with_grad
    from lightning_modules.nn.similarity_distillation import multi_size_distillation_losses

    output = gather_with_grad(student(x))
    losses = multi_size_distillation_losses(gather_with_grad(teacher), {2: output[:, :2], 4: output}, 0.2)
    return sum(losses.values())


def _two_process_gradients(rank, port, x, teacher, state, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    student = torch.nn.Linear(6, 4).double()
    student.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    distillation_loss_of(ddp, x.chunk(2)[rank], teacher.chunk(2)[rank]).backward()
    queue.put((rank, [p.grad.numpy().copy() for p in student.parameters()]))
    dist.destroy_process_group()


def test_distillation_over_the_gathered_batch_gives_the_single_process_gradient_under_ddp():
    torch.manual_seed(0)
    x, teacher = torch.randn(24, 6, dtype=torch.float64), torch.randn(24, 5, dtype=torch.float64)
    student = torch.nn.Linear(6, 4).double()
    distillation_loss_of(student, x, teacher).backward()
    expected = [p.grad.clone() for p in student.parameters()]
    results = run_in_two_processes(_two_process_gradients, x, teacher, student.state_dict())
    for rank in range(2):
        for got, want in zip(results[rank], expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-10, atol=1e-12)

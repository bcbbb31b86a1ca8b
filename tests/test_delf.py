"""DELF local features: the attention head and pooling, the multi-scale top-N selection on hand-built maps, the
receptive-field centres of a real ResNet, the local PCA, the training stages, and fit -> predict through the
command line on a tiny generated landmark benchmark, writing a feature store."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from lightning_modules.base import load_frozen_module
from lightning_modules.cli import main as cli_main
from lightning_modules.delf import DelfLocalFeatures
from lightning_modules.nn.delf import (
    DelfAttention,
    LocalPCA,
    attention_pool,
    multiscale_local_features,
    receptive_field_centres,
)
from lightning_modules.nn.margin_heads import ContiguousLabels
from retrieval.diagnostics import RunningMoments
from retrieval.feature_store import FeatureStore

TINY_SPEC = {
    "image_size": 64,
    "train_landmarks": 4,
    "train_images_per_landmark": 4,
    "query_landmarks": 2,
    "index_images_per_landmark": 2,
    "index_distractor_landmarks": 2,
    "ignored_queries": 1,
    "revisited_landmarks": 1,
    "revisited_queries_per_landmark": 1,
    "revisited_database_per_landmark": 1,
    "revisited_distractor_landmarks": 1,
    "background_pool": 3,
    "distractor_pool": 3,
}


TINY_RESNET = {"layers": [1, 1, 1, 1]}  # a ResNet-18 with one block per stage


def small_module(**kwargs) -> DelfLocalFeatures:
    defaults = {"pretrained": False, "model_kwargs": TINY_RESNET, "attention_hidden": 16, "num_local": 20}
    defaults["projection_dim"] = 8
    return DelfLocalFeatures("resnet18", **{**defaults, **kwargs})


def test_attention_scores_are_positive_and_pool_the_normalised_features():
    torch.manual_seed(0)
    attention = DelfAttention(8, hidden_channels=4)
    with torch.no_grad():
        attention.conv2.bias.fill_(-30.0)  # softplus of very negative logits: tiny, still positive
    features = torch.randn(2, 8, 3, 5) * 10
    scores = attention(features)
    assert scores.shape == (2, 3, 5) and bool((scores > 0).all())
    expected = (F.normalize(features, dim=1) * scores[:, None]).sum(dim=(2, 3)) / 15
    torch.testing.assert_close(attention_pool(features, scores), expected)


def hand_built_levels(size_to_scores: dict[int, torch.Tensor], channels: int = 3):
    """A fake network: per input side, a random feature map and the given score map."""
    generator = torch.Generator().manual_seed(0)
    maps = {
        side: torch.randn(1, channels, *scores.shape, generator=generator) for side, scores in size_to_scores.items()
    }

    def features_and_scores(images):
        side = images.shape[-1]
        return maps[side], size_to_scores[side][None]

    return maps, features_and_scores


def test_top_n_over_scales_in_score_order_at_receptive_field_centres_in_original_pixels():
    # Scale 1 (64 px): a 4 x 4 map scored 0.0, 0.1, ..., 1.5 row-major; scale 0.5 (32 px): a 2 x 2 map.
    full = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    half = torch.tensor([[5.0, 0.05], [0.3, 2.0]])
    maps, features_and_scores = hand_built_levels({64: full, 32: half})
    pixels = torch.zeros(1, 3, 64, 64)
    to_original = torch.tensor([[2.0, 3.0, 10.0, 20.0]])  # original = input * scale + offset
    local = multiscale_local_features(pixels, features_and_scores, (1.0, 0.5), 16, 4, to_original=to_original)[0]
    # (scale index, row, col, score) of the four best; centres 16 j + 0.5 in the resized image, x2 at scale 0.5
    expected = [(1, 0, 0, 5.0), (1, 1, 1, 2.0), (0, 3, 3, 1.5), (0, 3, 2, 1.4)]
    for row, (scale_index, i, j, score) in zip(local, expected):
        resize = 2.0 if scale_index == 1 else 1.0
        x, y = (16 * j + 0.5) * resize * 2 + 10, (16 * i + 0.5) * resize * 3 + 20
        torch.testing.assert_close(row[:5], torch.tensor([x, y, scale_index, 0.0, score]))
        feature = maps[64 if scale_index == 0 else 32][0, :, i, j]
        torch.testing.assert_close(row[5:], F.normalize(feature, dim=0))

    # More rows than candidates: all 20 in order, then padding; a threshold drops the weaker ones.
    local = multiscale_local_features(pixels, features_and_scores, (1.0, 0.5), 16, 25)[0]
    assert local[:20, 3].eq(0).all() and local[20:].eq(torch.tensor([0, 0, 0, 1.0, 0] + [0] * 3)).all()
    assert torch.equal(local[:20, 4], torch.cat([full.flatten(), half.flatten()]).sort(descending=True).values)
    local = multiscale_local_features(pixels, features_and_scores, (1.0, 0.5), 16, 20, threshold=0.35)[0]
    assert local[:14, 3].eq(0).all() and bool((local[:14, 4] >= 0.35).all())
    assert local[14:].eq(torch.tensor([0, 0, 0, 1.0, 0] + [0] * 3)).all()


def test_receptive_field_centres_are_those_of_the_resnet():
    """Through gradients: the input pixels a cell of a ResNet cut at layer3 depends on are centred on
    ``16 j + 0.5`` (with positive weights and average pooling, so that no path is cut)."""
    backbone = small_module().backbone.backbone.eval()
    backbone.maxpool = torch.nn.AvgPool2d(3, 2, 1)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.uniform_(0.5, 1.0)
    # Cells whose receptive field (115 px) lies inside the image, so that no border clips it.
    pixels = torch.ones(1, 3, 160, 192, requires_grad=True)
    output = backbone.forward_features(pixels)
    centres = receptive_field_centres(*output.shape[2:], stride=16).reshape(*output.shape[2:], 2)
    for i, j in [(4, 5), (5, 7)]:
        (gradient,) = torch.autograd.grad(output[0, :, i, j].sum(), pixels, retain_graph=True)
        rows = gradient[0].abs().sum(dim=(0, 2)).nonzero()
        cols = gradient[0].abs().sum(dim=(0, 1)).nonzero()
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 159 and cols.max() < 191
        centre = torch.tensor([cols.min() + cols.max(), rows.min() + rows.max()]) / 2 + 0.5
        torch.testing.assert_close(centres[i, j], centre.float())


def test_the_local_pca_whitens_the_training_descriptors_and_gives_unit_vectors():
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(3.0, 0.1, 32)
    descriptors = torch.randn(4000, 32, generator=generator) * scales + 2.0
    moments = RunningMoments(32)
    moments.update(F.normalize(descriptors, dim=-1))
    pca = LocalPCA(32, 12, whiten=True)
    pca.fit(moments)
    projected = pca.project(descriptors, normalize=False).double()
    covariance = torch.cov(projected.T, correction=0)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(projected.mean(dim=0), torch.zeros(12, dtype=torch.float64), atol=1e-4, rtol=0)
    rows = torch.cat([torch.rand(2, 3, 5), descriptors[:6].reshape(2, 3, 32)], dim=-1)
    rows[..., 3] = 0.0
    rows[1, 2] = 0.0
    rows[1, 2, 3] = 1.0  # padding stays zero
    out = pca(rows)
    assert out.shape == (2, 3, 5 + 12)
    torch.testing.assert_close(out[..., :5], rows[..., :5])
    torch.testing.assert_close(out[..., 5:].norm(dim=-1), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    # Without whitening: decorrelated, variances the decreasing eigenvalues.
    plain = LocalPCA(32, 12, whiten=False)
    plain.fit(moments)
    covariance = torch.cov(plain.project(descriptors, normalize=False).double().T, correction=0)
    torch.testing.assert_close(covariance, torch.diag(plain.eigenvalues.double()), atol=1e-5, rtol=1e-3)
    assert bool((plain.eigenvalues[:-1] >= plain.eigenvalues[1:]).all())


@pytest.mark.parametrize("stage", ["finetune", "attention", "joint"])
def test_each_stage_trains_its_own_parameters(stage):
    torch.manual_seed(0)
    module = small_module(stage=stage)
    module._build_head(ContiguousLabels(torch.tensor([7, 9, 11])))
    module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    module.train()
    loss = module.training_step({"image": torch.rand(3, 3, 48, 48), "label": torch.tensor([9, 7, 11])}, 0)
    loss.backward()
    touched = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
    assert touched(module.backbone) == (stage != "attention")
    assert touched(module.attention) == touched(module.attention_classifier) == (stage != "finetune")
    assert touched(module.descriptor_classifier) == (stage != "attention")
    if stage == "attention":
        assert all(not m.training for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if stage == "joint":  # the attention loss alone never reaches the backbone
        module.zero_grad()
        module.hparams.stage = "attention"
        module.training_step({"image": torch.rand(3, 3, 48, 48), "label": torch.tensor([9, 7, 11])}, 0).backward()
        assert not touched(module.backbone) and touched(module.attention)


TINY = [
    "--data.init_args.root=generated",
    *[f"--data.init_args.spec.{key}={value}" for key, value in TINY_SPEC.items()],
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
    "--data.init_args.num_workers=0",
    f"--model.init_args.model_kwargs={json.dumps(TINY_RESNET)}",
    "--model.init_args.attention_hidden=32",
    "--model.init_args.num_local=40",
    "--model.init_args.projection_dim=16",
    "--model.init_args.pca_images=6",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
]


def test_fit_then_predict_writes_delf_feature_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(REPO / "configs/delf/generated_landmarks.yaml")]
    fit = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.default_root_dir=runs/delf"]
    cli_main(["fit", *config, *TINY, *fit])
    checkpoint = tmp_path / "runs/delf/version_0/checkpoints/last.ckpt"
    module = load_frozen_module(checkpoint)
    assert isinstance(module, DelfLocalFeatures) and bool(module.projection.fitted)
    assert module.hparams.num_classes == 4

    lists = json.dumps(["index", "test"])
    cli_main(
        ["predict", *config, *TINY, f"--data.init_args.predict_lists={lists}", "--predictions.output_dir=features"]
        + ["--trainer.default_root_dir=runs/delf", f"--ckpt_path={checkpoint}"]
    )
    for name in ("index", "test"):
        store = FeatureStore(tmp_path / f"features/{name}.h5")
        local = store.local_descriptors(slice(None)).astype(np.float32)
        assert local.shape == (store.num_images, 40, 5 + 16)
        pad, weight = local[..., 3], local[..., 4]
        assert set(np.unique(pad)) <= {0.0, 1.0} and pad[:, 0].sum() == 0
        assert np.all(np.diff(pad, axis=1) >= 0), "padding rows come last"
        real = pad == 0
        assert np.all(weight[real] > 0) and np.all(local[~real] == 0)
        assert np.all(np.diff(np.where(real, weight, -1.0), axis=1) <= 1e-3), "sorted by weight"
        xy = local[real][:, :2]
        assert xy.min() >= 0 and xy.max() <= 64, "receptive-field centres inside the 64-px images"
        assert set(np.unique(local[real][:, 2])) <= set(range(7))
        np.testing.assert_allclose(np.linalg.norm(local[real][:, 5:], axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(store.global_descriptors()), axis=1), 1.0, atol=1e-5)
    # The global rows are the module's attention-pooled descriptors at the input resolution.
    assert store.global_dim == module.retrieval_dim == 256

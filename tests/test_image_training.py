"""The shared pieces of image-level training: trainable backbone, augmentation, margin heads, P x K batches."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layouts import write_sop
from PIL import Image
from torch.utils.data import TensorDataset

from datamodules import StanfordOnlineProducts
from datamodules.augmentation import TrainAugmentation
from datamodules.sampling import ClassBalancedSampler, GlobalBatchSampler, ResumableDataLoader
from lightning_modules.nn.backbones import FeatureMapBackbone, create_backbone
from lightning_modules.nn.margin_heads import ArcFace, ContiguousLabels, CosFace

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def tiny_resnet(**kwargs) -> FeatureMapBackbone:
    return FeatureMapBackbone(create_backbone("resnet18", pretrained=False), **kwargs)


def tiny_vit(**kwargs) -> FeatureMapBackbone:
    return FeatureMapBackbone(create_backbone("dinov2_vits14_reg", pretrained=False, model_kwargs=TINY_VIT), **kwargs)


# ---- trainable backbone ---------------------------------------------------------------------------------------------


def test_feature_maps_of_a_cnn_and_a_vit():
    cnn = tiny_resnet()
    assert cnn(torch.rand(2, 3, 64, 96)).shape == (2, 512, 2, 3) and cnn.out_channels == 512 and cnn.stride == 32
    vit = tiny_vit()
    # 4 register tokens and the CLS token are dropped; a 56 x 42 image is a 4 x 3 grid of 14-pixel patches.
    assert vit(torch.rand(2, 3, 56, 42)).shape == (2, 64, 4, 3) and vit.out_channels == 64 and vit.stride == 14
    # The timm normalisation is applied inside.
    assert torch.allclose(cnn.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_frozen_cnn_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    model = tiny_resnet(freeze_blocks=2)
    assert model.stage_names() == ["layer1", "layer2", "layer3", "layer4"]
    model.train()
    frozen_bn = model.backbone.layer2[0].bn1
    trained_bn = model.backbone.layer3[0].bn1
    assert not model.backbone.bn1.training and not frozen_bn.training and trained_bn.training
    before = {name: bn.running_mean.clone() for name, bn in (("frozen", frozen_bn), ("trained", trained_bn))}
    stem_stats = model.backbone.bn1.running_var.clone()
    model(torch.rand(4, 3, 64, 64)).square().mean().backward()
    assert torch.equal(frozen_bn.running_mean, before["frozen"]) and torch.equal(
        model.backbone.bn1.running_var, stem_stats
    )
    assert not torch.equal(trained_bn.running_mean, before["trained"])
    for name, parameter in model.backbone.named_parameters():
        frozen = name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
        assert parameter.requires_grad != frozen, name
        assert (parameter.grad is None) == frozen, name
    # timm zero-initialises the last BatchNorm scale of each block, so its own gradient is the nonzero one.
    assert model.backbone.layer4[1].bn2.weight.grad.abs().sum() > 0


def test_frozen_vit_blocks_and_embeddings_get_no_gradient():
    model = tiny_vit(freeze_blocks=1).train()
    model(torch.rand(2, 3, 28, 28)).sum().backward()
    trained = {name for name, p in model.backbone.named_parameters() if p.grad is not None}
    frozen = {name for name, p in model.backbone.named_parameters() if not p.requires_grad}
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= frozen
    assert not frozen & trained and any(n.startswith("blocks.1.") for n in trained) and "norm.weight" in trained
    assert not model.backbone.blocks[0].training and model.backbone.blocks[1].training


def test_channels_last_gives_the_same_features_and_bad_freezing_is_refused():
    reference = tiny_resnet().eval()
    fast = tiny_resnet(channels_last=True).eval()
    fast.load_state_dict(reference.state_dict())
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(pixels), reference(pixels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has 4 stages"):
        tiny_resnet(freeze_blocks=5)
    with pytest.raises(ValueError, match="freeze_blocks must be an integer >= 0"):
        tiny_resnet(freeze_blocks=-1)


# ---- training augmentation ------------------------------------------------------------------------------------------


def test_augmentation_has_a_fixed_size_and_is_reproducible_with_a_generator():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    augment = TrainAugmentation(image_size=32, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)

    def draw(seed):
        return augment(image, torch.Generator().manual_seed(seed))

    pixels, to_original = draw(1)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32 and 0 <= pixels.min() <= pixels.max() <= 1
    assert torch.equal(pixels, draw(1)[0]) and torch.equal(to_original, draw(1)[1])
    assert not torch.equal(pixels, draw(2)[0])


def test_augmentation_maps_back_to_original_pixels_through_the_flip():
    image = Image.new("RGB", (80, 40))
    # The whole image's area at its own aspect ratio: the crop is the whole image whatever is drawn.
    whole = TrainAugmentation(
        16, scale=(1, 1), ratio=(2, 2), flip_probability=1, brightness=0, contrast=0, saturation=0
    )
    for seed in range(5):
        pixels, to_original = whole(image, generator=torch.Generator().manual_seed(seed))
        # Transformed x = 0 (left edge) is the original's right edge x = 80.
        np.testing.assert_allclose(to_original.numpy(), [-80 / 16, 40 / 16, 80, 0])


def test_image_benchmark_augments_training_images_only(tmp_path):
    write_sop(tmp_path, train_classes=4, test_classes=2, per_class=2)
    options = dict(image_size=32, resize="longer_side", val_fraction=0.5)
    plain = StanfordOnlineProducts(str(tmp_path), **options)
    augmented = StanfordOnlineProducts(str(tmp_path), train_augmentation={"image_size": 24}, **options)
    torch.manual_seed(0)
    example = augmented.train_dataset()[0]
    assert example["image"].shape == (3, 24, 24) and example["label"] == plain.train_dataset()[0]["label"]
    assert plain.train_dataset()[0]["image"].shape == (3, 27, 32)  # the 48 x 40 images, longer side 32
    for stage in ("val", "test"):
        for name, part in augmented.eval_parts(stage).items():
            assert torch.equal(part[0]["image"], plain.eval_parts(stage)[name][0]["image"])
    with pytest.raises(ValueError, match="multiple of multiple_of = 14"):
        StanfordOnlineProducts(str(tmp_path), multiple_of=14, train_augmentation={"image_size": 30})
    with pytest.raises(ValueError, match="unset features"):
        StanfordOnlineProducts(str(tmp_path), features=str(tmp_path), train_augmentation={})


# ---- margin heads ---------------------------------------------------------------------------------------------------


def two_class_head(head_type, **kwargs):
    head = head_type(2, 2, scale=10.0, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # normalised inside: the two axes
    return head


def at_angle(theta):
    return torch.tensor([[math.cos(theta), math.sin(theta)]]) * 5.0  # normalised inside


@pytest.mark.parametrize("theta", [0.5, 3.0])  # 3.0 + 0.3 > pi: the fallback branch
def test_arcface_and_cosface_logits_equal_a_hand_computation(theta):
    s, m = 10.0, 0.3
    target = torch.tensor([0])
    other = s * math.cos(math.pi / 2 - theta)  # the non-target class keeps its plain cosine
    arcface = two_class_head(ArcFace, margin=m)(at_angle(theta), target)
    expected = math.cos(theta + m) if theta + m < math.pi else math.cos(theta) - math.sin(m) * m
    torch.testing.assert_close(arcface, torch.tensor([[s * expected, other]]))
    cosface = two_class_head(CosFace, margin=m)(at_angle(theta), target)
    torch.testing.assert_close(cosface, torch.tensor([[s * (math.cos(theta) - m), other]]))
    easy = two_class_head(ArcFace, margin=m, easy_margin=True)(at_angle(theta), target)
    easy_expected = math.cos(theta + m) if math.cos(theta) > 0 else math.cos(theta)
    torch.testing.assert_close(easy, torch.tensor([[s * easy_expected, other]]))
    # Without targets: plain scaled cosines.
    torch.testing.assert_close(two_class_head(ArcFace)(at_angle(theta)), torch.tensor([[s * math.cos(theta), other]]))


@pytest.mark.parametrize("head_type", [ArcFace, CosFace])
@pytest.mark.parametrize("theta", [0.0, 1e-4, math.pi - 1e-4, math.pi])
def test_margin_head_gradients_are_finite_at_the_extreme_angles(head_type, theta):
    head = two_class_head(head_type)
    embedding = at_angle(theta).requires_grad_(True)
    F.cross_entropy(head(embedding, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(embedding.grad).all() and torch.isfinite(head.weight.grad).all()


def test_label_map_round_trips_through_a_saved_state_dict(tmp_path):
    landmark_ids = torch.tensor([907, 12, 55555, 12, 3, 907])

    class Model(torch.nn.Module):
        def __init__(self, labels):
            super().__init__()
            self.label_map = ContiguousLabels(labels)
            self.head = ArcFace(8, self.label_map.num_classes)

    model = Model(landmark_ids)
    classes = model.label_map.encode(landmark_ids)
    assert classes.tolist() == [2, 1, 3, 1, 0, 2] and torch.equal(model.label_map.decode(classes), landmark_ids)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt")
    reloaded = Model(landmark_ids.flip(0))  # the same label set, in another order
    reloaded.load_state_dict(state)
    rebuilt = ContiguousLabels.from_state_dict(state, prefix="label_map.")
    assert torch.equal(rebuilt.decode(classes), landmark_ids)
    for other_labels in ([12, 3, 907, 55556], [12, 3, 907]):
        with pytest.raises(RuntimeError, match="label map was built from other training labels"):
            Model(torch.tensor(other_labels)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"labels \[4\] .* are not among the 4 training labels"):
        model.label_map.encode(torch.tensor([3, 4]))


# ---- class-balanced P x K batches -----------------------------------------------------------------------------------

# 13 classes (labels 7, 17, ..., 127) of 1 to 6 images, 3 of them of a single image, shuffled over 43 indices.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(13) * 10 + 7, [1, 2, 3, 4, 5, 6] * 2 + [1]))


def pk_batches(rank=0, world_size=1, epoch=0, seed=3, P=4, K=3):
    sampler = ClassBalancedSampler(LABELS, P, K, min_images_per_class=2, seed=seed)
    sampler.set_epoch(epoch)
    return list(GlobalBatchSampler(sampler, P * K, rank, world_size))


def test_every_global_batch_holds_p_classes_of_k_images_and_every_class_is_seen():
    sampler = ClassBalancedSampler(LABELS, 4, 3, min_images_per_class=2, seed=3)
    assert (sampler.skipped_classes, sampler.skipped_images) == (
        3,
        3,
    ) and "3 classes (3 images) skipped" in sampler.summary
    batches = pk_batches()
    assert len(batches) == 3 == len(sampler) // 12  # 10 classes in batches of 4: 2 classes seen twice
    seen = set()
    for batch in batches:
        labels = LABELS[batch].reshape(4, 3)  # class after class, K images each
        assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == 4
        seen |= set(labels[:, 0])
        for indices in np.asarray(batch).reshape(4, 3):
            # Distinct images unless the class has fewer than K.
            assert len(set(indices)) == min(3, int((LABELS == LABELS[indices[0]]).sum()))
    assert seen == {label for label in set(LABELS) if (LABELS == label).sum() >= 2}


def test_two_processes_split_each_class_balanced_global_batch():
    single = pk_batches(epoch=1)
    shards = [pk_batches(rank, 2, epoch=1) for rank in range(2)]
    for step, global_batch in enumerate(single):
        assert shards[0][step] + shards[1][step] == global_batch
        assert len(set(LABELS[shards[0][step]]) & set(LABELS[shards[1][step]])) == 0  # whole classes per process


def test_class_balanced_order_is_deterministic_per_seed_and_epoch():
    assert pk_batches(epoch=2) == pk_batches(epoch=2)
    assert pk_batches(epoch=2) != pk_batches(epoch=3)
    assert pk_batches(seed=1) != pk_batches(seed=2)


def test_resumed_class_balanced_loader_continues_with_the_same_indices():
    def make_loader():
        sampler = ClassBalancedSampler(LABELS, 2, 2, seed=5)
        return ResumableDataLoader(
            TensorDataset(torch.arange(len(LABELS))), batch_sampler=GlobalBatchSampler(sampler, 4)
        )

    loader = make_loader()
    loader.batch_sampler.sampler.set_epoch(4)
    reference = [b[0].tolist() for b in loader]
    iterator = iter(loader)
    consumed = [next(iterator)[0].tolist() for _ in range(3)]
    resumed = make_loader()
    resumed.load_state_dict(loader.state_dict())
    assert consumed + [b[0].tolist() for b in resumed] == reference


def test_image_datamodule_trains_on_class_balanced_batches(tmp_path):
    write_sop(tmp_path, train_classes=6, test_classes=2, per_class=3)
    balanced = {"classes_per_batch": 2, "images_per_class": 2}
    with pytest.raises(ValueError, match="batch_size 64 must equal class_balanced .* = 4"):
        StanfordOnlineProducts(str(tmp_path), class_balanced=balanced)
    data = StanfordOnlineProducts(
        str(tmp_path), val_fraction=0, image_size=16, resize="square", batch_size=4, class_balanced=balanced
    )
    batches = list(data.train_dataloader())
    assert len(batches) == 3  # 6 classes, 2 per batch
    for batch in batches:
        labels = batch["label"].view(2, 2)
        assert (labels[:, 0] == labels[:, 1]).all() and labels[0, 0] != labels[1, 0]
    with pytest.raises(ValueError, match="must equal the ClassBalancedSampler's batch of 4"):
        GlobalBatchSampler(ClassBalancedSampler(LABELS, 2, 2), 8)

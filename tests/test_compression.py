"""Compression: exact bit packing, ITQ, product quantisation, and the AMES paper's memory figures."""

import numpy as np
import pytest
import torch

from retrieval.compression import (
    KIB,
    ProductQuantizer,
    binary_codes,
    bytes_per_image,
    itq_projection,
    itq_rotation,
    memory_breakdown,
    pack_bits,
    unpack_bits,
)


def test_packing_round_trips_exactly():
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((4, 3, 128)) > 0.5, 1.0, -1.0).astype(np.float32)
    packed = pack_bits(codes)
    assert packed.dtype == np.uint8 and packed.shape == (4, 3, 16)
    np.testing.assert_array_equal(unpack_bits(packed), codes)
    np.testing.assert_array_equal(unpack_bits(packed, 128), codes)
    # {0, 1}, booleans and tensors pack the same.
    np.testing.assert_array_equal(pack_bits(codes > 0), packed)
    np.testing.assert_array_equal(pack_bits((codes > 0).astype(np.uint8)), packed)
    np.testing.assert_array_equal(pack_bits(torch.from_numpy(codes)), packed)
    assert pack_bits(np.array([1, -1, -1, -1, -1, -1, -1, 1])).tolist() == [0b10000001]  # first code: top bit


def test_packing_needs_whole_bytes():
    with pytest.raises(ValueError, match="12 bits on the last axis; packing needs a multiple of 8"):
        pack_bits(np.ones((2, 12)))
    with pytest.raises(ValueError, match="packed codes must be uint8"):
        unpack_bits(np.ones((2, 2), dtype=np.int64))


def _anisotropic(rng, n=3000, dim=32):
    """Correlated descriptors with a dominant mean direction, like non-negative CNN activations."""
    mixing = rng.standard_normal((dim, dim)) * np.linspace(2.0, 0.1, dim)
    return rng.standard_normal((n, dim)) @ mixing.T + 0.5


def test_itq_lowers_the_quantisation_loss_at_every_iteration():
    rng = np.random.default_rng(0)
    x = _anisotropic(rng)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    projected = x @ eigenvectors[:, np.argsort(eigenvalues)[::-1][:16]]
    rotation, losses = itq_rotation(projected, iterations=30, seed=3)
    assert len(losses) == 31
    assert np.all(np.diff(losses) <= 1e-9 * losses[0]), "each ITQ step can only lower the loss"
    # Below the loss of every random rotation tried (the loss is dominated by the constant N x bits, so the
    # differences are small in relative terms).
    for seed in range(10):
        random_rotation = np.linalg.qr(np.random.default_rng(seed).standard_normal((16, 16)))[0]
        rotated = projected @ random_rotation
        assert losses[-1] < np.sum((np.where(rotated > 0, 1.0, -1.0) - rotated) ** 2) - 100
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-10)


def test_itq_projection_has_orthonormal_columns_and_beats_a_random_rotation():
    rng = np.random.default_rng(1)
    x = _anisotropic(rng)
    projection = itq_projection(x, bits=16, iterations=50)
    assert projection.shape == (32, 16) and projection.dtype == np.float32
    np.testing.assert_allclose(projection.T @ projection, np.eye(16), atol=1e-5)
    normalized = x / np.linalg.norm(x, axis=1, keepdims=True)

    def loss(w):
        projected = normalized @ w
        return np.sum((binary_codes(normalized, w) - projected) ** 2)

    # The same principal subspace under random rotations: ITQ's rotation quantises it better than any of them.
    random_rotations = [np.linalg.qr(rng.standard_normal((16, 16)))[0] for _ in range(5)]
    assert all(loss(projection) < loss(projection @ r) for r in random_rotations)
    # Deterministic for a seed.
    np.testing.assert_array_equal(projection, itq_projection(x, bits=16, iterations=50))


def test_binary_codes_are_signs_of_the_projection():
    rng = np.random.default_rng(2)
    descriptors = rng.standard_normal((5, 7, 32)).astype(np.float16)
    projection = rng.standard_normal((32, 16)).astype(np.float32)
    codes = binary_codes(descriptors, projection)
    assert codes.shape == (5, 7, 16) and set(np.unique(codes)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(codes, np.where(descriptors.astype(np.float32) @ projection > 0, 1, -1))
    assert binary_codes(np.zeros((1, 32)), projection).tolist() == [[-1.0] * 16]  # zero (padding) -> -1
    with pytest.raises(ValueError, match=r"projection of shape \(16, 8\) does not apply to descriptors of dim"):
        binary_codes(descriptors, projection[:16, :8])


def test_product_quantizer_round_trips_through_its_centroids():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    errors = {}
    for sub_dim in (8, 4, 1):
        quantizer = ProductQuantizer.train(x, sub_dim)
        codes = quantizer.encode(x)
        assert codes.dtype == np.uint8 and codes.shape == (600, 16 // sub_dim)
        assert quantizer.centroids.shape == (16 // sub_dim, 256, sub_dim) and quantizer.centroids.dtype == np.float32
        assert quantizer.code_bytes == 16 // sub_dim and quantizer.dim == 16
        decoded = quantizer.decode(codes)
        assert decoded.shape == (600, 16) and decoded.dtype == np.float32
        # What a store keeps (the centroids) rebuilds a quantizer that encodes and decodes identically.
        rebuilt = ProductQuantizer(quantizer.centroids.copy())
        np.testing.assert_array_equal(rebuilt.decode(codes), decoded)
        np.testing.assert_array_equal(rebuilt.encode(x), codes)
        errors[sub_dim] = float(np.mean(np.sum((decoded - x) ** 2, axis=1)))
    assert errors[8] > errors[4] > errors[1], errors  # more bytes, finer reconstruction


def test_product_quantizer_refuses_what_it_cannot_train_or_decode():
    x = np.zeros((300, 12), np.float32)
    with pytest.raises(ValueError, match=r"sub_dim 5 must divide the dimension of vectors \[N, D\]"):
        ProductQuantizer.train(x, 5)
    with pytest.raises(ValueError, match="PQ training needs at least 256 vectors"):
        ProductQuantizer.train(x[:100], 4)
    with pytest.raises(ValueError, match=r"PQ centroids must be \[M, 256, sub_dim\]"):
        ProductQuantizer(np.zeros((3, 16, 4)))
    quantizer = ProductQuantizer(np.zeros((3, 256, 4)))
    with pytest.raises(ValueError, match=r"PQ codes must be uint8 \[N, 3\]"):
        quantizer.decode(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"vectors must be \[N, 12\]"):
        quantizer.encode(np.zeros((2, 8)))


# The AMES paper's memory per database image (KB = 1024 B), for SuperGlobal/CVNet globals (d_g = 2048) and
# 128-d local descriptors (binary: 16 B; fp: float16, 256 B); "full" globals are float32.
PAPER_TABLE_2 = [  # (local storage, global storage, L_x, KB as printed)
    ("fp16", "fp32", 50, 20.5),  # fp locals, full global: 8192 + 50 x 256
    ("binary", "fp32", 50, 8.8),  # binary locals, full global: 8192 + 50 x 16
    ("binary", "pq8", 50, 1.0),  # binary locals, PQ8 global: 256 + 50 x 16
]
PAPER_TABLE_4 = [  # (KB, global storage, L_x): budgets met exactly
    (3, "pq1", 64),
    (3, "pq4", 160),
    (3, "pq8", 176),
    (2, "pq1", 0),
    (2, "pq4", 96),
    (2, "pq8", 112),
    (1, "pq4", 32),
    (1, "pq8", 48),
]


@pytest.mark.parametrize("local_storage, global_storage, num_locals, kilobytes", PAPER_TABLE_2)
def test_memory_of_the_ames_ablation_table(local_storage, global_storage, num_locals, kilobytes):
    assert round(bytes_per_image(2048, global_storage, num_locals, local_storage) / KIB, 1) == kilobytes


@pytest.mark.parametrize("kilobytes, global_storage, num_locals", PAPER_TABLE_4)
def test_memory_of_the_ames_small_footprint_table(kilobytes, global_storage, num_locals):
    assert bytes_per_image(2048, global_storage, num_locals, "binary") == kilobytes * KIB


def test_the_paper_figures_rule_out_other_conventions():
    # KB = 1000 would print 21.0, 9.0 and 1.1 for Table 2.
    assert [round(bytes_per_image(2048, g, n, s) / 1000, 1) for s, g, n, _ in PAPER_TABLE_2] == [21.0, 9.0, 1.1]
    # A float16 "full" global would give 16.5 KB, not 20.5.
    assert bytes_per_image(2048, "fp16", 50, "fp16") / KIB == 16.5
    # Counting the 5 metadata columns (float16) would break the exact budgets of Table 4.
    assert bytes_per_image(2048, "pq8", 48, "binary") + 48 * 5 * 2 != KIB


def test_memory_breakdown_and_storage_names():
    assert memory_breakdown(2048, "pq8", 48, "binary") == {"global": 256, "local": 768, "total": 1024}
    assert memory_breakdown(768, "fp16", 10, "fp32", local_dim=64) == {"global": 1536, "local": 2560, "total": 4096}
    assert bytes_per_image(2048, None, 600, "binary") == 9600
    assert bytes_per_image(2048, "pq4", 0, None) == 512
    with pytest.raises(ValueError, match="unknown global storage 'pq2'"):
        bytes_per_image(2048, "pq2", 1, "binary")
    with pytest.raises(ValueError, match="unknown local storage 'int8'"):
        bytes_per_image(2048, "pq8", 1, "int8")
    with pytest.raises(ValueError, match="pq8 needs a dimension divisible by 8, got 100"):
        bytes_per_image(100, "pq8", 1, "binary")

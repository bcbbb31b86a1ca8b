"""Compressed descriptors: binary codes for local descriptors, product quantisation for global ones, and the
memory a database image takes when stored this way.

AMES (Suma et al., ECCV 2024) stores each database local descriptor as a 128-bit code, ``sign(x W)`` with a
projection ``W`` initialised by ITQ (Gong & Lazebnik, PAMI 2012), and the global descriptor as product
quantisation codes: one byte (256 centroids) per sub-space of 1, 4 or 8 dimensions (PQ1, PQ4, PQ8).

Memory conventions, as read from the AMES paper's memory figures (Tables 2 and 4 of the paper, reproduced by
the tests): only descriptors are counted (no keypoint position, scale or weight, no model parameters);
``1 KB = 1024 bytes``; a "full" global descriptor is float32 (a 2048-d one takes 8 KiB: Table 2's 20.5 KB =
8 KiB + 50 fp16 locals of 256 B, although a footnote says half precision); an fp local descriptor is float16
after the 128-d projection (256 B); a binary one is 16 B. The text's rounder figures for 600 locals ("301 KB"
fp, "~10 KB" binary) follow no single convention exactly: 600 binary locals alone are 9.4 KiB, 600 float32 ones
300 KiB.
"""

from __future__ import annotations

import numpy as np

#: ``pq<k>``: one byte per sub-space of ``k`` dimensions.
GLOBAL_STORAGES = ("fp32", "fp16", "pq1", "pq4", "pq8")
LOCAL_STORAGES = ("binary", "fp16", "fp32")
PQ_CENTROIDS = 256  # 8 bits per sub-space
KIB = 1024


def pack_bits(codes) -> np.ndarray:
    """``uint8 [..., bits / 8]``: binary codes packed 8 to a byte along the last axis (bit = ``code > 0``, so
    ±1, {0, 1} and boolean codes all pack; the first code is the byte's most significant bit)."""
    codes = _to_numpy(codes)
    if codes.shape[-1] % 8:
        raise ValueError(f"codes have {codes.shape[-1]} bits on the last axis; packing needs a multiple of 8")
    return np.packbits(codes > 0, axis=-1)


def unpack_bits(packed, bits: int | None = None) -> np.ndarray:
    """``float32 [..., bits]`` of ±1: the inverse of :func:`pack_bits` (``bits`` defaults to all packed bits)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    unpacked = np.unpackbits(packed, axis=-1, count=bits)
    return unpacked.astype(np.float32) * 2 - 1


def binary_codes(descriptors, projection: np.ndarray) -> np.ndarray:
    """``float32 [..., bits]`` of ±1: ``sign(x W)`` of descriptors ``[..., D]`` with a projection ``[D, bits]``
    (e.g. :func:`itq_projection`, or the trained binarisation weights of a model). A zero maps to -1, as in
    :func:`pack_bits`. No L2 normalisation: it would not change any sign."""
    descriptors = _to_numpy(descriptors).astype(np.float32, copy=False)
    projection = np.asarray(projection, dtype=np.float32)
    if projection.ndim != 2 or descriptors.shape[-1] != projection.shape[0]:
        raise ValueError(
            f"projection of shape {projection.shape} does not apply to descriptors of dimension "
            f"{descriptors.shape[-1]}; expected [D, bits]"
        )
    # One 2-D product: numpy multiplies a [B, L, D] stack matrix by matrix, about 15 times slower.
    products = descriptors.reshape(-1, descriptors.shape[-1]) @ projection
    return np.where(products > 0, 1.0, -1.0).astype(np.float32).reshape(*descriptors.shape[:-1], projection.shape[1])


def itq_projection(
    descriptors, bits: int = 128, iterations: int = 50, seed: int = 0, normalize: bool = True
) -> np.ndarray:
    """Iterative Quantization: ``W [D, bits]`` with orthonormal columns such that ``sign(x W)`` are binary codes
    that lose little of ``x``.

    PCA to ``bits`` dimensions, then :func:`itq_rotation`; ``W = principal directions @ R``.

    The data are *not* centred: the codes are ``sign(x W)`` with no offset (as in AMES, whose binarisation is
    a bias-free matrix initialised by ITQ), so the principal directions are those of the uncentred second
    moment and the rotation minimises the quantisation loss of exactly the codes that will be stored.
    ``normalize`` L2-normalises each descriptor first, as AMES does before binarising. Pass a sample (e.g. a
    few hundred thousand descriptors of training images, not of the test database): the cost is linear in N.
    """
    x = _to_numpy(descriptors).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be [N, D], got shape {x.shape}")
    if not 0 < bits <= x.shape[1]:
        raise ValueError(f"bits must be in [1, {x.shape[1]}] (the descriptor dimension), got {bits}")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    principal = eigenvectors[:, np.argsort(eigenvalues)[::-1][:bits]]
    rotation, _ = itq_rotation(x @ principal, iterations, seed)
    return (principal @ rotation).astype(np.float32)


def itq_rotation(projected: np.ndarray, iterations: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rotation ``R [bits, bits]`` of ITQ for PCA-projected data ``V [N, bits]``, and the quantisation loss
    ``||sign(V R) - V R||²`` before each update (``iterations + 1`` values, the first for the random start).

    Alternates ``B = sign(V R)`` and the orthogonal Procrustes solution ``R = argmin ||B - V R||`` (from the SVD
    of ``Vᵀ B``); each step can only lower the loss, so the losses never increase.
    """
    v = np.asarray(projected, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((v.shape[1], v.shape[1])))
    losses = []
    for step in range(iterations + 1):
        rotated = v @ rotation
        codes = np.where(rotated > 0, 1.0, -1.0)
        losses.append(float(np.sum((codes - rotated) ** 2)))
        if step == iterations:
            break
        u, _, vt = np.linalg.svd(v.T @ codes)
        rotation = u @ vt
    return rotation, np.asarray(losses)


class ProductQuantizer:
    """Product quantisation with 256 centroids (one byte) per sub-space, trained with faiss.

    A quantizer is its centroids, ``float32 [M, 256, sub_dim]`` for ``M = D / sub_dim`` sub-spaces: that array
    is all a store keeps, and ``ProductQuantizer(centroids)`` rebuilds the same quantizer from it.
    """

    def __init__(self, centroids: np.ndarray):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 3 or centroids.shape[1] != PQ_CENTROIDS:
            raise ValueError(f"PQ centroids must be [M, {PQ_CENTROIDS}, sub_dim], got shape {centroids.shape}")
        if not np.isfinite(centroids).all():
            raise ValueError("PQ centroids contain NaN or Inf values")
        self.centroids = centroids

    @property
    def num_subspaces(self) -> int:
        return self.centroids.shape[0]

    @property
    def sub_dim(self) -> int:
        return self.centroids.shape[2]

    @property
    def dim(self) -> int:
        return self.num_subspaces * self.sub_dim

    @property
    def code_bytes(self) -> int:
        return self.num_subspaces

    @classmethod
    def train(cls, vectors, sub_dim: int, iterations: int = 25, seed: int = 0) -> ProductQuantizer:
        """k-means (faiss) with 256 centroids in each ``sub_dim``-dimensional sub-space of ``vectors [N, D]``.

        Train on training images, not on the database that will be searched, where there are some: codes of a
        database its own codebook was fitted to look better than codes of unseen images. faiss samples at most
        256 vectors per centroid (65,536) for each k-means.
        """
        import faiss

        x = np.ascontiguousarray(_to_numpy(vectors), dtype=np.float32)
        if x.ndim != 2 or sub_dim <= 0 or x.shape[1] % sub_dim:
            raise ValueError(f"sub_dim {sub_dim} must divide the dimension of vectors [N, D], got shape {x.shape}")
        if len(x) < PQ_CENTROIDS:
            raise ValueError(f"PQ training needs at least {PQ_CENTROIDS} vectors (one per centroid), got {len(x)}")
        if not np.isfinite(x).all():
            raise ValueError("PQ training vectors contain NaN or Inf values")
        quantizer = faiss.ProductQuantizer(x.shape[1], x.shape[1] // sub_dim, 8)
        quantizer.cp.niter = iterations
        quantizer.cp.seed = seed
        quantizer.cp.min_points_per_centroid = 1  # few training vectors give a weaker codebook, not an error
        quantizer.train(x)
        centroids = faiss.vector_to_array(quantizer.centroids)
        return cls(centroids.reshape(quantizer.M, quantizer.ksub, quantizer.dsub))

    def encode(self, vectors) -> np.ndarray:
        """``uint8 [N, M]``: the nearest centroid of every sub-vector."""
        import faiss

        x = np.ascontiguousarray(_to_numpy(vectors), dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must be [N, {self.dim}], got shape {x.shape}")
        quantizer = faiss.ProductQuantizer(self.dim, self.num_subspaces, 8)
        faiss.copy_array_to_vector(self.centroids.ravel(), quantizer.centroids)
        return quantizer.compute_codes(x)

    def decode(self, codes) -> np.ndarray:
        """``float32 [N, D]``: each sub-vector replaced by its centroid."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_subspaces or codes.dtype != np.uint8:
            raise ValueError(f"PQ codes must be uint8 [N, {self.num_subspaces}], got {codes.dtype} {codes.shape}")
        return self.centroids[np.arange(self.num_subspaces), codes].reshape(len(codes), self.dim)


def global_bytes(dim: int, storage: str | None) -> int:
    """Bytes of one global descriptor of dimension ``dim`` stored as ``storage`` (``None``: not stored)."""
    if storage is None:
        return 0
    if storage in ("fp32", "fp16"):
        return dim * (4 if storage == "fp32" else 2)
    if storage in GLOBAL_STORAGES:
        sub_dim = int(storage[2:])
        if dim % sub_dim:
            raise ValueError(f"{storage} needs a dimension divisible by {sub_dim}, got {dim}")
        return dim // sub_dim  # one byte per sub-space
    raise ValueError(f"unknown global storage {storage!r}; expected one of {GLOBAL_STORAGES} or None")


def local_bytes(dim: int, storage: str | None) -> int:
    """Bytes of one local descriptor of dimension ``dim`` stored as ``storage`` (binary: one bit per dimension);
    the keypoint metadata (position, scale, weight) is not counted, as in the AMES paper."""
    if storage is None:
        return 0
    if storage == "binary":
        return -(-dim // 8)
    if storage in ("fp16", "fp32"):
        return dim * (2 if storage == "fp16" else 4)
    raise ValueError(f"unknown local storage {storage!r}; expected one of {LOCAL_STORAGES} or None")


def memory_breakdown(
    global_dim: int, global_storage: str | None, num_locals: int, local_storage: str | None, local_dim: int = 128
) -> dict[str, int]:
    """``{"global", "local", "total"}`` bytes of one database image (see the module docstring's conventions)."""
    global_part = global_bytes(global_dim, global_storage)
    local_part = num_locals * local_bytes(local_dim, local_storage)
    return {"global": global_part, "local": local_part, "total": global_part + local_part}


def bytes_per_image(
    global_dim: int, global_storage: str | None, num_locals: int, local_storage: str | None, local_dim: int = 128
) -> int:
    """Bytes one database image takes: its global descriptor plus ``num_locals`` local descriptors, e.g.
    ``bytes_per_image(2048, "pq8", 48, "binary") == 1024`` (the AMES paper's "1 KB" setting)."""
    return memory_breakdown(global_dim, global_storage, num_locals, local_storage, local_dim)["total"]


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)

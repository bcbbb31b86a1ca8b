"""Bytes per database image of each re-ranking configuration: the accounting the evaluation reports, and a store
really written in the compressed layout, whose HDF5 file size is compared with it.

    python benchmarks/ames_memory.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from retrieval.compression import bytes_per_image
from retrieval.feature_store import FeatureStore, compress_feature_store, write_feature_store

# (name, global dim, global storage, locals, local storage): the AMES paper's settings (CVNet 2048-d globals)
# and the embedded local-descriptor benchmark's (64-d globals, float32 in the store).
SETTINGS = [
    ("paper Table 2: fp16 locals + fp32 global", 2048, "fp32", 50, "fp16"),
    ("paper Table 2: binary locals + fp32 global", 2048, "fp32", 50, "binary"),
    ("paper Table 2: binary locals + PQ8 global", 2048, "pq8", 50, "binary"),
    ("paper Table 4: 1 KB = PQ8 + 48 binary", 2048, "pq8", 48, "binary"),
    ("paper Table 4: 1 KB = PQ4 + 32 binary", 2048, "pq4", 32, "binary"),
    ("paper Table 4: 3 KB = PQ1 + 64 binary", 2048, "pq1", 64, "binary"),
    ("DINOv2 ViT-B/14, 400 fp16 locals, fp32 global", 768, "fp32", 400, "fp16"),
    ("DINOv2 ViT-B/14, 400 binary locals, PQ8 global", 768, "pq8", 400, "binary"),
    ("embedded local, fp AMES, L_x = 64", 64, "fp32", 64, "fp16"),
    ("embedded local, binary AMES, L_x = 64", 64, "fp32", 64, "binary"),
    ("embedded local, binary AMES, L_x = 16", 64, "fp32", 16, "binary"),
]


def stored_file(num_images: int = 2000, dim: int = 2048, locals_: int = 48, local_dim: int = 128):
    """A PQ8 + 48-binary-locals store written for real: (bytes per image by the accounting, file bytes per image)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "float.h5"
        local = np.zeros((num_images, locals_, 5 + local_dim), dtype=np.float16)
        local[..., 5:] = rng.standard_normal((num_images, locals_, local_dim))
        global_ = rng.standard_normal((num_images, dim)).astype(np.float32)
        write_feature_store(source, [str(i) for i in range(num_images)], global_, local)
        projection = np.linalg.qr(rng.standard_normal((local_dim, local_dim)))[0]
        output = Path(directory) / "1kb.h5"
        compress_feature_store(source, output, global_pq_sub_dim=8, local_projection=projection)
        store = FeatureStore(output)
        return store.stored_bytes_per_image(), output.stat().st_size / num_images


def main() -> None:
    print("| setting | bytes per database image | KB (1024 B) |")
    print("|---|---|---|")
    for name, dim, global_storage, count, local_storage in SETTINGS:
        size = bytes_per_image(dim, global_storage, count, local_storage)
        print(f"| {name} | {size} | {size / 1024:.1f} |")
    accounted, on_disk = stored_file()
    print(
        f"\nA written PQ8 + 48 binary store of 2,000 images: {accounted} B per image accounted, "
        f"{on_disk:.0f} B per image on disk (metadata columns, ids and the PQ codebook included)"
    )


if __name__ == "__main__":
    main()

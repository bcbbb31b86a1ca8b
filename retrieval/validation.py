"""Input checks shared by search, metrics and the feature store: refuse bad numbers with a count, never drop them."""

from __future__ import annotations

import numpy as np


def as_float32_matrix(values, name: str) -> np.ndarray:
    """A C-contiguous ``float32`` ``[rows, dim]`` numpy view or copy of an array or tensor.

    Raises ``ValueError`` naming ``name`` when the input is not 2-D or holds NaN/Inf, with the number of
    offending rows and the first few of them.
    """
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, dim] array, got shape {array.shape}")
    check_finite_rows(array, name)
    return array


def check_finite_rows(array: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if any row of ``array`` holds NaN or Inf, counting the offending rows."""
    if array.size == 0:
        return
    finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{name}: {len(bad)} of {array.shape[0]} rows contain NaN or Inf values (rows {shown}); "
            "refusing to search or score them"
        )

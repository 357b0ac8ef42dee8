"""Small helpers shared by the thickness modules: mask binarisation, spacing validation, cropping.

Axis order everywhere is the array's own ``(i, j, k)``; spacing is ``(s_i, s_j, s_k)`` in millimetres.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

#: Default probability threshold (MONAI ``AsDiscrete(threshold=0.5)`` semantics: ``p >= 0.5`` is inside).
DEFAULT_THRESHOLD = 0.5


def as_binary_mask(mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean 3D mask from a binary, label or probability array.

    * bool arrays are used as they are;
    * integer arrays: every non-zero voxel is inside (pass ``labels == LABEL_FC`` to select one label);
    * floating arrays are probabilities: ``p >= threshold`` is inside (a 0/1 float mask works too).

    Raises ``ValueError`` unless the array is 3D.
    """
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D mask (i, j, k), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= threshold
    return arr != 0


def check_spacing(spacing: Sequence[float]) -> np.ndarray:
    """Validated voxel spacing ``(s_i, s_j, s_k)`` in mm as a float64 array of length 3."""
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return sp


def bbox_crop(mask: np.ndarray, margin: int = 1) -> Tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask`` grown by ``margin`` voxels, clipped to the array."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo = max(int(hit[0]) - margin, 0)
        hi = min(int(hit[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)

"""Registration metrics: per-bone Dice of a warped label map, and folds (negative Jacobian determinant) of a map.

* :func:`bone_dice`: Dice of femur, tibia, fibula (labels 1, 2, 3) between the warped moving label map and the
  fixed one, plus their mean (the paper's Table 1 metric).
* :func:`jacobian_determinant` / :func:`fold_percent`: the Jacobian determinant of a map in pixel units by
  FORWARD differences on the ``(H - 1) x (W - 1)`` grid of pixel cells (as ICON's ``flips``), and the
  percentage of cells where it is negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch

from pipeline.conventions import DXA_LABELS
from pipeline.registration.maps import check_map, map_to_pixels

__all__ = ["bone_dice", "fold_percent", "jacobian_determinant"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def bone_dice(warped_labels: ArrayLike, fixed_labels: ArrayLike, labels: Sequence[int] = (1, 2, 3),
              names: Optional[Mapping[int, str]] = None) -> dict[str, float]:
    """``{"femur", "tibia", "fibula", "mean"}``: Dice ``2 |W = k and F = k| / (|W = k| + |F = k|)`` per label
    ``k`` over all elements of two integer label maps of one shape (any layout: ``H x W``, ``B x 1 x H x W``;
    a batch is pooled, so pass one pair for per-pair scores).

    A label absent from both maps has Dice NaN (undefined) and is left out of ``"mean"`` (NaN if all are).
    ``names``: label -> key (default :data:`pipeline.conventions.DXA_LABELS`, ``label_k`` for others)."""
    w, f = torch.as_tensor(warped_labels), torch.as_tensor(fixed_labels)
    if w.shape != f.shape:
        raise ValueError(f"bone_dice needs label maps of one shape, got {tuple(w.shape)} and {tuple(f.shape)}")
    names = dict(DXA_LABELS if names is None else names)
    w, f = w.to(f.device).long(), f.long()
    out: dict[str, float] = {}
    for k in labels:
        a, b = w == int(k), f == int(k)
        denom = int(a.sum()) + int(b.sum())
        out[names.get(int(k), f"label_{int(k)}")] = float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom
    vals = [v for v in out.values() if not np.isnan(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def jacobian_determinant(phi: torch.Tensor) -> torch.Tensor:
    """``B x (H - 1) x (W - 1)`` Jacobian determinant of ``phi`` (``B x 2 x H x W`` on [0, 1]) in pixel units.

    Forward differences at the top-left corner of each pixel cell: with ``P = map_to_pixels(phi)``,
    ``d/drow = P[:, :, 1:, :-1] - P[:, :, :-1, :-1]``, ``d/dcol = P[:, :, :-1, 1:] - P[:, :, :-1, :-1]``,
    ``det = drow_row * dcol_col - drow_col * dcol_row``. 1 for the identity and any translation."""
    p = map_to_pixels(check_map(phi).detach().double())
    d_row = p[:, :, 1:, :-1] - p[:, :, :-1, :-1]
    d_col = p[:, :, :-1, 1:] - p[:, :, :-1, :-1]
    return d_row[:, 0] * d_col[:, 1] - d_row[:, 1] * d_col[:, 0]


def fold_percent(phi: torch.Tensor) -> float:
    """Percentage of pixel cells of ``phi`` with a negative Jacobian determinant (:func:`jacobian_determinant`),
    pooled over the batch (pass one map for a per-pair value). 0 for any orientation-preserving affine map."""
    det = jacobian_determinant(phi)
    return float((det < 0).double().mean() * 100.0)

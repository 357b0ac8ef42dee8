"""Landmark localisation metrics: Euclidean error in mm, recall at radii, outliers, per landmark group.

Points are ``(x, y)`` = (column, row) in pixels of the ORIGINAL radiograph; spacing is
``(row spacing, column spacing)`` in mm (the DICOM order, :mod:`pipeline.io.dicom`), so an error is
``sqrt((dx * col_spacing)^2 + (dy * row_spacing)^2)`` mm (anisotropic pixels handled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric

from pipeline.conventions import JOINT_CENTRE_IDX

__all__ = [
    "RECALL_RADII_MM",
    "OUTLIER_MM",
    "LANDMARK_GROUPS",
    "landmark_errors_mm",
    "summarize_errors",
    "LandmarkErrorMetric",
]

#: Radii (mm) of the recall table (KNEEL).
RECALL_RADII_MM: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5)
#: Errors at or above this (mm) count as outliers.
OUTLIER_MM = 10.0
#: Landmark groups of the report (KNEEL): tibial corners, femoral corners, joint centre, all 16.
LANDMARK_GROUPS: dict[str, tuple[int, ...]] = {
    "centre": (JOINT_CENTRE_IDX,),
    "tibial_corners": (0, 8),
    "femoral_corners": (9, 15),
    "all": tuple(range(16)),
}


def landmark_errors_mm(pred_xy: Any, true_xy: Any, spacing_rc: Any) -> np.ndarray:
    """Euclidean errors in mm.

    Args:
        pred_xy, true_xy: ``(..., N, 2)`` points ``(x, y)`` in original pixels (numpy or torch).
        spacing_rc: ``(row, col)`` mm, one pair for all, or ``(..., 2)`` per knee (broadcast over N).

    Returns:
        ``(..., N)`` float64 errors in mm (NaN where a point is NaN).
    """
    p = _np(pred_xy)
    t = _np(true_xy)
    if p.shape != t.shape or p.shape[-1] != 2:
        raise ValueError(f"pred and true must have the same (..., N, 2) shape, got {p.shape} and {t.shape}")
    s = _np(spacing_rc)
    if s.shape[-1] != 2:
        raise ValueError(f"spacing must be (row, col) mm pairs, got shape {s.shape}")
    s = s[..., None, :] if s.ndim > 1 else s  # per-knee spacing -> broadcast over the points
    d = p - t
    return np.sqrt((d[..., 0] * s[..., 1]) ** 2 + (d[..., 1] * s[..., 0]) ** 2)


def summarize_errors(errors_mm: Any, groups: Mapping[str, Sequence[int]] | None = None,
                     radii_mm: Sequence[float] = RECALL_RADII_MM, outlier_mm: float = OUTLIER_MM
                     ) -> dict[str, dict[str, float]]:
    """Per group: ``n`` (points), ``median_mm``, ``mean_mm``, ``recall@r`` (% of points with error <= r mm,
    for every radius), ``outliers_pct`` (% with error >= ``outlier_mm``). NaN errors are ignored.

    Args:
        errors_mm: ``(K, N)`` errors (K knees, N landmarks in KNEEL order) or ``(K,)`` for one point.
        groups: ``{name: landmark indices}`` (default :data:`LANDMARK_GROUPS`, only groups whose
            indices exist in N are reported).
    """
    e = _np(errors_mm)
    if e.ndim == 1:
        e = e[:, None]
    groups = LANDMARK_GROUPS if groups is None else groups
    out: dict[str, dict[str, float]] = {}
    for name, idx in groups.items():
        if max(idx) >= e.shape[1]:
            continue
        v = e[:, list(idx)].reshape(-1)
        v = v[np.isfinite(v)]
        row: dict[str, float] = {"n": int(v.size)}
        row["median_mm"] = float(np.median(v)) if v.size else float("nan")
        row["mean_mm"] = float(np.mean(v)) if v.size else float("nan")
        for r in radii_mm:
            row[f"recall@{r:g}mm"] = float(100.0 * np.mean(v <= r)) if v.size else float("nan")
        row["outliers_pct"] = float(100.0 * np.mean(v >= outlier_mm)) if v.size else float("nan")
        out[name] = row
    return out


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class LandmarkErrorMetric(Metric):
    """Ignite metric for a ``SupervisedEvaluator`` on canvases: landmark error in mm over the whole set.

    Reads ``output["pred"]`` and ``output["label"]``: ``(B, N, 2)`` NORMALISED canvas coordinates. A canvas
    of ``S`` px at ``t`` mm/px is physically square, so an error is ``|d| * S * t`` mm: pass
    ``mm_per_unit = S * t``. Validation canvases must therefore be un-scaled (no zoom augmentation).

    Args:
        mm_per_unit: canvas side in mm.
        reduce: ``"mean"``, ``"median"`` or ``"recall"`` (% of points within ``radius_mm``).
        points: landmark indices to include (default all).
    """

    required_output_keys = ("pred", "label")

    def __init__(self, mm_per_unit: float, reduce: str = "mean", radius_mm: float = 2.5,
                 points: Sequence[int] | None = None, output_transform=lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if reduce not in ("mean", "median", "recall"):
            raise ValueError(f"reduce must be 'mean', 'median' or 'recall', got {reduce!r}")
        self.mm_per_unit, self.reduce, self.radius_mm = float(mm_per_unit), reduce, float(radius_mm)
        self.points = None if points is None else list(points)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._errors: list[np.ndarray] = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        pred, label = output
        pred = torch.stack(list(pred)) if isinstance(pred, (list, tuple)) else pred
        label = torch.stack(list(label)) if isinstance(label, (list, tuple)) else label
        e = landmark_errors_mm(pred.float(), label.float(), (self.mm_per_unit, self.mm_per_unit))
        if self.points is not None:
            e = e[..., self.points]
        self._errors.append(e.reshape(-1))

    def compute(self) -> float:
        if not self._errors:
            raise RuntimeError("LandmarkErrorMetric needs at least one batch")
        e = np.concatenate(self._errors)
        if self.reduce == "mean":
            return float(np.mean(e))
        if self.reduce == "median":
            return float(np.median(e))
        return float(100.0 * np.mean(e <= self.radius_mm))

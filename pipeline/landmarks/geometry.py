"""Exact geometry of the two KNEEL stages: canvases, resampling, and point mapping both ways.

Conventions
-----------
* Points are ``(x, y)`` = (column, row) in pixels; a pixel's CENTRE has integer coordinates.
  Source (ORIGINAL radiograph) spacing is ``(row, col)`` mm (:mod:`pipeline.io.dicom`).
* A **canvas** is an ``S x S`` image at ``t`` mm/px (physically square, also for anisotropic sources)
  centred on a point of the source. It is described by one 3 x 3 matrix ``M`` mapping canvas pixel
  ``(u, v, 1)`` to source pixel ``(x, y, 1)`` (:func:`canvas_matrix`):

  ``M = T(centre) . diag(1/col_spacing, 1/row_spacing) . R(angle) . diag(f t / zoom, t / zoom) . T(-(S-1)/2)``

  with ``f = -1`` for a left-right flipped canvas. Sampling uses ``M`` (bilinear, Gaussian anti-aliasing
  when down-sampling) and predictions are mapped back with the SAME ``M`` (:func:`apply_matrix`), so the
  forward and inverse point maps are exact to float precision (no "multiply by the ROI size"
  approximation). Chained canvases multiply their matrices.
* Normalised canvas coordinates: ``n = (u + 0.5) / S`` (:mod:`pipeline.landmarks.soft_argmax`).
* **Stages** (:class:`StageSpec`): ``global`` = the knee's field (one half of a bilateral image, the whole
  image for a single knee; the rest masked) on a canvas of e.g. 450 px at 1 mm/px (paper) -> 1 point,
  the joint centre; ``local`` = a canvas around the joint centre, e.g. 450 px at 0.3 mm/px (paper, a
  135 mm field inside KNEEL's 140 mm ROI) -> 16 landmarks in KNEEL order.
* Sides: the patient's RIGHT knee is on the image's LEFT half. Right-knee canvases are flipped so every
  canvas shows a left knee; landmark ``i`` of a canvas is always the ``i``-th from the canvas' left in its
  group, so a flipped canvas permutes indices by ``pipeline.conventions.FLIP_PERMUTATION``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.conventions import FLIP_PERMUTATION, JOINT_CENTRE_IDX, N_LANDMARKS, SIDES

__all__ = [
    "STAGES",
    "StageSpec",
    "LAYOUTS",
    "canvas_matrix",
    "apply_matrix",
    "resample",
    "knee_field",
    "field_centre",
    "make_view",
    "sample_canvas",
    "permute_if_flipped",
]

STAGES = ("global", "local")
#: Image layouts: both knees (patient's right on the image's left half) or one knee filling the image.
LAYOUTS = ("bilateral", "single")


@dataclass(frozen=True)
class StageSpec:
    """One localisation stage: ``stage`` (``"global"`` | ``"local"``), canvas side ``canvas_size`` (px) and
    ``canvas_spacing_mm`` (mm/px). ``n_points`` / ``point_indices``: 1 point (KNEEL index 4) for the global
    stage, all 16 for the local stage."""

    stage: str
    canvas_size: int
    canvas_spacing_mm: float

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if int(self.canvas_size) < 8 or float(self.canvas_spacing_mm) <= 0:
            raise ValueError(f"canvas_size must be >= 8 px and canvas_spacing_mm > 0, got "
                             f"{self.canvas_size}, {self.canvas_spacing_mm}")

    @property
    def point_indices(self) -> tuple[int, ...]:
        return (JOINT_CENTRE_IDX,) if self.stage == "global" else tuple(range(N_LANDMARKS))

    @property
    def n_points(self) -> int:
        return len(self.point_indices)

    @property
    def canvas_mm(self) -> float:
        """Canvas side in mm (``canvas_size * canvas_spacing_mm``)."""
        return self.canvas_size * self.canvas_spacing_mm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpec:
        return cls(stage=str(d["stage"]), canvas_size=int(d["canvas_size"]),
                   canvas_spacing_mm=float(d["canvas_spacing_mm"]))


def canvas_matrix(centre_xy: Sequence[float], size_hw: Sequence[int], out_spacing_mm: float,
                  in_spacing_rc: Sequence[float], angle_rad: float = 0.0, zoom: float = 1.0,
                  flip: bool = False) -> np.ndarray:
    """3 x 3 matrix: canvas pixel ``(u, v, 1)`` -> source pixel ``(x, y, 1)`` (module docstring).

    Args:
        centre_xy: source point ``(x, y)`` at the canvas centre ``((W-1)/2, (H-1)/2)``.
        size_hw: canvas ``(H, W)`` px.
        out_spacing_mm: canvas mm/px (before ``zoom``).
        in_spacing_rc: source ``(row, col)`` mm/px.
        angle_rad: rotation of the sampling grid (the content turns by ``-angle``).
        zoom: > 1 magnifies (a canvas pixel covers ``out_spacing_mm / zoom`` mm).
        flip: mirror the canvas left-right.
    """
    h, w = (int(s) for s in size_hw)
    sr, sc = (float(s) for s in in_spacing_rc)
    t = float(out_spacing_mm) / float(zoom)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    shift = np.array([[1.0, 0.0, -(w - 1) / 2.0], [0.0, 1.0, -(h - 1) / 2.0], [0.0, 0.0, 1.0]])
    scale = np.diag([(-t if flip else t), t, 1.0])
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    to_px = np.array([[1.0 / sc, 0.0, float(centre_xy[0])], [0.0, 1.0 / sr, float(centre_xy[1])], [0.0, 0.0, 1.0]])
    return to_px @ rot @ scale @ shift


def apply_matrix(m: np.ndarray, points_xy: Any) -> np.ndarray:
    """Apply a 3 x 3 ``(x, y, 1)`` matrix to ``(..., 2)`` points; returns float64 ``(..., 2)``."""
    p = np.asarray(points_xy, dtype=np.float64)
    return p @ np.asarray(m, dtype=np.float64)[:2, :2].T + np.asarray(m, dtype=np.float64)[:2, 2]


def resample(image: np.ndarray, m: np.ndarray, size_hw: Sequence[int], antialias: bool = True,
             valid_box: Sequence[float] | None = None) -> np.ndarray:
    """Sample ``image`` (2D, rows x columns) on a canvas: canvas pixel ``(u, v)`` takes the bilinear value
    at source ``M (u, v, 1)``.

    When a canvas pixel spans ``k > 1`` source pixels along a source axis, that axis is first smoothed with
    a Gaussian of sigma ``(k - 1) / 2`` source pixels (anti-aliasing; symmetric, so no shift). Canvas
    pixels whose source point lies outside the image, or outside ``valid_box`` = ``(x0, x1, y0, y1)`` in
    source pixel coordinates (edges, e.g. ``(-0.5, W/2 - 0.5, -0.5, H - 0.5)`` for the left half), are NaN.

    Returns:
        float32 ``(H, W)`` canvas.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"resample expects a 2D image (rows, columns), got shape {img.shape}")
    h, w = (int(s) for s in size_hw)
    m = np.asarray(m, dtype=np.float64)
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
    xs = m[0, 0] * uu + m[0, 1] * vv + m[0, 2]
    ys = m[1, 0] * uu + m[1, 1] * vv + m[1, 2]
    hs, ws = img.shape
    box = [-0.5, ws - 0.5, -0.5, hs - 0.5]
    if valid_box is not None:
        box = [max(box[0], valid_box[0]), min(box[1], valid_box[1]), max(box[2], valid_box[2]), min(box[3], valid_box[3])]
    inside = (xs >= box[0]) & (xs <= box[1]) & (ys >= box[2]) & (ys <= box[3])
    out = np.full((h, w), np.nan, dtype=np.float32)
    if not inside.any():
        return out
    step_x = math.hypot(m[0, 0], m[0, 1])  # source columns per canvas pixel
    step_y = math.hypot(m[1, 0], m[1, 1])
    sig = (max(0.0, (step_y - 1.0) / 2.0), max(0.0, (step_x - 1.0) / 2.0)) if antialias else (0.0, 0.0)
    margin = int(math.ceil(4.0 * max(sig))) + 2
    x_in, y_in = xs[inside], ys[inside]
    c0 = max(0, int(math.floor(x_in.min())) - margin)
    c1 = min(ws, int(math.ceil(x_in.max())) + margin + 1)
    r0 = max(0, int(math.floor(y_in.min())) - margin)
    r1 = min(hs, int(math.ceil(y_in.max())) + margin + 1)
    crop = img[r0:r1, c0:c1]
    if max(sig) > 0.05:
        crop = ndimage.gaussian_filter(crop, sigma=sig, mode="nearest", truncate=4.0)
    vals = ndimage.map_coordinates(crop, [y_in - r0, x_in - c0], order=1, mode="nearest")
    out[inside] = vals
    return out


def knee_field(shape_hw: Sequence[int], side: str, layout: str = "bilateral") -> tuple[float, float, float, float]:
    """Box ``(x0, x1, y0, y1)`` (pixel-edge coordinates) of one knee's field in an image of ``shape_hw``.

    ``bilateral``: the patient's right knee (``"R"``) is the image's LEFT half, ``"L"`` the right half
    (split at the middle column line ``x = W/2 - 0.5``); ``single``: the whole image.
    """
    h, w = (int(s) for s in shape_hw)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "single":
        return (-0.5, w - 0.5, -0.5, h - 0.5)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} for a bilateral image, got {side!r}")
    mid = w / 2.0 - 0.5
    return (-0.5, mid, -0.5, h - 0.5) if side == "R" else (mid, w - 0.5, -0.5, h - 0.5)


def field_centre(box: Sequence[float]) -> tuple[float, float]:
    """Centre ``(x, y)`` of a :func:`knee_field` box."""
    return (0.5 * (box[0] + box[1]), 0.5 * (box[2] + box[3]))


def make_view(image: np.ndarray, spacing_rc: Sequence[float], centre_xy: Sequence[float], view_mm: float,
              spacing_mm: float, valid_box: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An axis-aligned, unflipped square region of ``view_mm`` around ``centre_xy`` at ``spacing_mm`` mm/px.

    Views are the cacheable intermediate of training (a stage's canvases with their random rotation,
    zoom, shift and flip are then sampled from the view) and of inference (the same code path).

    Returns:
        ``(view float32 (n, n) with NaN outside the image / valid_box, M_view (view px -> source px))``.
    """
    n = max(8, int(math.ceil(float(view_mm) / float(spacing_mm))))
    m = canvas_matrix(centre_xy, (n, n), spacing_mm, spacing_rc)
    return resample(image, m, (n, n), antialias=True, valid_box=valid_box), m


def sample_canvas(view: np.ndarray, view_matrix: np.ndarray, view_spacing_mm: float, centre_xy: Sequence[float],
                  spec: StageSpec, angle_rad: float = 0.0, zoom: float = 1.0, flip: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A stage canvas from a view: ``spec.canvas_size`` px at ``spec.canvas_spacing_mm`` around the SOURCE
    point ``centre_xy`` (original pixels).

    Returns:
        ``(canvas float32 (S, S) with NaN where there is no image, M (canvas px -> ORIGINAL px))``.
    """
    s = spec.canvas_size
    centre_view = apply_matrix(np.linalg.inv(view_matrix), np.asarray(centre_xy, dtype=np.float64))
    m_cv = canvas_matrix(centre_view, (s, s), spec.canvas_spacing_mm, (view_spacing_mm, view_spacing_mm),
                         angle_rad=angle_rad, zoom=zoom, flip=flip)
    canvas = resample(view, m_cv, (s, s), antialias=True)
    return canvas, np.asarray(view_matrix) @ m_cv


def permute_if_flipped(points: np.ndarray, flipped: bool) -> np.ndarray:
    """Reorder 16 KNEEL landmarks by ``FLIP_PERMUTATION`` when ``flipped`` (an involution: the same call maps
    canvas order -> image order and back); other point counts are returned unchanged."""
    p = np.asarray(points)
    if flipped and p.shape[-2] == N_LANDMARKS:
        return p[..., list(FLIP_PERMUTATION), :]
    return p

"""The two KNEEL stages: stage specs, knee fields, views and canvases (geometry: :mod:`pipeline.geometry`).

Conventions
-----------
* Points are ``(x, y)`` = (column, row) in pixels; a pixel's CENTRE has integer coordinates.
  Source (ORIGINAL radiograph) spacing is ``(row, col)`` mm (:mod:`pipeline.io.dicom`).
* A **canvas** is an ``S x S`` image at ``t`` mm/px (physically square, also for anisotropic sources)
  centred on a point of the source, described by ONE 3 x 3 matrix ``M`` mapping canvas pixel ``(u, v, 1)``
  to source pixel ``(x, y, 1)`` (:func:`pipeline.geometry.canvas_matrix`, the radiograph geometry every crop
  of the package shares). Sampling uses ``M`` (:func:`pipeline.geometry.resample`: bilinear, Gaussian
  anti-aliasing when down-sampling) and predictions are mapped back with the SAME ``M``
  (:func:`pipeline.geometry.apply_matrix`), so the forward and inverse point maps are exact to float precision
  (no "multiply by the ROI size" approximation). Chained canvases multiply their matrices.
* Normalised canvas coordinates: ``n = (u + 0.5) / S`` (:mod:`pipeline.landmarks.soft_argmax`).
* **Stages** (:class:`StageSpec`): ``global`` = the knee's field (one half of a bilateral image, the whole
  image for a single knee; the rest masked) on a canvas of e.g. 450 px at 1 mm/px (paper) -> 1 point,
  the joint centre; ``local`` = a canvas around the joint centre, e.g. 450 px at 0.3 mm/px (paper, a
  135 mm field inside KNEEL's 140 mm ROI) -> 16 landmarks in KNEEL order.
* Sides: the patient's RIGHT knee is on the image's LEFT half. Right-knee canvases are flipped so every
  canvas shows a left knee; landmark ``i`` of a canvas is always the ``i``-th from the canvas' left in its
  group, so a flipped canvas permutes indices by ``pipeline.conventions.FLIP_PERMUTATION``
  (:func:`pipeline.geometry.permute_if_flipped`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.conventions import JOINT_CENTRE_IDX, N_LANDMARKS, SIDES
from pipeline.geometry import apply_matrix, canvas_matrix, invert, permute_if_flipped, resample

__all__ = [
    "STAGES",
    "StageSpec",
    "LAYOUTS",
    "knee_field",
    "field_centre",
    "make_view",
    "sample_canvas",
    # re-exported from pipeline.geometry (their home) for the users of this module
    "canvas_matrix",
    "apply_matrix",
    "resample",
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
    centre_view = apply_matrix(invert(view_matrix), np.asarray(centre_xy, dtype=np.float64))
    m_cv = canvas_matrix(centre_view, (s, s), spec.canvas_spacing_mm, (view_spacing_mm, view_spacing_mm),
                         angle_rad=angle_rad, zoom=zoom, flip=flip)
    canvas = resample(view, m_cv, (s, s), antialias=True)
    return canvas, np.asarray(view_matrix) @ m_cv

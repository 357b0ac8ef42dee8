"""One radiograph geometry: the affine between an image cut around a knee and the ORIGINAL radiograph.

Every image cut out of a radiograph -- the KNEEL landmark views and canvases (:mod:`pipeline.landmarks.geometry`)
and the MRIS / direct-synthesis 140 mm ROI crop (:mod:`transforms.roi`) -- is described by ONE 3 x 3 matrix ``M``
from an OUTPUT pixel to an ORIGINAL pixel::

    (x, y, 1) = M @ (u, v, 1)      x, u = column; y, v = row; a pixel's centre has integer coordinates

* Exact both ways: outputs are sampled at ``M (u, v, 1)`` and points go back with the same ``M``; the inverse
  (:func:`invert`) maps original points into the output. Steps chain by multiplication: a canvas sampled from a
  view is ``M_view @ M_canvas``, a crop resized later is ``M_crop @ resize_matrix(...)``.
* Two samplers share the matrices: :func:`resample` (bilinear at ``M (u, v, 1)``, Gaussian anti-aliasing when
  down-sampling; the landmark canvases) and the integer-shift crop (:func:`crop_matrix`, pixel values copied
  exactly; the ROI crop).
* Padding: where a crop leaves the image it holds a constant (``pad_value``; never wrapped or reflected:
  :func:`crop_overlap` is the part that lies inside); a resampled canvas holds NaN there (the caller fills it).
* Right knees: the patient's RIGHT knee lies on the image's LEFT half, and its output is mirrored left-right so
  that every output shows a left knee. The mirror is part of ``M`` (``M = M_unmirrored @ mirror_matrix(W)``);
  the 16 KNEEL landmarks of a mirrored output are re-indexed by ``FLIP_PERMUTATION`` (:func:`permute_if_flipped`)
  so that landmark ``i`` is again the ``i``-th from the output's left in its group.
* ROI size and placement (the MRIS / KNEEL crop): ``n = round(roi_mm / spacing)`` px per axis (half up;
  physically square for anisotropic spacing, :func:`roi_size_px`); the original pixel holding the centre becomes
  unmirrored output index ``n // 2`` (:func:`crop_start`).
* The record carried to the outputs (:func:`roi_record`: file, side, flip, centre, ROI size in px and mm,
  spacing and the output -> original matrix, JSON-ready) and its point helpers
  (:func:`output_to_original_points`, :func:`original_to_output_points`).
* MONAI affines index ``(row, col)``; :func:`swap_xy_rc` turns such a matrix into the same map in ``(x, y)``
  and back. Spacings are ``(row, col)`` mm as in DICOM (:mod:`pipeline.io.dicom`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.conventions import FLIP_PERMUTATION, N_LANDMARKS

__all__ = [
    "round_half_up",
    "roi_size_px",
    "crop_start",
    "mirror_matrix",
    "crop_matrix",
    "canvas_matrix",
    "resize_matrix",
    "swap_xy_rc",
    "invert",
    "apply_matrix",
    "crop_overlap",
    "resample",
    "permute_if_flipped",
    "roi_record",
    "output_to_original_points",
    "original_to_output_points",
]


# ------------------------------------------------------------------------------------------- ROI size
def round_half_up(v: float) -> int:
    """``floor(v + 0.5)``: the pixel whose centre is nearest to ``v`` (ties go up, for both signs)."""
    return int(math.floor(float(v) + 0.5))


def roi_size_px(roi_mm: float, spacing_rc: Sequence[float]) -> tuple[int, int]:
    """ROI side in pixels per axis, ``(round(roi_mm / row_spacing), round(roi_mm / col_spacing))``, at least 1."""
    sr, sc = (float(s) for s in spacing_rc)
    if sr <= 0 or sc <= 0:
        raise ValueError(f"spacing must be positive, got {spacing_rc}")
    return max(1, round_half_up(roi_mm / sr)), max(1, round_half_up(roi_mm / sc))


def crop_start(centre_xy: Sequence[float], size_rc: Sequence[int]) -> tuple[int, int]:
    """Top-left source pixel ``(x0, y0)`` of an ``(n_r, n_c)`` crop whose unmirrored index ``(n_c // 2, n_r // 2)``
    is the pixel holding ``centre_xy``."""
    n_r, n_c = (int(s) for s in size_rc)
    return round_half_up(centre_xy[0]) - n_c // 2, round_half_up(centre_xy[1]) - n_r // 2


# ------------------------------------------------------------------------------------------- matrices
def mirror_matrix(width: int) -> np.ndarray:
    """Left-right mirror of an output ``width`` px wide: ``u -> (width - 1) - u`` (its own inverse)."""
    return np.array([[-1.0, 0.0, float(width) - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def crop_matrix(start_xy: Sequence[float], size_rc: Sequence[int], flip: bool = False) -> np.ndarray:
    """``M`` of an integer-shift crop of ``size_rc`` = ``(n_r, n_c)`` px starting at source pixel ``start_xy``:
    ``x = x0 + u`` (mirrored: ``x = x0 + (n_c - 1) - u``), ``y = y0 + v``."""
    m = np.array([[1.0, 0.0, float(start_xy[0])], [0.0, 1.0, float(start_xy[1])], [0.0, 0.0, 1.0]])
    return m @ mirror_matrix(int(size_rc[1])) if flip else m


def canvas_matrix(centre_xy: Sequence[float], size_hw: Sequence[int], out_spacing_mm: float,
                  in_spacing_rc: Sequence[float], angle_rad: float = 0.0, zoom: float = 1.0,
                  flip: bool = False) -> np.ndarray:
    """``M`` of a resampled canvas: ``size_hw`` = ``(H, W)`` px at ``out_spacing_mm / zoom`` mm/px (physically
    square also for an anisotropic source), source point ``centre_xy`` at the canvas centre ``((W-1)/2, (H-1)/2)``::

        M = T(centre) . diag(1/col_spacing, 1/row_spacing) . R(angle) . diag(f t, t) . T(-(W-1)/2, -(H-1)/2)

    with ``t = out_spacing_mm / zoom`` and ``f = -1`` when ``flip`` (the left-right mirror), else 1.

    Args:
        in_spacing_rc: source ``(row, col)`` mm/px.
        angle_rad: rotation of the sampling grid (the content turns by ``-angle``).
        zoom: > 1 magnifies.
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


def resize_matrix(in_size_rc: Sequence[int], out_size_rc: Sequence[int] | None) -> np.ndarray:
    """``M`` of a MONAI ``Resize`` (``align_corners=False``) from ``in_size_rc`` to ``out_size_rc``: output pixel
    ``i`` is input pixel ``(i + 0.5) * n / S - 0.5`` per axis. ``out_size_rc=None``: the identity."""
    m = np.eye(3)
    if out_size_rc is None:
        return m
    for ax, a in ((0, 1), (1, 0)):  # x <- columns, y <- rows
        s = float(in_size_rc[a]) / float(out_size_rc[a])
        m[ax, ax] = s
        m[ax, 2] = 0.5 * s - 0.5
    return m


def swap_xy_rc(m: Any) -> np.ndarray:
    """The same 2D affine map with its two axes swapped: a ``(row, col, 1)`` matrix -> ``(x, y, 1)`` and back."""
    a = np.asarray(m, dtype=np.float64)
    p = [1, 0, 2]
    return a[np.ix_(p, p)]


def invert(m: Any) -> np.ndarray:
    """Inverse of a 3 x 3 affine ``[[A, t], [0, 1]]``: ``[[A^-1, -A^-1 t], [0, 1]]``."""
    a = np.asarray(m, dtype=np.float64)
    inv = np.eye(3)
    inv[:2, :2] = np.linalg.inv(a[:2, :2])
    inv[:2, 2] = -inv[:2, :2] @ a[:2, 2]
    return inv


def apply_matrix(m: Any, points_xy: Any) -> np.ndarray:
    """Apply a 3 x 3 ``(x, y, 1)`` matrix to ``(..., 2)`` points; returns float64 ``(..., 2)``."""
    p = np.asarray(points_xy, dtype=np.float64)
    a = np.asarray(m, dtype=np.float64)
    return p @ a[:2, :2].T + a[:2, 2]


# ------------------------------------------------------------------------------------------- sampling
def crop_overlap(start_xy: Sequence[int], size_rc: Sequence[int], shape_rc: Sequence[int]
                 ) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """The part of an unmirrored ``size_rc`` crop starting at ``start_xy`` that lies inside a source of
    ``shape_rc``: ``((source rows, source cols), (crop rows, crop cols))`` slices, or None when the crop misses the
    image (the rest is padding)."""
    x0, y0 = (int(s) for s in start_xy)
    n_r, n_c = (int(s) for s in size_rc)
    h, w = (int(s) for s in shape_rc)
    sr0, sr1 = max(y0, 0), min(y0 + n_r, h)
    sc0, sc1 = max(x0, 0), min(x0 + n_c, w)
    if sr1 <= sr0 or sc1 <= sc0:
        return None
    return (slice(sr0, sr1), slice(sc0, sc1)), (slice(sr0 - y0, sr1 - y0), slice(sc0 - x0, sc1 - x0))


def resample(image: np.ndarray, m: np.ndarray, size_hw: Sequence[int], antialias: bool = True,
             valid_box: Sequence[float] | None = None) -> np.ndarray:
    """Sample ``image`` (2D, rows x columns) on an output of ``size_hw``: output pixel ``(u, v)`` takes the bilinear
    value at source ``M (u, v, 1)``.

    When an output pixel spans ``k > 1`` source pixels along a source axis, that axis is first smoothed with a
    Gaussian of sigma ``(k - 1) / 2`` source pixels (anti-aliasing; symmetric, so no shift). Output pixels whose
    source point lies outside the image, or outside ``valid_box`` = ``(x0, x1, y0, y1)`` in source pixel
    coordinates (edges, e.g. ``(-0.5, W/2 - 0.5, -0.5, H - 0.5)`` for the left half), are NaN.

    Returns:
        float32 ``(H, W)``.
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
    step_x = math.hypot(m[0, 0], m[0, 1])  # source columns per output pixel
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


def permute_if_flipped(points: Any, flipped: bool) -> np.ndarray:
    """Reorder 16 KNEEL landmarks (axis -2) by ``FLIP_PERMUTATION`` when ``flipped``; an involution, so the same
    call maps output order -> image order and back. Other point counts are returned unchanged."""
    p = np.asarray(points)
    if flipped and p.ndim >= 2 and p.shape[-2] == N_LANDMARKS:
        return p[..., list(FLIP_PERMUTATION), :]
    return p


# ------------------------------------------------------------------------------------------- the record
def roi_record(side: str, flipped: bool, centre_xy: Sequence[float], size_rc: Sequence[int],
               spacing_rc: Sequence[float], output_to_original: Any, output_size_rc: Sequence[int],
               file: str = "") -> dict[str, Any]:
    """Where an output image came from, JSON-ready (plain lists and numbers):

    ``file``, ``side`` (``"R"``/``"L"``), ``flipped`` (mirrored to a left knee), ``centre_xy`` (the joint centre
    the ROI was cut around, ORIGINAL px), ``size_rc`` (ROI rows, cols in ORIGINAL px), ``size_mm`` (rows, cols in
    mm), ``spacing_rc`` (ORIGINAL row, col spacing in mm), ``output_size_rc`` (rows, cols of the output image) and
    ``output_to_original`` (3 x 3, row-major: output ``(u, v, 1)`` -> ORIGINAL ``(x, y, 1)``, columns / rows;
    :func:`output_to_original_points`).
    """
    n_r, n_c = (int(s) for s in size_rc)
    sr, sc = (float(s) for s in spacing_rc)
    m = np.asarray(output_to_original, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"output_to_original must be 3 x 3, got shape {m.shape}")
    return {"file": str(file), "side": str(side), "flipped": bool(flipped),
            "centre_xy": [float(centre_xy[0]), float(centre_xy[1])], "size_rc": [n_r, n_c],
            "size_mm": [n_r * sr, n_c * sc], "spacing_rc": [sr, sc],
            "output_size_rc": [int(s) for s in output_size_rc], "output_to_original": m.tolist()}


def _record_matrix(roi: Mapping[str, Any]) -> np.ndarray:
    if "output_to_original" not in roi:
        raise ValueError("not an ROI record (pipeline.geometry.roi_record): no 'output_to_original'")
    return np.asarray(roi["output_to_original"], dtype=np.float64)


def output_to_original_points(points_uv: Any, roi: Mapping[str, Any], permute_landmarks: bool = False) -> np.ndarray:
    """Points ``(u, v)`` of the output image (e.g. predicted on the network input) -> ORIGINAL ``(x, y)`` through
    an ROI record's ``output_to_original``. ``permute_landmarks``: 16 KNEEL landmarks of a mirrored output are
    re-indexed to image order."""
    p = permute_if_flipped(np.asarray(points_uv, dtype=np.float64), bool(roi.get("flipped")) and permute_landmarks)
    return apply_matrix(_record_matrix(roi), p)


def original_to_output_points(points_xy: Any, roi: Mapping[str, Any], permute_landmarks: bool = False) -> np.ndarray:
    """ORIGINAL ``(x, y)`` -> output ``(u, v)``: the exact inverse of :func:`output_to_original_points`."""
    p = apply_matrix(invert(_record_matrix(roi)), points_xy)
    return permute_if_flipped(p, bool(roi.get("flipped")) and permute_landmarks)

"""Minimal joint-space width (mJSW) measured on a knee radiograph from its KNEEL landmarks.

For every image column of a compartment, the femoral bottom edge and the tibial top edge are located as
the strongest falling and rising intensity steps (bone bright) of the vertical profile between the
femoral and tibial landmark contours; the width is their distance in mm. The compartment's mJSW is a low
percentile over its columns (robust to noise). Works in ORIGINAL pixel coordinates (x = column, y = row).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def compartment_columns(landmarks: np.ndarray, side: str, compartment: str) -> tuple[float, float]:
    """Column range (pixels) of the medial or lateral compartment from the tibial landmarks 0-8.

    Tibial landmarks run left -> right in the image. The patient's right knee (image left) has its
    medial side towards the image right; the left knee has it towards the image left.
    """
    tib = np.asarray(landmarks, dtype=float)[:9]
    left_part = (tib[1, 0], tib[3, 0])
    right_part = (tib[5, 0], tib[7, 0])
    medial_on_right = side == "R"
    if compartment == "medial":
        return right_part if medial_on_right else left_part
    if compartment == "lateral":
        return left_part if medial_on_right else right_part
    raise ValueError(f"compartment must be 'medial' or 'lateral', got {compartment!r}")


def _subpixel_peak(d: np.ndarray, i: int) -> float:
    if 0 < i < d.size - 1:
        a, b, c = d[i - 1], d[i], d[i + 1]
        den = a - 2 * b + c
        if den != 0:
            return i + 0.5 * (a - c) / den
    return float(i)


def measure_mjsw(image: np.ndarray, spacing_mm: tuple[float, float], landmarks: np.ndarray, side: str,
                 compartment: str = "medial", margin_mm: float = 6.0, percentile: float = 10.0,
                 smooth_mm: float = 0.4) -> float:
    """Minimal joint-space width in mm of one compartment.

    ``image``: 2D (rows, columns), bone bright. ``spacing_mm``: (row, column) spacing. ``landmarks``:
    16 x 2 KNEEL points (x, y) in pixels of ``image``.
    """
    img = np.asarray(image, dtype=np.float64)
    lm = np.asarray(landmarks, dtype=float)
    sr, sc = float(spacing_mm[0]), float(spacing_mm[1])
    c0, c1 = sorted(compartment_columns(lm, side, compartment))
    cols = np.arange(int(np.ceil(c0)), int(np.floor(c1)) + 1)
    tib_y = np.interp(cols, lm[:9, 0], lm[:9, 1])
    fem_y = np.interp(cols, np.sort(lm[9:, 0]), lm[9:, 1][np.argsort(lm[9:, 0])])
    m = int(np.ceil(margin_mm / sr))
    top = int(max(0, np.floor(min(fem_y.min(), tib_y.min())) - m))
    bot = int(min(img.shape[0], np.ceil(max(fem_y.max(), tib_y.max())) + m))
    band = ndimage.gaussian_filter(img[top:bot, :], (smooth_mm / sr, smooth_mm / sc))[:, cols]
    grad = np.gradient(band, axis=0)
    widths = []
    for j in range(cols.size):
        mid = int(round(0.5 * (fem_y[j] + tib_y[j]))) - top
        mid = min(max(mid, 1), band.shape[0] - 2)
        g = grad[:, j]
        f = int(np.argmin(g[:mid]))  # bright femur above -> dark joint space: falling step
        t = mid + int(np.argmax(g[mid:]))  # dark joint space -> bright tibia: rising step
        widths.append(_subpixel_peak(g, t) - _subpixel_peak(g, f))
    widths = np.asarray(widths) * sr
    return float(np.percentile(widths, percentile))

"""The fixed 2D atlas grid of the thickness maps, shared by every knee (left-knee convention).

Each map (FC or TC) holds two compartments side by side: medial in the left half, lateral in the right
half, separated by a central gap (the intercondylar notch / tibial spines) and padded at the borders.
Within a compartment, cells are addressed by normalised footprint coordinates ``(x, y)`` in ``[-1, 1]``:

* femoral condyle (FC): ``x = phi / PHI_MAX`` (tube angle of the condyle surface, -1 medial side,
  +1 lateral side), ``y = (theta - THETA_MID) / THETA_HALF`` (sagittal angle from the inferior direction
  towards posterior: -1 anterior-distal, +1 posterior); the footprint is the whole square;
* tibial plateau (TC): ``x = (u - cu) / su`` (-1 medial rim, +1 lateral rim), ``y = (b - cb) / sb``
  (-1 anterior, +1 posterior); the footprint is the unit disc.

Rows run anterior -> posterior, columns medial -> lateral. Because the footprint is defined in normalised
coordinates, the NaN mask is the same for every knee.
"""

from __future__ import annotations

import numpy as np

PHI_MAX = np.deg2rad(55.0)
THETA_MID = np.deg2rad(25.0)
THETA_HALF = np.deg2rad(80.0)  # theta from -55 deg (anterior-distal) to +105 deg (posterior)
PAD = 0.04
GAP = 0.06


def atlas_grid(size: tuple[int, int], pad: float = PAD, gap: float = GAP):
    """Cell-centre coordinates of a ``(rows, cols)`` map.

    Returns ``(compartment, x, y)`` arrays of shape ``size``: compartment 0 = medial, 1 = lateral,
    -1 = outside (padding and the central gap); ``x, y`` normalised footprint coordinates.
    """
    rows, cols = int(size[0]), int(size[1])
    cy = (np.arange(rows) + 0.5) / rows
    cx = (np.arange(cols) + 0.5) / cols
    y = (cy - 0.5) / (0.5 - pad)
    half = (1.0 - 2 * pad - gap) / 2.0
    x_med = (cx - pad) / half * 2.0 - 1.0
    x_lat = (cx - (pad + half + gap)) / half * 2.0 - 1.0
    comp = np.where(np.abs(x_med) <= 1.0, 0, np.where(np.abs(x_lat) <= 1.0, 1, -1))
    xx = np.where(comp == 0, x_med, x_lat)
    Y, X = np.meshgrid(y, xx, indexing="ij")
    C = np.broadcast_to(comp[None, :], (rows, cols)).copy()
    C[np.abs(Y) > 1.0] = -1
    return C, X, Y


def xy_to_cell(compartment: int, x, y, size: tuple[int, int], pad: float = PAD, gap: float = GAP):
    """Fractional ``(row, col)`` of normalised coordinates ``(x, y)`` of a compartment (inverse of
    :func:`atlas_grid`)."""
    rows, cols = int(size[0]), int(size[1])
    half = (1.0 - 2 * pad - gap) / 2.0
    cy = np.asarray(y) * (0.5 - pad) + 0.5
    start = pad if compartment == 0 else pad + half + gap
    cx = start + (np.asarray(x) + 1.0) / 2.0 * half
    return cy * rows - 0.5, cx * cols - 0.5


def footprint(kind: str, size: tuple[int, int]) -> np.ndarray:
    """Boolean footprint mask of an ``"fc"`` (squares) or ``"tc"`` (discs) map."""
    comp, x, y = atlas_grid(size)
    inside = comp >= 0
    if kind == "tc":
        inside &= x * x + y * y <= 1.0
    elif kind != "fc":
        raise ValueError(f"kind must be 'fc' or 'tc', got {kind!r}")
    return inside


def grid_description(kind: str, size: tuple[int, int]) -> dict:
    """JSON-serialisable description stored next to every map."""
    return {"kind": kind, "rows": int(size[0]), "cols": int(size[1]), "pad": PAD, "gap": GAP,
            "convention": "left knee; columns medial -> lateral, rows anterior -> posterior; mm; NaN outside",
            "coordinates": "FC: x = phi / PHI_MAX, y = (theta - THETA_MID) / THETA_HALF; "
                           "TC: x = (u - cu) / su, y = (b - cb) / sb (see pipeline/thickness/grid.py)",
            "phi_max_deg": float(np.rad2deg(PHI_MAX)), "theta_mid_deg": float(np.rad2deg(THETA_MID)),
            "theta_half_deg": float(np.rad2deg(THETA_HALF))}

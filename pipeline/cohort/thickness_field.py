"""Smooth, subject-specific cartilage thickness fields and the fixed parametric atlas grid.

A field lives on normalised footprint coordinates ``(x, y)`` in ``[-1, 1]``:

* femoral condyle: ``x = phi / PHI_MAX`` (tube angle, -1 medial side of the condyle ... +1 lateral side),
  ``y = (theta - THETA_MID) / THETA_HALF`` (sagittal angle, -1 anterior ... +1 posterior);
  footprint = the whole square;
* tibial plateau: ``x = (u - cu) / su`` (-1 medial rim ... +1 lateral rim), ``y = (b - cb) / sb``
  (-1 anterior ... +1 posterior); footprint = the unit disc.

Thickness (mm) = healthy pattern (base x (1 + smooth random modes) x rim taper) minus the disease loss
(a Gaussian on the load-bearing zone scaled by severity) minus focal defects, clipped at 0.
Because the footprint is defined in normalised coordinates, the atlas grid and its NaN mask are the same
for every knee.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHI_MAX = np.deg2rad(55.0)
THETA_MID = np.deg2rad(25.0)
THETA_HALF = np.deg2rad(80.0)  # theta from -55 deg (anterior-distal) to +105 deg (posterior)


@dataclass(frozen=True)
class ThicknessField:
    """Thickness in mm on normalised footprint coordinates (see module docstring)."""

    base: float  #: healthy mean thickness (mm)
    modes: tuple[tuple[float, float, float, float], ...]  #: (amplitude, fx, fy, phase)
    disc: bool  #: True: footprint is the unit disc (tibia); False: the square (femur)
    load_centre: tuple[float, float]  #: load-bearing zone centre (x, y)
    load_sigma: tuple[float, float] = (0.35, 0.4)
    loss_mm: float = 0.0  #: thinning at the load-bearing centre (mm)
    defects: tuple[tuple[float, float, float, float], ...] = field(default=())  #: (x, y, radius, depth_mm)
    rim: float = 0.45  #: relative thinning at the footprint rim

    def inside(self, x, y):
        if self.disc:
            return x * x + y * y <= 1.0
        return (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)

    def healthy(self, x, y):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mod = np.ones_like(x)
        for amp, fx, fy, ph in self.modes:
            mod = mod + amp * np.cos(np.pi * (fx * x + fy * y) + ph)
        r2 = x * x + y * y if self.disc else np.maximum(np.abs(x), np.abs(y)) ** 2
        taper = 1.0 - self.rim * np.clip(r2, 0.0, 1.0) ** 2
        return self.base * mod * taper

    def __call__(self, x, y):
        """Thickness (mm) at ``(x, y)``; NaN outside the footprint."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        t = self.healthy(x, y)
        cx, cy = self.load_centre
        g = np.exp(-0.5 * (((x - cx) / self.load_sigma[0]) ** 2 + ((y - cy) / self.load_sigma[1]) ** 2))
        t = t - self.loss_mm * g
        for dx, dy, rad, depth in self.defects:
            t = t - depth * np.exp(-0.5 * ((x - dx) ** 2 + (y - dy) ** 2) / rad**2)
        t = np.clip(t, 0.0, None)
        return np.where(self.inside(x, y), t, np.nan)

    def with_disease(self, loss_mm: float, defects=()) -> ThicknessField:
        return ThicknessField(self.base, self.modes, self.disc, self.load_centre, self.load_sigma,
                              float(loss_mm), tuple(defects), self.rim)


def sample_modes(rng: np.random.Generator, n: int = 5, amp: float = 0.07) -> tuple:
    """Low-frequency cosine modes of a smooth random field (relative amplitude ``amp``)."""
    modes = []
    for _ in range(n):
        modes.append((float(rng.normal(0.0, amp)), float(rng.uniform(-1.2, 1.2)), float(rng.uniform(-1.2, 1.2)),
                      float(rng.uniform(0, 2 * np.pi))))
    return tuple(modes)


def atlas_grid(size: tuple[int, int], pad: float = 0.04, gap: float = 0.06):
    """The fixed 2D atlas grid shared by every knee, for a ``(rows, cols)`` map.

    Returns ``(compartment, x, y)`` arrays of shape ``size``: compartment 0 = medial condyle / plateau
    (left half of the map, left-knee convention: medial on the left), 1 = lateral, -1 = outside (padding
    and the central gap, e.g. the intercondylar notch). ``x, y`` are the normalised footprint coordinates
    of each cell centre (rows run anterior -> posterior, columns medial -> lateral).
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


def render_map(fields: tuple[ThicknessField, ThicknessField], size: tuple[int, int]) -> np.ndarray:
    """Render (medial, lateral) fields onto the atlas grid: float32 mm, NaN outside the footprint."""
    comp, x, y = atlas_grid(size)
    out = np.full(comp.shape, np.nan, dtype=np.float64)
    for k in (0, 1):
        sel = comp == k
        out[sel] = fields[k](x[sel], y[sel])
    return out.astype(np.float32)

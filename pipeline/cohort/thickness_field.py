"""Smooth, subject-specific cartilage thickness fields on the atlas grid's normalised coordinates.

A field lives on the normalised footprint coordinates ``(x, y)`` of :mod:`pipeline.thickness.grid`
(femoral condyle: square footprint; tibial plateau: unit disc).

Thickness (mm) = healthy pattern (base x (1 + smooth random modes) x rim taper) minus the disease loss
(a Gaussian on the load-bearing zone scaled by severity) minus focal defects, clipped at 0.
Because the footprint is defined in normalised coordinates, the atlas grid and its NaN mask are the same
for every knee.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.thickness.grid import atlas_grid


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


def sample_modes(rng: np.random.Generator, n: int = 5, amp: float = 0.04) -> tuple:
    """Low-frequency cosine modes of a smooth random field (relative amplitude ``amp``)."""
    modes = []
    for _ in range(n):
        modes.append((float(rng.normal(0.0, amp)), float(rng.uniform(-1.2, 1.2)), float(rng.uniform(-1.2, 1.2)),
                      float(rng.uniform(0, 2 * np.pi))))
    return tuple(modes)


def render_map(fields: tuple[ThicknessField, ThicknessField], size: tuple[int, int]) -> np.ndarray:
    """Render (medial, lateral) fields onto the atlas grid: float32 mm, NaN outside the footprint."""
    comp, x, y = atlas_grid(size)
    out = np.full(comp.shape, np.nan, dtype=np.float64)
    for k in (0, 1):
        sel = comp == k
        out[sel] = fields[k](x[sel], y[sel])
    return out.astype(np.float32)

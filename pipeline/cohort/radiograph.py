"""Bilateral PA knee radiograph: the projection of the 3D anatomy (the DXA-like image is in :mod:`.dxa`).

The beam runs along the anatomical AP axis (v). The line integral at each detector pixel is computed
exactly from the bone solids (:meth:`KneeVisit.chords`) and the soft-tissue envelope (Beer-Lambert,
linear attenuation coefficients at ~60 keV). Cartilage, fluid and muscle attenuate like water, so the only
radiographic trace of cartilage is the joint space between the bones it holds apart.

Image layout: the patient's right knee is on the image's LEFT (PA view, standard display); columns run
towards the patient's left (+X), rows towards the feet (-Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import KneeVisit

# Linear attenuation (1/mm) at ~60 keV.
MU_SOFT = 0.0206
MU_TRABECULAR = 0.032
MU_CORTICAL = 0.060


@dataclass(frozen=True)
class KneePlacement:
    """Where a knee sits in the radiograph: world centre (mm), side, leg rotation (rad)."""

    side: str
    centre: tuple[float, float]  #: (X, Z) of the knee-frame origin in mm
    angle: float  #: coronal rotation of the leg about the AP axis (rad)

    @property
    def sign(self) -> float:
        return 1.0 if self.side == "L" else -1.0

    def to_knee(self, X, Z):
        """World (X, Z) mm -> knee frame (u, w) mm."""
        up = self.sign * (X - self.centre[0])
        wp = Z - self.centre[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        return c * up + s * wp, -s * up + c * wp

    def to_world(self, u, w):
        c, s = np.cos(self.angle), np.sin(self.angle)
        up, wp = c * u - s * w, s * u + c * w
        return self.centre[0] + self.sign * up, self.centre[1] + wp


@dataclass(frozen=True)
class DetectorGeometry:
    """Pixel grid: column c -> X = x0 + c * spacing, row r -> Z = z0 - r * spacing (pixel centres)."""

    spacing: float
    width_mm: float = 330.0
    height_mm: float = 260.0

    @property
    def shape(self) -> tuple[int, int]:
        return int(round(self.height_mm / self.spacing)), int(round(self.width_mm / self.spacing))

    @property
    def x0(self) -> float:
        return -self.width_mm / 2.0 + self.spacing / 2.0

    @property
    def z0(self) -> float:
        return self.height_mm / 2.0 - self.spacing / 2.0

    def world_to_pixel(self, X, Z):
        return (np.asarray(X) - self.x0) / self.spacing, (self.z0 - np.asarray(Z)) / self.spacing


def knee_detector_points(knees: list[tuple[KneeVisit, KneePlacement]], geom: DetectorGeometry):
    """Per knee ``(kv, cols, u, w)``: the detector columns of its half of the detector (within a quarter
    detector width of its centre) and the knee-frame coordinates ``(u, w)`` (mm, ``rows x len(cols)``) of those
    pixel centres. The one place that decides which pixels a knee is projected onto (attenuation and labels)."""
    H, W = geom.shape
    X = geom.x0 + np.arange(W) * geom.spacing
    Z = geom.z0 - np.arange(H) * geom.spacing
    for kv, place in knees:
        cols = np.nonzero(np.abs(X - place.centre[0]) < 0.25 * geom.width_mm)[0]
        if cols.size == 0:
            continue
        XX, ZZ = np.meshgrid(X[cols], Z, indexing="xy")
        u, w = place.to_knee(XX, ZZ)
        yield kv, cols, u, w


def line_integrals(knees: list[tuple[KneeVisit, KneePlacement]], geom: DetectorGeometry,
                   bone_only: bool = False) -> np.ndarray:
    """Attenuation line integral ``sum(mu * length)`` per pixel (dimensionless), shape ``geom.shape``."""
    P = np.zeros(geom.shape)
    for kv, cols, u, w in knee_detector_points(knees, geom):
        acc = np.zeros(u.shape)
        if not bone_only:
            acc += MU_SOFT * kv.envelope_length(u, w)
        for bone in ("femur", "tibia", "fibula", "patella"):
            total, cort = kv.chords(u, w, bone)
            acc += (MU_TRABECULAR - MU_SOFT) * (total - cort) + (MU_CORTICAL - MU_SOFT) * cort
        P[:, cols] += acc
    return P


def expose(P: np.ndarray, spacing: float, rng: np.random.Generator, photons: float = 6000.0,
           scatter: float = 0.25, blur_mm: float = 0.2) -> np.ndarray:
    """Detector model: primary fluence, focal-spot/detector blur, scatter, quantum noise, log transform.

    ``photons`` is the unattenuated count per pixel at 0.3 mm (scaled with pixel area). Returns the
    measured line integral ``-ln(N / N0)``.
    """
    n0 = photons * (spacing / 0.3) ** 2
    prim = n0 * np.exp(-P)
    if blur_mm > 0:
        prim = ndimage.gaussian_filter(prim, blur_mm / spacing)
    # scatter: a broad (sigma 12 mm) blur of the primary, computed on an 8x decimated grid
    step = max(1, int(4.0 / spacing))
    small = ndimage.gaussian_filter(prim[::step, ::step], 12.0 / (spacing * step), mode="nearest")
    sc = scatter * ndimage.zoom(small, (prim.shape[0] / small.shape[0], prim.shape[1] / small.shape[1]), order=1,
                                mode="nearest", grid_mode=True)[: prim.shape[0], : prim.shape[1]]
    n = prim + sc
    n = n + np.sqrt(n) * rng.standard_normal(n.shape)
    return -np.log(np.clip(n, 1.0, None) / (n0 * (1.0 + scatter)))


def to_detector_values(measured: np.ndarray, bits_stored: int = 12) -> np.ndarray:
    """Map measured line integrals to raw for-presentation values (bone bright), integer in range."""
    top = 2**bits_stored - 1
    v = 0.04 * top + measured * (0.9 * top / 3.6)
    return np.clip(np.round(v), 0, top).astype(np.uint16)

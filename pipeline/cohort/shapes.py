"""Solid primitives of the synthetic knee, each with two exact views of the same shape.

Every primitive lives in a bone frame ``(u, v, w)`` in millimetres (u lateral, v posterior, w superior,
left-knee convention) and offers

* ``sdf(u, v, w)``: a signed distance (negative inside). Its sign is exact; its magnitude is exact for
  the torus and the half-space and a smooth approximation for ellipses. It drives the voxel labels and
  the partial-volume fractions of the MR volume.
* ``intervals(u, w)``: the exact set ``{v : (u, v, w) inside}`` as up to two intervals ``(lo, hi)``
  along the v axis (the X-ray beam of a PA radiograph runs along v). Empty intervals are ``(inf, inf)``.
  The radiograph's line integrals are lengths of unions of these intervals, so the radiograph is the
  exact projection of the same solids that the MR volume samples.
* ``shrunk(c)``: the primitive shrunk by ``c`` mm (used for the cortical shell: cortex = solid minus
  shrunk solid). Flat w cuts are seams between primitives of one bone and do not move.

Bone poses are rotations about the v axis, so the beam direction is preserved and ``intervals`` stays
exact after posing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

INF = np.float32(np.inf)


def _empty_like(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.full_like(x, INF), np.full_like(x, INF)


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid: centre ``c`` (mm) and semi-axes ``a`` (mm), both ``(u, v, w)``,
    optionally cut to ``wmin < w < wmax`` (a half-ellipsoid makes a smooth metaphyseal flare)."""

    c: tuple[float, float, float]
    a: tuple[float, float, float]
    wmin: float = -np.inf
    wmax: float = np.inf

    def sdf(self, u, v, w):
        # Bound-corrected ellipsoid distance (exact on the surface, good near it).
        pu, pv, pw = (u - self.c[0]), (v - self.c[1]), (w - self.c[2])
        k0 = np.sqrt((pu / self.a[0]) ** 2 + (pv / self.a[1]) ** 2 + (pw / self.a[2]) ** 2)
        k1 = np.sqrt((pu / self.a[0] ** 2) ** 2 + (pv / self.a[1] ** 2) ** 2 + (pw / self.a[2] ** 2) ** 2)
        d = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
        if np.isfinite(self.wmin):
            d = np.maximum(d, self.wmin - w)
        if np.isfinite(self.wmax):
            d = np.maximum(d, w - self.wmax)
        return d

    def intervals(self, u, w):
        q = 1.0 - ((u - self.c[0]) / self.a[0]) ** 2 - ((w - self.c[2]) / self.a[2]) ** 2
        half = self.a[1] * np.sqrt(np.clip(q, 0.0, None))
        ok = (q > 0) & (w > self.wmin) & (w < self.wmax)
        lo = np.where(ok, self.c[1] - half, INF)
        hi = np.where(ok, self.c[1] + half, INF)
        return [(lo, hi)]

    def shrunk(self, c: float) -> Ellipsoid:
        # w cuts are seams with neighbouring primitives, not bone surfaces: they do not move.
        return replace(self, a=tuple(max(x - c, 0.5) for x in self.a))

    def bbox(self):
        b = [(self.c[i] - self.a[i], self.c[i] + self.a[i]) for i in range(3)]
        b[2] = (max(b[2][0], self.wmin), min(b[2][1], self.wmax))
        return tuple(b)


@dataclass(frozen=True)
class ZCylinder:
    """Elliptic cylinder along w, optionally capped on top by the plane ``w < top + slope * v``.

    ``c = (cu, cv)`` centre, ``a = (au, av)`` semi-axes (mm), ``w0 < w < w1`` extent (mm).
    """

    c: tuple[float, float]
    a: tuple[float, float]
    w0: float
    w1: float
    top: Optional[float] = None
    slope: float = 0.0

    def _radial(self, u, v):
        pu, pv = (u - self.c[0]) / self.a[0], (v - self.c[1]) / self.a[1]
        return (np.sqrt(pu * pu + pv * pv) - 1.0) * min(self.a)

    def sdf(self, u, v, w):
        d = np.maximum(self._radial(u, v), np.maximum(self.w0 - w, w - self.w1))
        if self.top is not None:
            d = np.maximum(d, (w - self.top - self.slope * v) / np.sqrt(1.0 + self.slope**2))
        return d

    def intervals(self, u, w):
        q = 1.0 - ((u - self.c[0]) / self.a[0]) ** 2
        half = self.a[1] * np.sqrt(np.clip(q, 0.0, None))
        lo = self.c[1] - half
        hi = self.c[1] + half
        ok = (q > 0) & (w > self.w0) & (w < self.w1)
        if self.top is not None:
            if self.slope > 0:  # w < top + slope*v  <=>  v > (w - top) / slope
                lo = np.maximum(lo, (w - self.top) / self.slope)
            elif self.slope < 0:
                hi = np.minimum(hi, (w - self.top) / self.slope)
            else:
                ok &= w < self.top
        ok &= hi > lo
        return [(np.where(ok, lo, INF), np.where(ok, hi, INF))]

    def shrunk(self, c: float) -> ZCylinder:
        top = None if self.top is None else self.top - c * np.sqrt(1.0 + self.slope**2)
        # w0 / w1 are seams with neighbouring primitives; the top plane is a bone surface and moves.
        return replace(self, a=tuple(max(x - c, 0.5) for x in self.a), top=top)

    def bbox(self):
        return ((self.c[0] - self.a[0], self.c[0] + self.a[0]), (self.c[1] - self.a[1], self.c[1] + self.a[1]),
                (self.w0, self.w1 if self.top is None else min(self.w1, self.top + abs(self.slope) * self.a[1]
                                                                 + abs(self.slope * self.c[1]))))


@dataclass(frozen=True)
class SpindleTorus:
    """Femoral condyle: all points within ``r`` mm of a circle of radius ``ra`` mm (``ra < r``).

    The circle lies in the sagittal plane ``u = c[0]`` centred at ``(c[1], c[2])``. The sagittal
    profile of the condyle has radius ``ra + r``; its coronal profile is a circle of radius ``r``.
    The distance to the surface, ``dist(p, circle) - r``, is exact, so a cartilage layer of thickness
    ``t`` is the shell ``r <= dist < r + t`` and ``t`` is its thickness along the surface normal.
    """

    c: tuple[float, float, float]
    ra: float
    r: float

    def polar(self, u, v, w):
        """Return ``(d, theta, phi)``: distance to the circle (mm), sagittal angle from the inferior
        direction towards posterior (rad), tube angle from the outward sagittal direction towards +u (rad)."""
        pu, pv, pw = (u - self.c[0]), (v - self.c[1]), (w - self.c[2])
        rho = np.sqrt(pv * pv + pw * pw)
        d = np.sqrt((rho - self.ra) ** 2 + pu * pu)
        theta = np.arctan2(pv, -pw)
        phi = np.arctan2(pu, rho - self.ra)
        return d, theta, phi

    def surface_point(self, theta, phi, offset: float = 0.0):
        """Point at ``offset`` mm outside the surface in direction ``(theta, phi)``; returns (u, v, w)."""
        rr = self.r + offset
        radial = self.ra + rr * np.cos(phi)
        return (self.c[0] + rr * np.sin(phi), self.c[1] + radial * np.sin(theta), self.c[2] - radial * np.cos(theta))

    def sdf(self, u, v, w):
        return self.polar(u, v, w)[0] - self.r

    def intervals(self, u, w):
        h2 = self.r**2 - (u - self.c[0]) ** 2
        h = np.sqrt(np.clip(h2, 0.0, None))
        dz2 = (w - self.c[2]) ** 2
        outer2 = (self.ra + h) ** 2 - dz2
        inner_r = self.ra - h
        inner2 = np.where(inner_r > 0, inner_r**2 - dz2, -1.0)
        a = np.sqrt(np.clip(outer2, 0.0, None))
        b = np.sqrt(np.clip(inner2, 0.0, None))
        ok = (h2 > 0) & (outer2 > 0)
        hole = ok & (inner2 > 0)
        lo1 = np.where(ok, self.c[1] - a, INF)
        hi1 = np.where(ok, np.where(hole, self.c[1] - b, self.c[1] + a), INF)
        lo2 = np.where(hole, self.c[1] + b, INF)
        hi2 = np.where(hole, self.c[1] + a, INF)
        return [(lo1, hi1), (lo2, hi2)]

    def shrunk(self, c: float) -> SpindleTorus:
        return replace(self, r=max(self.r - c, 0.5))

    def bbox(self):
        R = self.ra + self.r
        return ((self.c[0] - self.r, self.c[0] + self.r), (self.c[1] - R, self.c[1] + R), (self.c[2] - R, self.c[2] + R))


def union_length(intervals: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Length (mm) of the union of intervals, elementwise. Empty intervals are ``(inf, inf)``."""
    shape = np.broadcast_shapes(*[np.shape(i[0]) for i in intervals])
    lo = np.stack([np.broadcast_to(i[0], shape).ravel() for i in intervals])
    hi = np.stack([np.broadcast_to(i[1], shape).ravel() for i in intervals])
    total = np.zeros(lo.shape[1], dtype=np.float64)
    finite = np.isfinite(lo)
    cols = np.nonzero(finite.any(axis=0))[0]
    rows = np.nonzero(finite[:, cols].any(axis=1))[0] if cols.size else cols
    if cols.size == 0:
        return total.reshape(shape)
    lo, hi = lo[np.ix_(rows, cols)], hi[np.ix_(rows, cols)]
    if lo.shape[0] > 1:
        order = np.argsort(lo, axis=0)
        lo = np.take_along_axis(lo, order, axis=0)
        hi = np.take_along_axis(hi, order, axis=0)
    acc = np.zeros(lo.shape[1], dtype=np.float64)
    cur_lo, cur_hi = lo[0].astype(np.float64), hi[0].astype(np.float64)
    for k in range(1, lo.shape[0]):
        nxt_lo, nxt_hi = lo[k], hi[k]
        valid = np.isfinite(nxt_lo)
        gap = valid & (nxt_lo > cur_hi)
        acc += np.where(gap, cur_hi - cur_lo, 0.0)
        cur_lo = np.where(gap, nxt_lo, cur_lo)
        cur_hi = np.where(gap, nxt_hi, np.where(valid, np.maximum(cur_hi, nxt_hi), cur_hi))
    acc += np.where(np.isfinite(cur_lo), cur_hi - cur_lo, 0.0)
    total[cols] = acc
    return total.reshape(shape)


@dataclass(frozen=True)
class Pose:
    """Rigid pose in the (u, w) plane: rotation ``beta`` (rad) about the v axis, then translation (mm).

    ``to_local`` maps knee-frame points into the bone frame; ``to_knee`` maps bone-frame points out.
    """

    beta: float = 0.0
    t: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_local(self, u, v, w):
        cb, sb = np.cos(self.beta), np.sin(self.beta)
        du, dw = u - self.t[0], w - self.t[2]
        return cb * du + sb * dw, v - self.t[1], -sb * du + cb * dw

    def to_knee(self, u, v, w):
        cb, sb = np.cos(self.beta), np.sin(self.beta)
        return cb * u - sb * w + self.t[0], v + self.t[1], sb * u + cb * w + self.t[2]

"""Analytic test shapes (binary masks) with known thickness in mm.

Every function voxelises by the voxel CENTRE: voxel ``(i, j, k)`` sits at ``(i * s_i, j * s_j, k * s_k)`` mm
and is inside when its centre satisfies the shape's inequality. Axis order ``(i, j, k)``, spacing in mm.
The benchmark's knee-like phantom also returns the analytic thickness so errors can be measured.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ._common import check_spacing


def voxel_centres(shape: Sequence[int], spacing: Sequence[float]) -> Tuple[np.ndarray, ...]:
    """Open (broadcastable) grids of voxel-centre coordinates in mm along ``i``, ``j``, ``k``."""
    sp = check_spacing(spacing)
    return tuple(np.arange(n, dtype=np.float64).reshape([-1 if a == ax else 1 for a in range(3)]) * sp[ax]
                 for ax, n in enumerate(shape))


def _centre_mm(shape: Sequence[int], spacing: Sequence[float], centre: Optional[Sequence[float]]) -> np.ndarray:
    if centre is not None:
        return np.asarray(centre, dtype=np.float64)
    return (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * check_spacing(spacing)


def oblique_plate(shape: Sequence[int], spacing: Sequence[float], normal: Sequence[float], thickness_mm: float,
                  centre: Optional[Sequence[float]] = None) -> np.ndarray:
    """Slab ``|(x - centre) . n| <= thickness_mm / 2`` (``n`` normalised); centre defaults to the volume centre."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    c = _centre_mm(shape, spacing, centre)
    x = voxel_centres(shape, spacing)
    signed = sum((x[a] - c[a]) * n[a] for a in range(3))
    return np.abs(signed) <= thickness_mm / 2.0


def cylindrical_shell(shape: Sequence[int], spacing: Sequence[float], axis: int, r_inner: float, r_outer: float,
                      centre: Optional[Sequence[float]] = None) -> np.ndarray:
    """Shell ``r_inner <= rho <= r_outer`` (mm) around a cylinder axis parallel to array ``axis``.

    Its thickness is ``r_outer - r_inner`` everywhere; the shell runs through the whole volume along ``axis``.
    """
    c = _centre_mm(shape, spacing, centre)
    x = voxel_centres(shape, spacing)
    rho2 = sum((x[a] - c[a]) ** 2 for a in range(3) if a != axis)
    rho2 = np.broadcast_to(rho2, tuple(shape))
    return (rho2 >= r_inner**2) & (rho2 <= r_outer**2)


def spherical_shell(shape: Sequence[int], spacing: Sequence[float], r_inner: float, r_outer: float,
                    centre: Optional[Sequence[float]] = None) -> np.ndarray:
    """Shell ``r_inner <= |x - centre| <= r_outer`` (mm); thickness ``r_outer - r_inner``."""
    c = _centre_mm(shape, spacing, centre)
    x = voxel_centres(shape, spacing)
    r2 = sum((x[a] - c[a]) ** 2 for a in range(3))
    return (r2 >= r_inner**2) & (r2 <= r_outer**2)


def knee_like_phantom(shape: Sequence[int] = (200, 200, 160), spacing: Sequence[float] = (0.5, 0.5, 0.7),
                      fc_radius: float = 22.0, fc_thickness: float = 2.5,
                      tc_thickness: float = 2.0) -> Tuple[np.ndarray, float, float]:
    """Synthetic femoral + tibial cartilage in one label volume (labels 2 = FC, 4 = TC; 0 elsewhere).

    * FC: a cylindrical shell (axis along ``k``, the medial-lateral / slice axis) of inner radius
      ``fc_radius`` mm and thickness ``fc_thickness`` mm, kept over a 200-degree arc facing ``+i``/``+j``
      and over the central 70 % of ``k``: a curved condyle-like layer.
    * TC: a flat plate ``tc_thickness`` mm thick, perpendicular to ``j``, 8 mm below the FC arc, covering a
      50 x 70 % footprint in ``(i, k)``.

    Returns ``(labels, fc_thickness, tc_thickness)``: the analytic thickness (mm) of every FC voxel is
    ``fc_thickness`` and of every TC voxel ``tc_thickness`` (the cut rims of both layers excepted).
    """
    sp = check_spacing(spacing)
    shape = tuple(int(n) for n in shape)
    x = voxel_centres(shape, sp)
    ext = (np.asarray(shape) - 1) * sp
    ci, cj = ext[0] / 2.0, ext[1] * 0.45
    di, dj = x[0] - ci, x[1] - cj
    rho = np.sqrt(di**2 + dj**2)
    angle = np.degrees(np.arctan2(dj, di))  # 0 deg along +i, 90 deg along +j
    k_ok = (x[2] >= 0.15 * ext[2]) & (x[2] <= 0.85 * ext[2])
    fc = (rho >= fc_radius) & (rho <= fc_radius + fc_thickness) & (angle >= -10.0) & (angle <= 190.0) & k_ok
    top = cj + fc_radius + fc_thickness + 8.0  # tibial plate below the condyle (+j)
    tc = ((x[1] >= top) & (x[1] <= top + tc_thickness) & (np.abs(x[0] - ci) <= 0.25 * ext[0])
          & (x[2] >= 0.15 * ext[2]) & (x[2] <= 0.85 * ext[2]))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.broadcast_to(fc, shape)] = 2
    labels[np.broadcast_to(tc, shape)] = 4
    return labels, float(fc_thickness), float(tc_thickness)

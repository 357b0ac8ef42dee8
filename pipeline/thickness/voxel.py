"""Voxel local thickness (mm) of a 3D cartilage mask with anisotropic spacing.

Method (see ``docs/thickness.md``)
----------------------------------
1. Distance: ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)`` (feature transform only;
   the distance is evaluated at cartilage voxels, which is much cheaper) gives the inside-positive
   Euclidean distance ``d(x)`` (mm) from each cartilage voxel centre to the nearest background voxel centre.
2. Ridge: Hildebrand & Ruegsegger's criterion keeps the voxels whose ball ``{y : |y - x| < d(x)}`` is not
   contained in the ball of a 26-neighbour (``d(y) >= d(x) + |y - x|``). Every cartilage voxel lies in the
   ball of at least one ridge voxel, and every such ball holds cartilage voxels only.
3. Seed value at a ridge voxel ``r`` (full thickness, mm, half-voxel corrected): along each of the 13
   lattice lines through ``r`` the distance is a tent across the layer; from ``d(r)`` and its two line
   neighbours ``lo <= hi <= d(r)`` the tent peak is ``P = d(r) + (hi - lo) / 2`` (``d(r)`` when the
   mid-plane passes through ``r``, half a step more when it passes between ``r`` and a neighbour, so
   even and odd layer widths come out alike). ``P`` is taken on the line with the steepest tent slope
   (the one best aligned with the layer normal); ``2 P`` is then the centre-to-centre distance between
   the background voxels on both sides. The true boundary lies half a voxel before each background centre,
   hence ``T(r) = 2 P - 2 h(n)`` with ``h(n)`` half the voxel extent along the normal ``n`` (``s_a / 2`` for a
   surface facing axis ``a``), ``n`` taken as the direction of the chosen line. A plate of ``n``
   voxels along an axis of spacing ``s`` thus measures exactly ``n * s``.
4. Propagation: every cartilage voxel gets the maximum seed value over the ridge balls covering it,
   painted ball by ball (grouped by radius, ``numpy.maximum.at``), i.e. the local thickness is the (corrected)
   diameter of the largest inscribed ball containing the voxel.

Only distances enter the seeds (never a normal sign, never the EDT's choice among equidistant background
voxels), so flipping or transposing the mask (and the spacing with it) flips or transposes the result
exactly. The volume border is not a cartilage surface: a layer cut by the field of view is assumed to
continue beyond it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from ._common import DEFAULT_THRESHOLD, as_binary_mask, bbox_crop, check_spacing

__all__ = ["local_thickness", "half_voxel_extent"]

# 26-neighbourhood offsets in index units, shape (26, 3).
_OFFSETS = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
                     if (a, b, c) != (0, 0, 0)], dtype=np.int64)


def half_voxel_extent(u: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Half the voxel extent (mm) along unit directions ``u`` (shape ``(3, N)``): the boundary offset.

    ``h(u) = 0.5 / sqrt(sum_a (u_a / s_a)^2)``: the half distance between neighbouring lattice planes
    perpendicular to ``u`` for the ellipsoidal voxel metric. It equals ``s_a / 2`` when ``u`` is axis ``a``
    (0.18 mm across a 0.36 mm axis, 0.35 mm across the 0.7 mm slice axis) and blends smoothly between
    axes for oblique surfaces.
    """
    sp = np.asarray(spacing, dtype=np.float64).reshape(3, 1)
    return 0.5 / np.sqrt(np.sum((u / sp) ** 2, axis=0))


@lru_cache(maxsize=512)
def _ball_offsets(radius: float, spacing: Tuple[float, float, float]) -> np.ndarray:
    """Integer offsets ``(M, 3)`` of the lattice points strictly closer than ``radius`` mm to the centre."""
    sp = np.asarray(spacing)
    n = np.floor(radius / sp).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij")
    off = np.stack([g.ravel() for g in grids], axis=1)
    r2 = np.sum((off * sp) ** 2, axis=1)
    return off[r2 < radius * radius * (1.0 - 1e-9)]


# The 13 lattice line directions through a voxel (one of each +/- pair), shape (13, 3).
_LINES = _OFFSETS[:13]


def _seed_values(base: np.ndarray, d_pad: np.ndarray, sp: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """Corrected full thickness (mm) at ridge voxels with flat indices ``base`` into the padded ``d_pad``.

    Along each of the 13 lattice lines through ``r`` the distance is a tent ``P - k |t - t0|`` across a
    layer; from the three samples ``lo <= hi`` (the two neighbours) and ``f0 = d(r) >= hi`` its peak is
    ``P = f0 + (hi - lo) / 2`` (exact when the mid-plane lies within one step; ``hi`` if ``f0 < hi``).
    ``P`` never exceeds half the centre-to-centre width ``W`` between the background voxels on both
    sides, and reaches it on the line best aligned with the layer normal, so ``W = 2 max_lines P``. The
    thickness is ``W - 2 h(n)`` with ``n`` the direction of the chosen line. Only
    distances enter, so the result does not depend on orientation or on EDT tie-breaking.
    """
    f0 = d_pad[base]
    peak = f0.copy()
    best = np.full(base.size, -1.0)  # tent slope of the line chosen so far
    normal = np.zeros((3, base.size))  # unit direction of the chosen line; (0, 0, 0) until one is chosen
    for delta in _LINES:
        o = int(delta @ strides)
        fm = d_pad[base - o]
        fp = d_pad[base + o]
        lo = np.fmin(fm, fp)  # NaN = outside the array: ignored
        hi = np.fmax(fm, fp)
        valid = ~(np.isnan(fm) | np.isnan(fp)) & (f0 >= hi)
        step = delta * sp
        length = float(np.sqrt(np.sum(step**2)))
        k = np.where(valid, (f0 - lo) / length, -1.0)
        p = f0 + 0.5 * (hi - lo)
        take = valid & ((k > best + 1e-9) | ((k > best - 1e-9) & (p > peak)))
        best = np.where(take, k, best)
        peak = np.where(take, p, peak)
        normal[:, take] = (np.abs(step) / length)[:, None]
    none = ~normal.any(axis=0)
    normal[:, none] = 1.0 / np.sqrt(3.0)
    return 2.0 * peak - 2.0 * half_voxel_extent(normal, sp)


def _thickness_in_crop(sub: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Local thickness (mm, float32, 0 outside) of a non-empty boolean crop ``sub``."""
    ft = ndi.distance_transform_edt(sub, sampling=sp, return_distances=False, return_indices=True)
    coords = np.nonzero(sub)  # tuple of 3 index arrays, N cartilage voxels
    vec = np.stack([(coords[a] - ft[a][coords]) * sp[a] for a in range(3)])  # (3, N) mm, b -> x
    del ft
    dist = np.sqrt(np.sum(vec * vec, axis=0))  # (N,) mm, > 0

    # Padded geometry: room for neighbour look-ups and for balls that cross the array border.
    pad = np.maximum(np.ceil(dist.max() / sp).astype(np.int64), 1)
    pshape = tuple(int(n + 2 * p) for n, p in zip(sub.shape, pad))
    flat = np.ravel_multi_index(tuple(coords[a] + pad[a] for a in range(3)), pshape)
    strides = np.array([pshape[1] * pshape[2], pshape[2], 1], dtype=np.int64)
    d_pad = np.full(int(np.prod(pshape)), np.nan)  # NaN beyond the array border, 0 at background
    d_pad.reshape(pshape)[tuple(slice(p, p + n) for p, n in zip(pad, sub.shape))] = 0.0
    d_pad[flat] = dist

    # Ridge (ball not inside a neighbour's ball).
    off_flat = _OFFSETS @ strides
    off_len = np.sqrt(np.sum((_OFFSETS * sp) ** 2, axis=1))
    covered = np.zeros(dist.size, dtype=bool)
    for o, length in zip(off_flat, off_len):
        covered |= d_pad[flat + o] >= dist + length - 1e-9
    ridge = np.flatnonzero(~covered)

    # Seed values with the half-voxel correction.
    seed = _seed_values(flat[ridge], d_pad, sp, strides)

    # Propagation: max over covering ridge balls, grouped by radius.
    out = np.zeros(d_pad.size, dtype=np.float64)
    radii, group = np.unique(dist[ridge], return_inverse=True)
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(radii.size + 1))
    sp_key = tuple(float(s) for s in sp)
    offsets_cache: Dict[float, np.ndarray] = {}
    for g, radius in enumerate(radii):
        members = order[bounds[g]:bounds[g + 1]]
        key = float(radius)
        if key not in offsets_cache:
            offsets_cache[key] = _ball_offsets(key, sp_key) @ strides
        ball = offsets_cache[key]
        idx = (flat[ridge[members]][:, None] + ball[None, :]).ravel()
        np.maximum.at(out, idx, np.repeat(seed[members], ball.size))

    result = np.zeros(sub.shape, dtype=np.float32)
    result[coords] = out[flat]
    return result


def local_thickness(mask: np.ndarray, spacing: Sequence[float], *, threshold: float = DEFAULT_THRESHOLD,
                    outside: float = np.nan) -> np.ndarray:
    """Local full thickness (mm) at every voxel of a 3D cartilage mask.

    Parameters
    ----------
    mask:
        3D array, axis order ``(i, j, k)``: boolean, integer (non-zero = cartilage) or floating
        probabilities (``p >= threshold`` = cartilage). Pass one label at a time (``labels == 2``).
    spacing:
        Voxel size ``(s_i, s_j, s_k)`` in mm, e.g. ``(0.3646, 0.3646, 0.7)``; anisotropy is handled.
    threshold:
        Probability threshold for floating inputs (default 0.5).
    outside:
        Value written at non-cartilage voxels (default NaN; pass 0.0 for a zero background).

    Returns
    -------
    np.ndarray
        float32, same shape as ``mask``: at each cartilage voxel the diameter (mm) of the largest inscribed
        ball containing it, corrected by half a voxel at each surface (a plate of ``n`` voxels along an axis
        of spacing ``s`` gives ``n * s``); ``outside`` elsewhere. An empty mask gives all ``outside``;
        a mask without any background voxel raises ``ValueError``. The volume border is not treated as
        a surface (a layer cut by the field of view is assumed to continue).
    """
    m = as_binary_mask(mask, threshold)
    sp = check_spacing(spacing)
    out = np.full(m.shape, outside, dtype=np.float32)
    if not m.any():
        return out
    if m.all():
        raise ValueError("mask has no background voxel: thickness is undefined")
    crop = bbox_crop(m, margin=1)
    sub = np.ascontiguousarray(m[crop])
    thick = _thickness_in_crop(sub, sp)
    region = out[crop]
    region[sub] = thick[sub]
    return out

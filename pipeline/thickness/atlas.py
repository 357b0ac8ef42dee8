"""DESS label map -> FC / TC thickness maps on the fixed atlas grid (:mod:`pipeline.thickness.grid`).

Steps (thickness is measured in native voxel space BEFORE any mapping, then transferred):

1. **Canonical orientation**: the label volume is reoriented (from its affine) to sagittal PIR
   (i posterior, j inferior, k patient's right) and right knees are flipped along k, so k points
   medially for every knee (left-knee convention). A knee stored with any DICOM orientation maps to the
   same canonical array.
2. **Clean-up**: cartilage components smaller than 10 % of the largest are dropped (false-positive
   fragments of predicted segmentations).
3. **Alignment from the bone labels** (no intensity registration): cartilage voxels are split into the
   medial and lateral compartment at the largest gap along the medial-lateral axis. For each femoral
   condyle a torus with a medial-lateral axis (a circle in the sagittal plane swept by a coronal circle)
   is fitted by least squares to the bone-cartilage interface; each FC voxel gets its sagittal angle
   ``theta`` and tube angle ``phi`` (its radial projection onto that surface). For each tibial plateau a
   plane is fitted (PCA) to the interface; each TC voxel gets its in-plane coordinates, normalised by the
   centre and semi-axes of the plateau's cartilage footprint.
4. **Flattening** (``method="volume"``, default): the cartilage volume above each cell of the fitted
   bone surface (voxel count x voxel volume, Gaussian-smoothed over ~``smooth_mm`` on the surface with
   normalised convolution inside the footprint) divided by the cell's surface area, solved exactly for the
   curved torus shell (FC) and the flat layer (TC). This is unbiased by voxelisation, unlike per-voxel
   local thickness, which over-reads 2 mm shells by 0.2-0.5 mm at 0.7 mm voxels (``method="local"``
   maps the mean local thickness per cell instead). Cells outside the fixed footprint are NaN; holes
   inside it are interpolated (linear, then nearest). ``coverage`` is the fraction of footprint cells
   within one cell of a cell that received voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage
from scipy.interpolate import griddata
from scipy.optimize import least_squares

from pipeline.conventions import LABEL_FC, LABEL_FEMUR, LABEL_TC, LABEL_TIBIA

from .grid import PHI_MAX, THETA_HALF, THETA_MID, atlas_grid, footprint, xy_to_cell
from .voxel import local_thickness

CANONICAL = ("P", "I", "R")


class FlatteningError(ValueError):
    """The labels do not allow a map (e.g. a compartment without cartilage)."""


def canonicalize(array: np.ndarray, affine: np.ndarray, side: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a 3D array with a RAS ``affine`` (NIfTI convention) to canonical PIR, left-knee convention.

    Returns ``(array, spacing)`` with spacing ``(s_i, s_j, s_k)`` in mm. Right knees (``side="R"``) are
    flipped along k so that k points medially for both sides.
    """
    if side not in ("R", "L"):
        raise ValueError(f"side must be 'R' or 'L', got {side!r}")
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL))
    out = apply_orientation(np.asarray(array), ornt)
    perm = ornt[:, 0].astype(int)
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    sp = [0.0, 0.0, 0.0]
    for src, dst in enumerate(perm):
        sp[dst] = float(spacing[src])
    if side == "R":
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out), (sp[0], sp[1], sp[2])


def _coords(mask: np.ndarray, spacing) -> np.ndarray:
    """Knee-frame-like coordinates (mm) of mask voxels: columns (u lateral, v posterior, w superior)."""
    idx = np.nonzero(mask)
    i, j, k = (np.asarray(a, dtype=np.float64) for a in idx)
    return np.stack([-k * spacing[2], i * spacing[0], -j * spacing[1]], axis=1)


def _split_ml(u: np.ndarray) -> float:
    """Medial-lateral split position (mm): the middle of the widest gap between occupied 0.5 mm bins
    in the central part of the cartilage's u range."""
    lo, hi = np.percentile(u, [2, 98])
    bins = np.arange(lo, hi + 0.5, 0.5)
    hist, edges = np.histogram(u, bins=bins)
    n = len(hist)
    core = slice(n // 5, n - n // 5)
    empty = hist[core] <= max(1, 0.02 * hist.max())
    best, run, start, best_start = 0, 0, 0, None
    for t, e in enumerate(empty):
        if e:
            run = run + 1
            if run == 1:
                start = t
            if run > best:
                best, best_start = run, start
        else:
            run = 0
    if best_start is None:  # no gap: split at the least populated bin of the core
        t = int(np.argmin(hist[core]))
        return float(0.5 * (edges[core.start + t] + edges[core.start + t + 1]))
    a = core.start + best_start
    return float(0.5 * (edges[a] + edges[a + best]))


def main_components(mask: np.ndarray, min_fraction: float = 0.1) -> np.ndarray:
    """Keep the connected components (26-connectivity) of at least ``min_fraction`` of the largest one:
    drops the small false-positive fragments of predicted segmentations (the two condyles / plateaus
    are each kept as large components)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(lab, keep)


def _interface(mask: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Cartilage voxels touching bone (6-neighbourhood)."""
    return mask & ndimage.binary_dilation(bone, structure=ndimage.generate_binary_structure(3, 1))


@dataclass
class TorusFit:
    cu: float
    cv: float
    cw: float
    ra: float
    r: float
    rms: float

    def angles(self, p: np.ndarray):
        pu, pv, pw = p[:, 0] - self.cu, p[:, 1] - self.cv, p[:, 2] - self.cw
        rho = np.sqrt(pv * pv + pw * pw)
        theta = np.arctan2(pv, -pw)
        phi = np.arctan2(pu, rho - self.ra)
        return theta, phi


def fit_condyle(points: np.ndarray) -> TorusFit:
    """Least-squares torus (ML axis) through bone-cartilage interface points ``(N, 3)`` (u, v, w) mm."""
    v, w = points[:, 1], points[:, 2]
    A = np.stack([v, w, np.ones_like(v)], axis=1)  # algebraic circle fit in the sagittal plane
    sol, *_ = np.linalg.lstsq(A, v * v + w * w, rcond=None)
    cv, cw = sol[0] / 2, sol[1] / 2
    R = float(np.sqrt(max(sol[2] + cv * cv + cw * cw, 1.0)))
    half = 0.5 * float(np.ptp(points[:, 0]))
    r0 = max(half / np.sin(PHI_MAX), 3.0)
    x0 = np.array([np.median(points[:, 0]), cv, cw, max(R - r0, 0.5), r0])

    def res(x):
        pu, pv, pw = points[:, 0] - x[0], points[:, 1] - x[1], points[:, 2] - x[2]
        rho = np.sqrt(pv * pv + pw * pw)
        return np.sqrt((rho - x[3]) ** 2 + pu * pu) - x[4]

    fit = least_squares(res, x0, method="lm")
    x = fit.x
    return TorusFit(*map(float, x), rms=float(np.sqrt(np.mean(fit.fun**2))))


@dataclass
class PlateauFit:
    centre: np.ndarray
    normal: np.ndarray
    a_axis: np.ndarray
    b_axis: np.ndarray
    ab_centre: tuple[float, float] = (0.0, 0.0)
    ab_semi: tuple[float, float] = (1.0, 1.0)

    def plane_coords(self, p: np.ndarray):
        d = p - self.centre
        return d @ self.a_axis, d @ self.b_axis

    def normalised(self, p: np.ndarray):
        a, b = self.plane_coords(p)
        return (a - self.ab_centre[0]) / self.ab_semi[0], (b - self.ab_centre[1]) / self.ab_semi[1]


def fit_plateau(interface: np.ndarray, cartilage: np.ndarray, cell_mm: float) -> PlateauFit:
    """Plane through the interface points (PCA) with in-plane axes a (lateral) and b (posterior); the
    cartilage footprint's centre and semi-axes from the second moments of its projected area."""
    c = interface.mean(axis=0)
    _, _, vt = np.linalg.svd(interface - c, full_matrices=False)
    n = vt[2] * np.sign(vt[2][2] or 1.0)  # normal pointing superior
    a = np.array([1.0, 0.0, 0.0]) - n[0] * n
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    b *= np.sign(b[1] or 1.0)  # posterior
    fit = PlateauFit(c, n, a, b)
    pa, pb = fit.plane_coords(cartilage)
    # projected footprint as a set of cells, so that thicker regions do not weigh more
    ia, ib = np.floor(pa / cell_mm).astype(int), np.floor(pb / cell_mm).astype(int)
    cells = np.unique(np.stack([ia, ib], axis=1), axis=0).astype(float)
    ca, cb = (cells + 0.5).mean(axis=0) * cell_mm
    va, vb = (cells + 0.5).var(axis=0) * cell_mm**2
    # uniform ellipse: variance = semi_axis^2 / 4; add the cell's own extent (var of a cell = c^2/12)
    sa = 2.0 * np.sqrt(max(va + cell_mm**2 / 12.0, 1e-6))
    sb = 2.0 * np.sqrt(max(vb + cell_mm**2 / 12.0, 1e-6))
    fit.ab_centre, fit.ab_semi = (float(ca), float(cb)), (float(sa), float(sb))
    return fit


def _bin(samples, size) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell sum of values and voxel count of ``(compartment, x, y, value)`` samples."""
    rows, cols = size
    acc = np.zeros(size)
    cnt = np.zeros(size)
    for comp, x, y, val in samples:
        r, c = xy_to_cell(comp, x, y, size)
        ri, ci = np.rint(r).astype(int), np.rint(c).astype(int)
        ok = (ri >= 0) & (ri < rows) & (ci >= 0) & (ci < cols) & np.isfinite(val)
        np.add.at(acc, (ri[ok], ci[ok]), val[ok])
        np.add.at(cnt, (ri[ok], ci[ok]), 1.0)
    return acc, cnt


def _fill_holes(out: np.ndarray, has: np.ndarray, foot: np.ndarray) -> np.ndarray:
    holes = foot & ~has
    if holes.any() and has.sum() >= 3:
        pts = np.argwhere(has)
        q = np.argwhere(holes)
        vals = griddata(pts, out[has], q, method="linear")
        bad = ~np.isfinite(vals)
        if bad.any():
            vals[bad] = griddata(pts, out[has], q[bad], method="nearest")
        out[holes] = vals
    out[~foot] = np.nan
    return out.astype(np.float32)


def _coverage(has: np.ndarray, foot: np.ndarray) -> float:
    near = ndimage.binary_dilation(has, structure=np.ones((3, 3), bool))
    return float((near & foot).sum() / foot.sum())


def _smooth_in(a: np.ndarray, foot: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """Normalised Gaussian smoothing restricted to the footprint (outside cells do not pull values down)."""
    w = ndimage.gaussian_filter(foot.astype(float), sigma, mode="constant")
    return np.where(foot, ndimage.gaussian_filter(np.where(foot, a, 0.0), sigma, mode="constant") / np.maximum(w, 1e-9), 0.0)


def _torus_thickness(vol_per_angle: np.ndarray, ra: float, r: float, cos_phi: np.ndarray) -> np.ndarray:
    """Solve ``ra((r+t)^2 - r^2)/2 + cos(phi)((r+t)^3 - r^3)/3 = V`` for t >= 0 (Newton, monotone)."""
    t = vol_per_angle / max(r * (ra + r), 1e-6)
    for _ in range(20):
        f = ra * ((r + t) ** 2 - r * r) / 2 + cos_phi * ((r + t) ** 3 - r**3) / 3 - vol_per_angle
        df = (r + t) * (ra + (r + t) * cos_phi)
        t = np.clip(t - f / np.maximum(df, 1e-9), 0.0, None)
    return t


@dataclass
class FlattenResult:
    fc: np.ndarray
    tc: np.ndarray
    coverage: dict
    fits: dict


def labels_to_maps(labels: np.ndarray, affine: np.ndarray, side: str, size: tuple[int, int] = (310, 310),
                   method: str = "volume", smooth_mm: float = 1.5) -> FlattenResult:
    """FC / TC thickness maps (float32 mm, NaN outside the fixed footprint, left-knee convention).

    ``labels``: 3D DESS label volume (0 bg, 1 femur, 2 FC, 3 tibia, 4 TC) with its RAS ``affine``;
    ``side``: ``"R"`` or ``"L"``; ``size``: map grid (rows, cols); ``method``: ``"volume"`` (cartilage volume
    per bone-surface area, default) or ``"local"`` (mean voxel local thickness per cell).
    """
    if method not in ("volume", "local"):
        raise ValueError(f"method must be 'volume' or 'local', got {method!r}")
    lab, sp = canonicalize(labels, affine, side)
    voxel_mm3 = float(np.prod(sp))
    h = float(np.mean(sp))
    out, coverage, fits = {}, {}, {}
    for kind, lab_c, lab_b in (("fc", LABEL_FC, LABEL_FEMUR), ("tc", LABEL_TC, LABEL_TIBIA)):
        mask = main_components(lab == lab_c)
        if mask.sum() < 20:
            raise FlatteningError(f"too few {kind.upper()} voxels ({int(mask.sum())}) to build a map")
        p = _coords(mask, sp)
        vals = local_thickness(mask, sp)[mask] if method == "local" else np.ones(len(p))
        pi = _coords(_interface(mask, lab == lab_b), sp)
        split = _split_ml(p[:, 0])
        samples = []
        for comp in (0, 1):  # 0 medial (u < split), 1 lateral
            sel = p[:, 0] < split if comp == 0 else p[:, 0] >= split
            seli = pi[:, 0] < split if comp == 0 else pi[:, 0] >= split
            if seli.sum() < 10:
                raise FlatteningError(f"{kind.upper()} {'medial' if comp == 0 else 'lateral'} compartment has no "
                                      "bone-cartilage interface")
            if kind == "fc":
                fit = fit_condyle(pi[seli])
                # interface voxel centres lie on average half a voxel outside the bone surface
                fit.r = max(fit.r - 0.5 * h, 0.5)
                theta, phi = fit.angles(p[sel])
                x, y = phi / PHI_MAX, (theta - THETA_MID) / THETA_HALF
            else:
                fit = fit_plateau(pi[seli], p[sel], h)
                x, y = fit.normalised(p[sel])
            fits[f"{kind}_{comp}"] = fit
            samples.append((comp, x, y, vals[sel]))
        acc, cnt = _bin(samples, size)
        foot = footprint(kind, size)
        has = (cnt > 0) & foot
        coverage[kind] = _coverage(has, foot)
        if method == "local":
            m = np.full(size, np.nan)
            m[has] = acc[has] / cnt[has]
            out[kind] = _fill_holes(m, has, foot)
            continue
        comp_map, gx, gy = atlas_grid(size)
        rows, cols = size
        ncols = int((comp_map[rows // 2] == 0).sum())
        nrows = int((comp_map[:, (comp_map[rows // 2] == 0).argmax()] == 0).sum())
        t = np.full(size, np.nan)
        for comp in (0, 1):
            fit = fits[f"{kind}_{comp}"]
            cmask = foot & (comp_map == comp)
            if kind == "fc":
                dphi, dtheta = 2 * PHI_MAX / ncols, 2 * THETA_HALF / nrows
                # cell size on the surface (mm) sets the smoothing in cells
                sig = (smooth_mm / (dtheta * (fit.ra + fit.r)), smooth_mm / (dphi * fit.r))
                vol = _smooth_in(cnt * voxel_mm3, cmask, sig)
                t[cmask] = _torus_thickness(vol[cmask] / (dphi * dtheta), fit.ra, fit.r, np.cos(gx[cmask] * PHI_MAX))
            else:
                da, db = 2 * fit.ab_semi[0] / ncols, 2 * fit.ab_semi[1] / nrows
                vol = _smooth_in(cnt * voxel_mm3, cmask, (smooth_mm / db, smooth_mm / da))
                t[cmask] = vol[cmask] / (da * db)
        t[~foot] = np.nan
        out[kind] = t.astype(np.float32)
    return FlattenResult(out["fc"], out["tc"], coverage, fits)

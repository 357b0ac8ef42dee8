"""DESS-like MR volume and label map of one knee visit, sampled from the analytic anatomy.

Sampling happens on a grid aligned with the knee frame (arrays indexed ``[u, v, w]``, ascending mm);
:func:`to_pir` reorders to the stored sagittal "PIR" layout (i -> posterior, j -> inferior,
k -> patient's right) used by the DICOM and NIfTI writers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.conventions import LABEL_FC, LABEL_FEMUR, LABEL_TC, LABEL_TIBIA

from .anatomy import KneeVisit
from .shapes import Ellipsoid, ZCylinder

# DESS-like relative signal (fluid and cartilage bright, marrow intermediate, cortex/tendon dark).
SIGNAL = {"air": 0.0, "muscle": 0.24, "fat_pad": 0.55, "fluid": 0.95, "tendon": 0.05, "cartilage": 0.72,
          "marrow": 0.42, "cortex": 0.05}


@dataclass(frozen=True)
class MRGrid:
    """Voxel-centre coordinates (mm, knee frame) of a knee-aligned grid; spacing ``(su, sv, sw)`` mm."""

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray

    @classmethod
    def around_knee(cls, spacing: tuple[float, float, float], half_extent=(50.0, 48.0, 48.0),
                    offset=(0.0, 0.0, 0.0)) -> MRGrid:
        axes = []
        for s, h, o in zip(spacing, half_extent, offset):
            n = int(round(2 * h / s))
            axes.append(((np.arange(n) - (n - 1) / 2.0) * s + o).astype(np.float32))
        return cls(*axes)

    @property
    def shape(self):
        return (self.u.size, self.v.size, self.w.size)

    @property
    def spacing(self):
        return tuple(float(a[1] - a[0]) for a in (self.u, self.v, self.w))

    def box(self, lo, hi, margin: float):
        """Index slices of the sub-grid covering the knee-frame box [lo, hi] (+ margin mm)."""
        sl = []
        for ax, a, b in zip((self.u, self.v, self.w), lo, hi):
            i0 = int(np.searchsorted(ax, a - margin))
            i1 = int(np.searchsorted(ax, b + margin))
            sl.append(slice(i0, max(i0, i1)))
        return tuple(sl)

    def coords(self, sl):
        return (self.u[sl[0]][:, None, None], self.v[sl[1]][None, :, None], self.w[sl[2]][None, None, :])


def _posed_bbox(pose, bbox):
    corners = np.array(np.meshgrid(*[np.array(b, dtype=np.float64) for b in bbox], indexing="ij")).reshape(3, -1)
    corners = np.clip(corners, -400, 400)
    k = np.array(pose.to_knee(corners[0], corners[1], corners[2]))
    return k.min(axis=1), k.max(axis=1)


@dataclass
class Patch:
    """Signed distances (mm) of one tissue on the sub-grid ``sl``; far (outside) everywhere else."""

    sl: tuple
    arr: np.ndarray

    @classmethod
    def covering(cls, grid: MRGrid, boxes, margin: float, far: float) -> Patch:
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
        sl = grid.box(lo, hi, margin)
        return cls(sl, np.full(tuple(max(0, x.stop - x.start) for x in sl), far, np.float32))

    def paint(self, sl, values) -> None:
        """``min`` the patch with ``values`` given on grid slices ``sl`` (inside the patch)."""
        loc = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, self.sl))
        np.minimum(self.arr[loc], values, out=self.arr[loc])

    def inside(self) -> tuple[tuple, np.ndarray]:
        return self.sl, self.arr < 0

    @classmethod
    def union(cls, a: Patch, b: Patch, far: float) -> Patch:
        """Union of two tissues: ``min`` of the distances on a patch covering both."""
        sl = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a.sl, b.sl))
        out = cls(sl, np.full(tuple(x.stop - x.start for x in sl), far, np.float32))
        out.paint(a.sl, a.arr)
        out.paint(b.sl, b.arr)
        return out


def _clip_box(sl, outer):
    return tuple(slice(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop))) for a, b in zip(sl, outer))


def _paint_prim(patch: Patch, grid: MRGrid, pose, prim, margin: float):
    lo, hi = _posed_bbox(pose, prim.bbox())
    sl = _clip_box(grid.box(lo, hi, margin), patch.sl)
    if any(x.stop <= x.start for x in sl):
        return
    u, v, w = grid.coords(sl)
    lu, lv, lw = pose.to_local(u, v, w)
    patch.paint(sl, prim.sdf(lu, lv, lw).astype(np.float32))


def _frac(sdf: np.ndarray, h: float) -> np.ndarray:
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


def tissue_sdfs(kv: KneeVisit, grid: MRGrid) -> dict[str, Patch]:
    """Signed distances (mm, negative inside) of every tissue, each on its bounding sub-grid."""
    h = float(np.mean(grid.spacing))
    far = np.float32(4.0 * h)
    margin = 2.0 * h
    out: dict[str, Patch] = {}
    for bone, (pose, prims) in kv.bones.items():
        boxes = [_posed_bbox(pose, prim.bbox()) for prim, _ in prims]
        outer = Patch.covering(grid, boxes, margin, far)
        inner = Patch.covering(grid, boxes, margin, far)
        for prim, cortex in prims:
            _paint_prim(outer, grid, pose, prim, margin)
            _paint_prim(inner, grid, pose, prim.shrunk(cortex), margin)
        out[bone] = outer
        out[bone + "_marrow"] = inner
    # Femoral cartilage: shells on the two condyles with the analytic thickness field.
    boxes = [_posed_bbox(kv.femur_pose, c.bbox()) for c in kv.condyles]
    fc = Patch.covering(grid, boxes, 8.0, far)
    for k, cond in enumerate(kv.condyles):
        sl = _clip_box(grid.box(*boxes[k], 8.0), fc.sl)
        u, v, w = grid.coords(sl)
        lu, lv, lw = kv.femur_pose.to_local(u, v, w)
        d, theta, phi = cond.polar(lu, lv, lw)
        x, y = kv.fc_polar_to_xy(theta, phi)
        t = kv.fc[k](x, y)
        sdf = np.maximum(cond.r - d, d - cond.r - np.nan_to_num(t, nan=-1.0))
        fc.paint(sl, np.where(np.isnan(t), far, sdf).astype(np.float32))
    out["fc"] = fc
    # Tibial cartilage: layers above the plateau plane.
    boxes = [((cu - su, cb - sb - 8, -3.0), (cu + su, cb + sb + 8, 9.0)) for cu, cb, su, sb in kv.spec.tc_footprints]
    tc = Patch.covering(grid, boxes, margin, far)
    for k in range(2):
        sl = _clip_box(grid.box(*boxes[k], margin), tc.sl)
        u, v, w = grid.coords(sl)
        delta, b = kv.tc_plane_coords(u, v, w)
        x, y = kv.tc_to_xy(k, u, b)
        t = kv.tc[k](x, y)
        sdf = np.maximum(-delta, delta - np.nan_to_num(t, nan=-1.0))
        tc.paint(sl, np.where(np.isnan(t), far, sdf).astype(np.float32))
    out["tc"] = tc
    out["cartilage"] = Patch.union(fc, tc, far)
    s = kv.spec.scale
    au, av = kv.spec.envelope
    soft = {
        "envelope": ZCylinder((0.0, 5.0), (au, av), -1e4, 1e4),
        "fluid": Ellipsoid((0.0, 6.0, 4.0), (38.0 * s, 30.0 * s, 14.0 * s)),
        "fat_pad": Ellipsoid((0.0, -26.0 * s, -4.0 * s), (20.0 * s, 9.0 * s, 13.0 * s)),
        "tendon": ZCylinder((0.0, -38.0 * s), (12.0 * s, 2.5 * s), -45.0 * s, 10.0 * s),
    }
    ident = kv.bones["tibia"][0]
    for name, prim in soft.items():
        patch = Patch.covering(grid, [_posed_bbox(ident, prim.bbox())], margin, far)
        _paint_prim(patch, grid, ident, prim, margin)
        out[name] = patch
    return out


def label_volume(sdfs: dict[str, Patch], shape: tuple[int, int, int]) -> np.ndarray:
    """Hard labels at voxel centres (uint8, DESS label table) on a grid of ``shape``. Bone wins over
    cartilage."""
    lab = np.zeros(shape, np.uint8)
    for name, value in (("tc", LABEL_TC), ("fc", LABEL_FC), ("tibia", LABEL_TIBIA), ("femur", LABEL_FEMUR)):
        sl, inside = sdfs[name].inside()
        lab[sl][inside] = value
    return lab


def dess_signal(sdfs: dict[str, Patch], shape: tuple[int, int, int], spacing, rng: np.random.Generator,
                noise: float = 0.03, bias: float = 0.15, blur_vox: float = 0.5) -> np.ndarray:
    """DESS-like magnitude image (float32, ~0..1) with partial volume, blur, bias field and Rician noise."""
    h = float(np.mean(spacing))
    img = np.zeros(shape, np.float32)

    def paint(value, name):
        p = sdfs[name]
        f = _frac(p.arr, h)
        img[p.sl] = img[p.sl] * (1.0 - f) + value * f

    paint(SIGNAL["muscle"], "envelope")
    paint(SIGNAL["fat_pad"], "fat_pad")
    paint(SIGNAL["fluid"], "fluid")
    paint(SIGNAL["tendon"], "tendon")
    paint(SIGNAL["cartilage"], "cartilage")
    for bone in ("femur", "tibia", "fibula", "patella"):
        paint(SIGNAL["cortex"], bone)
        paint(SIGNAL["marrow"], bone + "_marrow")
    if blur_vox > 0:
        img = ndimage.gaussian_filter(img, blur_vox)
    # Smooth multiplicative bias field: random low-order polynomial over the normalised grid.
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in img.shape]
    c = rng.normal(0.0, bias / 2.0, size=6)
    field = (1.0 + c[0] * axes[0][:, None, None] + c[1] * axes[1][None, :, None] + c[2] * axes[2][None, None, :]
             + c[3] * axes[0][:, None, None] * axes[2][None, None, :] + c[4] * axes[1][None, :, None] ** 2
             + c[5] * axes[2][None, None, :] ** 2)
    img = img * np.clip(field, 0.5, 1.5)
    n1 = rng.normal(0.0, noise, img.shape).astype(np.float32)
    n2 = rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)


def to_pir(a: np.ndarray, side: str) -> np.ndarray:
    """Knee-aligned ``[u, v, w]`` array -> stored ``[i, j, k]`` = (posterior, inferior, patient's right).

    For a left knee +u is the patient's left, so k (towards the patient's right) runs along -u; for a
    right knee +u is the patient's right.
    """
    p = np.transpose(a, (1, 2, 0))[:, ::-1, :]
    if side == "L":
        p = p[:, :, ::-1]
    return np.ascontiguousarray(p)


def pir_affine_lps(grid: MRGrid, side: str, centre_lps) -> np.ndarray:
    """4x4 affine from stored PIR indices (i, j, k) to LPS mm for :func:`to_pir` arrays."""
    su, sv, sw = grid.spacing
    sign = 1.0 if side == "L" else -1.0  # X = Xc + sign * u
    u0 = grid.u[-1] if side == "L" else grid.u[0]
    A = np.eye(4)
    A[:3, 0] = (0.0, sv, 0.0)
    A[:3, 1] = (0.0, 0.0, -sw)
    A[:3, 2] = (-su, 0.0, 0.0)
    A[:3, 3] = (centre_lps[0] + sign * u0, centre_lps[1] + grid.v[0], centre_lps[2] + grid.w[-1])
    return A

"""DESS-like MR volume and label map of one knee visit, sampled from the analytic anatomy.

Sampling happens on a grid aligned with the knee frame (arrays indexed ``[u, v, w]``, ascending mm);
:func:`to_pir` reorders to the stored sagittal "PIR" layout (i -> posterior, j -> inferior,
k -> patient's right) used by the DICOM and NIfTI writers.

Menisci are MR-only tissues: dark fibrocartilage wedges in the signal, background in the label table
(:func:`meniscus_sdf`). Marker tissues and signal changes (effusion, meniscal extrusion / damage,
bone-marrow-lesion and cartilage signal) are described in :mod:`pipeline.cohort.mr_markers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from scipy import ndimage

from pipeline.conventions import LABEL_FC, LABEL_FEMUR, LABEL_TC, LABEL_TIBIA

from .anatomy import KneeVisit
from .shapes import Ellipsoid, ZCylinder

if TYPE_CHECKING:
    from .mr_markers import KneeMarkers

# DESS-like relative signal (fluid and cartilage bright, marrow intermediate, cortex/tendon dark).
SIGNAL = {"air": 0.0, "muscle": 0.24, "fat_pad": 0.55, "fluid": 0.95, "tendon": 0.05, "cartilage": 0.72,
          "marrow": 0.42, "cortex": 0.05, "meniscus": 0.08}
#: Height (mm, x knee scale) of a healthy meniscus at its outer rim; the wedge thins to 0 at its inner edge.
MENISCUS_HEIGHT_MM = 6.0
#: Half-width (mm, x knee scale) of the intercondylar gap that separates the medial and lateral menisci.
MENISCUS_GAP_MM = 6.0


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

    def values_on(self, sl, far: float) -> np.ndarray:
        """The distances on grid slices ``sl`` (``far`` where ``sl`` reaches outside this patch)."""
        out = np.full(tuple(max(0, x.stop - x.start) for x in sl), far, np.float32)
        inter = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, self.sl))
        if all(x.stop > x.start for x in inter):
            dst = tuple(slice(x.start - a.start, x.stop - a.start) for x, a in zip(inter, sl))
            src = tuple(slice(x.start - b.start, x.stop - b.start) for x, b in zip(inter, self.sl))
            out[dst] = self.arr[src]
        return out

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


def tissue_sdfs(kv: KneeVisit, grid: MRGrid, markers: Optional[KneeMarkers] = None) -> dict[str, Patch]:
    """Signed distances (mm, negative inside) of every tissue, each on its bounding sub-grid.

    Always includes the menisci ("meniscus"); with ``markers`` the medial meniscus is extruded /
    macerated and an "effusion" fluid layer is added (:mod:`pipeline.cohort.mr_markers`)."""
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
    if markers is not None and markers.effusion_ml > 0:
        out["effusion"] = effusion_sdf(kv, grid, markers.effusion_ml)
    extrusion, damage = (0.0, 0) if markers is None else (markers.meniscal_extrusion_mm, markers.meniscal_damage)
    out["meniscus"] = meniscus_sdf(kv, grid, out, extrusion, MENISCUS_MACERATION[int(damage)])
    return out


#: Height factor of the medial meniscus per damage grade 0-3 (grades 2-3: maceration, lost substance).
MENISCUS_MACERATION = (1.0, 1.0, 0.8, 0.6)


def meniscus_sdf(kv: KneeVisit, grid: MRGrid, sdfs: dict[str, Patch], extrusion_mm: float = 0.0,
                 medial_height_factor: float = 1.0) -> Patch:
    """Signed distance (mm, approximate away from the surface) of the medial + lateral menisci.

    Each meniscus is a C-shaped wedge on the tibial plateau (plateau-plane coordinates, see
    :meth:`KneeVisit.tc_plane_coords`): between an inner ellipse around the compartment's contact point
    (semi-axes 0.6 x condyle tube radius in u, 0.45 x sagittal condyle radius in AP) and the plateau rim
    (the tibia's elliptic outline), on its own side of a ``MENISCUS_GAP_MM`` intercondylar gap. The top
    rises linearly from 0 at the inner edge to ``MENISCUS_HEIGHT_MM`` at the rim (triangular cross
    section). The medial meniscus is shifted medially by ``extrusion_mm`` (its outer edge then lies that
    far beyond the rim) and its height multiplied by ``medial_height_factor`` (maceration). The result
    is cut by cartilage and bone (``sdfs`` "fc", "tc", "femur", "tibia"), so the menisci never overlap
    labelled voxels.
    """
    spec = kv.spec
    h = float(np.mean(grid.spacing))
    far = np.float32(4.0 * h)
    pa_u, pa_v = spec.plateau_axes
    height = MENISCUS_HEIGHT_MM * spec.scale
    lo = (-pa_u - extrusion_mm - 2.0, 2.0 - pa_v - 2.0, -2.0)
    hi = (pa_u + 2.0, 2.0 + pa_v + 2.0, height + 3.0 + abs(spec.plateau_slope) * pa_v)
    patch = Patch.covering(grid, [(lo, hi)], 2.0 * h, far)
    if any(x.stop <= x.start for x in patch.sl):
        return patch
    u, v, w = grid.coords(patch.sl)
    delta, b = kv.tc_plane_coords(u, v, w)
    out = np.full(patch.arr.shape, far, np.float32)
    for k, sg in ((0, -1.0), (1, 1.0)):
        e, hf = (extrusion_mm, medial_height_factor) if k == 0 else (0.0, 1.0)
        us = u - sg * e  # the meniscus frame: the whole medial meniscus moves medially by the extrusion
        uc, bc = sg * spec.condyle_u[k], spec.condyle_v - 1.0
        ri_u, ri_b = 0.6 * spec.condyle_r[k], 0.45 * (spec.condyle_ra[k] + spec.condyle_r[k])
        q_in = np.sqrt(((us - uc) / ri_u) ** 2 + ((b - bc) / ri_b) ** 2)
        q_out = np.sqrt((us / pa_u) ** 2 + ((b - 2.0) / pa_v) ** 2)
        frac = np.clip((q_in - 1.0) / np.maximum((q_in - 1.0) + (1.0 - q_out), 1e-3), 0.0, 1.0)
        top = height * hf * frac
        d = np.maximum((1.0 - q_in) * min(ri_u, ri_b), (q_out - 1.0) * min(pa_u, pa_v))
        d = np.maximum(d, np.maximum(-delta, 0.8 * (delta - top)))
        d = np.maximum(d, MENISCUS_GAP_MM * spec.scale - sg * us)
        np.minimum(out, d.astype(np.float32), out=out)
    for name in ("fc", "tc", "femur", "tibia"):
        np.maximum(out, -sdfs[name].values_on(patch.sl, far), out=out)
    patch.arr = out
    return patch


#: Coronal footprint semi-axes (u, w) in mm (x knee scale) of the effusion layer and its centre height w.
EFFUSION_FOOTPRINT_MM = (30.0, 25.0)
EFFUSION_CENTRE_W_MM = 26.0


def effusion_sdf(kv: KneeVisit, grid: MRGrid, volume_ml: float) -> Patch:
    """Effusion: a fluid layer (mm distances) on the anterior femur holding about ``volume_ml`` mL.

    The layer is the set of points within ``t`` mm of the femur's outer surface and inside an ellipsoid
    footprint (semi-axes u = 30, v = 30, w = 25 mm x scale, centred at v = -24, w = 26 mm x scale: the
    suprapatellar / patellofemoral recess) with ``t = volume / (pi a_u a_w)`` (the footprint's projected
    area; the nominal volume ignores surface curvature). Points inside the femur are part of the set but
    bone and cartilage are painted after it, so only the fluid in front of the femur shows.
    """
    s = kv.spec.scale
    h = float(np.mean(grid.spacing))
    far = np.float32(4.0 * h)
    au, aw = EFFUSION_FOOTPRINT_MM[0] * s, EFFUSION_FOOTPRINT_MM[1] * s
    t = float(volume_ml) * 1000.0 / (np.pi * au * aw)
    foot = Ellipsoid((0.0, -24.0 * s, EFFUSION_CENTRE_W_MM * s), (au, 30.0 * s, aw))
    ident = kv.bones["tibia"][0]
    patch = Patch.covering(grid, [_posed_bbox(ident, foot.bbox())], 2.0 * h, far)
    if any(x.stop <= x.start for x in patch.sl):
        return patch
    pose, prims = kv.bones["femur"]
    femur = Patch(patch.sl, np.full(patch.arr.shape, np.float32(t + 4.0 * h), np.float32))
    for prim, _ in prims:
        _paint_prim(femur, grid, pose, prim, t + 2.0 * h)
    _paint_prim(patch, grid, ident, foot, 2.0 * h)
    patch.arr = np.maximum(patch.arr, femur.arr - np.float32(t))
    return patch


def label_volume(sdfs: dict[str, Patch], shape: tuple[int, int, int]) -> np.ndarray:
    """Hard labels at voxel centres (uint8, DESS label table) on a grid of ``shape``. Bone wins over
    cartilage."""
    lab = np.zeros(shape, np.uint8)
    for name, value in (("tc", LABEL_TC), ("fc", LABEL_FC), ("tibia", LABEL_TIBIA), ("femur", LABEL_FEMUR)):
        sl, inside = sdfs[name].inside()
        lab[sl][inside] = value
    return lab


def dess_signal(sdfs: dict[str, Patch], shape: tuple[int, int, int], spacing, rng: np.random.Generator,
                noise: float = 0.03, bias: float = 0.15, blur_vox: float = 0.5,
                values: Optional[dict[str, Union[float, np.ndarray]]] = None) -> np.ndarray:
    """DESS-like magnitude image (float32, ~0..1) with partial volume, blur, bias field and Rician noise.

    Tissues are painted in order (later ones win): envelope (muscle), fat pad, fluid, effusion, tendon,
    meniscus, cartilage, then per bone cortex and marrow; "effusion" and "meniscus" only when present in
    ``sdfs``. ``values`` overrides the signal of a tissue patch by name (a number, or an array of that
    patch's shape: the marker signal changes of :func:`pipeline.cohort.mr_markers.marker_signal_values`).
    The number of random draws depends only on ``shape``.
    """
    h = float(np.mean(spacing))
    img = np.zeros(shape, np.float32)
    values = values or {}

    def paint(value, name):
        p = sdfs[name]
        f = _frac(p.arr, h)
        img[p.sl] = img[p.sl] * (1.0 - f) + values.get(name, value) * f

    paint(SIGNAL["muscle"], "envelope")
    paint(SIGNAL["fat_pad"], "fat_pad")
    paint(SIGNAL["fluid"], "fluid")
    if "effusion" in sdfs:
        paint(SIGNAL["fluid"], "effusion")
    paint(SIGNAL["tendon"], "tendon")
    if "meniscus" in sdfs:
        paint(SIGNAL["meniscus"], "meniscus")
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

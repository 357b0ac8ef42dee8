"""3D knee anatomy of one knee at one visit, in the knee frame (left-knee convention).

Knee frame ``(u, v, w)`` in mm: u lateral, v posterior, w superior; origin at the centre of the tibial
plateau. A right knee is the mirror image (u -> -u in patient coordinates), so both knees share this code.

Bones are unions of :mod:`~pipeline.cohort.shapes` primitives, each with a cortical thickness. The femur is
posed (rotation about the AP axis + translation) so that in each compartment the femoral bone sits exactly
femoral + tibial cartilage thickness above the tibial bone at the contact point: thinner medial cartilage
lowers and tilts the femur (varus) and narrows the radiographic joint space. Nothing in the radiograph is
drawn: it is the projection of these solids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.thickness.grid import PHI_MAX, THETA_HALF, THETA_MID

from .disease import DiseaseParams, jsn_grade, klg_rule, osteophyte_grade
from .shapes import Ellipsoid, Pose, SpindleTorus, ZCylinder, union_length
from .thickness_field import ThicknessField, render_map, sample_modes

BONES = ("femur", "tibia", "fibula", "patella")


@dataclass(frozen=True)
class KneeSpec:
    """Everything about a knee that does not change over visits."""

    scale: float  #: overall size factor
    condyle_u: tuple[float, float]  #: |u| of medial, lateral condyle circle centres (mm)
    condyle_ra: tuple[float, float]  #: sagittal circle radii (mm)
    condyle_r: tuple[float, float]  #: tube radii (mm)
    condyle_v: float  #: AP offset of condyle centres (mm, + posterior)
    plateau_slope: float  #: tan of the plateau slope seen by the beam (positioning)
    plateau_axes: tuple[float, float]  #: tibial plateau semi-axes (u, v) in mm
    envelope: tuple[float, float]  #: soft-tissue semi-axes (u, v) mm
    fc_fields: tuple[ThicknessField, ThicknessField]  #: healthy medial, lateral condyle fields
    tc_fields: tuple[ThicknessField, ThicknessField]  #: healthy medial, lateral plateau fields
    tc_footprints: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]  #: (cu, cb, su, sb)
    disease: DiseaseParams
    defects_fc: tuple  #: focal defects (x, y, radius, max depth) on the dominant condyle
    leg_angle: float  #: static coronal alignment (rad, + = varus), rotation about v


def sample_knee_spec(shape_rng: np.random.Generator, rng: np.random.Generator, scale: float, bmi: float,
                     disease: DiseaseParams, thick_factor: float, leg_angle: float) -> KneeSpec:
    """Draw the visit-independent anatomy of one knee.

    ``shape_rng`` draws the bone shape (seed it identically for the two knees of a subject: mirror-
    consistent bones); ``rng`` draws cartilage, defects and positioning (different per knee).
    """
    s = scale
    jitter = lambda x, sd=0.04: float(x * s * (1.0 + shape_rng.normal(0.0, sd)))  # noqa: E731
    fc_base = (2.0 * thick_factor * rng.normal(1.0, 0.06), 2.2 * thick_factor * rng.normal(1.0, 0.06))
    tc_base = (1.8 * thick_factor * rng.normal(1.0, 0.06), 2.4 * thick_factor * rng.normal(1.0, 0.06))
    # Load-bearing zone of the condyle: around theta ~ 5 deg (distal), phi ~ 0.
    fc_load = (0.0, float((np.deg2rad(5.0) - THETA_MID) / THETA_HALF))
    fc = tuple(ThicknessField(float(b), sample_modes(rng), False, fc_load, (0.45, 0.3)) for b in fc_base)
    pa_u, pa_v = jitter(38.0), jitter(26.0)
    # Plateau footprints (cu, cb, su, sb) in mm: medial centred under the medial condyle.
    cu_m, cu_l = jitter(21.0, 0.03), jitter(20.0, 0.03)
    foot = ((-cu_m, jitter(1.0, 0.0), jitter(13.0), jitter(20.0)), (cu_l, jitter(-1.0, 0.0), jitter(12.0), jitter(17.0)))
    tc = []
    for k, b in enumerate(tc_base):
        # Load-bearing centre = the contact point below the condyle (x = 0 at the footprint centre).
        ccu, ccb, su, sb = foot[k]
        lc = ((((-cu_m, cu_l)[k]) - ccu) / su, (jitter(6.0, 0.0) - ccb) / sb)
        tc.append(ThicknessField(float(b), sample_modes(rng), True, (float(lc[0]), float(lc[1])), (0.4, 0.4)))
    n_def = int(rng.integers(0, 3))
    defects = tuple((float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.5, 0.4)), float(rng.uniform(0.08, 0.15)),
                     float(rng.uniform(0.5, 1.2))) for _ in range(n_def))
    bmi_f = float(np.sqrt(bmi / 25.0))
    return KneeSpec(
        scale=s,
        condyle_u=(cu_m, cu_l),
        condyle_ra=(jitter(10.0), jitter(8.5)),
        condyle_r=(jitter(13.0), jitter(12.0)),
        condyle_v=jitter(6.0),
        plateau_slope=float(np.tan(np.deg2rad(rng.normal(0.0, 1.2)))),
        plateau_axes=(pa_u, pa_v),
        envelope=(52.0 * s * bmi_f, 55.0 * s * bmi_f),
        fc_fields=fc,
        tc_fields=tuple(tc),
        tc_footprints=foot,
        disease=disease,
        defects_fc=defects,
        leg_angle=leg_angle,
    )


@dataclass
class KneeVisit:
    """The anatomy of one knee at one visit: posed bones, cartilage fields and derived grades."""

    spec: KneeSpec
    month: int
    severity: float
    fc: tuple[ThicknessField, ThicknessField]
    tc: tuple[ThicknessField, ThicknessField]
    osteophyte_mm: tuple[float, float]  #: medial, lateral
    femur_pose: Pose
    bones: dict  #: name -> (Pose, [(primitive, cortex_mm), ...])
    condyles: tuple[SpindleTorus, SpindleTorus]  #: in the femur frame
    contact_jsw_mm: tuple[float, float]  #: FC + TC at the contact point, medial / lateral
    healthy_jsw_mm: tuple[float, float]
    jsn: int
    ost: int
    klg: int

    # ------------------------------------------------------------------ thickness ground truth
    @staticmethod
    def fc_polar_to_xy(theta, phi):
        """Condyle surface angles (rad) -> normalised atlas coordinates (x, y)."""
        return phi / PHI_MAX, (theta - THETA_MID) / THETA_HALF

    def tc_plane_coords(self, u, v, w):
        """Tibia frame -> (distance above the plateau plane along its normal, in-plane b) in mm."""
        g = self.spec.plateau_slope
        n = np.sqrt(1.0 + g * g)
        return (w - g * v) / n, (v + g * w) / n

    def tc_to_xy(self, k: int, u, b):
        cu, cb, su, sb = self.spec.tc_footprints[k]
        return (u - cu) / su, (b - cb) / sb

    def thickness_maps(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Analytic FC / TC thickness maps (mm, NaN outside the footprint) on the fixed atlas grid."""
        return {"fc": render_map(self.fc, size), "tc": render_map(self.tc, size)}

    # ------------------------------------------------------------------ projection
    def chords(self, u, w, bone: str):
        """Exact path lengths (mm) along the beam (v) through ``bone`` at knee-frame points ``(u, w)``.

        Returns ``(total, cortical)``: length inside the bone and inside its cortical shell.
        """
        pose, prims = self.bones[bone]
        u, w = np.broadcast_arrays(np.asarray(u, dtype=np.float64), np.asarray(w, dtype=np.float64))
        total = np.zeros(u.shape)
        cort = np.zeros(u.shape)
        lo, hi = self._bone_box(bone)
        sel = (u >= lo[0]) & (u <= hi[0]) & (w >= lo[1]) & (w <= hi[1])
        if not sel.any():
            return total, cort
        lu, _, lw = pose.to_local(u[sel], 0.0, w[sel])
        outer, inner = [], []
        for prim, cortex in prims:
            outer += prim.intervals(lu, lw)
            inner += prim.shrunk(cortex).intervals(lu, lw)
        t = union_length(outer)
        total[sel] = t
        cort[sel] = np.clip(t - union_length(inner), 0.0, None)
        return total, cort

    def _bone_box(self, bone: str):
        """Knee-frame (u, w) bounding box of a posed bone (mm), cached."""
        cache = self.__dict__.setdefault("_boxes", {})
        if bone not in cache:
            pose, prims = self.bones[bone]
            pts = []
            for prim, _ in prims:
                bb = prim.bbox()
                for a in np.clip(bb[0], -1e3, 1e3):
                    for c in np.clip(bb[2], -1e3, 1e3):
                        pts.append(pose.to_knee(a, 0.0, c))
            pts = np.array(pts)
            cache[bone] = ((pts[:, 0].min() - 1.0, pts[:, 2].min() - 1.0), (pts[:, 0].max() + 1.0, pts[:, 2].max() + 1.0))
        return cache[bone]

    def envelope_length(self, u, w):
        au, av = self.spec.envelope
        env = [ZCylinder((0.0, 5.0), (au, av), -1e4, 1e4).intervals(u, w)[0],
               Ellipsoid((0.0, 5.0, 170.0 * self.spec.scale), (au * 1.3, av * 1.25, 150.0)).intervals(u, w)[0]]
        return union_length(env)

    def silhouette(self, bone: str, u: np.ndarray, top: bool, w_range=(-40.0, 60.0), step: float = 0.05) -> np.ndarray:
        """Top (``top=True``) or bottom edge w (mm) of the projected bone at knee-frame ``u`` positions."""
        u = np.asarray(u, dtype=np.float64)
        ws = np.arange(w_range[0], w_range[1], step)
        U, W = np.meshgrid(u, ws, indexing="ij")
        has = self.chords(U, W, bone)[0] > 0
        found = has.any(axis=1)
        if top:
            j = has.shape[1] - 1 - np.argmax(has[:, ::-1], axis=1)
            a, b = ws[j], ws[j] + step  # a inside, b outside
        else:
            j = np.argmax(has, axis=1)
            a, b = ws[j] - step, ws[j]  # a outside, b inside
        for _ in range(18):  # vectorised bisection between an empty and a filled sample
            m = 0.5 * (a + b)
            inside = self.chords(u, m, bone)[0] > 0
            if top:
                a, b = np.where(inside, m, a), np.where(inside, b, m)
            else:
                a, b = np.where(inside, a, m), np.where(inside, m, b)
        return np.where(found, 0.5 * (a + b), np.nan)

    def landmark_positions(self) -> np.ndarray:
        """16 KNEEL landmarks in the knee frame as (u, w) mm, each group ordered by increasing u.

        Tibial 0-8: the projected tibial plateau edge from the medial to the lateral rim (index 4 at the
        intercondylar eminence = joint centre). Femoral 9-15: the projected femoral condyle edge.
        """
        pa_u = self.spec.plateau_axes[0]
        ut = np.linspace(-0.9 * pa_u, 0.9 * pa_u, 9)
        cu_m, cu_l = self.spec.condyle_u
        r_m, r_l = self.spec.condyle_r
        uf = np.linspace(-(cu_m + 0.75 * r_m), cu_l + 0.75 * r_l, 7)
        wt = self.silhouette("tibia", ut, top=True, w_range=(-25.0, 20.0))
        wf = self.silhouette("femur", uf, top=False, w_range=(-10.0, 45.0))
        return np.stack([np.concatenate([ut, uf]), np.concatenate([wt, wf])], axis=1)

    def radiographic_jsw(self, n: int = 41) -> tuple[float, float]:
        """Minimal vertical gap (mm) between projected femur and tibia in the medial / lateral compartment.

        0 when the projected bones touch or overlap (denuded bone; the plateau rim projects above the
        contact point)."""
        out = []
        for k in (0, 1):
            cu, _, su, _ = self.spec.tc_footprints[k]
            u = np.linspace(cu - 0.6 * su, cu + 0.6 * su, n)
            gap = self.silhouette("femur", u, top=False, w_range=(-10.0, 25.0), step=0.1) - \
                self.silhouette("tibia", u, top=True, w_range=(-15.0, 12.0), step=0.1)
            out.append(max(0.0, float(np.nanmin(gap))))
        return out[0], out[1]


def _femur_prims(spec: KneeSpec, ost: tuple[float, float]):
    s = spec.scale
    cu_m, cu_l = spec.condyle_u
    ra_m, ra_l = spec.condyle_ra
    r_m, r_l = spec.condyle_r
    cv = spec.condyle_v
    cond_m = SpindleTorus((-cu_m, cv, ra_m + r_m), ra_m, r_m)
    cond_l = SpindleTorus((cu_l, cv, ra_l + r_l), ra_l, r_l)
    prims = [
        (cond_m, 1.2), (cond_l, 1.2),
        # distal metaphysis: a half-ellipsoid flaring from the shaft down to the epicondyles
        (Ellipsoid((0.0, 0.0, 17.0 * s), (35.0 * s, 25.0 * s, 72.0 * s), wmin=17.0 * s), 1.2),
        (ZCylinder((0.0, -2.0), (13.5 * s, 12.5 * s), 70.0 * s, 1e4), 4.5),
    ]
    for k, (cu, r, sign) in enumerate(((cu_m, r_m, -1.0), (cu_l, r_l, 1.0))):
        o = ost[k]
        if o > 0.05:
            prims.append((Ellipsoid((sign * (cu + 0.8 * r + o / 2.0 - 1.5), cv, 0.45 * r),
                                    (o / 2.0 + 1.5, 5.0 + o / 2.0, 1.5 + 0.5 * o)), 0.6))
    return (cond_m, cond_l), prims


def _tibia_prims(spec: KneeSpec, ost: tuple[float, float]):
    s = spec.scale
    au, av = spec.plateau_axes
    prims = [
        # the block reaches 4 mm into the flare: abutting solids would leave a zero-distance seam inside bone
        (ZCylinder((0.0, 2.0), (au, av), -14.0 * s, 20.0, top=0.0, slope=spec.plateau_slope), 1.0),
        (Ellipsoid((0.0, 0.0, 0.0), (8.0 * s, 13.0 * s, 7.0 * s)), 1.0),
        # proximal metaphysis: a half-ellipsoid tapering from the plateau to the shaft
        (Ellipsoid((0.0, 2.0, -10.0 * s), (au, av, 68.0 * s), wmax=-10.0 * s), 1.2),
        (ZCylinder((0.0, 4.0), (12.5 * s, 11.5 * s), -1e4, -60.0 * s), 4.5),
    ]
    for k, sign in enumerate((-1.0, 1.0)):
        o = ost[k]
        if o > 0.05:
            prims.append((Ellipsoid((sign * (au + o / 2.0 - 2.0), 2.0, -1.5), (o / 2.0 + 2.0, 5.0 + o / 2.0,
                                                                            1.2 + 0.45 * o)), 0.6))
    return prims


def _contact_jsw(fc, tc, spec: KneeSpec) -> tuple[float, float]:
    out = []
    for k in (0, 1):
        fx, fy = 0.0, (0.0 - THETA_MID) / THETA_HALF
        cu, cb, su, sb = spec.tc_footprints[k]
        u_c = (-spec.condyle_u[0], spec.condyle_u[1])[k]
        tx, ty = (u_c - cu) / su, (spec.condyle_v - cb) / sb
        out.append(float(np.nan_to_num(fc[k](fx, fy)) + np.nan_to_num(tc[k](tx, ty))))
    return out[0], out[1]


def knee_at_visit(spec: KneeSpec, month: int) -> KneeVisit:
    """Build the posed anatomy of ``spec`` at ``month`` (disease applied, femur seated on the cartilage)."""
    d = spec.disease
    sev = d.severity(month)
    dom, other = (1, 0) if d.lateral else (0, 1)
    fc, tc = list(spec.fc_fields), list(spec.tc_fields)
    healthy = _contact_jsw(fc, tc, spec)
    for k, frac in ((dom, 1.0), (other, 0.15)):
        s_k = sev * frac
        # loss at the load-bearing centre = s_k x the healthy thickness there
        fcl = s_k * float(fc[k].healthy(*fc[k].load_centre))
        tcl = s_k * float(tc[k].healthy(*tc[k].load_centre))
        defects = ()
        if k == dom and sev > 0.15:
            defects = tuple((x, y, r, depth * min(1.0, (sev - 0.15) / 0.4)) for x, y, r, depth in spec.defects_fc)
        fc[k] = fc[k].with_disease(fcl, defects)
        tc[k] = tc[k].with_disease(tcl)
    osteo = d.osteophyte_mm(month)
    ost = (osteo, 0.6 * osteo) if not d.lateral else (0.6 * osteo, osteo)
    jsw = _contact_jsw(fc, tc, spec)
    # Seat the femur: lowest condyle points (femur frame, w = 0 at u = -cu_m, +cu_l) rest on the cartilage.
    g = spec.plateau_slope
    heights = [jsw[k] + g * spec.condyle_v for k in (0, 1)]
    cu_m, cu_l = spec.condyle_u
    sin_b = (heights[1] - heights[0]) / (cu_l + cu_m)
    beta = float(np.arcsin(np.clip(sin_b, -0.2, 0.2)))
    tw = heights[0] + np.sin(beta) * cu_m
    pose = Pose(beta, (0.0, 0.0, float(tw)))
    condyles, fprims = _femur_prims(spec, ost)
    s = spec.scale
    bones = {
        "femur": (pose, fprims),
        "tibia": (Pose(), _tibia_prims(spec, ost)),
        "fibula": (Pose(), [(Ellipsoid((36.0 * s, 18.0 * s, -30.0 * s), (10.0 * s, 10.0 * s, 12.0 * s)), 1.0),
                            (ZCylinder((38.0 * s, 20.0 * s), (7.0 * s, 7.0 * s), -1e4, -36.0 * s), 2.5)]),
        "patella": (pose, [(Ellipsoid((2.0, -40.0 * s, 30.0 * s), (21.0 * s, 10.0 * s, 22.0 * s)), 1.5)]),
    }
    narrowing = max(1.0 - jsw[k] / max(healthy[k], 1e-6) for k in (0, 1))
    jsn = jsn_grade(narrowing)
    og = osteophyte_grade(max(ost))
    return KneeVisit(spec, int(month), sev, tuple(fc), tuple(tc), ost, pose, bones, condyles, jsw, healthy,
                     jsn, og, klg_rule(jsn, og))

"""Knee DXA acquisition in its own pose, bone label maps of both modalities, and pair-ready crops.

Physics of the pose. The bilateral radiograph is taken standing, weight-bearing, in fixed flexion; a knee DXA is
taken supine with the leg extended and unloaded. Three things therefore differ between the two images of one knee:

* **Articulation** (:func:`articulate`): unloaded, the femur is no longer pressed onto the compartment that
  carries the load, so the coronal (varus / valgus) femur-tibia angle differs by a few degrees. The femur and
  the patella rock about the contact point of the compartment that stays in contact (so no bone passes through
  the other), by ``flex_angle`` = 2-5 degrees in either direction (which compartment opens depends on the
  disease side and on ligament laxity), and lift ``distraction_mm`` = 0.3-1.5 mm along the tibial axis (the
  unloaded joint space is wider). Tibia and fibula do not move: the knee frame is the tibia's frame.
* **Placement**: the whole leg lies on the table with its own in-plane rotation (leg alignment + about
  4 degrees of positioning), its own position in the field of view (about 6-8 mm) and its own magnification
  (0.92-1.08: fan-beam DXA geometry against the radiograph's source-to-detector geometry).
* No single affine map aligns the two images: the tibia and the femur need different ones.

Everything here is drawn from the knee's OWN random stream (``subject_rng(seed, index, 20 + side index)``,
passed in by the generator), so the radiographs and MR volumes of a seed do not depend on whether DXA is written.

Pixel conventions. Points are ``(x, y)`` = (column, row) pixels; a pixel's centre has integer coordinates.
Columns run towards the patient's left (+X), rows towards the feet (-Z), in both modalities; so the right knee's
fibula (lateral) is on the image's left. A 3 x 3 matrix ``P`` maps ``(x, y, 1)`` pixels to ``(X, Z, 1)`` mm of
the modality's own detector plane (the radiograph's world, or the DXA scanner's field of view centred at 0).

Label maps (:data:`BONE_LABELS`): 0 background, 1 femur, 2 tibia, 3 fibula -- the projected bone silhouettes,
painted fibula, then femur, then tibia (the tibia wins where projections overlap), identically in both
modalities. The patella is part of the image (it projects over the femur) but has no label.

Pair-ready crops (:func:`crop_matrix_from_landmarks`): 256 x 256 px, a similarity (rotation, isotropic scale,
translation; a left-right mirror for right knees, so every crop shows a left knee as the MRIS ROI does) that
maps the tibial plateau ends (KNEEL landmarks 0 and 8) and the joint centre (4) onto fixed canonical positions
(:data:`CANONICAL_TIBIA`) by least squares. The radiograph's landmarks are those a lab gets from bundles/kneel;
the DXA's are computed through its own pose. The tibia (the bone the landmarks sit on) is thus aligned across
modalities and the femur is not: what is left is the articulation a deformable registration must recover. The
paper affinely pre-aligns every image to one random image; mapping landmarks onto a fixed template is the same
up to the template and needs no image similarity across modalities.

Files: NIfTI with array index ``[i, j]`` = ``[column, row]`` (like the radiograph as MONAI's ITK reader returns
it; 2D for the radiograph labels and the crops, ``[column, row, 1]`` for the uncropped DXA files as before);
:func:`load_2d` returns rows x columns and the spacing. The affine maps ``(i, j)`` to the modality's detector mm
(LPS: x = patient's left, z = superior), so its column norms are the pixel spacing (mm); for a crop it is
``P @ M`` (rotation, the similarity's scale and, for right knees, the mirror included).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from pipeline.conventions import DXA_LABELS, FLIP_PERMUTATION, N_LANDMARKS
from pipeline.geometry import apply_matrix, mirror_matrix
from pipeline.io.atomic import write_text_atomic

from .anatomy import KneeVisit
from .radiograph import DetectorGeometry, KneePlacement, knee_detector_points
from .shapes import Pose

__all__ = [
    "BONE_LABELS",
    "LABEL_ORDER",
    "CROP_SIZE",
    "CANONICAL_TIBIA",
    "DXAPose",
    "DXAGrid",
    "sample_dxa_pose",
    "articulate",
    "dxa_image",
    "dxa_landmarks",
    "paint_labels",
    "radiograph_labels",
    "radiograph_pixel_matrix",
    "order_left_to_right",
    "similarity_fit",
    "crop_matrix_from_landmarks",
    "resample_to_crop",
    "robust_unit",
    "nifti_affine_2d",
    "load_2d",
    "write_knee_pair",
]

#: bone name -> label value (0 background), from the shared DXA label table.
BONE_LABELS: dict[str, int] = {name: k for k, name in DXA_LABELS.items() if k}
#: painting order of the projected silhouettes: later bones win where they overlap (tibia over fibula).
LABEL_ORDER: tuple[str, ...] = ("fibula", "femur", "tibia")
#: side of the pair-ready crops (px).
CROP_SIZE = 256
#: canonical crop positions (x, y) px of KNEEL landmarks 0 and 8 (tibial plateau ends, medial / lateral in the
#: left-knee convention) and 4 (joint centre, on the intercondylar eminence ~7 mm above the plateau). A plateau
#: about 68 mm wide then spans 124 px (~0.55 mm/px): ~65 mm of femur above and ~75 mm of tibia and fibula below.
CANONICAL_TIBIA: dict[int, tuple[float, float]] = {0: (66.0, 120.0), 4: (128.0, 107.0), 8: (190.0, 120.0)}

# areal density per mm of path (g/cm^2-like units) of trabecular and cortical bone
_DENS_TRABECULAR = 0.035
_DENS_CORTICAL = 0.12


# ----------------------------------------------------------------------------------------------- pose
@dataclass(frozen=True)
class DXAPose:
    """The DXA acquisition's pose of one knee (see the module docstring for the physics).

    ``flex_angle`` (rad): coronal femur-tibia articulation, + raises the lateral condyle (opens the lateral
    compartment). ``distraction_mm``: extra joint opening along the tibial axis. ``angle`` (rad): in-plane
    rotation of the leg (same sense as :class:`KneePlacement`). ``centre``: detector position (X, Z) mm of the
    knee-frame origin (plateau centre). ``magnification``: detector mm per object mm.
    """

    side: str
    flex_angle: float
    distraction_mm: float
    angle: float
    centre: tuple[float, float]
    magnification: float

    def placement(self) -> KneePlacement:
        """The knee's placement in OBJECT mm (detector mm / magnification)."""
        m = self.magnification
        return KneePlacement(self.side, (self.centre[0] / m, self.centre[1] / m), self.angle)

    def detector_to_knee(self, X, Z):
        """Detector (X, Z) mm -> knee frame (u, w) mm."""
        return self.placement().to_knee(np.asarray(X) / self.magnification, np.asarray(Z) / self.magnification)

    def knee_to_detector(self, u, w):
        """Knee frame (u, w) mm -> detector (X, Z) mm."""
        X, Z = self.placement().to_world(np.asarray(u, dtype=np.float64), np.asarray(w, dtype=np.float64))
        return X * self.magnification, Z * self.magnification


@dataclass(frozen=True)
class DXAGrid:
    """DXA pixel grid: ``spacing`` mm, ``size_mm = (width, height)``, centred on the detector origin."""

    spacing: float = 0.5
    size_mm: tuple[float, float] = (150.0, 200.0)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return int(round(self.size_mm[1] / self.spacing)), int(round(self.size_mm[0] / self.spacing))

    def pixel_matrix(self) -> np.ndarray:
        """``P``: (x, y, 1) px -> (X, Z, 1) detector mm (pixel centres; columns +X, rows -Z)."""
        nz, nx = self.shape
        s = self.spacing
        return np.array([[s, 0.0, -(nx - 1) / 2.0 * s], [0.0, -s, (nz - 1) / 2.0 * s], [0.0, 0.0, 1.0]])


def radiograph_pixel_matrix(geom: DetectorGeometry) -> np.ndarray:
    """``P`` of the radiograph: (x, y, 1) px -> (X, Z, 1) world mm (:class:`DetectorGeometry`)."""
    return np.array([[geom.spacing, 0.0, geom.x0], [0.0, -geom.spacing, geom.z0], [0.0, 0.0, 1.0]])


def sample_dxa_pose(rng: np.random.Generator, kv: KneeVisit, side: str) -> DXAPose:
    """Draw the DXA pose of one knee from ``rng`` (the knee's own stream). Ranges in the module docstring."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    flex = sign * float(np.deg2rad(rng.uniform(2.0, 5.0)))
    distraction = float(rng.uniform(0.3, 1.5))
    angle = float(kv.spec.leg_angle + np.deg2rad(rng.normal(0.0, 4.0)))
    centre = (float(rng.normal(0.0, 6.0)), float(rng.normal(0.0, 8.0)))
    mag = float(rng.uniform(0.92, 1.08))
    return DXAPose(side, flex, distraction, angle, centre, mag)


def _rotate_about(pose: Pose, angle: float, pivot_uw: tuple[float, float], lift: float) -> Pose:
    """``pose`` followed by a rotation by ``angle`` about knee-frame ``pivot_uw`` and a lift along +w (mm)."""
    c, s = math.cos(angle), math.sin(angle)
    du, dw = pose.t[0] - pivot_uw[0], pose.t[2] - pivot_uw[1]
    t = (c * du - s * dw + pivot_uw[0], pose.t[1], s * du + c * dw + pivot_uw[1] + lift)
    return Pose(pose.beta + angle, t)


def articulate(kv: KneeVisit, pose: DXAPose) -> KneeVisit:
    """The same knee with femur and patella rocked by ``pose.flex_angle`` about the contact point of the
    compartment that stays in contact (medial when the lateral side rises) and lifted ``pose.distraction_mm``.

    Tibia and fibula keep their poses. Returns a new :class:`KneeVisit` (the input is not changed)."""
    cu_m, cu_l = kv.spec.condyle_u
    fp = kv.femur_pose
    # lowest condyle points in the femur frame: (-cu_m, 0) medial, (+cu_l, 0) lateral (anatomy.knee_at_visit)
    u_loc = -cu_m if pose.flex_angle >= 0 else cu_l
    pu, _, pw = fp.to_knee(u_loc, 0.0, 0.0)
    pivot = (float(pu), float(pw))
    bones = dict(kv.bones)
    for name in ("femur", "patella"):
        bp, prims = bones[name]
        bones[name] = (_rotate_about(bp, pose.flex_angle, pivot, pose.distraction_mm), prims)
    femur_pose = _rotate_about(fp, pose.flex_angle, pivot, pose.distraction_mm)
    return replace(kv, femur_pose=femur_pose, bones=bones)


# ----------------------------------------------------------------------------------------------- labels
def paint_labels(kv: KneeVisit, u: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Bone label map (uint8, :data:`BONE_LABELS`) of the projected silhouettes at knee-frame points (u, w) mm,
    painted in :data:`LABEL_ORDER`. ``out``: a label array of the same shape to paint into (other pixels kept)."""
    lab = np.zeros(np.shape(u), np.uint8) if out is None else out
    for bone in LABEL_ORDER:
        total, _ = kv.chords(u, w, bone)
        lab[total > 0] = BONE_LABELS[bone]
    return lab


def radiograph_labels(knees: list[tuple[KneeVisit, KneePlacement]], geom: DetectorGeometry) -> np.ndarray:
    """Bone label map (uint8, rows x columns of ``geom``) of a bilateral radiograph, on its own pixel grid.

    Each knee is painted on the pixels :func:`~pipeline.cohort.radiograph.knee_detector_points` gives it (those
    :func:`~pipeline.cohort.radiograph.line_integrals` projects it onto)."""
    lab = np.zeros(geom.shape, np.uint8)
    for kv, cols, u, w in knee_detector_points(knees, geom):
        sub = lab[:, cols]
        paint_labels(kv, u, w, out=sub)
        lab[:, cols] = sub
    return lab


# ----------------------------------------------------------------------------------------------- DXA image
def dxa_image(kv: KneeVisit, pose: DXAPose, grid: DXAGrid = DXAGrid(),
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DXA-like single-knee image (areal bone density, soft tissue removed) and its label map.

    ``kv`` is the knee as posed for the DXA (:func:`articulate`); ``pose`` places it on the detector. Returns
    ``(density float32 g/cm^2-like, labels uint8)``, both rows x columns of ``grid`` (rows towards the feet,
    columns towards the patient's left). Density: trabecular 0.035 and cortical 0.12 per mm of path through
    bone (patella included), a 0.6 px Gaussian blur and, with ``rng``, N(0, 0.01) noise.
    """
    XX, ZZ = _grid_mm(grid)
    u, w = pose.detector_to_knee(XX, ZZ)
    density = np.zeros(u.shape)
    labels = np.zeros(u.shape, np.uint8)
    for bone in LABEL_ORDER + ("patella",):
        total, cort = kv.chords(u, w, bone)
        density += _DENS_TRABECULAR * (total - cort) + _DENS_CORTICAL * cort
        if bone in BONE_LABELS:
            labels[total > 0] = BONE_LABELS[bone]
    density = ndimage.gaussian_filter(density, 0.6)
    if rng is not None:
        density = density + rng.normal(0.0, 0.01, density.shape)
    return density.astype(np.float32), labels


def _grid_mm(grid: DXAGrid) -> tuple[np.ndarray, np.ndarray]:
    nz, nx = grid.shape
    P = grid.pixel_matrix()
    X = P[0, 2] + np.arange(nx) * P[0, 0]
    Z = P[1, 2] + np.arange(nz) * P[1, 1]
    return np.meshgrid(X, Z, indexing="xy")


def order_left_to_right(points: np.ndarray, side: str) -> np.ndarray:
    """16 KNEEL landmarks ordered by increasing knee-frame u -> each group ordered left to right in the image
    (a right knee's u runs towards the image's left, so its groups are reversed)."""
    p = np.asarray(points)
    if side == "R":
        p = np.concatenate([p[:9][::-1], p[9:][::-1]])
    return p


def dxa_landmarks(kv: KneeVisit, pose: DXAPose, grid: DXAGrid = DXAGrid()) -> np.ndarray:
    """The 16 KNEEL landmarks of the DXA image (``kv`` articulated), (x, y) px, each group left to right."""
    lm = kv.landmark_positions()
    X, Z = pose.knee_to_detector(lm[:, 0], lm[:, 1])
    P = grid.pixel_matrix()
    x = (X - P[0, 2]) / P[0, 0]
    y = (Z - P[1, 2]) / P[1, 1]
    return order_left_to_right(np.stack([x, y], axis=1), pose.side)


# ----------------------------------------------------------------------------------------------- crops
def similarity_fit(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, isotropic scale, translation; no reflection) mapping ``src`` points
    onto ``dst`` points (Umeyama 1991). Returns the 3 x 3 ``(x, y, 1)`` matrix."""
    src = np.asarray(src_xy, dtype=np.float64)
    dst = np.asarray(dst_xy, dtype=np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    cov = b.T @ a / len(src)
    U, S, Vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0])
    R = U @ d @ Vt
    var = (a**2).sum() / len(src)
    if var <= 0:
        raise ValueError("similarity_fit needs at least two distinct source points")
    scale = float(np.trace(np.diag(S) @ d) / var)
    m = np.eye(3)
    m[:2, :2] = scale * R
    m[:2, 2] = md - scale * R @ ms
    return m


def crop_matrix_from_landmarks(points_xy: np.ndarray, side: str, size: int = CROP_SIZE,
                               canonical: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """``M``: crop (x, y, 1) px -> ORIGINAL (x, y, 1) px, from the 16 KNEEL landmarks (ORIGINAL px, image order).

    A similarity that puts landmarks 0, 8 and 4 (by least squares) on ``canonical`` (default
    :data:`CANONICAL_TIBIA`). Right knees are mirrored (``M = S @ mirror_matrix(size)``) so the crop shows a left
    knee; their landmark ``i`` in crop order is the original's ``FLIP_PERMUTATION[i]``.
    """
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.shape != (N_LANDMARKS, 2) or not np.isfinite(pts[[0, 4, 8]]).all():
        raise ValueError(f"need {N_LANDMARKS} finite (x, y) landmarks, got shape {pts.shape}")
    canon = CANONICAL_TIBIA if canonical is None else canonical
    idx = sorted(canon)
    flip = side == "R"
    src_idx = [FLIP_PERMUTATION[i] for i in idx] if flip else idx
    crop_pts = np.array([canon[i] for i in idx], dtype=np.float64)
    mirror = mirror_matrix(size) if flip else np.eye(3)
    s = similarity_fit(apply_matrix(mirror, crop_pts), pts[src_idx])  # mirror is its own inverse
    return s @ mirror


def resample_to_crop(array: np.ndarray, m: np.ndarray, size: int = CROP_SIZE, mode: str = "linear") -> np.ndarray:
    """Sample a rows x columns ``array`` on a ``size`` x ``size`` crop: crop pixel (x, y) takes the value at
    ORIGINAL ``M (x, y, 1)``; outside the source: 0.

    ``mode="linear"`` (images): bilinear, float32, with Gaussian anti-aliasing of sigma ``(k - 1) / 2`` source px
    when a crop pixel spans ``k > 1`` source px. ``mode="nearest"`` (label maps): nearest neighbour only, the
    input dtype kept, so the output holds only values of the input.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    src = np.asarray(array)
    if src.ndim != 2:
        raise ValueError(f"resample_to_crop expects a 2D array (rows, columns), got shape {src.shape}")
    m = np.asarray(m, dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    xs = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    ys = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    if mode == "nearest":
        return ndimage.map_coordinates(src, [ys, xs], order=0, mode="constant", cval=0).astype(src.dtype)
    img = src.astype(np.float32)
    k = math.hypot(m[0, 0], m[1, 0])  # source px per crop px (a similarity: same along both axes)
    if k > 1.05:
        img = ndimage.gaussian_filter(img, (k - 1.0) / 2.0, mode="nearest")
    return ndimage.map_coordinates(img, [ys, xs], order=1, mode="constant", cval=0.0).astype(np.float32)


def robust_unit(image: np.ndarray, lo: float = 1.0, hi: float = 99.0, mask: np.ndarray | None = None) -> np.ndarray:
    """``(image - p_lo) / (p_hi - p_lo)`` clipped to [0, 1] (float32); percentiles over ``mask`` (default: all)."""
    img = np.asarray(image, dtype=np.float64)
    vals = img[mask] if mask is not None else img.ravel()
    a, b = np.percentile(vals, [lo, hi]) if vals.size else (0.0, 1.0)
    return np.clip((img - a) / max(b - a, 1e-12), 0.0, 1.0).astype(np.float32)


def nifti_affine_2d(p: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """4 x 4 LPS affine of a 2D NIfTI stored ``[i, j]`` = ``[column, row]``: pixel (x, y) -> ``P @ M`` detector mm.

    ``p``: (x, y, 1) px -> (X, Z, 1) mm of the source image; ``m``: crop -> source px (None: the source itself).
    X is the patient's left (LPS x), Z superior (LPS z); the k axis points posterior with the pixel spacing."""
    a = np.asarray(p, dtype=np.float64) @ (np.eye(3) if m is None else np.asarray(m, dtype=np.float64))
    s = float(np.sqrt(abs(np.linalg.det(a[:2, :2]))))
    return np.array([[a[0, 0], a[0, 1], 0.0, a[0, 2]], [0.0, 0.0, s, 0.0], [a[1, 0], a[1, 1], 0.0, a[1, 2]],
                     [0.0, 0.0, 0.0, 1.0]])


def load_2d(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a 2D NIfTI written here: ``(array rows x columns, pixel spacing mm)``."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    arr = arr.reshape(arr.shape[:2])
    spacing = float(np.linalg.norm(img.affine[:3, 0]))
    return arr.T, spacing


def write_knee_pair(root: Path, folders: dict[str, Path], kv: KneeVisit, side: str, xray_values: np.ndarray,
                    xray_labels: np.ndarray, xray_points: np.ndarray, geom: DetectorGeometry,
                    rng: np.random.Generator, writer: Callable, grid: DXAGrid = DXAGrid()) -> dict[str, str]:
    """Acquire one knee's DXA in its own pose and write its files and both modalities' pair-ready crops.

    ``folders``: ``{"dxa": DXA/<SIDE>_KNEE, "xray": XRAY/PA_BILATERAL/<SIDE>_KNEE}`` relative to ``root``.
    ``xray_values``: raw detector values of the bilateral radiograph (bone bright); ``xray_labels``: its label
    map (:func:`radiograph_labels`); ``xray_points``: this knee's 16 landmarks there (image order).
    ``writer(path, array, affine_lps, dtype=...)``: the NIfTI writer. Returns manifest column -> relative path.

    Also writes ``<dxa folder>/dxa_pose.json``: the drawn :class:`DXAPose` (angles in degrees), the DXA's 16
    landmarks (original DXA px, image order) and both crops' ``crop_to_original`` matrices (3 x 3, (x, y, 1)).
    """
    pose = sample_dxa_pose(rng, kv, side)
    kd = articulate(kv, pose)
    dimg, dlab = dxa_image(kd, pose, grid, rng=rng)
    dpts = dxa_landmarks(kd, pose, grid)
    P_d, P_x = grid.pixel_matrix(), radiograph_pixel_matrix(geom)
    daff = nifti_affine_2d(P_d)
    ddir, xdir = Path(folders["dxa"]), Path(folders["xray"])
    out = {"dxa_nifti": ddir / "dxa.nii.gz", "dxa_labels_nifti": ddir / "dxa_labels.nii.gz",
           "dxa_crop": ddir / "dxa_crop.nii.gz", "dxa_crop_labels": ddir / "dxa_crop_labels.nii.gz",
           "xray_crop": xdir / "xray_crop.nii.gz", "xray_crop_labels": xdir / "xray_crop_labels.nii.gz"}
    # the uncropped DXA keeps its historical layout: [column, row, 1]
    writer(root / out["dxa_nifti"], dimg.T[:, :, None], daff, dtype=np.float32)
    writer(root / out["dxa_labels_nifti"], dlab.T[:, :, None], daff, dtype=np.uint8)
    record = {"pose": {**asdict(pose), "flex_angle_deg": math.degrees(pose.flex_angle),
                       "angle_deg": math.degrees(pose.angle)},
              "dxa_landmarks": np.round(dpts, 3).tolist(), "canonical_tibia": CANONICAL_TIBIA, "crop_size": CROP_SIZE}
    for key, img, lab, pts, P in (("dxa", dimg, dlab, dpts, P_d), ("xray", xray_values, xray_labels, xray_points, P_x)):
        m = crop_matrix_from_landmarks(pts, side)
        record[f"{key}_crop_to_original"] = np.round(m, 8).tolist()
        inside = resample_to_crop(np.ones(np.shape(img), np.uint8), m, mode="nearest") > 0
        crop = robust_unit(resample_to_crop(img, m, mode="linear"), mask=inside if inside.any() else None)
        crop_lab = resample_to_crop(lab, m, mode="nearest")
        aff = nifti_affine_2d(P, m)
        writer(root / out[f"{key}_crop"], crop.T, aff, dtype=np.float32)
        writer(root / out[f"{key}_crop_labels"], crop_lab.T, aff, dtype=np.uint8)
    write_text_atomic(root / ddir / "dxa_pose.json", json.dumps(record, indent=1, sort_keys=True))
    return {k: str(v) for k, v in out.items()}

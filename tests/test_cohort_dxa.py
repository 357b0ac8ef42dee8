"""The cohort's DXA in its own pose, the bone label maps of both modalities and the pair-ready crops."""

from __future__ import annotations

import hashlib
import json
import math

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipeline.cohort.anatomy import knee_at_visit
from pipeline.cohort.dxa import (
    CANONICAL_TIBIA,
    CROP_SIZE,
    DXAGrid,
    DXAPose,
    articulate,
    crop_matrix_from_landmarks,
    dxa_image,
    load_2d,
    radiograph_labels,
    resample_to_crop,
    robust_unit,
    sample_dxa_pose,
    similarity_fit,
)
from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort, generate_subject
from pipeline.cohort.radiograph import DetectorGeometry, KneePlacement
from pipeline.cohort.subject import sample_subject, subject_rng
from pipeline.geometry import apply_matrix
from pipeline.io.manifest import load_manifest

NEW_COLUMNS = ("xray_labels", "xray_crop", "xray_crop_labels", "dxa_crop", "dxa_crop_labels")
CFG = dict(seed=11, workers=1, **{**TINY, "visits": (0, 24), "write_mr": False})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dxa_cohort")
    m = generate_cohort(root, CohortConfig(n_subjects=2, **CFG), progress=False)
    return root, m


def _baseline(m):
    return m[m.visit_month == 0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# ------------------------------------------------------------------------------------------- pure functions
def test_similarity_fit_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    ang, s, t = 0.3, 1.7, np.array([4.0, -9.0])
    R = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    dst = src @ (s * R).T + t
    m = similarity_fit(src, dst)
    assert np.allclose(m[:2, :2], s * R) and np.allclose(m[:2, 2], t)


@pytest.mark.parametrize("side", ["L", "R"])
def test_crop_matrix_puts_tibial_landmarks_on_canonical_positions(side):
    # landmarks that ARE a similarity image of the canonical ones: the fit is exact, the mirror only for R
    canon = np.array([CANONICAL_TIBIA[k] for k in (0, 4, 8)])
    pts = np.full((16, 2), 50.0)
    ang, s, t = -0.2, 2.5, np.array([300.0, 120.0])
    R = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    img = canon @ (s * R).T + t
    if side == "R":  # a right knee lies mirrored in the image: its landmarks are ordered left -> right there
        img = canon * [-1.0, 1.0] @ (s * R).T + t
        pts[[8, 4, 0]] = img
    else:
        pts[[0, 4, 8]] = img
    m = crop_matrix_from_landmarks(pts, side)
    src_idx = [8, 4, 0] if side == "R" else [0, 4, 8]
    assert np.allclose(apply_matrix(m, canon), pts[src_idx], atol=1e-6)
    assert (np.linalg.det(m[:2, :2]) < 0) == (side == "R")
    assert math.isclose(abs(np.linalg.det(m[:2, :2])), s * s, rel_tol=1e-9)


def test_resample_to_crop_nearest_keeps_labels_and_linear_is_exact_on_identity():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 4, (40, 50)).astype(np.uint8)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    rot = np.array([[math.cos(0.4), -math.sin(0.4), 20.0], [math.sin(0.4), math.cos(0.4), 5.0], [0, 0, 1]])
    out = resample_to_crop(lab, rot * [[0.37], [0.37], [1]], size=32, mode="nearest")
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2, 3} and len(np.unique(out)) == 4
    same = resample_to_crop(img, np.eye(3), size=32, mode="linear")
    assert np.allclose(same, img[:32, :32], atol=1e-6)
    # a half-pixel shift is the mean of neighbours (linear, not nearest)
    half = resample_to_crop(img, np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1.0]]), size=8, mode="linear")
    assert np.allclose(half, 0.5 * (img[:8, :8] + img[:8, 1:9]), atol=1e-6)
    with pytest.raises(ValueError):
        resample_to_crop(img, np.eye(3), mode="cubic")


def test_robust_unit_range():
    x = np.arange(1000, dtype=float)
    u = robust_unit(x)
    assert u.dtype == np.float32 and u.min() == 0.0 and u.max() == 1.0
    assert math.isclose(float(u[500]), (500 - 9.99) / (989.01 - 9.99), rel_tol=1e-4)


def _knee(seed: int = 3, side: str = "L"):
    sub = sample_subject(seed, 0, (0,), 0.0)
    return knee_at_visit(sub.knees[side], 0)


def test_unarticulated_dxa_labels_equal_the_radiograph_labels_on_the_same_grid():
    """One label painter for both modalities: a DXA 'posed' exactly like the radiograph gives its labels."""
    kv = _knee()
    geom = DetectorGeometry(1.0, width_mm=200.0, height_mm=160.0)
    place = KneePlacement("L", (40.0, -5.0), 0.05)
    xl = radiograph_labels([(kv, place)], geom)
    pose = DXAPose("L", 0.0, 0.0, place.angle, place.centre, 1.0)
    _, dl = dxa_image(kv, pose, DXAGrid(1.0, (200.0, 160.0)))
    assert dl.shape == xl.shape
    cols = np.abs(geom.x0 + np.arange(xl.shape[1]) - place.centre[0]) < 0.25 * geom.width_mm
    assert np.array_equal(dl[:, cols], xl[:, cols])
    assert set(np.unique(xl)) == {0, 1, 2, 3}


def test_no_single_affine_aligns_femur_and_tibia():
    """Corresponding material points of femur and tibia, radiograph px vs DXA px: each bone alone is mapped
    exactly by one affine, both together are not (the femur is articulated relative to the tibia)."""
    kv = _knee(seed=5)
    geom = DetectorGeometry(1.0)
    place = KneePlacement("L", (90.0, 3.0), kv.spec.leg_angle)
    pose = sample_dxa_pose(subject_rng(5, 0, 21), kv, "L")
    assert np.deg2rad(2.0) <= abs(pose.flex_angle) <= np.deg2rad(5.0)
    kd = articulate(kv, pose)
    g = np.mgrid[-60:61:4, -80:81:4].reshape(2, -1).astype(float)
    pix = {}
    for bone in ("femur", "tibia"):
        fu, _, fw = kv.bones[bone][0].to_knee(g[0], 0.0, g[1])  # bone-local grid -> knee frame (radiograph)
        inside = kv.chords(fu, fw, bone)[0] > 0
        du, _, dw = kd.bones[bone][0].to_knee(g[0][inside], 0.0, g[1][inside])  # same points, DXA pose
        xr = np.stack(geom.world_to_pixel(*place.to_world(fu[inside], fw[inside])), 1)
        P = DXAGrid().pixel_matrix()
        X, Z = pose.knee_to_detector(du, dw)
        xd = np.stack([(X - P[0, 2]) / P[0, 0], (Z - P[1, 2]) / P[1, 1]], 1)
        pix[bone] = (xd, xr)
        assert inside.sum() > 50

    def residual_mm(pairs):
        src = np.concatenate([p[0] for p in pairs])
        dst = np.concatenate([p[1] for p in pairs])
        A = np.c_[src, np.ones(len(src))]
        coef, *_ = np.linalg.lstsq(A, dst, rcond=None)
        return float(np.sqrt(((A @ coef - dst) ** 2).sum(1).mean())) * geom.spacing

    assert residual_mm([pix["femur"]]) < 1e-6 and residual_mm([pix["tibia"]]) < 1e-6
    assert residual_mm([pix["femur"], pix["tibia"]]) > 0.5


# ------------------------------------------------------------------------------------------- the cohort
def test_manifest_has_the_new_columns_and_the_files_exist(cohort):
    root, m = cohort
    assert list(m.columns).index("dxa_crop_labels") == list(m.columns).index("dxa_labels_nifti") + 5
    base = _baseline(m)
    loaded = load_manifest(root / "manifest.csv", check_paths=["dxa_nifti", "dxa_labels_nifti", *NEW_COLUMNS])
    assert len(loaded) == len(m) == 2 * 2 * 2
    for c in NEW_COLUMNS:
        assert c in loaded.columns
        assert all((root / p).is_file() for p in base[c])
        assert (m[m.visit_month != 0][c] == "").all()  # only the DXA visit has them
    assert base.xray_labels.nunique() == 2  # one bilateral label map per subject, shared by both knees
    schema = json.loads(_schema_path().read_text())
    for c in NEW_COLUMNS:
        assert c in schema["columns"] and schema["columns"][c]["type"] == "path"
    assert "SCORING ONLY" in schema["columns"]["xray_labels"]["description"]


def _schema_path():
    from pipeline.io.manifest import SCHEMA_PATH

    return SCHEMA_PATH


def test_label_maps_hold_bone_labels_and_match_their_images(cohort):
    root, m = cohort
    for _, row in _baseline(m).iterrows():
        ds = pydicom.dcmread(root / row.xray_dicom)
        xl, sp = load_2d(root / row.xray_labels)
        assert xl.shape == (ds.Rows, ds.Columns) and sp == pytest.approx(row.xray_spacing_mm)
        assert set(np.unique(xl)) == {0, 1, 2, 3}
        # the landmarks sit on the bones: joint centre 4 on the tibia's top edge, tibia below it
        pts = np.asarray(json.loads(row.landmarks))
        cx, cy = (int(round(v)) for v in pts[4])
        assert 2 in xl[cy:cy + 4, cx] and (xl[cy + 3:cy + 20, cx] == 2).all()
        dimg = np.asanyarray(nib.load(root / row.dxa_nifti).dataobj)[:, :, 0].T
        dl = np.asanyarray(nib.load(root / row.dxa_labels_nifti).dataobj)[:, :, 0].T
        assert dl.shape == dimg.shape and set(np.unique(dl)) == {0, 1, 2, 3}
        assert dimg[dl > 0].mean() > 10 * abs(dimg[dl == 0].mean())  # density only where there is bone


def test_crops_are_pair_ready(cohort):
    root, m = cohort
    for _, row in _baseline(m).iterrows():
        crops = {}
        for key in ("xray", "dxa"):
            img, sp = load_2d(root / row[f"{key}_crop"])
            lab, sp_l = load_2d(root / row[f"{key}_crop_labels"])
            assert img.shape == lab.shape == (CROP_SIZE, CROP_SIZE)
            assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
            assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2, 3}
            assert sp == sp_l and 0.3 < sp < 1.0  # the affine says the crop's pixel spacing in mm
            # left-knee convention: femur above tibia, fibula lateral (image right) and below the plateau
            ctr = {k: np.argwhere(lab == k).mean(axis=0) for k in (1, 2, 3)}
            assert ctr[1][0] < ctr[2][0] < ctr[3][0] and ctr[3][1] > ctr[2][1] + 30
            assert lab[112, 128] == 2 and lab[150, 128] == 2  # just below the canonical joint centre: tibia
            # bone bright in both modalities
            assert img[lab == 2].mean() > img[lab == 0].mean() + 0.1
            crops[key] = lab
        d_tib = _dice(crops["xray"] == 2, crops["dxa"] == 2)
        d_fem = _dice(crops["xray"] == 1, crops["dxa"] == 1)
        assert d_tib > 0.95 and d_tib > d_fem  # pre-aligned on the tibia; the femur is articulated


def _best_rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (deg) that best aligns mask ``a`` onto mask ``b`` after matching centroids (Dice, 0.25 deg steps)."""
    ca, cb = ndimage.center_of_mass(a), ndimage.center_of_mass(b)
    a = ndimage.shift(a.astype(float), np.subtract(cb, ca), order=0) > 0.5
    best = (-1.0, 0.0)
    for ang in np.arange(-8.0, 8.01, 0.25):
        m = np.deg2rad(ang)
        R = np.array([[math.cos(m), -math.sin(m)], [math.sin(m), math.cos(m)]])
        off = np.asarray(cb) - R @ np.asarray(cb)
        r = ndimage.affine_transform(a.astype(np.uint8), R, offset=off, order=0) > 0
        best = max(best, (_dice(r, b), ang))
    return best[1]


def test_femur_tibia_angle_differs_between_modalities(cohort):
    """Measured on the crops' label maps: the femur needs a rotation to match across modalities, the tibia
    does not, and the rotation is the drawn articulation."""
    root, m = cohort
    for _, row in _baseline(m).iterrows():
        xl, _ = load_2d(root / row.xray_crop_labels)
        dl, _ = load_2d(root / row.dxa_crop_labels)
        pose = json.loads((root / row.dxa_nifti).with_name("dxa_pose.json").read_text())["pose"]
        fem = _best_rotation_deg(xl == 1, dl == 1)
        tib = _best_rotation_deg(xl == 2, dl == 2)
        assert abs(tib) <= 0.5
        assert abs(fem - tib) >= 1.5
        assert abs(abs(fem - tib) - abs(pose["flex_angle_deg"])) < 1.0


def test_same_seed_gives_identical_crop_bytes(tmp_path):
    cfg = CohortConfig(n_subjects=1, **{**CFG, "visits": (0,)})
    rows_a = generate_subject(cfg, 0, tmp_path / "a")
    generate_subject(cfg, 0, tmp_path / "b")
    for c in ("xray_crop", "xray_crop_labels", "dxa_crop", "dxa_crop_labels", "xray_labels", "dxa_nifti"):
        for r in rows_a:
            a = (tmp_path / "a" / r[c]).read_bytes()
            assert a == (tmp_path / "b" / r[c]).read_bytes()
    pose = tmp_path / "a" / rows_a[0]["dxa_nifti"]
    assert pose.with_name("dxa_pose.json").read_bytes() == (tmp_path / "b" / rows_a[0]["dxa_nifti"]).with_name(
        "dxa_pose.json").read_bytes()


def test_radiographs_do_not_depend_on_write_dxa(cohort, tmp_path):
    """The DXA draws from its own streams: with write_dxa=False every radiograph (all visits) is byte-identical,
    and no DXA-visit file or column is written."""
    root, m = cohort
    m2 = generate_cohort(tmp_path, CohortConfig(n_subjects=2, **{**CFG, "write_dxa": False}), progress=False)
    assert list(m2.xray_dicom) == list(m.xray_dicom)
    for p in m.xray_dicom.unique():
        assert hashlib.sha256((root / p).read_bytes()).digest() == hashlib.sha256((tmp_path / p).read_bytes()).digest()
    for c in ("dxa_nifti", "dxa_labels_nifti", *NEW_COLUMNS):
        assert (m2[c] == "").all()
    assert not list(tmp_path.rglob("*.nii.gz"))

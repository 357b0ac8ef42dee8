"""The cohort's files: DICOM / NIfTI round trips, label alignment, determinism, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort, generate_subject
from pipeline.cohort.subject import sample_subject
from pipeline.conventions import LABEL_FC, LABEL_FEMUR, LABEL_TC, LABEL_TIBIA, N_LANDMARKS
from pipeline.io.manifest import load_manifest


def test_manifest_is_valid_and_complete(tiny_cohort):
    root, m = tiny_cohort
    loaded = load_manifest(root / "manifest.csv", check_paths=["xray_dicom", "dess_nifti", "labels_nifti", "fc_map",
                                                               "tc_map", "dess_dicom_dir"])
    assert len(loaded) == len(m) == 3 * 2 * 3  # 3 subjects x 2 knees x 3 visits (no missing in TINY)
    assert set(loaded.side) == {"R", "L"}
    assert (root / "subjects.csv").exists() and (root / "cohort.json").exists()
    assert not list(root.rglob("*.partial*"))


def test_radiograph_dicom_roundtrip_pydicom(tiny_cohort):
    root, m = tiny_cohort
    for _, row in m.drop_duplicates("xray_dicom").iterrows():
        ds = pydicom.dcmread(root / row.xray_dicom)
        assert [float(x) for x in ds.ImagerPixelSpacing] == [1.0, 1.0]
        assert ds.Modality == "DX" and ds.PatientID == row.subject_id and ds.StudyDate == str(row.study_date)
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if row.xray_monochrome1 else "MONOCHROME2")
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.max() < 2 ** int(ds.BitsStored)
        # bone is bright after applying the photometric interpretation: tibial shaft vs. soft tissue
        vals = arr.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            vals = (2 ** int(ds.BitsStored) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) - vals
        pts = np.asarray(json.loads(row.landmarks))
        cx, cy = pts[4]
        bone = vals[int(cy) + 25, int(cx)]  # 25 mm below the joint centre: tibia
        air = vals[5, 5]
        assert bone > air + 500


def test_landmarks_sides_and_order(tiny_cohort):
    root, m = tiny_cohort
    for _, row in m.iterrows():
        pts = np.asarray(json.loads(row.landmarks))
        ds = pydicom.dcmread(root / row.xray_dicom, stop_before_pixels=True)
        assert pts.shape == (N_LANDMARKS, 2)
        half = ds.Columns / 2
        # the patient's right knee is on the image's left
        assert (pts[:, 0] < half).all() if row.side == "R" else (pts[:, 0] > half).all()
        assert (np.diff(pts[:9, 0]) > 0).all() and (np.diff(pts[9:, 0]) > 0).all()  # left -> right
        # femoral points lie above (smaller row) the tibial plateau rims
        assert pts[9:, 1].max() < max(pts[0, 1], pts[8, 1]) + 1e-6 or pts[12, 1] < pts[4, 1]


def test_radiograph_loads_with_monai_itk_spacing(tiny_cohort):
    from monai.transforms import LoadImage

    root, m = tiny_cohort
    row = m.iloc[0]
    img = LoadImage(reader="ITKReader", image_only=True)(str(root / row.xray_dicom))
    sp = np.asarray(img.meta["spacing"], dtype=float)[:2]
    assert np.allclose(sp, [1.0, 1.0])
    ds = pydicom.dcmread(root / row.xray_dicom, stop_before_pixels=True)
    # ITK returns (columns, rows) spatially
    assert tuple(np.squeeze(np.asarray(img)).shape) == (ds.Columns, ds.Rows)


def test_mr_dicom_series_matches_nifti_through_monai(tiny_cohort):
    from monai.transforms import LoadImage

    root, m = tiny_cohort
    for side in ("R", "L"):
        row = m[m.side == side].iloc[0]
        dcm = LoadImage(reader="ITKReader", image_only=True)(str(root / row.dess_dicom_dir))
        nii = LoadImage(reader="NibabelReader", image_only=True)(str(root / row.dess_nifti))
        assert dcm.shape == nii.shape
        assert np.allclose(dcm.affine.numpy(), nii.affine.numpy(), atol=1e-3)
        assert np.array_equal(np.asarray(dcm), np.asarray(nii))
        ds = pydicom.dcmread(next(Path(root / row.dess_dicom_dir).iterdir()), stop_before_pixels=True)
        assert ds.Laterality == side and float(ds.SliceThickness) == pytest.approx(1.6)


def test_labels_align_with_mr_volume(tiny_cohort):
    root, m = tiny_cohort
    for side in ("R", "L"):
        row = m[(m.side == side) & (m.visit_month == 0)].iloc[0]
        img_n = nib.load(root / row.dess_nifti)
        lab_n = nib.load(root / row.labels_nifti)
        assert np.allclose(img_n.affine, lab_n.affine)
        img, lab = np.asanyarray(img_n.dataobj).astype(float), np.asanyarray(lab_n.dataobj)
        mean = {k: img[lab == k].mean() for k in (0, LABEL_FEMUR, LABEL_FC, LABEL_TIBIA, LABEL_TC)}
        # DESS contrast: cartilage bright, marrow intermediate
        assert mean[LABEL_FC] > mean[LABEL_FEMUR] and mean[LABEL_TC] > mean[LABEL_TIBIA]
        # anatomy through the affine (RAS): femur superior to tibia; FC between them
        ijk = {k: np.argwhere(lab == k).mean(axis=0) for k in (LABEL_FEMUR, LABEL_FC, LABEL_TIBIA)}
        z = {k: (img_n.affine @ np.r_[v, 1.0])[2] for k, v in ijk.items()}
        assert z[LABEL_FEMUR] > z[LABEL_FC] > z[LABEL_TIBIA]
        # the knee's side: RAS +x points to the patient's right, and each knee sits on its own side
        x = (img_n.affine @ np.r_[ijk[LABEL_FEMUR], 1.0])[0]
        assert (x > 0) if side == "R" else (x < 0)


def test_thickness_maps_share_one_footprint(tiny_cohort):
    root, m = tiny_cohort
    masks = {}
    for key in ("fc_map", "tc_map"):
        ref = None
        for _, row in m.iterrows():
            a = np.load(root / row[key])
            assert a.dtype == np.float32 and a.shape == (32, 32)
            fin = np.isfinite(a)
            ref = fin if ref is None else ref
            assert np.array_equal(fin, ref)
            assert np.nanmax(a) < 7.0 and np.nanmin(a) >= 0.0
        masks[key] = ref
    assert masks["fc_map"].mean() > 0.5


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    cfg = CohortConfig(n_subjects=1, seed=3, workers=1, **{**TINY, "visits": (0, 24)})
    generate_subject(cfg, 0, tmp_path / "a")
    generate_subject(cfg, 0, tmp_path / "b")
    a, b = _digest_tree(tmp_path / "a"), _digest_tree(tmp_path / "b")
    assert a and a == b
    other = CohortConfig(n_subjects=1, seed=4, workers=1, **{**TINY, "visits": (0, 24)})
    generate_subject(other, 0, tmp_path / "c")
    assert _digest_tree(tmp_path / "c") != a


def test_interrupted_generation_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    import pipeline.cohort.generate as gen

    cfg = CohortConfig(n_subjects=2, seed=1, workers=1, **{**TINY, "visits": (0,)})
    calls = {"n": 0}
    real = gen.write_nifti
    second = sample_subject(cfg.seed, 1, cfg.visits, cfg.missing_rate).subject_id

    def flaky(path, *a, **k):
        # fail at the third NIfTI write inside the second subject's (temporary) folder
        calls["n"] += f".{second}." in str(path)
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(gen, "write_nifti", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path, cfg, progress=False)
    done = [p.name for p in (tmp_path / "subjects").iterdir() if not p.name.startswith(".")]
    assert len(done) == 1  # the first subject is complete; the second left nothing under its real name
    assert not (tmp_path / "manifest.csv").exists()
    monkeypatch.setattr(gen, "write_nifti", real)
    m = generate_cohort(tmp_path, cfg, progress=False)  # resumes
    assert len(m) == 4 and not list(tmp_path.rglob("*.partial*"))


def test_cohort_without_mr_has_radiographs_and_maps_only(tmp_path):
    cfg = CohortConfig(n_subjects=1, seed=2, workers=1, **{**TINY, "visits": (0, 24), "write_mr": False})
    m = generate_cohort(tmp_path, cfg, progress=False)
    loaded = load_manifest(tmp_path / "manifest.csv", check_paths=["xray_dicom", "fc_map", "tc_map"])
    assert len(loaded) == 4 and loaded.dess_nifti.isna().all() and loaded.labels_nifti.isna().all()
    niftis = list(tmp_path.rglob("*.nii.gz"))
    assert not any("MR_SAG_3D_DESS" in str(p) for p in niftis)
    # the DXA-visit files are cheap and stay on: DXA, both modalities' labels and pair-ready crops
    base = loaded[loaded.visit_month == 0]
    for c in ("dxa_nifti", "xray_labels", "xray_crop", "dxa_crop", "dxa_crop_labels"):
        assert base[c].notna().all() and all((tmp_path / p).is_file() for p in base[c])
    assert np.isfinite(np.load(tmp_path / m.fc_map.iloc[0])).any()

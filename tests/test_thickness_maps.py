"""DESS labels -> flattened FC/TC atlas maps: accuracy, orientation invariance, fixed footprint, batches."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.cohort.anatomy import knee_at_visit
from pipeline.cohort.mr import MRGrid, label_volume, pir_affine_lps, tissue_sdfs, to_pir
from pipeline.cohort.subject import sample_subject
from pipeline.thickness.atlas import canonicalize, labels_to_maps
from pipeline.thickness.grid import footprint
from pipeline.thickness.maps_io import batch_maps

SIZE = (96, 96)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _knee_labels(seed: int, index: int, side: str, month: int = 0, spacing=(0.7, 0.7, 0.35)):
    """Labels (stored PIR, RAS affine) and analytic maps of one cohort knee, without writing files."""
    spec = sample_subject(seed, index).knees[side]
    kv = knee_at_visit(spec, month)
    grid = MRGrid.around_knee(spacing, (47.0, 45.0, 40.0))
    lab = to_pir(label_volume(tissue_sdfs(kv, grid), grid.shape), side)
    aff = LPS_TO_RAS @ pir_affine_lps(grid, side, (95.0 if side == "L" else -95.0, 3.0, -2.0))
    return lab, aff, kv.thickness_maps(SIZE), kv


@pytest.fixture(scope="module")
def knee():
    return _knee_labels(0, 2, "L")


def test_maps_match_analytic_thickness_at_default_resolution(knee):
    lab, aff, truth, _ = knee
    res = labels_to_maps(lab, aff, "L", size=SIZE)
    for kind in ("fc", "tc"):
        got, ref = getattr(res, kind), truth[kind]
        assert np.array_equal(np.isfinite(got), np.isfinite(ref))
        err = np.nanmedian(np.abs(got - ref))
        assert err < 0.15, (kind, err)
        assert res.coverage[kind] > 0.95


def test_right_knee_mirror_gives_the_same_map(knee):
    lab, aff, _, _ = knee
    left = labels_to_maps(lab, aff, "L", size=SIZE)
    # the same anatomy stored as a right knee: mirror along the patient's left-right axis (k in PIR)
    mirrored = lab[:, :, ::-1]
    right = labels_to_maps(mirrored, aff, "R", size=SIZE)
    for kind in ("fc", "tc"):
        assert np.allclose(getattr(left, kind), getattr(right, kind), equal_nan=True, atol=1e-5)


def test_other_dicom_orientation_gives_the_same_map(knee):
    lab, aff, _, _ = knee
    ref = labels_to_maps(lab, aff, "L", size=SIZE)
    # store with axes permuted (k, i, j) and the first axis reversed: a different orientation, same anatomy
    arr = np.transpose(lab, (2, 0, 1))[::-1]
    A = aff[:, [2, 0, 1, 3]].copy()
    A[:3, 3] = A[:3, 3] + A[:3, 0] * (arr.shape[0] - 1)
    A[:3, 0] = -A[:3, 0]
    can, sp = canonicalize(arr, A, "L")
    assert np.array_equal(can, lab) and np.allclose(sp, (0.7, 0.35, 0.7))  # (P, I, R) = (AP, SI, ML)
    other = labels_to_maps(arr, A, "L", size=SIZE)
    for kind in ("fc", "tc"):
        assert np.allclose(getattr(ref, kind), getattr(other, kind), equal_nan=True, atol=1e-5)


def test_footprint_identical_across_knees_and_disease():
    masks = []
    for seed, idx, side, month in ((1, 0, "R", 0), (1, 3, "L", 96)):
        lab, aff, _, kv = _knee_labels(seed, idx, side, month, spacing=(1.0, 1.0, 1.0))
        res = labels_to_maps(lab, aff, side, size=SIZE)
        masks.append((np.isfinite(res.fc), np.isfinite(res.tc)))
        assert np.nanmin(res.fc) >= 0 and np.nanmax(res.fc) < 7.0
    assert np.array_equal(masks[0][0], masks[1][0]) and np.array_equal(masks[0][1], masks[1][1])
    assert np.array_equal(masks[0][0], footprint("fc", SIZE)) and np.array_equal(masks[0][1], footprint("tc", SIZE))


def test_medial_thinning_shows_in_the_map():
    idx, side = next((i, s) for i in range(200) for s, k in sample_subject(0, i).knees.items()
                     if k.disease.phenotype == "fast" and not k.disease.lateral)
    vals = []
    for month in (0, 96):
        lab, aff, _, _ = _knee_labels(0, idx, side, month, spacing=(1.0, 1.0, 1.0))
        res = labels_to_maps(lab, aff, side, size=SIZE)
        half = SIZE[1] // 2
        vals.append((np.nanmean(res.tc[:, :half]), np.nanmean(res.tc[:, half:])))
    assert vals[1][0] < vals[0][0] - 0.3  # medial TC thinner by > 0.3 mm on average
    assert abs(vals[1][1] - vals[0][1]) < 0.5 * abs(vals[1][0] - vals[0][0])


def test_batch_records_failures_and_continues(tmp_path, knee):
    lab, aff, _, _ = knee
    good = tmp_path / "good_L_00.nii.gz"
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), good)
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti")
    empty = tmp_path / "empty_L.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), aff), empty)
    items = [{"labels": str(bad), "side": "L", "stem": "bad"}, {"labels": str(good), "side": "L", "stem": "good"},
             {"labels": str(empty), "side": "L", "stem": "empty"}]
    df = batch_maps(items, tmp_path / "out", size=SIZE, progress=False)
    assert list(df.status) == ["failed", "ok", "failed"]
    assert "corrupt.nii.gz" in df.error[0] and "too few FC voxels" in df.error[2]
    assert (tmp_path / "out" / "good_fc.npy").exists() and (tmp_path / "out" / "good.png").exists()
    grid = json.loads((tmp_path / "out" / "good_grid.json").read_text())
    assert grid["fc"]["rows"] == SIZE[0] and grid["coverage"]["tc"] > 0.9
    assert (tmp_path / "out" / "maps_manifest.csv").exists()


def test_segmentation_result_feeds_the_map_batch(tmp_path, knee):
    from pipeline.thickness.maps_io import items_from_segmentation

    lab, aff, _, _ = knee
    seg_dir = tmp_path / "pred"
    (seg_dir / "a" / "LEFT_KNEE").mkdir(parents=True)
    pred = seg_dir / "a" / "LEFT_KNEE" / "dess_seg.nii.gz"
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), pred)
    result = {"predictions": [{"image": "a/LEFT_KNEE/dess.nii.gz", "side": "L", "knee_flipped": False,
                               "output": str(pred)}],
              "failures": [{"image": "b/RIGHT_KNEE/dess.nii.gz", "stage": "load", "error": "truncated file"}]}
    items = items_from_segmentation(result, seg_dir)
    assert items[0]["stem"] == "a_LEFT_KNEE_dess_seg" and items[1]["error"].startswith("segmentation (load)")
    df = batch_maps(items, tmp_path / "maps", size=SIZE, png=False, progress=False)
    assert list(df.status) == ["ok", "failed"] and "truncated file" in df.error[1]
    assert (tmp_path / "maps" / "a_LEFT_KNEE_dess_seg_fc.npy").exists()


def test_small_false_positive_fragments_do_not_move_the_maps(knee):
    lab, aff, _, _ = knee
    clean = labels_to_maps(lab, aff, "L", size=SIZE)
    noisy = lab.copy()
    noisy[2:6, 2:6, 2:6] = 2  # FC fragment far from the femur, in a corner of the volume
    noisy[-6:-2, -6:-2, 2:6] = 4  # TC fragment
    got = labels_to_maps(noisy, aff, "L", size=SIZE)
    for kind in ("fc", "tc"):
        assert np.allclose(getattr(clean, kind), getattr(got, kind), equal_nan=True, atol=1e-6)

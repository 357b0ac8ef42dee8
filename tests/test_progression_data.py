"""Progression data (items, subject folds, MR / radiograph chains), the sagittal-DESS input checks of
``pipeline.io.validate``, and progression inference (``bundles/progression_mr/configs/inference.json``)."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.io.manifest import ManifestError
from pipeline.io.validate import dess_problems, dess_series_problems, nifti_slice_axis, sagittal_problem
from pipeline.progression import data
from pipeline.progression.network import make_progression_network

REPO = Path(__file__).resolve().parents[1]
S, SIZE = 8, 32
TINY_TRF = {"num_slices": S, "widen_factor": 1 / 16, "token_dim": 32, "heads": 4, "layers": 2, "mlp_dim": 64}

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 subjects, 1.6 mm MR (NIfTI + DICOM series) at the baseline only, no DXA; visits to 96 months."""
    from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort

    root = tmp_path_factory.mktemp("prog_cohort")
    cfg = CohortConfig(n_subjects=4, seed=3, workers=2, write_dxa=False, mr_visits=(0,),
                       **{**TINY, "visits": (0, 24, 48, 96)})
    generate_cohort(root, cfg, progress=False)
    return root, root / "manifest.csv"


@pytest.fixture(scope="module")
def items(cohort):
    return data.progression_items(cohort[1], prefer="dicom")


@pytest.fixture(scope="module")
def eval_chain():
    return data.mr_transforms(S, SIZE)


def _knee(items, side, subject=None):
    return next(it for it in items if it["side"] == side and (subject is None or it["subject_id"] == subject))


# --------------------------------------------------------------------------------------------------- items
def test_items_one_per_baseline_knee_with_the_contract_keys(cohort, items):
    root, manifest = cohort
    df = pd.read_csv(manifest, dtype={"subject_id": str})
    base = df[(df.visit_month == 0) & (df.progression_3class != -1)]
    assert len(items) == len(base) == 7  # seed 3: one knee is KLG 4 at baseline (label -1)
    assert sorted({it["label"] for it in items}) == [0, 1, 2]
    for it in items:
        assert set(it) == {"image", "xray", "landmarks", "side", "subject_id", "label", "knee"}
        assert Path(it["image"]).is_dir() and Path(it["image"]).is_absolute()  # DICOM series preferred
        assert Path(it["xray"]).is_file() and len(it["landmarks"]) == 16
        assert it["knee"] == f"{it['subject_id']}_{it['side']}"
        row = base[(base.subject_id == it["subject_id"]) & (base.side == it["side"])].iloc[0]
        assert it["label"] == row.progression_3class
    nifti = data.progression_items(manifest)  # default: the NIfTI of each knee
    assert all(it["image"].endswith("dess.nii.gz") for it in nifti)
    assert [Path(it["image"]).parent for it in nifti] == [Path(it["image"]).parent for it in items]


def test_label_minus_one_is_excluded_and_counted(cohort, caplog):
    root, manifest = cohort
    df = pd.read_csv(manifest, dtype={"subject_id": str})
    natural = int(((df.visit_month == 0) & (df.progression_3class == -1)).sum())
    first = df.index[(df.visit_month == 0) & (df.progression_3class != -1)][0]
    df.loc[first, "progression_3class"] = -1
    path = root / "manifest_klg4.csv"  # next to the cohort: its relative paths resolve
    df.to_csv(path, index=False)
    with caplog.at_level(logging.INFO, logger="pipeline.progression.data"):
        kept, excluded = data.progression_items(path, return_excluded=True)
    assert natural == 1 and excluded == 2 and len(kept) == 6
    assert f"{df.at[first, 'subject_id']}_{df.at[first, 'side']}" not in {it["knee"] for it in kept}
    assert "2 knee(s) excluded" in caplog.text


def test_missing_column_is_a_manifest_error_naming_it(cohort, tmp_path):
    df = pd.read_csv(cohort[1], dtype={"subject_id": str}).drop(columns=["landmarks"])
    with pytest.raises(ManifestError, match="landmarks"):
        data.progression_items(df)
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="landmarks"):
        data.progression_items(tmp_path / "m.csv")
    no_dess = pd.read_csv(cohort[1], dtype={"subject_id": str}).drop(columns=["dess_nifti", "dess_dicom_dir"])
    with pytest.raises(ManifestError, match="no DESS column"):
        data.progression_items(no_dess)


# --------------------------------------------------------------------------------------------------- folds
def _synthetic_items(n_subjects=30, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_subjects):
        for side in ("R", "L")[: 1 + int(rng.integers(0, 2))]:
            out.append({"subject_id": f"S{s:03d}", "side": side, "label": int(rng.choice(3, p=[.6, .2, .2]))})
    return out


@pytest.mark.parametrize("n_folds", [2, 5])
def test_folds_keep_subjects_whole_and_validate_every_item_once(n_folds):
    its = _synthetic_items()
    folds = data.folds_by_subject(its, n_folds=n_folds, seed=1)
    assert len(folds) == n_folds
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(len(its)))  # every item validated exactly once
    subj = np.array([it["subject_id"] for it in its])
    labels = np.array([it["label"] for it in its])
    for tr, va in folds:
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(its)))
        assert not set(subj[tr]) & set(subj[va])  # no subject on both sides
        assert set(labels[va]) == {0, 1, 2}  # stratified: every class in every validation fold
    again = data.folds_by_subject(its, n_folds=n_folds, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = data.folds_by_subject(its, n_folds=n_folds, seed=2)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_folds_need_enough_subjects(items):
    assert len(data.folds_by_subject(items, n_folds=4)) == 4
    with pytest.raises(ValueError, match="at least 5 subjects"):
        data.folds_by_subject(items, n_folds=5)


# ---------------------------------------------------------------------------------------------- MR chain
def test_mr_chain_shape_range_and_medial_lateral_axis(items, eval_chain):
    for side in ("L", "R"):
        out = eval_chain(_knee(items, side))["image"]
        assert out.shape == (1, S, SIZE, SIZE) and out.dtype == torch.float32
        assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(1.0)
        assert out.meta[data.FLIP_META_KEY] is (side == "R")
        # axis 0 runs towards the knee's MEDIAL side for both (RAS +x = patient's right: medial of a left knee)
        direction = out.affine[:3, 0] / torch.linalg.norm(out.affine[:3, 0])
        assert torch.allclose(direction, torch.tensor([1.0 if side == "L" else -1.0, 0, 0], dtype=direction.dtype))
        # in-plane axes: axis 1 anterior -> posterior (RAS -y), axis 2 superior -> inferior (RAS -z)
        assert float(out.affine[1, 1]) < 0 and float(out.affine[2, 2]) < 0


def _best_corr(a: np.ndarray, b: np.ndarray, m: int = 2) -> float:
    """Largest correlation of ``a`` and ``b`` over shifts of up to ``m`` voxels per axis (the cohort places the
    two knees' grids with independent random offsets)."""
    best = -1.0
    inner = (slice(m, -m),) * 3
    for dx in range(-m, m + 1):
        for dy in range(-m, m + 1):
            for dz in range(-m, m + 1):
                shifted = np.roll(a, (dx, dy, dz), (0, 1, 2))[inner]
                best = max(best, float(np.corrcoef(shifted.ravel(), b[inner].ravel())[0, 1]))
    return best


def test_flipped_right_knee_resembles_the_left_knee_of_its_subject(items):
    chain = data.mr_transforms(24, 24)
    both = [sid for sid in sorted({it["subject_id"] for it in items})
            if {it["side"] for it in items if it["subject_id"] == sid} == {"R", "L"}]
    assert len(both) >= 3
    for sid in both:
        right = chain(_knee(items, "R", sid))["image"][0].numpy()
        left = chain(_knee(items, "L", sid))["image"][0].numpy()
        flipped, unflipped = _best_corr(right, left), _best_corr(right[::-1], left)
        assert flipped > unflipped, (sid, flipped, unflipped)


def test_nifti_and_dicom_series_of_one_knee_give_the_same_input(items, eval_chain):
    for side in ("R", "L"):
        it = _knee(items, side)
        nifti = str(Path(it["image"]).parent / "dess.nii.gz")
        a = eval_chain(it)["image"]
        b = eval_chain({**it, "image": nifti})["image"]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_training_augmentation_is_seeded_keeps_shape_and_range(items, eval_chain):
    it = _knee(items, "L")
    chain = data.mr_transforms(S, SIZE, train=True, prob=1.0)
    outs = []
    for _ in range(2):
        chain.set_random_state(0)
        outs.append(chain(it)["image"])
    torch.testing.assert_close(outs[0], outs[1])
    assert outs[0].shape == (1, S, SIZE, SIZE) and outs[0].dtype == torch.float32
    assert float(outs[0].min()) >= 0.0 and float(outs[0].max()) <= 1.0 + 1e-6
    assert not torch.allclose(outs[0], eval_chain(it)["image"], atol=1e-3)


def test_xray_chain_gives_the_knee_roi(items):
    out = data.xray_transforms(size=64)(_knee(items, "R"))
    assert out["image"].shape == (1, 64, 64) and out["image"].dtype == torch.float32
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert float(out["image"].std()) > 0.05


# ------------------------------------------------------------------------------------------ input checks
def _series(items, side="L") -> Path:
    return Path(_knee(items, side)["image"])


def _copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    return path


def test_good_series_and_nifti_pass(items):
    series = _series(items)
    assert dess_series_problems(series) == [] and dess_problems(series) == []
    assert dess_problems(series.parent / "dess.nii.gz") == []


def test_missing_slice_is_named_with_its_neighbours(items, tmp_path):
    series = _copy_series(_series(items), tmp_path / "gap")
    files = sorted(series.iterdir())
    middle = len(files) // 2
    files[middle].unlink()
    errors = dess_problems(series)
    assert len(errors) == 1 and str(series) in errors[0]
    assert "1 missing slice(s)" in errors[0]
    assert files[middle - 1].name in errors[0] and files[middle + 1].name in errors[0]
    files[middle + 1].unlink()
    assert "2 missing slice(s)" in dess_problems(series)[0]


def test_duplicate_slice_is_reported(items, tmp_path):
    series = _copy_series(_series(items), tmp_path / "dup")
    files = sorted(series.iterdir())
    shutil.copy(files[3], series / "extra")
    assert "duplicate" in dess_problems(series)[0]


def test_coronal_dicom_series_is_not_sagittal(items, tmp_path):
    import pydicom

    series = _copy_series(_series(items), tmp_path / "coronal")
    for k, f in enumerate(sorted(series.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # rows along x, columns along -z: normal along y
        ds.ImagePositionPatient = [0.0, 1.6 * k, 0.0]
        ds.save_as(f)
    errors = dess_problems(series)
    assert len(errors) == 1 and str(series) in errors[0]
    assert "not a sagittal series" in errors[0] and "coronal" in errors[0]


def test_coronal_and_oblique_nifti(tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 12))
    coronal = np.diag([1.0, 1.0, 1.0, 1.0])[:, [0, 2, 1, 3]]  # third array axis along RAS y (anterior)
    path = _save_nifti(tmp_path / "coronal.nii.gz", vol, coronal)
    errors = dess_problems(path)
    assert len(errors) == 1 and str(path) in errors[0] and "coronal" in errors[0]
    sagittal = np.diag([1.0, 1.0, 1.0, 1.0])[:, [1, 2, 0, 3]]  # third axis along x: sagittal slices
    assert dess_problems(_save_nifti(tmp_path / "sag.nii.gz", vol, sagittal)) == []


def test_sagittal_rule_and_nifti_slice_axis():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    assert sagittal_problem([c, s, 0]) == ""  # tilted 20 degrees: still sagittal
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    assert "oblique" in sagittal_problem([c, 0, s])
    assert "axial" in sagittal_problem([0, 0, -2.0])
    hdr = nib.Nifti1Header()
    assert nifti_slice_axis(hdr, (0.6, 0.6, 1.5)) == 2
    assert nifti_slice_axis(hdr, (1.5, 0.6, 0.6)) == 0  # thick slices along axis 0
    assert nifti_slice_axis(hdr, (1.0, 1.0, 1.0)) == 2
    hdr.set_dim_info(slice=1)
    assert nifti_slice_axis(hdr, (1.5, 0.6, 0.6)) == 1


def test_2d_images_are_refused(items, tmp_path):
    flat = _save_nifti(tmp_path / "flat.nii.gz", np.random.default_rng(0).random((32, 32)), np.eye(4))
    errors = dess_problems(flat)
    assert len(errors) == 1 and str(flat) in errors[0] and "not a 3D volume" in errors[0]
    one = tmp_path / "one_slice"
    one.mkdir()
    shutil.copy(sorted(_series(items).iterdir())[5], one / "001")
    errors = dess_problems(one)
    assert len(errors) == 1 and str(one) in errors[0] and "2D image" in errors[0]


def test_unreadable_files_are_named(items, tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image" * 10)
    errors = dess_problems(junk)
    assert len(errors) == 1 and str(junk) in errors[0] and "not a readable NIfTI" in errors[0]
    series = _copy_series(_series(items), tmp_path / "bad_file")
    (series / "050").write_bytes(b"garbage" * 20)
    errors = dess_problems(series)
    assert len(errors) == 1 and str(series / "050") in errors[0] and "not a DICOM file" in errors[0]
    assert "not found" in dess_problems(tmp_path / "nothing.nii.gz")[0]
    png = tmp_path / "knee.png"
    png.write_bytes(b"\x89PNG")
    assert "not a DESS volume" in dess_problems(png)[0]


# ------------------------------------------------------------------------------------------------ inference
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prog_ckpt")
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        net = make_progression_network("trf", image_size=SIZE, **TINY_TRF)
        paths.append(folder / f"fold{i}" / "model.pt")
        paths[-1].parent.mkdir()
        torch.save(net.state_dict(), paths[-1])
    torch.save({"model": net.state_dict()}, folder / "fold1" / "checkpoint_epoch=3.pt")  # not part of the ensemble
    return folder, paths


@pytest.fixture(scope="module")
def input_folder(items, tmp_path_factory):
    """One good NIfTI (side in its name), one good DICOM series (side from Laterality), one NIfTI without a side,
    and the bad cases."""
    folder = tmp_path_factory.mktemp("prog_inputs")
    left = _knee(items, "L")
    shutil.copy(Path(left["image"]).parent / "dess.nii.gz", folder / "knee_LEFT.nii.gz")
    shutil.copytree(_series(items, "R"), folder / "series_a")
    shutil.copy(Path(left["image"]).parent / "dess.nii.gz", folder / "mystery.nii.gz")
    gap = shutil.copytree(_series(items, "L"), folder / "gap_LEFT")
    sorted(gap.iterdir())[10].unlink()
    vol = np.random.default_rng(0).random((16, 16, 12))
    _save_nifti(folder / "coronal_LEFT.nii.gz", vol, np.eye(4)[:, [0, 2, 1, 3]])
    _save_nifti(folder / "flat_LEFT.nii.gz", vol[:, :, 0], np.eye(4))
    (folder / "broken_LEFT.nii.gz").write_bytes(b"not a NIfTI" * 10)
    (folder / "photo_LEFT.png").write_bytes(b"\x89PNG")
    return folder


def test_inference_items_sides(input_folder):
    from pipeline.progression.infer import inference_items

    found = {it["name"]: it for it in inference_items(input_folder)}
    assert (found["knee_LEFT"]["side"], found["knee_LEFT"]["side_source"]) == ("L", "name")
    assert (found["series_a"]["side"], found["series_a"]["side_source"]) == ("R", "dicom")
    assert found["mystery"]["side"] == "" and found["mystery"]["side_source"] == "unknown"
    assert len(found) == 8


def test_inference_one_ok_per_good_input_and_failed_rows_with_reasons(input_folder, checkpoints, tmp_path,
                                                                      one_torch_thread):
    from pipeline.progression.infer import run_inference

    out = tmp_path / "out"
    df = run_inference(input_folder, out, checkpoints[1][0], progress=False).set_index("item")
    on_disk = pd.read_csv(out / "predictions.csv").set_index("item")
    assert list(on_disk.columns[:6]) == ["status", "reason", "p_none", "p_fast", "p_slow", "p_any"]
    assert on_disk["status"].to_dict() == df["status"].to_dict()
    assert df.loc["knee_LEFT", "status"] == "ok" and df.loc["series_a", "status"] == "ok"
    assert df.loc["mystery", "status"] == "low_confidence" and "side unknown" in df.loc["mystery", "reason"]
    expect = {"gap_LEFT": "missing slice", "coronal_LEFT": "not a sagittal", "flat_LEFT": "not a 3D volume",
              "broken_LEFT": "not a readable NIfTI", "photo_LEFT": "not a DESS volume"}
    for name, words in expect.items():
        assert df.loc[name, "status"] == "failed", name
        assert words in df.loc[name, "reason"] and str(input_folder / name) in df.loc[name, "reason"]
        assert np.isnan(df.loc[name, "p_any"])
    done = df[df.status != "failed"]
    p = done[["p_none", "p_fast", "p_slow"]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(done["p_any"], done["p_fast"] + done["p_slow"], atol=1e-7)
    # the same knee as a NIfTI (left, by name) and as a series (right, by tag) are different knees: both predicted
    assert (out / "outputs.csv").is_file() and not (out / "run.lock").exists()


def test_fold_ensemble_averages_probabilities_once(input_folder, checkpoints, tmp_path, one_torch_thread):
    from pipeline.progression.infer import ProgressionPredictor

    chain = data.mr_transforms(S, SIZE, keep_meta=False)
    x = chain({"image": str(input_folder / "knee_LEFT.nii.gz"), "side": "L"})["image"]
    single = [ProgressionPredictor(p).probabilities(x) for p in checkpoints[1]]
    both = ProgressionPredictor(checkpoints[0])  # the folder: the model.pt of each fold, nothing else
    assert len(both.networks) == 2 and (both.num_slices, both.image_size) == (S, SIZE)
    torch.testing.assert_close(both.probabilities(x), (single[0] + single[1]) / 2)


def test_bundle_inference_config_runs(input_folder, checkpoints, tmp_path, one_torch_thread):
    import json

    from monai.bundle import run

    cfg = REPO / "bundles" / "progression_mr" / "configs" / "inference.json"
    parsed = json.loads(cfg.read_text())
    assert parsed["inference"] == parsed["run"]
    out = tmp_path / "bundle_out"
    run("inference", config_file=str(cfg), input=str(input_folder / "knee_LEFT.nii.gz"), output_dir=str(out),
        checkpoint=str(checkpoints[0]), progress=False, device="cpu")
    df = pd.read_csv(out / "predictions.csv")
    assert df["status"].tolist() == ["ok"]
    assert df["p_any"].iloc[0] == pytest.approx(df["p_fast"].iloc[0] + df["p_slow"].iloc[0])
    assert len(df["checkpoints"].iloc[0].split(";")) == 2  # the fold ensemble of the folder


def test_inference_on_a_manifest_flags_klg4_knees(cohort, checkpoints, tmp_path, one_torch_thread):
    from pipeline.progression.infer import ProgressionPredictor, run_inference

    model = ProgressionPredictor(checkpoints[1][0])
    df = run_inference(cohort[1], tmp_path / "m", None, predictor=model, progress=False).set_index("item")
    assert len(df) == 8 and (df.side_source == "manifest").all()
    assert df.loc["9030003_R", "status"] == "low_confidence" and "KLG 4" in df.loc["9030003_R", "reason"]
    assert (df.drop(index="9030003_R").status == "ok").all()
    assert all(Path(p).is_dir() for p in df.image)  # the DICOM series of each knee

"""Issue 12 (radiograph inference, KNEEL, dess_seg, checkpoints, logs): bad or odd inputs give a clear failed row
or a flag, never ``ok``. Tiny inputs and untrained tiny networks made here."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from dicom_helpers import synthetic_knee_image, write_radiograph_dicom

SIZE = 32
TINY_NET = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _knee(path: Path, spacing=(0.3, 0.3), pixels=None, **kw) -> Path:
    if pixels is None:
        pixels = synthetic_knee_image(400, 600, [(150, 200), (450, 200)], bits=12)
    write_radiograph_dicom(path, pixels, imager_spacing=spacing, **kw)
    return path


# -- radiograph inference (pipeline.knee_inference.run_knees, MRIS and direct synthesis) ---------------------


@pytest.fixture(scope="module")
def radiograph_run(tmp_path_factory):
    """One direct-synthesis run (tiny U-Net) over a folder of good and bad radiographs + a landmarks table."""
    from pipeline.baselines import make_generator
    from pipeline.baselines.infer import run_inference

    tmp = tmp_path_factory.mktemp("radiographs")
    folder = tmp / "xrays"
    folder.mkdir()
    _knee(folder / "good.dcm")
    _knee(folder / "blank.dcm", pixels=np.zeros((400, 600), np.uint16))
    _knee(folder / "one_pixel.dcm", pixels=np.full((1, 1), 7, np.uint16))
    _knee(folder / "spacing_1000mm.dcm", spacing=(1000.0, 1000.0))
    _knee(folder / "ct.dcm", extra={"Modality": "CT"})
    (folder / "text.dcm").write_text("not a DICOM file\n")
    rows = [{"file": n, "side": "R", "x": 150.0, "y": 200.0}
            for n in ("good.dcm", "blank.dcm", "spacing_1000mm.dcm", "ct.dcm", "text.dcm", "missing.dcm")]
    rows.append({"file": "one_pixel.dcm", "side": "R", "x": 150.0, "y": 200.0})
    pd.DataFrame(rows).to_csv(tmp / "landmarks.csv", index=False)
    torch.manual_seed(0)
    ckpt = tmp / "unet.pt"
    torch.save(make_generator("unet", SIZE, **TINY_NET).state_dict(), ckpt)
    out = tmp / "out"
    summary = run_inference(None, ckpt, folder, out, landmarks=tmp / "landmarks.csv", method="unet",
                            image_size=SIZE, net_kwargs=TINY_NET, map_size=SIZE, png=False, progress=False)
    manifest = pd.read_csv(out / "outputs.csv").fillna("")
    by_file = {Path(r["file"]).name: r for r in manifest.to_dict(orient="records")}
    return summary, by_file


def test_radiograph_good_file_is_ok(radiograph_run):
    summary, rows = radiograph_run
    assert rows["good.dcm"]["status"] == "ok"
    assert summary["n_knees_ok"] == 1  # only the good knee; the CT knee is flagged, the rest failed


@pytest.mark.parametrize("name, reason", [
    ("blank.dcm", "blank"),
    ("one_pixel.dcm", "outside the 1 x 1 px image"),
    ("spacing_1000mm.dcm", "outside the plausible range"),
])
def test_radiograph_garbage_is_failed_not_ok(radiograph_run, name, reason):
    _, rows = radiograph_run
    assert rows[name]["status"] == "failed" and reason in rows[name]["reason"], rows[name]


def test_radiograph_ct_modality_is_flagged_not_counted(radiograph_run):
    summary, rows = radiograph_run
    assert rows["ct.dcm"]["status"] == "low_confidence" and "Modality 'CT'" in rows["ct.dcm"]["reason"]
    assert summary["n_knees_flagged"] == 1


def test_radiograph_unreadable_file_gives_real_reason(radiograph_run):
    _, rows = radiograph_run
    reason = rows["text.dcm"]["reason"]
    assert rows["text.dcm"]["status"] == "failed" and "applying transform" not in reason
    assert "RadiographReadError" in reason and "text.dcm" in reason


def test_landmark_row_for_missing_file_gets_failed_row(radiograph_run):
    _, rows = radiograph_run
    assert rows["missing.dcm"]["status"] == "failed" and "file not found" in rows["missing.dcm"]["reason"]


def test_describe_exception_unwraps_monai_wrapper(tmp_path):
    from monai.transforms import Compose

    from pipeline.io.validate import describe_exception
    from transforms import LoadKneeRadiographd

    (tmp_path / "x.dcm").write_text("text")
    with pytest.raises(RuntimeError, match="applying transform") as info:
        Compose([LoadKneeRadiographd("image")])({"image": str(tmp_path / "x.dcm")})
    text = describe_exception(info.value)
    assert text.startswith("RadiographReadError: cannot read radiograph") and "applying transform" not in text


# -- KNEEL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localiser(tmp_path_factory):
    from pipeline.landmarks.engine import make_network
    from pipeline.landmarks.infer import KneeLocaliser

    tmp = tmp_path_factory.mktemp("kneel")
    torch.manual_seed(0)
    torch.save(make_network("global", 32, 8.0, width=2).state_dict(), tmp / "g.pt")
    return KneeLocaliser(tmp / "g.pt")


def _dicom_with_spacing_text(path: Path, value: str) -> Path:
    """A DX file whose ImagerPixelSpacing holds ``value`` as written (0, negative, NaN)."""
    import pydicom

    _knee(path)
    ds = pydicom.dcmread(path)
    ds["ImagerPixelSpacing"].value = value  # the raw DS string, e.g. "0\\0"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("value", ["0\\0", "-0.3\\-0.3", "nan\\nan"])
def test_kneel_invalid_spacing_names_the_value(localiser, tmp_path, value):
    import pydicom

    before = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        f = _dicom_with_spacing_text(tmp_path / "k.dcm", value)
        rows = localiser.predict_image(f)
    finally:
        pydicom.config.settings.reading_validation_mode = before
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert "invalid pixel spacing" in rows[0]["message"] and "no pixel spacing" not in rows[0]["message"]


@pytest.mark.parametrize("case", ["spacing_1000mm", "all_zero"])
def test_kneel_implausible_radiograph_is_error_not_ok(localiser, tmp_path, case):
    if case == "all_zero":
        f = _knee(tmp_path / "z.dcm", pixels=np.zeros((400, 600), np.uint16))
    else:
        f = _knee(tmp_path / "s.dcm", spacing=(1000.0, 1000.0))
    rows = localiser.predict_image(f)
    assert [r["status"] for r in rows] == ["error"] and "implausible radiograph" in rows[0]["message"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_kneel_folder_scan_reports_dangling_link_and_loop(localiser, tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    _knee(folder / "good.dcm")
    os.symlink(folder / "gone.dcm", folder / "dangling.dcm")
    os.symlink(folder / "loop_b.dcm", folder / "loop_a.dcm")
    os.symlink(folder / "loop_a.dcm", folder / "loop_b.dcm")
    df = localiser.predict(folder, progress=False)
    msg = {Path(f).name: m for f, m in zip(df["file"], df["message"])}
    assert {"dangling.dcm", "loop_a.dcm", "loop_b.dcm", "good.dcm"} <= set(msg)
    assert "dangling symbolic link" in msg["dangling.dcm"] and "symbolic link loop" in msg["loop_a.dcm"]
    assert set(df[df["file"].str.contains("loop|dangling")]["status"]) == {"error"}


# -- dess_seg ------------------------------------------------------------------------------------------------


def _volume(path: Path, data: np.ndarray, spacing: float = 1.0) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([spacing] * 3 + [1.0])), str(path))
    return path


def _mr_series(folder: Path, shape=(16, 16, 12)) -> Path:
    """A small sagittal MR series (one DICOM file per slice, 0.8 x 0.8 x 1.2 mm) with its orientation."""
    from pipeline.cohort.writers import uid, write_mr_series

    affine = np.array([[0.0, 0.0, 1.2, 10.0], [0.8, 0.0, 0.0, -5.0], [0.0, -0.8, 0.0, 20.0], [0, 0, 0, 1]])
    patient = {"PatientID": "P1", "PatientSex": "F", "PatientAge": 60, "StudyDate": "20230405",
               "StudyInstanceUID": uid("study", folder.name)}
    rng = np.random.default_rng(1)
    write_mr_series(folder, rng.uniform(0, 900, shape), affine, patient, series_uid=uid("series", folder.name),
                    laterality="L")
    return folder


def _drop_orientation(series: Path) -> None:
    """Remove ImageOrientationPatient from every slice of a series (a series that says nothing of its axes)."""
    import pydicom

    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        del ds.ImageOrientationPatient
        ds.save_as(f)


@pytest.fixture(scope="module")
def dess_run(tmp_path_factory):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from pipeline.segmentation.inference import SafeInferenceRunner

    tmp = tmp_path_factory.mktemp("dess")
    rng = np.random.default_rng(0)
    good = _volume(tmp / "good.nii.gz", rng.random((24, 24, 24)))
    cut = tmp / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:2048])
    nan = _volume(tmp / "nan.nii.gz", np.full((24, 24, 24), np.nan))
    inf = rng.random((24, 24, 24))
    inf[3, 3, 3] = np.inf
    inf = _volume(tmp / "inf.nii.gz", inf)
    flat = tmp / "flat.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((24, 24)).astype(np.float32), np.eye(4)), str(flat))
    huge = _volume(tmp / "huge_voxels.nii.gz", rng.random((24, 24, 24)), spacing=100.0)
    no_orient = nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))
    no_orient.set_qform(None, code=0)
    no_orient.set_sform(None, code=0)  # nibabel would make up an affine from the voxel sizes alone
    nib.save(no_orient, str(tmp / "no_orientation.nii.gz"))
    degenerate = np.eye(4)
    degenerate[:3, 1] = degenerate[:3, 0]  # two voxel axes along one direction: 1 mm "voxels", no orientation
    nib.save(nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32), degenerate), str(tmp / "degenerate.nii.gz"))
    series_ok, series_no_iop = _mr_series(tmp / "series_ok"), _mr_series(tmp / "series_no_iop")
    _drop_orientation(series_no_iop)
    items = [{"image": str(p), "side": "L"} for p in (good, cut, nan, inf, flat, huge, tmp / "no_orientation.nii.gz",
                                                        tmp / "degenerate.nii.gz", series_ok, series_no_iop)]
    runner = SafeInferenceRunner(items, Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")]),
                                 torch.nn.Conv3d(1, 5, 1), lambda x, net: net(x), lambda d: d, str(tmp / "out"),
                                 progress=False)
    runner.run()
    manifest = pd.read_csv(tmp / "out" / "outputs.csv").fillna("")
    return {Path(r["item"]).name: r for r in manifest.to_dict(orient="records")}


@pytest.mark.parametrize("name, reason", [
    ("cut.nii.gz", "truncated"),
    ("nan.nii.gz", "NaN or infinite"),
    ("inf.nii.gz", "NaN or infinite"),
    ("flat.nii.gz", "not a 3D volume"),
    ("huge_voxels.nii.gz", "voxel size"),
])
def test_dess_seg_garbage_is_failed(dess_run, name, reason):
    assert dess_run[name]["status"] == "failed" and reason in dess_run[name]["reason"], dess_run[name]
    assert "start_ornt" not in dess_run[name]["reason"]


def test_dess_seg_good_volume_is_ok(dess_run):
    assert dess_run["good.nii.gz"]["status"] == "ok"


@pytest.mark.parametrize("name, reason", [
    ("no_orientation.nii.gz", "header has no qform/sform"),
    ("degenerate.nii.gz", "a degenerate affine"),
    ("series_no_iop", "has no ImageOrientationPatient"),
])
def test_dess_seg_unknown_orientation_is_failed(dess_run, name, reason):
    """A volume whose orientation is unknown is a failed row naming the file (the item), with what to do; the
    other inputs of the run are still processed (a good NIfTI and a good DICOM series are ok)."""
    row = dess_run[name]
    assert row["status"] == "failed" and Path(row["item"]).name == name, row
    assert "orientation unknown" in row["reason"] and reason in row["reason"], row
    assert "dcm2niix" in row["reason"] or "ImageOrientationPatient" in row["reason"]
    assert not row["outputs"]
    assert dess_run["good.nii.gz"]["status"] == "ok" and dess_run["series_ok"]["status"] == "ok"


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoint_truncated_and_text_are_named(tmp_path):
    from pipeline.io.checkpoints import read_state_dict
    from pipeline.user_errors import CheckpointReadError

    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(CheckpointReadError, match="truncated.pt: truncated checkpoint"):
        read_state_dict(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointReadError, match="notes.pt: not a checkpoint: a text file"):
        read_state_dict(tmp_path / "notes.pt")


# -- logs ----------------------------------------------------------------------------------------------------


def test_undecodable_dicom_logs_no_traceback(tmp_path, caplog):
    import pydicom
    from pydicom.encaps import encapsulate

    from pipeline.io.dicom import RadiographReadError, read_radiograph

    f = _knee(tmp_path / "a.dcm")
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, garbage frame
    ds.PixelData = encapsulate([b"\x00" * 20])
    ds.save_as(tmp_path / "j2k.dcm")
    with caplog.at_level(logging.INFO):
        with pytest.raises(RadiographReadError, match="j2k.dcm"):
            read_radiograph(tmp_path / "j2k.dcm")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="pipeline.io.dicom"):
        with pytest.raises(RadiographReadError):
            read_radiograph(tmp_path / "j2k.dcm")


def test_validators_directly():
    from pipeline.io.validate import dess_volume_problems, radiograph_problems

    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert radiograph_problems(img, {"spacing_mm": [0.3, 0.3], "Modality": "DX"}, (5, 5)) == ([], [])
    errors, flags = radiograph_problems(img, {"spacing_mm": [math.nan, 0.3], "Modality": "MR"}, (50, 5))
    assert len(errors) == 2 and flags and "Modality 'MR'" in flags[0]
    vol = np.random.default_rng(0).random((4, 4, 4))
    assert dess_volume_problems(vol, np.eye(4)) == []
    rotated = np.eye(4)
    rotated[:3, :3] = [[0.0, 0.0, 0.7], [0.7, 0.0, 0.0], [0.0, -0.7, 0.0]]  # a sagittal 0.7 mm affine: known
    assert dess_volume_problems(vol, rotated) == []
    for bad in (np.diag([1.0, 1.0, 0.0, 1.0]), np.diag([np.nan, 1.0, 1.0, 1.0])):
        assert any(e.startswith("orientation unknown") for e in dess_volume_problems(vol, bad)), bad
    from pipeline.io.validate import orientation_problem

    tiny = np.diag([0.01, 0.01, 0.01, 1.0])  # tiny voxels are a voxel-size problem, not a singular affine
    assert orientation_problem(tiny) == ""
    assert "singular" in orientation_problem([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]])

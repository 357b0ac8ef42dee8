"""The shared result layer (pipeline.io.results: statuses, map PNG style, outputs manifest) and the DICOM outputs
(pipeline.io.dicom_out): Parametric Map / SEG / Secondary Capture round trips, required attributes, identifiers
and deterministic UIDs, and bundle runs with dicom=True (thickness, direct synthesis, KNEEL, dess_seg)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from dicom_helpers import synthetic_knee_image, write_radiograph_dicom

from pipeline.io import results
from pipeline.io.dicom_out import (
    read_parametric_map,
    read_segmentation,
    read_source,
    validate,
    write_parametric_maps,
    write_secondary_capture,
    write_segmentation,
)

pytest.importorskip("highdicom")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
IDENTIFIERS = ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate")


def _maps(seed: int = 0, shape=(12, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in ("fc", "tc"):
        m = rng.uniform(0.0, 4.5, shape).astype(np.float32)
        m[:, :2] = np.nan  # outside the footprint
        m[0, 5] = 0.0
        out[k] = m
    return out


@pytest.fixture
def radiograph(tmp_path) -> Path:
    path = tmp_path / "src" / "knee.dcm"
    path.parent.mkdir()
    write_radiograph_dicom(path, synthetic_knee_image(120, 100, [(30, 60), (70, 60)]), patient_id="P042",
                           study_date="20240102", extra={"PatientName": "DOE^JANE",
                                                         "StudyInstanceUID": pydicom.uid.generate_uid(),
                                                         "SeriesInstanceUID": pydicom.uid.generate_uid()})
    return path


def _same_identifiers(ds, src) -> None:
    for kw in IDENTIFIERS:
        assert str(ds.get(kw, "")) == str(src.get(kw, "")), kw
    assert ds.SeriesInstanceUID != src.get("SeriesInstanceUID") and ds.SOPInstanceUID != src.SOPInstanceUID


# ----------------------------------------------------------------------------------------- results layer
def test_status_vocabulary():
    assert results.STATUSES == ("ok", "low_confidence", "failed")
    assert [results.status_of(s) for s in ("ok", "LOW_CONFIDENCE", "failed", "error")] == [
        "ok", "low_confidence", "failed", "failed"]
    with pytest.raises(ValueError, match="unknown status"):
        results.status_of("done")


def test_map_png_one_style(tmp_path, monkeypatch):
    seen = []

    def capture(fig, path, dpi=90):
        seen.append(fig)
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(results, "save_figure", capture)
    m = _maps()
    results.save_map_png(tmp_path / "one.png", m["fc"], "one")
    results.save_map_png(tmp_path / "two.png", {"femoral (FC)": m["fc"], "tibial (TC)": m["tc"]}, "two", vmax=None)
    for fig, vmax in zip(seen, (results.DEFAULT_VMAX_MM, float(np.nanmax([m["fc"], m["tc"]])))):
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert {im.get_cmap().name for im in images} == {"viridis"}
        assert all(np.allclose(im.get_clim(), (0.0, vmax)) for im in images)
        assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == ["thickness (mm)"]
        assert all(np.ma.getmaskarray(im.get_array())[:, :2].all() for im in images)  # NaN masked: drawn blank
    monkeypatch.undo()
    path = results.save_map_png(tmp_path / "real.png", m["tc"], "real")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*partial*"))


def test_outputs_manifest(tmp_path):
    (tmp_path / "k").mkdir()
    files = [results.save_npy(tmp_path / "k" / "fc.npy", np.zeros(3)), tmp_path / "k" / "fc.dcm"]
    rows = [results.manifest_row("k_R", "ok", "", files, tmp_path, {"side": "R", "status": "ignored"}),
            results.manifest_row("bad", "error", "ValueError: no", (), tmp_path, {"extra": 1})]
    df = results.write_manifest(tmp_path / results.OUTPUTS_MANIFEST, rows)
    back = pd.read_csv(tmp_path / "outputs.csv", keep_default_na=False)
    assert list(back.columns) == ["item", "status", "reason", "outputs", "dicom", "side", "extra"]
    assert list(back.status) == ["ok", "failed"] and back.reason[1] == "ValueError: no"
    assert back.outputs[0] == "k/fc.npy;k/fc.dcm" and back.dicom[0] == "k/fc.dcm" and back.outputs[1] == ""
    assert len(df) == 2 and not list(tmp_path.glob(".*partial*"))
    with pytest.raises(ValueError, match="unknown status"):
        results.write_manifest(tmp_path / "x.csv", [{"item": "a", "status": "done"}])


def test_map_writer_keeps_the_maps_when_dicom_fails(tmp_path):
    from pipeline.knee_inference import KneeMapWriter

    bad = tmp_path / "no_study.dcm"  # a DICOM without StudyInstanceUID: no DICOM output can carry its study
    write_radiograph_dicom(bad, synthetic_knee_image(60, 50, [(25, 30)]))
    writer = KneeMapWriter(png=False, dicom=True)
    kdir = writer(tmp_path, "knee_L", _maps(), source=str(bad))
    assert sorted(p.name for p in kdir.iterdir()) == ["fc.npy", "tc.npy"]
    assert writer.notes["knee_L"].startswith("no DICOM maps")


# ------------------------------------------------------------------------------------- DICOM round trips
def test_parametric_map_round_trip_identifiers_and_uids(tmp_path, radiograph):
    maps = _maps()
    files = write_parametric_maps(tmp_path / "a", "knee_R", maps, radiograph, label="synthesized")
    assert [f.name for f in files] == ["fc.dcm", "tc.dcm"]
    src = pydicom.dcmread(radiograph)
    for f, (key, m) in zip(files, maps.items()):
        back = read_parametric_map(f)
        assert back.dtype == np.float32 and np.array_equal(np.isnan(back), np.isnan(m))
        assert np.array_equal(back[np.isfinite(m)], m[np.isfinite(m)])  # float32 stored: exact
        ds = pydicom.dcmread(f)
        assert validate(ds) == []
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and ds.FloatPixelPaddingValue == -1.0
        rwv = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == "mm" and rwv.LUTLabel == f"{key.upper()}_THICKNESS"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        _same_identifiers(ds, src)
    assert pydicom.dcmread(files[0]).SeriesInstanceUID == pydicom.dcmread(files[1]).SeriesInstanceUID
    # deterministic: the same maps give the same UIDs; other values give new ones
    again = write_parametric_maps(tmp_path / "b", "knee_R", maps, radiograph)
    other = write_parametric_maps(tmp_path / "c", "knee_R", _maps(seed=1), radiograph)
    uids = [(pydicom.dcmread(f).SeriesInstanceUID, pydicom.dcmread(f).SOPInstanceUID) for f in (files[0], again[0], other[0])]
    assert uids[0] == uids[1] and uids[2][0] != uids[0][0] and uids[2][1] != uids[0][1]


def test_parametric_map_without_dicom_source_gets_a_generated_study(tmp_path):
    maps = _maps()
    files = write_parametric_maps(tmp_path, "s1_L_00", maps, tmp_path / "labels.nii.gz", prefix="s1_L_00_",
                                  study={"patient_id": "s1", "study_key": 0})
    ds = pydicom.dcmread(files[0])
    assert ds.PatientID == "s1" and "generated study" in ds.StudyDescription and validate(ds) == []
    assert "SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
    tc = pydicom.dcmread(files[1])
    assert tc.StudyInstanceUID == ds.StudyInstanceUID and np.array_equal(read_parametric_map(files[1]), maps["tc"],
                                                                         equal_nan=True)


def test_segmentation_frames_match_the_label_volume(tmp_path):
    from pipeline.cohort.writers import uid, write_mr_series

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (10, 8, 6)).astype(np.uint8)  # [i, j, k]: column, row, slice
    labels[:, :, 2] = 0  # an empty slice
    affine = np.array([[0.0, 0.0, -1.2, 40.0], [0.8, 0.0, 0.0, -10.0], [0.0, -0.7, 0.0, 25.0], [0, 0, 0, 1]])
    patient = {"PatientID": "P7", "PatientSex": "F", "PatientAge": 61, "StudyDate": "20230405",
               "StudyInstanceUID": uid("study 7")}
    series = tmp_path / "dicom"
    write_mr_series(series, rng.uniform(0, 900, labels.shape), affine, patient, series_uid=uid("series 7"),
                    laterality="R")
    path = write_segmentation(tmp_path / "seg.dcm", labels, affine, series, "P7_R")
    frames = read_segmentation(path, series)
    assert np.array_equal(frames, np.stack([labels[:, :, k].T for k in range(labels.shape[2])]))
    ds = pydicom.dcmread(path)
    src = read_source(series)
    assert validate(ds) == [] and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["femur", "femoral cartilage", "tibia", "tibial cartilage"]
    assert ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    _same_identifiers(ds, src[0])


def test_secondary_capture_is_readable(tmp_path, radiograph):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    path = write_secondary_capture(tmp_path / "overlay.dcm", rgb, radiograph, "knee.dcm", "KNEEL landmarks overlay")
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(radiograph)
    assert ds.PhotometricInterpretation == "RGB" and np.array_equal(ds.pixel_array, rgb)
    assert validate(ds) == [] and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    _same_identifiers(ds, src)


# ------------------------------------------------------------------------------------- bundle runs
def _subset_manifest(tiny_cohort, tmp_path: Path, n: int = 2) -> Path:
    """The first ``n`` rows of the tiny cohort's manifest, with absolute paths (a small bundle input)."""
    root = Path(tiny_cohort[0])
    m = pd.read_csv(root / "manifest.csv", dtype={"subject_id": str, "study_date": str}).iloc[:n].copy()
    for c in ("xray_dicom", "dess_dicom_dir", "dess_nifti", "labels_nifti", "fc_map", "tc_map", "dxa_nifti",
              "dxa_labels_nifti"):
        if c in m.columns:
            m[c] = [str(root / v) if isinstance(v, str) and v else v for v in m[c]]
    path = tmp_path / "manifest.csv"
    m.to_csv(path, index=False)
    return path


def test_thickness_bundle_with_dicom(tiny_cohort, tmp_path):
    from monai.bundle import run

    manifest = _subset_manifest(tiny_cohort, tmp_path)
    out = tmp_path / "maps"
    run("inference", config_file=str(REPO / "bundles/thickness/configs/inference.json"), input=str(manifest),
        output_dir=str(out), map_size=[24, 24], png=False, dicom=True)
    df = pd.read_csv(out / "maps_manifest.csv", dtype={"subject_id": str}, keep_default_na=False)
    assert list(df.columns[:5]) == list(results.MANIFEST_COLUMNS) and (df.status == "ok").all()
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    for r, (_, row) in zip(df.itertuples(), m.iterrows()):
        assert r.dicom == f"{r.item}_fc.dcm;{r.item}_tc.dcm" and r.error == ""
        series = read_source(row["dess_dicom_dir"])
        for key in ("fc", "tc"):
            a = np.load(out / f"{r.item}_{key}.npy")
            assert np.array_equal(read_parametric_map(out / f"{r.item}_{key}.dcm"), a, equal_nan=True)
        ds = pydicom.dcmread(out / f"{r.item}_fc.dcm")
        assert ds.PatientID == row["subject_id"] and validate(ds) == []
        _same_identifiers(ds, series[0])
        assert len(ds.SourceImageSequence) == len(series)  # derived from every slice of the DESS series


def test_direct_synthesis_with_dicom(tiny_cohort, tmp_path):
    from pipeline.baselines import make_generator
    from pipeline.baselines.infer import run_inference
    from pipeline.knee_inference import KneeMapWriter

    root = Path(tiny_cohort[0])
    m = pd.read_csv(root / "manifest.csv", dtype={"subject_id": str})
    torch.manual_seed(0)
    ckpt = tmp_path / "unet.pt"
    torch.save(make_generator("unet", 32, base_channels=4).state_dict(), ckpt)
    folder = tmp_path / "xrays"
    folder.mkdir()
    shutil.copy(root / m["xray_dicom"].iloc[0], folder / "knees.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    lm = m[m["xray_dicom"] == m["xray_dicom"].iloc[0]]
    pd.DataFrame({"file": ["knees.dcm"] * len(lm) + ["broken.dcm"], "side": [*lm["side"], "L"],
                  "x": [*lm["joint_centre_x"], 50.0], "y": [*lm["joint_centre_y"], 50.0]}).to_csv(
        tmp_path / "lm.csv", index=False)
    out = tmp_path / "out"
    summary = run_inference(None, ckpt, folder, out, landmarks=tmp_path / "lm.csv", method="unet", image_size=32,
                            net_kwargs={"base_channels": 4}, map_size=32, progress=False,
                            writer=KneeMapWriter(png=False, dicom=True))
    assert summary["n_knees_ok"] == 2 and summary["n_failed"] == 1
    manifest = pd.read_csv(out / "outputs.csv", keep_default_na=False).set_index("item")
    assert manifest.loc["broken.dcm_L", "status"] == "failed" and manifest.loc["broken.dcm_L", "reason"]
    src = pydicom.dcmread(folder / "knees.dcm")
    for k in summary["knees"]:
        kdir = Path(k["folder"])
        row = manifest.loc[k["knee"]]
        assert row["status"] == "ok" and row["dicom"] == f"{kdir.name}/fc.dcm;{kdir.name}/tc.dcm"
        for key in ("fc", "tc"):
            assert np.array_equal(read_parametric_map(kdir / f"{key}.dcm"), np.load(kdir / f"{key}.npy"), equal_nan=True)
        ds = pydicom.dcmread(kdir / "fc.dcm")
        assert validate(ds) == []
        _same_identifiers(ds, src)


def test_kneel_overlays_as_secondary_capture(tiny_cohort, tmp_path):
    from pipeline.landmarks.engine import make_network
    from pipeline.landmarks.infer import run_folder

    root = Path(tiny_cohort[0])
    m = pd.read_csv(root / "manifest.csv", dtype={"subject_id": str})
    ckpts = []
    for stage, spacing in (("global", 8.0), ("local", 4.0)):
        ckpts.append(tmp_path / f"{stage}.pt")
        torch.manual_seed(0)
        torch.save(make_network(stage, 32, spacing, width=2).state_dict(), ckpts[-1])
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(root / m["xray_dicom"].iloc[0], folder / "knees.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 200)
    out = tmp_path / "out"
    df = run_folder(folder, out, ckpts[0], ckpts[1], progress=False, dicom=True)
    manifest = pd.read_csv(out / "outputs.csv", keep_default_na=False)
    assert len(manifest) == len(df) and set(manifest.status) <= set(results.STATUSES)
    by = manifest.set_index("item")
    assert by.loc["broken.dcm", "status"] == "failed" and by.loc["broken.dcm", "outputs"] == ""
    knee = by.loc[[i for i in by.index if i.startswith("knees.dcm_")]]
    assert len(knee) == 2 and (knee.dicom == "overlays/knees.dcm.dcm").all()
    ds = pydicom.dcmread(out / "overlays" / "knees.dcm.dcm")
    assert ds.PhotometricInterpretation == "RGB" and ds.pixel_array.shape[2] == 3 and validate(ds) == []
    _same_identifiers(ds, pydicom.dcmread(folder / "knees.dcm"))


def test_dess_seg_bundle_writes_seg_of_dicom_series(tiny_cohort, tmp_path):
    from monai.bundle import run

    from pipeline.segmentation import build_network

    root = Path(tiny_cohort[0])
    knee = next(root.glob("subjects/*/00_MONTH/MR_SAG_3D_DESS/RIGHT_KNEE"))
    torch.manual_seed(0)
    net = build_network(arch="unet", in_channels=1, out_channels=5, channels=[4, 8, 16], strides=[2, 2],
                        num_res_units=0, norm="instance")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    src = tmp_path / "in"
    shutil.copytree(knee / "dicom", src / "RIGHT_KNEE" / "dicom")
    shutil.copy(knee / "dess.nii.gz", src / "LEFT_dess.nii.gz")
    out = tmp_path / "out"
    run("run", config_file=str(REPO / "bundles/dess_seg/configs/inference.json"), input=str(src),
        output_dir=str(out), checkpoint=str(tmp_path / "model.pt"), progress=False, dicom=True,
        patch_size=[32, 32, 32], **{"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2],
                                    "network_def#num_res_units": 0})
    manifest = pd.read_csv(out / "outputs.csv", keep_default_na=False).set_index("item")
    series = str(src / "RIGHT_KNEE" / "dicom")
    assert manifest.loc[series, "dicom"] == "RIGHT_KNEE/dicom_seg.dcm"
    assert "not a DICOM series" in manifest.loc[str(src / "LEFT_dess.nii.gz"), "reason"]
    import nibabel as nib

    pred = np.asarray(nib.load(out / "RIGHT_KNEE" / "dicom_seg.nii.gz").dataobj).astype(np.uint8)
    frames = read_segmentation(out / "RIGHT_KNEE" / "dicom_seg.dcm", series)
    assert np.array_equal(frames, np.stack([pred[:, :, k].T for k in range(pred.shape[2])]))
    ds = pydicom.dcmread(out / "RIGHT_KNEE" / "dicom_seg.dcm")
    assert validate(ds) == []
    _same_identifiers(ds, read_source(series)[0])


def test_inference_configs_declare_the_dicom_flag():
    import json

    for bundle in ("mris", "direct_synthesis", "thickness", "kneel", "dess_seg"):
        cfg = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
        assert cfg["dicom"] is False, bundle

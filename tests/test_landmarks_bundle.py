"""bundles/kneel end to end on the tiny cohort: train both stages (MONAI bundle, 1 epoch, tiny network),
evaluate on the held-out subject, and run inference on a folder with bad inputs (CT_small.dcm, no pixel
spacing, a single knee tagged bilateral, a broken file): one row each with a clear message, never a crash."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "kneel" / "configs"
TINY = {
    "stages#global#canvas_size": 32, "stages#global#canvas_spacing_mm": 8.0,
    "stages#local#canvas_size": 32, "stages#local#canvas_spacing_mm": 4.0,
    "width": 4, "epochs": 1, "batch_size": 4, "val_batch_size": 8, "num_workers": 0, "n_folds": 2,
    "split_fractions": {"train": 0.67, "test": 0.33}, "lr_milestones": [1],
}


@pytest.fixture(scope="module")
def kneel_models(tiny_cohort, tmp_path_factory):
    from monai.bundle import run

    root, _ = tiny_cohort
    out = tmp_path_factory.mktemp("kneel_bundle")
    for stage in ("global", "local"):
        run("training", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "train_demo.json")],
            bundle_root=str(out), manifest=str(Path(root) / "manifest.csv"), stage=stage, **TINY)
    return out, Path(root) / "manifest.csv"


def test_training_writes_self_describing_checkpoints(kneel_models):
    from pipeline.landmarks.engine import load_landmark_model

    out, _ = kneel_models
    for stage, n, size in (("global", 1, 32), ("local", 16, 32)):
        net = load_landmark_model(out / "models" / stage / "model.pt")
        assert net.spec.stage == stage and net.spec.canvas_size == size and net.arch["n_points"] == n
        assert (out / "models" / stage / "checkpoint_final.pt").is_file()
        assert list((out / "runs" / stage).glob("events.out.tfevents*"))


def test_evaluate_reports_groups_recall_and_mris_roi_offset(kneel_models):
    from monai.bundle import run

    out, manifest = kneel_models
    run("evaluating", config_file=str(CONFIGS / "evaluate.json"), bundle_root=str(out), manifest=str(manifest),
        split_fractions=TINY["split_fractions"], n_examples=1)
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["n_subjects"] == 1 and m["n_knees"] == 6 and m["n_predicted"] == 6
    assert set(m["groups"]) == {"centre", "tibial_corners", "femoral_corners", "all"}
    g = m["groups"]["tibial_corners"]
    assert g["n"] == 12 and {"recall@1mm", "recall@1.5mm", "recall@2mm", "recall@2.5mm", "outliers_pct"} <= set(g)
    assert np.isfinite(m["joint_centre"]["median_mm"]) and m["mris_roi_offset_mm"]["mean"] >= 0.0
    errs = pd.read_csv(out / "eval" / "errors.csv")
    assert len(errs) == 6 and {"err_0_mm", "err_15_mm", "centre_error_mm", "mris_roi_offset_mm"} <= set(errs.columns)
    assert "R@2.5mm" in (out / "eval" / "report.md").read_text()
    assert len(list((out / "eval" / "examples").glob("*.png"))) == 1


def test_inference_folder_with_bad_inputs_never_crashes(kneel_models, tmp_path):
    import pydicom
    from dicom_helpers import write_radiograph_dicom
    from monai.bundle import run

    from pipeline.io.dicom import read_radiograph

    out, manifest = kneel_models
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    good = manifest.parent / m["xray_dicom"].iloc[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "bilateral.dcm")
    img, meta = read_radiograph(good)
    raw = np.clip(img, 0, 4095).astype(np.uint16)
    write_radiograph_dicom(folder / "no_spacing.dcm", raw, imager_spacing=None)
    write_radiograph_dicom(folder / "one_knee.dcm", raw[:, : raw.shape[1] // 2].copy(), imager_spacing=meta["spacing_mm"],
                           image_laterality="B")
    ct = glob.glob(str(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"))
    assert ct, "pydicom's CT_small.dcm test file is missing"
    shutil.copy(ct[0], folder / "CT_small.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 200)
    res = tmp_path / "res"
    run("inference", config_file=str(CONFIGS / "inference.json"), bundle_root=str(out), input=str(folder),
        output_dir=str(res))
    df = pd.read_csv(res / "landmarks.csv", keep_default_na=False, na_values=[""])
    df["name"] = df["file"].map(lambda f: Path(f).name)
    by = {n: g for n, g in df.groupby("name")}
    assert set(by) == {"bilateral.dcm", "no_spacing.dcm", "one_knee.dcm", "CT_small.dcm", "broken.dcm"}
    bil = by["bilateral.dcm"]
    assert sorted(bil["side"]) == ["L", "R"] and (bil["status"] != "error").all()
    r, lk = bil.set_index("side").loc["R"], bil.set_index("side").loc["L"]
    assert r["x"] < raw.shape[1] / 2 < lk["x"]  # the patient's right knee is on the image's left
    pts = np.asarray(json.loads(r["landmarks"]))
    assert pts.shape == (16, 2) and np.allclose(pts[4], [r["x"], r["y"]], atol=1e-3)
    assert by["no_spacing.dcm"]["status"].item() == "error" and "no pixel spacing" in by["no_spacing.dcm"]["message"].item()
    assert by["broken.dcm"]["status"].item() == "error" and "broken.dcm" in by["broken.dcm"]["message"].item()
    ct_row = by["CT_small.dcm"].iloc[0]
    assert bool(ct_row["low_confidence"]) and "Modality 'CT'" in ct_row["message"] and "too small" in ct_row["message"]
    one = by["one_knee.dcm"].iloc[0]
    assert len(by["one_knee.dcm"]) == 1 and bool(one["low_confidence"]) and "one knee may be missing" in one["message"]
    summary = json.loads((res / "summary.json").read_text())
    assert summary["n_errors"] == 2 and summary["n_files"] == 5
    assert (res / "overlays" / "bilateral.dcm.png").stat().st_size > 5000
    # the Python API gives the same joint centres, and a forced bilateral split of the one-knee image is flagged
    from pipeline.landmarks.infer import predict_knees

    api = predict_knees([folder / "bilateral.dcm"], out / "models" / "global" / "model.pt",
                        out / "models" / "local" / "model.pt", progress=False)
    assert np.allclose(api.sort_values("side")[["x", "y"]].to_numpy(), bil.sort_values("side")[["x", "y"]].to_numpy())
    forced = predict_knees(folder / "one_knee.dcm", out / "models" / "global" / "model.pt", None, layout="bilateral",
                           progress=False)
    assert len(forced) == 2 and forced["low_confidence"].all() and forced["message"].str.contains("bilateral").all()
    assert (forced["landmarks"] == "").all() and np.isfinite(forced[["x", "y"]].to_numpy()).all()


def test_two_ranks_under_torchrun_write_what_one_process_writes(kneel_models, tmp_path):
    """multi_gpu_inference.json (issue 16): 2 CPU processes (gloo) share the files (file k -> rank k % 2) and rank 0
    merges: every output file, the landmarks table, summary, manifest and journal byte for byte as one process."""
    from dist_helpers import assert_same_files, run_one_and_two

    out, manifest = kneel_models
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    folder = tmp_path / "in"
    folder.mkdir()
    for k, rel in enumerate(sorted(set(m["xray_dicom"]))[:4]):
        shutil.copy(manifest.parent / rel, folder / f"knee{k}.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 200)  # a failed row, on rank 0 (index 0)
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("inference", [CONFIGS / "inference.json"], CONFIGS / "multi_gpu_inference.json", one, two,
                            bundle_root=str(out), input=str(folder), tta=False)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks worked (per-rank progress bars)
    files = assert_same_files(one, two)
    assert "run_items.jsonl" in files and not [f for f in files if "rank" in f]  # parts joined, progress files gone
    df = pd.read_csv(two / "outputs.csv", dtype=str, keep_default_na=False)
    assert df["item"].is_unique and len(df) == 1 + 2 * 4  # every knee of every file once, and the broken file
    assert (df["status"] == "failed").sum() == 1


def test_two_ranks_evaluate_under_torchrun_write_what_one_process_writes(kneel_models, tmp_path):
    """multi_gpu_evaluate.json (issue 16): 2 CPU processes (gloo) localise the test radiographs (radiograph k ->
    rank k % 2), rank 0 computes the metrics: metrics.json, errors.csv, report.md and the example overlays byte
    for byte as one process, but for the timings."""
    from dist_helpers import assert_same_files_masked, run_one_and_two

    out, manifest = kneel_models
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("evaluating", [CONFIGS / "evaluate.json"], CONFIGS / "multi_gpu_evaluate.json", one, two,
                            bundle_root=str(out), manifest=str(manifest), split_fractions=TINY["split_fractions"],
                            n_examples=1)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks localised radiographs
    assert r2.stdout.count("# KNEEL landmarks") == 1  # rank 0 alone reports
    files = assert_same_files_masked(one, two, [r'"seconds_[a-z_]+": [-0-9.e]+', r"Inference: [0-9.]+ s"])
    assert {"metrics.json", "errors.csv", "report.md"} <= set(files) and len(files) == 4
    m = json.loads(files["metrics.json"])
    assert m["n_predicted"] == 6 and m["n_images"] >= 2  # rank 1 localised radiograph 1

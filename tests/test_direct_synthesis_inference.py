"""Direct-synthesis inference (bundles/direct_synthesis/configs/inference.json, pipeline.baselines.infer) on the
tiny cohort's radiograph DICOMs with an untrained tiny generator: maps float32 mm on the atlas grid, NaN exactly
outside the footprint, identical to the evaluation path; a corrupt DICOM gets a failure row, the others work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.baselines import make_generator

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "direct_synthesis" / "configs"
TINY_NET = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
SIZE = 32  # network input; the tiny cohort's maps are 32 x 32 too (TINY map_size)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(folder: Path, method: str) -> Path:
    """A random-init tiny generator saved like the bundle's ``models/model.pt`` (a bare state dict)."""
    torch.manual_seed(0)
    path = folder / f"{method}.pt"
    torch.save(make_generator(method, SIZE, **TINY_NET).state_dict(), path)
    return path


def _cohort(tiny_cohort) -> tuple[Path, pd.DataFrame]:
    root = Path(tiny_cohort[0])
    return root / "manifest.csv", pd.read_csv(root / "manifest.csv", dtype={"subject_id": str})


def test_bundle_inference_maps_footprint_and_corrupt_file(tiny_cohort, tmp_path):
    from monai.bundle import ConfigParser, run

    from pipeline.baselines.synthesize import load_generator, predict_maps
    from pipeline.mris.data import manifest_items

    manifest, m = _cohort(tiny_cohort)
    ckpt = _checkpoint(tmp_path, "unet")
    first = m[m["visit_month"] == 0].drop_duplicates("subject_id").iloc[:2]  # two radiographs, two subjects
    folder = tmp_path / "xrays"
    folder.mkdir()
    rows = []
    for name, (_, r) in zip(("a.dcm", "b.dcm"), first.iterrows()):
        shutil.copy(manifest.parent / r["xray_dicom"], folder / name)
        both = m[m["xray_dicom"] == r["xray_dicom"]]
        for _, k in (both if name == "a.dcm" else both.iloc[:1]).iterrows():  # a: both knees, b: one
            rows.append({"file": name, "side": k["side"], "x": k["joint_centre_x"], "y": k["joint_centre_y"]})
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    rows.append({"file": "broken.dcm", "side": "L", "x": 100.0, "y": 100.0})
    pd.DataFrame(rows).to_csv(tmp_path / "landmarks.csv", index=False)

    cfg = str(CONFIGS / "inference.json")
    parser = ConfigParser()
    parser.read_config(cfg)
    assert Path(parser.get_parsed_content("bundle_root")) == REPO / "bundles" / "direct_synthesis"

    out = tmp_path / "inference"
    run("inference", config_file=cfg, input=str(folder), landmarks=str(tmp_path / "landmarks.csv"),
        checkpoint=str(ckpt), output_dir=str(out), method="unet", image_size=SIZE, map_size=[SIZE, SIZE],
        device="cpu", **TINY_NET)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_files"] == 3 and summary["n_knees_ok"] == 3 and summary["n_failed"] == 1
    fail = summary["failures"][0]
    assert fail["file"].endswith("broken.dcm") and fail["side"] == "L" and fail["error"]
    assert summary["method"] == "unet" and summary["net_kwargs"] == TINY_NET and summary["landmarks_source"] == "table"
    assert "left-knee" in summary["convention"].lower()
    knees = {k["knee"]: k for k in summary["knees"]}
    assert set(knees) == {f"a.dcm_{rows[0]['side']}", f"a.dcm_{rows[1]['side']}", f"b.dcm_{rows[2]['side']}"}

    truth_fc = np.load(manifest.parent / m["fc_map"].iloc[0])  # the atlas footprint of the training maps
    truth_tc = np.load(manifest.parent / m["tc_map"].iloc[0])
    foot = {"fc": np.isfinite(truth_fc), "tc": np.isfinite(truth_tc)}
    for k in knees.values():
        kdir = Path(k["folder"])
        for key in ("fc", "tc"):
            a = np.load(kdir / f"{key}.npy")
            assert a.shape == foot[key].shape and a.dtype == np.float32
            assert np.array_equal(np.isnan(a), ~foot[key])  # NaN exactly outside the footprint
            assert np.isfinite(a[foot[key]]).all() and (a[foot[key]] >= 0).all()
            assert (kdir / f"{key}.png").is_file()

    # the same knee through the evaluation path (pipeline.baselines.synthesize.predict_maps) gives the same maps
    a_row = first.iloc[0]
    item = next(it for it in manifest_items(manifest, {"database": 1.0})
                if Path(it["image"]).resolve() == (manifest.parent / a_row["xray_dicom"]).resolve()
                and it["side"] == rows[0]["side"])
    ref, _ = predict_maps(load_generator("unet", ckpt, SIZE, **TINY_NET), [item], SIZE, foot, progress=False)
    got = np.load(Path(knees[f"a.dcm_{rows[0]['side']}"]["folder"]) / "fc.npy")
    np.testing.assert_allclose(got, ref["fc"][0], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_library_single_file_manifest_landmarks_transformer(tiny_cohort, tmp_path):
    """One DICOM file + the cohort manifest as the landmarks table: both knees, generator built from method /
    net_kwargs (TransUNet-like), no PNGs; no landmarks at all -> a clear error."""
    from pipeline.baselines.infer import run_inference
    from pipeline.mris.infer import LandmarksRequiredError

    manifest, m = _cohort(tiny_cohort)
    ckpt = _checkpoint(tmp_path, "transformer")
    dicom = manifest.parent / m["xray_dicom"].iloc[0]
    summary = run_inference(None, ckpt, dicom, tmp_path / "out", landmarks=manifest, method="TransUNet",
                            image_size=SIZE, net_kwargs=TINY_NET, map_size=SIZE, png=False, progress=False)
    assert summary["n_knees_ok"] == 2 and summary["n_failed"] == 0 and summary["method"] == "transformer"
    assert {k["side"] for k in summary["knees"]} == {"R", "L"}
    for k in summary["knees"]:
        tc = np.load(Path(k["folder"]) / "tc.npy")
        assert tc.shape == (SIZE, SIZE) and np.isfinite(tc).any() and not (Path(k["folder"]) / "tc.png").exists()
    with pytest.raises(LandmarksRequiredError, match="kneel_global_ckpt"):
        run_inference(None, ckpt, dicom, tmp_path / "none", method="transformer", image_size=SIZE,
                      net_kwargs=TINY_NET, map_size=SIZE)


def test_library_knees_from_kneel_model(tiny_cohort, tmp_path):
    """No landmarks table: the knees come from (untrained, tiny) KNEEL checkpoints; an unreadable file is a
    failure row naming the landmark model."""
    from pipeline.baselines.infer import run_inference
    from pipeline.landmarks.engine import make_network

    manifest, m = _cohort(tiny_cohort)
    ckpt = _checkpoint(tmp_path, "unet")
    kneel = []
    for stage, spacing in (("global", 8.0), ("local", 4.0)):
        kneel.append(tmp_path / f"kneel_{stage}.pt")
        torch.save(make_network(stage, 32, spacing, width=2).state_dict(), kneel[-1])
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(manifest.parent / m["xray_dicom"].iloc[0], folder / "knees.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    summary = run_inference(None, ckpt, folder, tmp_path / "out", method="unet", image_size=SIZE,
                            net_kwargs=TINY_NET, map_size=SIZE, png=False, progress=False,
                            kneel_global_ckpt=kneel[0], kneel_local_ckpt=kneel[1])
    assert summary["landmarks_source"] == {"kneel_global_ckpt": str(kneel[0]), "kneel_local_ckpt": str(kneel[1])}
    # both knees mapped; an untrained landmark model's low-confidence knees are flagged, not counted as ok
    assert summary["n_knees_ok"] + summary["n_knees_flagged"] == 2 and summary["n_failed"] == 1
    assert summary["n_knees_ok"] == sum(k.get("landmark_status") == "ok" and not k.get("flagged")
                                        for k in summary["knees"])
    assert "broken.dcm" in summary["failures"][0]["file"] and "landmark model" in summary["failures"][0]["error"]
    assert {k["side"] for k in summary["knees"]} == {"R", "L"}
    assert all("landmark_confidence" in k for k in summary["knees"])


def test_two_ranks_evaluate_under_torchrun_write_what_one_process_writes(tiny_cohort, tmp_path):
    """multi_gpu_evaluate.json (issue 16): 2 CPU processes (gloo) share the batches of test radiographs (batch
    b -> rank b % 2), rank 0 computes the metrics: synthesis_errors.csv, metrics.json, report.md and examples.png
    byte for byte as one process, but for the timing."""
    from dist_helpers import assert_same_files_masked, run_one_and_two

    manifest, _ = _cohort(tiny_cohort)
    ckpt = _checkpoint(tmp_path, "unet")
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("evaluating", [CONFIGS / "evaluate.json"], CONFIGS / "multi_gpu_evaluate.json", one, two,
                            checkpoint=str(ckpt), manifest=str(manifest), method="unet", image_size=SIZE,
                            split_fractions={"database": 0.67, "downstream": 0.0, "test": 0.33}, batch_size=2,
                            **TINY_NET)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks synthesized batches
    files = assert_same_files_masked(one, two, [r'"seconds": [0-9.]+'])
    assert sorted(files) == ["examples.png", "metrics.json", "report.md", "synthesis_errors.csv"]
    assert json.loads(files["metrics.json"])["n_test_visits"] == 6

"""The dess_seg MONAI bundle end to end on the tiny cohort: train (CLI, one subprocess), evaluate and
infer (in-process ``monai.bundle.run``). Marked slow: about 40-60 s on 2 CPU cores."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "dess_seg" / "configs"
#: Tiny network / patches for CPU tests (shared by the three configs).
TINY = {
    "patch_size": [32, 32, 32],
    "network_def#channels": [4, 8, 16],
    "network_def#strides": [2, 2],
    "network_def#num_res_units": 0,
}


def _cli_overrides(d: dict) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    """Train 2 epochs through ``python -m monai.bundle run training`` and return (bundle_root, log)."""
    root, _ = tiny_cohort
    bundle_root = tmp_path_factory.mktemp("dess_seg_bundle")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", str(CONFIGS / "train.json"),
           "--logging_file", str(CONFIGS / "logging.conf"),
           "--manifest", str(root / "manifest.csv"), "--bundle_root", str(bundle_root),
           "--epochs", "2", "--val_interval", "1", "--num_samples", "1", "--num_workers", "0",
           "--learning_rate", "0.003", "--affine_prob", "0.0",
           *_cli_overrides(TINY)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return bundle_root, log


@pytest.mark.slow
def test_training_writes_checkpoint_and_finite_dice(trained):
    bundle_root, log = trained
    assert (bundle_root / "models" / "model.pt").is_file()
    assert list((bundle_root / "runs").glob("events.out.tfevents.*"))
    lines = [ln for ln in log.splitlines() if "Metrics --" in ln and "val_mean_cartilage_dice" in ln]
    assert len(lines) == 2, log[-3000:]
    values = {}
    for tok in lines[-1].split("Metrics --")[1].split():
        if tok.endswith(":"):
            key = tok[:-1]
        else:
            values[key] = float(tok)
    assert set(values) == {"val_dice_fc", "val_dice_tc", "val_mean_cartilage_dice"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values.values())


@pytest.mark.slow
def test_evaluate_writes_per_class_dice_csv(trained, tiny_cohort):
    from monai.bundle import run

    bundle_root, _ = trained
    root, _ = tiny_cohort
    out = bundle_root / "eval"
    run("evaluating", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        manifest=str(root / "manifest.csv"), bundle_root=str(bundle_root), num_workers=0, **TINY)
    raw = out / "val_mean_cartilage_dice_raw.csv"
    assert raw.is_file() and (out / "metrics.csv").is_file()
    rows = list(csv.reader(raw.open()))
    assert rows[0] == ["filename", "class0", "class1", "mean"]  # class0 = FC, class1 = TC
    assert len(rows) == 1 + 6  # header + one test subject x 2 knees x 3 visits
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])


@pytest.mark.slow
def test_inference_on_folder_keeps_geometry_and_records_failures(trained, tiny_cohort, tmp_path):
    from monai.bundle import run

    bundle_root, _ = trained
    root, _ = tiny_cohort
    good = next(root.glob("subjects/*/00_MONTH/MR_SAG_3D_DESS/RIGHT_KNEE/dess.nii.gz"))
    src = tmp_path / "in"
    (src / "RIGHT_KNEE").mkdir(parents=True)
    shutil.copy(good, src / "RIGHT_KNEE" / "dess.nii.gz")
    (src / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    run("run", config_file=str(CONFIGS / "inference.json"), input=str(src), output_dir=str(out),
        checkpoint=str(bundle_root / "models" / "model.pt"), progress=False, **TINY)
    pred_path = out / "RIGHT_KNEE" / "dess_seg.nii.gz"
    assert pred_path.is_file()
    pred, ref = nib.load(pred_path), nib.load(good)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3, 4}
    failures = list(csv.DictReader((out / "failures.csv").open()))
    assert [Path(f["image"]).name for f in failures] == ["corrupt.nii.gz"]
    assert failures[0]["stage"] == "load" and failures[0]["error"]
    done = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(done) == 1 and done[0]["knee_flipped"] == "True" and done[0]["output"] == str(pred_path)


@pytest.mark.slow
def test_two_ranks_under_torchrun_evaluate_like_one_process(trained, tiny_cohort, tmp_path):
    """multi_gpu_evaluate.json (issue 16): 2 CPU processes (gloo) each evaluate a consecutive block of the test
    cases; MONAI's metrics and MetricsSaver gather them on rank 0, which alone writes: the metrics and the per-case
    rows (complete, in the single-process order) equal one process's, byte for byte."""
    from dist_helpers import assert_same_files, run_one_and_two

    bundle_root, _ = trained
    root, _ = tiny_cohort
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("evaluating", [CONFIGS / "train.json", CONFIGS / "evaluate.json"],
                            CONFIGS / "multi_gpu_evaluate.json", one, two, manifest=str(root / "manifest.csv"),
                            bundle_root=str(bundle_root), num_workers=0, **TINY)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks evaluated cases
    files = assert_same_files(one, two)
    rows = list(csv.reader(files["val_mean_cartilage_dice_raw.csv"].decode().splitlines()))
    assert len(rows) == 1 + 6 and len({r[0] for r in rows[1:]}) == 6  # every test case once


@pytest.mark.slow
def test_two_ranks_under_torchrun_segment_like_one_process(trained, tiny_cohort, tmp_path):
    """multi_gpu_inference.json (issue 16): 2 CPU processes (gloo) share the volumes (item k -> rank k % 2), rank 0
    writes the CSVs and manifest: every file byte for byte as one process, every volume listed once."""
    from dist_helpers import assert_same_files, run_one_and_two

    bundle_root, _ = trained
    root, _ = tiny_cohort
    src = tmp_path / "in"
    for k, good in enumerate(sorted(root.glob("subjects/*/00_MONTH/MR_SAG_3D_DESS/*_KNEE/dess.nii.gz"))[:2]):
        (src / f"s{k}" / good.parent.name).mkdir(parents=True)
        shutil.copy(good, src / f"s{k}" / good.parent.name / "dess.nii.gz")
    (src / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("inference", [CONFIGS / "inference.json"], CONFIGS / "multi_gpu_inference.json", one, two,
                            input=str(src), checkpoint=str(bundle_root / "models" / "model.pt"), **TINY)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr
    files = assert_same_files(one, two)
    assert sum(k.endswith("_seg.nii.gz") for k in files) == 2
    rows = list(csv.DictReader((two / "outputs.csv").open()))
    assert len(rows) == 3 and len({r["item"] for r in rows}) == 3
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]

"""bundles/thickness through the MONAI bundle CLI on the tiny cohort (one subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_thickness_bundle_inference_on_manifest(tiny_cohort, tmp_path):
    root, m = tiny_cohort
    out = tmp_path / "maps"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
           str(ROOT / "bundles/thickness/configs/inference.json"), "--input", str(root / "manifest.csv"),
           "--output_dir", str(out), "--map_size", "[48, 48]", "--png", "False"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out / "maps_manifest.csv")
    assert len(df) == len(m) and (df.status == "ok").all()
    masks = {tuple(np.isfinite(np.load(out / f)).ravel()) for f in df.fc_map}
    assert len(masks) == 1  # one footprint for every knee
    fc = np.load(out / df.fc_map[0])
    assert fc.shape == (48, 48) and fc.dtype == np.float32 and 0.5 < np.nanmedian(fc) < 4.0

"""The MRIS part of ``python -m pipeline demo``: a radiograph + map cohort, training and evaluation through
the bundle (``bundles/mris/configs/{train,evaluate}.json`` + their ``*_demo.json`` overrides)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.bundle_paths import bundle_configs
from pipeline.cohort.generate import CohortConfig, generate_cohort

CONFIGS = bundle_configs("mris")


def _bundle(run_id: str, files: list[str], bundle_root: Path, manifest: Path) -> None:
    cfg = "[" + ",".join(f"'{CONFIGS / f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", cfg, "--logging_file",
           str(CONFIGS / "logging.conf"), "--bundle_root", str(bundle_root), "--manifest", str(manifest)]
    log = bundle_root / f"{run_id}.log"
    bundle_root.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"MRIS {run_id} failed (exit {r.returncode}); see {log}")


def run_mris_demo(out: str | Path, seed: int = 0, n_subjects: int = 160, workers: int = 2) -> Path:
    """Radiograph cohort without MR (``n_subjects``, 0.6 mm radiographs: the 128 px ROI is 1.1 mm/px anyway),
    MRIS-C training and evaluation; returns the report path.

    The cohort seed is ``seed + 5`` so that the MRIS subjects are not the MR demo's subjects.
    """
    out = Path(out)
    cohort = out / "mris_cohort"
    cfg = CohortConfig(n_subjects=n_subjects, seed=seed + 5, visits=(0, 12, 24, 48), xray_spacing_mm=0.6, write_mr=False,
                       write_dxa=False, workers=workers)
    generate_cohort(cohort, cfg)
    root = out / "mris"
    manifest = cohort / "manifest.csv"
    _bundle("training", ["train.json", "train_demo.json"], root, manifest)
    _bundle("evaluating", ["evaluate.json", "evaluate_demo.json"], root, manifest)
    return root / "eval" / "report.md"

"""The segmentation-guided registration demo: every stage of ``bundles/segreg`` on the synthetic cohort.

``python -m pipeline.registration.demo --out demo_output`` generates a 60-subject cohort with DXA and
radiograph crops (baseline visit, no MR), then runs through the bundle's configs, each merged with
``stages_demo.json`` (CPU settings): stage 1 (+ augmentation), the DXA segmenter, the CycleGAN radiograph segmenter,
stage 3, the two image-similarity GradICON baselines, and the evaluation of every method; the report is
``<out>/segreg/eval/report.md``. Logs of each stage: ``<out>/segreg/<stage>.log``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from pipeline.bundle_paths import bundle_configs

CONFIGS = bundle_configs("segreg")
#: (run id, config files) of every stage, in order; ``stages_demo.json`` is merged last into each.
STAGES = (
    ("training", ["train_registration.json", "train_stage1.json"]),
    ("training", ["train_segmenter.json"]),
    ("training", ["train_cyclegan.json"]),
    ("training", ["train_registration.json", "train_stage3.json"]),
    ("training", ["train_registration.json", "train_baseline_lncc.json"]),
    ("training", ["train_registration.json", "train_baseline_mi.json"]),
    ("evaluating", ["evaluate.json"]),
)
COHORT = {"n_subjects": 60, "visits": (0,), "xray_spacing_mm": 0.6, "write_mr": False}


def run_stage(run_id: str, files: list[str], bundle_root: Path, manifest: Path, overrides: dict | None = None,
              demo: bool = True) -> float:
    """Run one bundle stage in a subprocess (log in ``bundle_root/<last config>.log``); returns seconds."""
    cfgs = [str(CONFIGS / f) for f in files] + ([str(CONFIGS / "stages_demo.json")] if demo else [])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", "[" + ",".join(
        f"'{c}'" for c in cfgs) + "]", "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root",
        str(bundle_root), "--manifest", str(manifest), "--progress_bar", "False"]
    for k, v in (overrides or {}).items():
        cmd += [f"--{k}", str(v)]
    bundle_root.mkdir(parents=True, exist_ok=True)
    log = bundle_root / f"{Path(files[-1]).stem}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"segreg {files[-1]} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def run_segreg_demo(out: str | Path, seed: int = 0, workers: int = 2, overrides: dict | None = None,
                    n_subjects: int | None = None, progress: bool = True) -> Path:
    """Cohort + every stage + evaluation (module docstring); returns the report path. ``overrides`` are passed
    to every stage (e.g. ``{"iterations": 2}`` in tests)."""
    from pipeline.cohort.generate import CohortConfig, generate_cohort

    out = Path(out)
    cohort = out / "segreg_cohort"
    cfg = CohortConfig(**{**COHORT, "n_subjects": n_subjects or COHORT["n_subjects"]}, seed=seed + 11, workers=workers)
    generate_cohort(cohort, cfg, progress=progress)
    root = out / "segreg"
    times = {}
    for run_id, files in STAGES:
        times[files[-1]] = run_stage(run_id, files, root, cohort / "manifest.csv", overrides)
        if progress:
            print(f"segreg {files[-1]}: {times[files[-1]]:.0f} s", flush=True)
    report = root / "eval" / "report.md"
    lines = "\n".join(f"| {k} | {v:.0f} |" for k, v in times.items())
    with open(report, "a") as fh:
        fh.write(f"\n## Demo stage times (s, this machine)\n\n| stage | seconds |\n|---|---|\n{lines}\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_output", help="output folder (cohort + bundle outputs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    print(run_segreg_demo(args.out, args.seed, args.workers))


if __name__ == "__main__":
    main()

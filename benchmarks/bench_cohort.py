"""Cohort generation rate: knee-visits per second for a small cohort at a chosen resolution.

Usage: python benchmarks/bench_cohort.py [--subjects 4] [--workers 2] [--tiny]

Prints the wall time, knee-visits/s, and the time split of one subject's stages (anatomy, radiograph
projection, MR sampling, writing), measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cohort.anatomy import knee_at_visit
from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort
from pipeline.cohort.mr import MRGrid, dess_signal, label_volume, tissue_sdfs
from pipeline.cohort.radiograph import DetectorGeometry, KneePlacement, expose, line_integrals
from pipeline.cohort.subject import sample_subject


def stage_times(cfg: CohortConfig) -> dict[str, float]:
    sub = sample_subject(cfg.seed, 0, cfg.visits, cfg.missing_rate)
    rng = np.random.default_rng(0)
    t = {}
    t0 = time.perf_counter()
    knees = {s: knee_at_visit(sub.knees[s], 0) for s in ("R", "L")}
    t["anatomy (2 knees)"] = time.perf_counter() - t0
    geom = DetectorGeometry(cfg.xray_spacing_mm)
    places = [(knees[s], KneePlacement(s, ((1 if s == "L" else -1) * 90.0, 0.0), 0.0)) for s in ("R", "L")]
    t0 = time.perf_counter()
    expose(line_integrals(places, geom), cfg.xray_spacing_mm, rng)
    t["radiograph projection"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in ("R", "L"):
        kv = knees[s]
        kv.landmark_positions()
        kv.radiographic_jsw()
    t["landmarks + JSW (2 knees)"] = time.perf_counter() - t0
    grid = MRGrid.around_knee(cfg.mr_spacing_mm, cfg.mr_half_extent_mm)
    t0 = time.perf_counter()
    sd = tissue_sdfs(knees["L"], grid)
    label_volume(sd, grid.shape)
    dess_signal(sd, grid.shape, grid.spacing, rng)
    t[f"MR sampling, 1 knee {grid.shape}"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    cfg = CohortConfig(n_subjects=a.subjects, workers=a.workers, **(TINY if a.tiny else {}))
    for k, v in stage_times(cfg).items():
        print(f"  {k:40s} {v:7.3f} s")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        m = generate_cohort(Path(d), cfg, progress=False)
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file()) / 2**20
    print(f"{len(m)} knee-visits ({a.subjects} subjects) in {dt:.1f} s with {a.workers} workers: "
          f"{len(m) / dt:.2f} knee-visits/s, {dt / a.subjects:.2f} s/subject, {size / len(m):.1f} MiB/knee-visit")


if __name__ == "__main__":
    main()

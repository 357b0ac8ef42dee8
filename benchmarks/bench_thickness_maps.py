"""Thickness + flattening per knee from DESS labels, against the surface-mesh alternative, same run.

Usage: python benchmarks/bench_thickness_maps.py [--knees 4] [--size 310]

Knees come from the synthetic cohort generator at its default MR resolution (labels sampled in memory,
no files). Timed per knee:
  ours (volume)   : canonicalise + fit + volume-per-area flattening (the default map method)
  ours (local)    : same flattening of voxel local thickness (pipeline.thickness.local_thickness)
  mesh reference  : marching cubes + KD-tree closest-point thickness of FC and TC (the reference
                    pipeline's thickness step only, no flattening)
Accuracy: median |map - analytic| inside the footprint (mm) for our two methods.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.cohort.anatomy import knee_at_visit
from pipeline.cohort.generate import CohortConfig
from pipeline.cohort.mr import MRGrid, label_volume, pir_affine_lps, tissue_sdfs, to_pir
from pipeline.cohort.subject import sample_subject
from pipeline.conventions import LABEL_FC, LABEL_TC
from pipeline.thickness import mesh_thickness
from pipeline.thickness.atlas import canonicalize, labels_to_maps

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--knees", type=int, default=4)
    ap.add_argument("--size", type=int, default=310)
    a = ap.parse_args()
    cfg = CohortConfig()
    size = (a.size, a.size)
    t = {"ours (volume)": [], "ours (local)": [], "mesh reference": []}
    err = {"ours (volume)": [], "ours (local)": []}
    for i in range(a.knees):
        side = "RL"[i % 2]
        kv = knee_at_visit(sample_subject(cfg.seed, i).knees[side], 0)
        grid = MRGrid.around_knee(cfg.mr_spacing_mm, cfg.mr_half_extent_mm)
        lab = to_pir(label_volume(tissue_sdfs(kv, grid), grid.shape), side)
        aff = LPS_TO_RAS @ pir_affine_lps(grid, side, (0.0, 0.0, 0.0))
        truth = kv.thickness_maps(size)
        for name, method in (("ours (volume)", "volume"), ("ours (local)", "local")):
            t0 = time.perf_counter()
            res = labels_to_maps(lab, aff, side, size=size, method=method)
            t[name].append(time.perf_counter() - t0)
            err[name].append([float(np.nanmedian(np.abs(getattr(res, k) - truth[k]))) for k in ("fc", "tc")])
        can, sp = canonicalize(lab, aff, side)
        t0 = time.perf_counter()
        for label in (LABEL_FC, LABEL_TC):
            mesh_thickness(can == label, sp)
        t["mesh reference"].append(time.perf_counter() - t0)
    print(f"{a.knees} knees, MR spacing {cfg.mr_spacing_mm} mm, volume {lab.shape}, maps {size}")
    base = np.median(t["mesh reference"])
    for name, v in t.items():
        extra = ""
        if name in err:
            e = np.median(np.asarray(err[name]), axis=0)
            extra = f"   median |error| FC {e[0]:.3f} mm, TC {e[1]:.3f} mm"
        print(f"  {name:16s} {np.median(v):6.3f} s/knee   x{base / np.median(v):5.1f} vs mesh{extra}")


if __name__ == "__main__":
    main()

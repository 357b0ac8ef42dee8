"""Seconds per knee for cartilage thickness from labels: voxel local thickness vs the mesh baseline.

Phantom (``pipeline.thickness.phantoms.knee_like_phantom``): a 200 x 200 x 160 label volume at
0.5 x 0.5 x 0.7 mm with a femoral-like curved layer (cylindrical shell, inner radius 22 mm, 2.5 mm thick,
200-degree arc, axis along the 0.7 mm slice axis) and a flat tibial-like plate 2.0 mm thick. One "knee" =
thickness of label 2 (FC) and label 4 (TC). Both methods run in the same process on the same labels;
accuracy is the median absolute error (mm) against the analytic thickness over all values each method
returns (voxels / mesh vertices). Timings: best of ``--repeat`` runs, wall clock.

Usage::

    python benchmarks/bench_thickness.py [--repeat 3] [--threads 2] [--oai]

``--oai`` also runs the OAI DESS grid (384 x 384 x 160 at 0.3646 x 0.3646 x 0.7 mm, same anatomy).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, Sequence, Tuple


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads and k-d tree workers")
    ap.add_argument("--oai", action="store_true", help="also benchmark the OAI DESS grid")
    return ap.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(ARGS.threads))

import numpy as np  # noqa: E402

from pipeline.thickness import local_thickness, mesh_thickness  # noqa: E402
from pipeline.thickness.phantoms import knee_like_phantom  # noqa: E402


def _best_time(fn: Callable[[], object], repeat: int) -> Tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(shape: Sequence[int], spacing: Sequence[float], repeat: int, threads: int) -> Dict[str, float]:
    labels, fc_t, tc_t = knee_like_phantom(shape, spacing)
    truth = {2: fc_t, 4: tc_t}
    print(f"grid {tuple(shape)} @ {tuple(spacing)} mm; FC voxels {np.count_nonzero(labels == 2)}, "
          f"TC voxels {np.count_nonzero(labels == 4)}")
    res: Dict[str, float] = {}
    for name in ("voxel", "mesh"):
        total = 0.0
        errs = []
        for lab in (2, 4):
            mask = labels == lab
            if name == "voxel":
                sec, out = _best_time(lambda m=mask: local_thickness(m, spacing), repeat)
                vals = out[mask]
            else:
                sec, out = _best_time(lambda m=mask: mesh_thickness(m, spacing, workers=threads), repeat)
                vals = out.thickness[~np.isnan(out.thickness)]
            total += sec
            mae = float(np.median(np.abs(vals - truth[lab])))
            errs.append(mae)
            print(f"  {name:5s} {'FC' if lab == 2 else 'TC'}: {sec:6.3f} s  median|err| {mae:.3f} mm  "
                  f"median {np.median(vals):.3f} (truth {truth[lab]:.2f}) mm  n={vals.size}")
        res[name] = total
        print(f"  {name:5s} per knee: {total:6.3f} s   median|err| FC {errs[0]:.3f} / TC {errs[1]:.3f} mm")
    print(f"  speed-up mesh/voxel: {res['mesh'] / res['voxel']:.1f}x")
    return res


def main() -> None:
    print(f"threads={ARGS.threads} repeat={ARGS.repeat} cpus={os.cpu_count()}")
    run((200, 200, 160), (0.5, 0.5, 0.7), ARGS.repeat, ARGS.threads)
    if ARGS.oai:
        run((384, 384, 160), (0.3646, 0.3646, 0.7), ARGS.repeat, ARGS.threads)


if __name__ == "__main__":
    main()

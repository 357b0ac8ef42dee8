"""Registration throughput: GradICON (one forward of the 3-level cascade per pair) vs the classical iterative
B-spline baseline (SimpleITK, Mattes MI) on the SAME pairs, pairs per second and their ratio, in one run.

    python benchmarks/bench_registration.py                      # 4 synthetic 256 x 256 pairs, paper width
    python benchmarks/bench_registration.py --manifest demo_output/segreg_cohort/manifest.csv --pairs 8

Pairs come from the manifest's DXA / radiograph crops (each knee's DXA onto its radiograph) or, without one,
from smooth synthetic bone-like images. The network is untrained (random weights at its zero-initialised
identity start cost the same as trained ones); its checkpoint is irrelevant for speed. Both methods use the
same number of CPU threads (``--threads``, default: torch's).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def synthetic_pairs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of smooth images with two bone-like ellipses, the second image deformed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(2 * n):
        c = rng.normal(0, 0.02, 4)
        img = (((xx - 0.5 - c[0]) / 0.22) ** 2 + ((yy - 0.3 - c[1]) / 0.25) ** 2 < 1).astype(float)
        img += 0.8 * (((xx - 0.5 - c[2]) / 0.26) ** 2 + ((yy - 0.72 - c[3]) / 0.2) ** 2 < 1)
        out.append(img + rng.normal(0, 0.02, img.shape))
    arr = np.asarray(out, dtype=np.float32)
    return arr[0::2], arr[1::2]


def manifest_pairs(manifest: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.registration.data import crop_table, load_role_arrays

    table = crop_table(manifest)
    rows = list(range(min(n, len(table))))
    return (load_role_arrays(table, rows, "dxa_crop", size)[:, 0], load_role_arrays(table, rows, "xray_crop", size)[:, 0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0, help="registration network width (1.0 = the paper's)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per network forward")
    ap.add_argument("--bspline-iterations", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from pipeline.registration.classical import bspline_registration
    from pipeline.registration.network import make_registration_network
    from pipeline.registration.step import register

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    mov, fix = (manifest_pairs(args.manifest, args.pairs, args.size) if args.manifest
                else synthetic_pairs(args.pairs, args.size))
    n = len(mov)
    net = make_registration_network(1, 3, args.width, image_size=args.size).eval()
    m, f = torch.as_tensor(mov)[:, None], torch.as_tensor(fix)[:, None]
    register(net, m[:1], f[:1])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n, args.batch):
        register(net, m[s:s + args.batch], f[s:s + args.batch])
    t_net = time.perf_counter() - t0
    t0 = time.perf_counter()
    iters = []
    for a, b in zip(mov, fix):
        res = bspline_registration(a, b, iterations=args.bspline_iterations, threads=threads)
        iters.append(res.iterations)
    t_bs = time.perf_counter() - t0
    print(f"{n} pairs of {args.size} x {args.size}, {threads} thread(s); GradICON width {args.width} "
          f"({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters), batch {args.batch}; "
          f"B-spline <= {args.bspline_iterations} iterations per level (mean {np.mean(iters):.0f} in all)")
    print(f"{'method':<28}{'s / pair':>10}{'pairs / s':>11}")
    print(f"{'GradICON (ours, forward)':<28}{t_net / n:>10.3f}{n / t_net:>11.2f}")
    print(f"{'B-spline MI (SimpleITK)':<28}{t_bs / n:>10.3f}{n / t_bs:>11.2f}")
    print(f"ratio GradICON / B-spline throughput: {t_bs / t_net:.1f}x")


if __name__ == "__main__":
    main()

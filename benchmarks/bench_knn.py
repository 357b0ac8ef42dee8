"""Benchmark: k-NN synthesis, our chunked ``torch.topk`` vs the reference approach (numpy dot + full argsort).

For each database size N, two fresh subprocesses (one per method) build the same synthetic data
(seeded): N x D float32 unit embeddings, N x S x S float16 maps in mm (stored like the database, 0 outside
a footprint mask) and Q query embeddings. Each process then resets its peak-RSS counter, runs the
method once on all Q queries (k = 20, synthesized maps in float32), and reports

* queries per second (wall clock of the method only; data generation excluded);
* peak memory of the method = the kernel's peak RSS during the run minus the RSS just before it (the
  peak counter ``VmHWM`` is reset through ``/proc/self/clear_refs`` after the data is built; where that is
  not possible the lifetime ``ru_maxrss`` is used and the script says so). The data and the libraries are
  in the baseline, so this is the extra memory the method needs on top of the loaded database, counted by
  the kernel for numpy and torch allocations alike;
* a checksum of the neighbour indices, so both methods are shown to find the same neighbours.

The reference method (as the MRIS public code does it): for each query, ``sims = db @ q``,
``order = argsort(sims)[::-1][:k]``, weights ``s / sum(s)``, weighted sum of the neighbour maps.

Each (N, method) runs in ``--repeats`` fresh processes (default 2): the table shows the fastest time and the
LARGEST peak (the peak varies between identical runs with the allocator's per-thread arenas).

Usage:  python benchmarks/bench_knn.py [--sizes 10000 100000] [--queries 1000] [--map-size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MB
    raise KeyError(field)


def reset_peak_rss() -> tuple[float, str]:
    """Reset the kernel's peak-RSS counter to the current RSS; return (current RSS MB, how)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM := VmRSS
        return _status_mb("VmRSS"), "VmHWM reset"
    except OSError:  # no /proc or not allowed: fall back to the (unresettable) lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss"


def peak_rss_mb(how: str) -> float:
    if how == "VmHWM reset":
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(n: int, n_queries: int, dim: int, map_size: int, seed: int = 0):
    """Synthetic database + queries, generated in float32 chunks (no large float64 temporaries)."""
    rng = np.random.default_rng(seed)
    chunk = 10_000
    emb = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        e = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        emb[s : s + chunk] = e / np.linalg.norm(e, axis=1, keepdims=True)
    yy, xx = np.mgrid[:map_size, :map_size]
    mask = (yy - map_size / 2) ** 2 / (0.4 * map_size) ** 2 + (xx - map_size / 2) ** 2 / (
        0.45 * map_size
    ) ** 2 < 1
    maps = np.empty((n, map_size, map_size), dtype=np.float16)
    for s in range(0, n, chunk):
        m = rng.random((min(chunk, n - s), map_size, map_size), dtype=np.float32) * 4.0
        m[:, ~mask] = 0.0
        maps[s : s + chunk] = m
    # queries near random database rows (realistic: similarities mostly positive)
    q = emb[rng.integers(0, n, n_queries)] + 0.5 * rng.standard_normal(
        (n_queries, dim), dtype=np.float32
    ) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), emb, maps, mask


def run_reference(q, emb, maps, mask, k):
    out = np.empty((q.shape[0], *maps.shape[1:]), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    for i, qv in enumerate(q):
        sims = emb @ qv
        order = np.argsort(sims)[::-1][:k]
        s = sims[order]
        w = s / s.sum()
        out[i] = np.tensordot(w, maps[order].astype(np.float32), axes=(0, 0))
        idx[i] = order
    out[:, ~mask] = np.nan
    return idx, out


def run_ours(q, emb, maps, mask, k):
    import torch

    from pipeline.mris.knn import knn_synthesize

    res = knn_synthesize(torch.from_numpy(q), emb, maps, k=k, masks=mask)
    return res.indices.numpy(), res.maps.numpy()


def worker(args) -> None:
    import torch  # imported by both workers so the baseline holds the same libraries

    import pipeline.mris.knn  # noqa: F401

    torch.set_num_threads(args.threads)
    q, emb, maps, mask = make_data(args.n, args.queries, args.dim, args.map_size, args.seed)
    base, how = reset_peak_rss()
    fn = run_ours if args.worker == "ours" else run_reference
    t0 = time.perf_counter()
    idx, synth = fn(q, emb, maps, mask, args.k)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb(how)
    print(
        json.dumps(
            {
                "method": args.worker,
                "n": args.n,
                "seconds": dt,
                "qps": args.queries / dt,
                "peak_extra_mb": peak - base,
                "baseline_mb": base,
                "memory_probe": how,
                "idx": idx.tolist(),
                "synth_mean": float(np.nanmean(synth)),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="database sizes N")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--map-size", type=int, default=64, help="maps are S x S (paper grid: 310)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="fresh subprocesses per (N, method); the fastest time and the LARGEST peak are shown",
    )
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    print(
        f"k-NN synthesis: {args.queries} queries, D={args.dim}, k={args.k}, maps {args.map_size}x{args.map_size} "
        f"float16 in memory, {args.threads} threads, {args.repeats} runs each (fastest time, largest peak), "
        f"python {sys.version.split()[0]}"
    )
    header = (
        f"{'N':>8} {'method':>10} {'seconds':>9} {'queries/s':>10} {'peak extra MB':>14} {'baseline MB':>12}"
    )
    print(header)
    for n in args.sizes:
        res = {}
        for method in ("ours", "reference"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--n",
                str(n),
                "--queries",
                str(args.queries),
                "--dim",
                str(args.dim),
                "--map-size",
                str(args.map_size),
                "--k",
                str(args.k),
                "--threads",
                str(args.threads),
                "--seed",
                str(args.seed),
            ]
            runs = []
            for _ in range(max(1, args.repeats)):
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            r = min(runs, key=lambda x: x["seconds"])
            r["peak_extra_mb"] = max(x["peak_extra_mb"] for x in runs)
            res[method] = r
            print(
                f"{n:>8} {method:>10} {r['seconds']:>9.2f} {r['qps']:>10.1f} {r['peak_extra_mb']:>14.1f} "
                f"{r['baseline_mb']:>12.1f}  ({r['memory_probe']})"
            )
        ours, ref = res["ours"], res["reference"]
        a, b = np.array(ours["idx"]), np.array(ref["idx"])
        same_lists = float(np.mean([set(x) == set(y) for x, y in zip(a, b)]))
        print(
            f"{n:>8} {'ratio':>10}  speed-up x{ours['qps'] / ref['qps']:.1f}, peak extra memory ours/ref = "
            f"{ours['peak_extra_mb']:.1f}/{ref['peak_extra_mb']:.1f} MB; identical neighbour sets: "
            f"{100 * same_lists:.1f} % of queries; mean synthesized mm {ours['synth_mean']:.4f} vs "
            f"{ref['synth_mean']:.4f}"
        )


if __name__ == "__main__":
    main()

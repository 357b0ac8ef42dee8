"""Benchmark: exact k-NN search (default) and k-NN synthesis (``--mode synthesis``).

``--mode search`` (default; issue 16 item 5): one process, ``--threads`` threads, synthetic seeded float32
unit embeddings (``--n`` database rows x ``--dim``, ``--queries`` queries near random database rows), k = 20.
Times, each the fastest of ``--repeats`` interleaved rounds (the numpy reference runs once: it is slow):

* ``ours``: :func:`pipeline.mris.knn.cosine_topk` with its defaults (``backend="auto"``: faiss when
  installed and the query count is outside ``TORCH_QUERY_RANGE`` (20-249), else torch; the database passed as
  a plain array, normalised and indexed inside the call);
* ``ours torch``: the same with ``backend="torch"`` (blocked ``torch.mm`` + ``torch.topk``);
* ``ours memmap``: ``ours`` on the database opened with ``np.load(mmap_mode="r")`` (``--memmap``);
* ``plain torch``: one ``torch.topk(q @ db.T, k)`` over the whole ``Q x N`` matrix (pre-normalised tensors);
* ``faiss search``: ``IndexFlatIP.search`` on a pre-built index of the normalised database (search only);
  ``faiss add+search``: building that index included;
* ``numpy``: ``cosine_topk(backend="numpy")``, the brute-force full-``argsort`` reference.

Then the ratios ours / faiss, ours / plain torch and ours / numpy, and whether every method returned the
same neighbour indices (in the same order) as the numpy reference.

``--mode crossover``: where ``backend="auto"`` switches from torch to faiss. For each query count of
``--query-counts`` (database ``--n`` rows), the fastest of ``--repeats`` rounds of ``cosine_topk`` with
``backend="torch"`` and with ``backend="faiss"``; prints faiss / torch, the backend ``"auto"`` picks and whether
it is the faster one (needs faiss).

``--mode synthesis``: the end-to-end synthesis benchmark (neighbours + weighted map average) against the
public MRIS code's approach. For each database size N, two fresh subprocesses (one per method) build the same
synthetic data (seeded): N x D float32 unit embeddings, N x S x S float16 maps in mm (stored like the
database, 0 outside a footprint mask) and Q query embeddings. Each process then resets its peak-RSS counter,
runs the method once on all Q queries (k = 20, synthesized maps in float32), and reports

* queries per second (wall clock of the method only; data generation excluded);
* peak memory of the method = the kernel's peak RSS during the run minus the RSS just before it (the
  peak counter ``VmHWM`` is reset through ``/proc/self/clear_refs`` after the data is built; where that is
  not possible the lifetime ``ru_maxrss`` is used and the script says so). The data and the libraries are
  in the baseline, so this is the extra memory the method needs on top of the loaded database, counted by
  the kernel for numpy and torch alike;
* a checksum of the neighbour indices, so both methods are shown to find the same neighbours.

The reference method (as the MRIS public code does it): for each query, ``sims = db @ q``,
``order = argsort(sims)[::-1][:k]``, weights ``s / sum(s)``, weighted sum of the neighbour maps.
Each (N, method) runs in ``--repeats`` fresh processes (default 2): the table shows the fastest time and the
LARGEST peak (the peak varies between identical runs with the allocator's per-thread arenas).

Usage:
    python benchmarks/bench_knn.py [--n 100000] [--queries 1000] [--dim 512] [--k 20] [--repeats 3] [--memmap]
    python benchmarks/bench_knn.py --quick            # 200 queries x 20,000 rows, 2 rounds
    python benchmarks/bench_knn.py --mode crossover [--n 100000] [--query-counts 1 5 19 20 100 249 250 400 1000]
    python benchmarks/bench_knn.py --mode synthesis [--sizes 10000 100000] [--queries 1000] [--map-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
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


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_search(args) -> None:
    """ours / faiss / plain torch / numpy on the same data, in this process (see the module docstring)."""
    import torch

    from pipeline.mris.knn import MAX_BLOCK_BYTES, cosine_topk, faiss_available, resolve_backend

    torch.set_num_threads(args.threads)
    have_faiss = faiss_available()
    if have_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    # embeddings only (make_data's maps are not needed): a 1 x 1 map grid keeps its RNG stream the same
    q, emb, _, _ = make_data(args.n, args.queries, args.dim, 1, args.seed)
    k = args.k
    qt = torch.from_numpy(q)
    dbt = torch.from_numpy(emb)  # make_data's rows are unit vectors already
    backend = resolve_backend("auto", n_queries=args.queries)
    print(
        f"k-NN search: {args.queries} queries x {args.n} database rows x {args.dim}-d float32, k = {k}, "
        f"{args.threads} threads (torch {torch.__version__}, faiss "
        f"{faiss.__version__ if have_faiss else 'not installed'}); ours = cosine_topk(backend='auto' -> "
        f"{backend!r}, max_block_bytes = {MAX_BLOCK_BYTES / 2**20:.0f} MiB); fastest of {args.repeats} rounds"
    )
    methods = {
        "ours": lambda: cosine_topk(q, emb, k)[1].numpy(),
        "ours torch": lambda: cosine_topk(q, emb, k, backend="torch")[1].numpy(),
        "plain torch": lambda: torch.topk(qt @ dbt.T, k, dim=1).indices.numpy(),
    }
    tmp = None
    if args.memmap:
        tmp = tempfile.TemporaryDirectory()
        np.save(os.path.join(tmp.name, "emb.npy"), emb)
        mm = np.load(os.path.join(tmp.name, "emb.npy"), mmap_mode="r")
        methods["ours memmap"] = lambda: cosine_topk(q, mm, k)[1].numpy()
    if have_faiss:
        index = faiss.IndexFlatIP(args.dim)
        index.add(emb)

        def add_search():
            idx = faiss.IndexFlatIP(args.dim)
            idx.add(emb)
            return idx.search(q, k)[1]

        methods["faiss search"] = lambda: index.search(q, k)[1]
        methods["faiss add+search"] = add_search
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, np.ndarray] = {}
    for _ in range(max(1, args.repeats)):  # interleaved rounds: load from other jobs hits every method alike
        for name, fn in methods.items():
            dt, results[name] = _timed(fn)
            times[name].append(dt)
    dt, results["numpy"] = _timed(lambda: cosine_topk(q, emb, k, backend="numpy")[1].numpy())
    times["numpy"] = [dt]
    ref = results["numpy"]
    print(f"{'method':>17} {'seconds':>8} {'queries/s':>10}  all rounds (s)        same neighbours as numpy")
    for name, ts in times.items():
        same = float(np.mean(np.all(results[name] == ref, axis=1)))
        rounds = " ".join(f"{t:.2f}" for t in ts)
        print(
            f"{name:>17} {min(ts):>8.3f} {args.queries / min(ts):>10.0f}  {rounds:<21} {100 * same:.1f} % of queries"
        )
    best = {name: min(ts) for name, ts in times.items()}
    ratios = []
    if have_faiss:
        ratios += [
            f"ours / faiss search = {best['ours'] / best['faiss search']:.2f}",
            f"ours / faiss add+search = {best['ours'] / best['faiss add+search']:.2f}",
            f"ours torch / faiss search = {best['ours torch'] / best['faiss search']:.2f}",
        ]
    else:
        ratios.append("ours / faiss: faiss not installed (pip install faiss-cpu)")
    ratios += [
        f"ours / plain torch = {best['ours'] / best['plain torch']:.2f}",
        f"ours torch / plain torch = {best['ours torch'] / best['plain torch']:.2f}",
        f"ours / numpy = {best['ours'] / best['numpy']:.3f}",
    ]
    print("ratios (time, lower is faster): " + "; ".join(ratios))
    identical = all(np.array_equal(r, ref) for r in results.values())
    print(f"identical neighbours (indices and order) in every method: {identical}")
    load = os.getloadavg()
    print(
        f"load average during the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    if tmp is not None:
        tmp.cleanup()


def run_crossover(args) -> None:
    """faiss / torch time of ``cosine_topk`` per query count, and the backend ``"auto"`` picks (docstring)."""
    import torch

    from pipeline.mris.knn import TORCH_QUERY_RANGE, cosine_topk, faiss_available, resolve_backend

    if not faiss_available():
        print("--mode crossover compares faiss with torch: install faiss-cpu (pip install '.[faiss]')")
        return
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    q_all, emb, _, _ = make_data(args.n, max(args.query_counts), args.dim, 1, args.seed)
    print(f"k-NN crossover: {args.n} database rows x {args.dim}-d float32, k = {args.k}, {args.threads} threads, "
          f"faiss {faiss.__version__}; auto takes torch for {TORCH_QUERY_RANGE.start}-{TORCH_QUERY_RANGE.stop - 1} "
          "queries, else faiss; "
          f"fastest of {args.repeats} rounds")
    print(f"{'queries':>8} {'torch s':>9} {'faiss s':>9} {'faiss/torch':>12} {'auto':>6}  auto faster?")
    for nq in args.query_counts:
        q = q_all[:nq]
        best = {b: float("inf") for b in ("torch", "faiss")}
        cosine_topk(q, emb[:1000], args.k, backend="faiss")  # warm-up: thread pools
        for _ in range(args.repeats):
            for b in best:
                best[b] = min(best[b], _timed(lambda b=b, q=q: cosine_topk(q, emb, args.k, backend=b))[0])
        auto = resolve_backend("auto", n_queries=nq)
        other = "faiss" if auto == "torch" else "torch"
        print(f"{nq:>8} {best['torch']:>9.4f} {best['faiss']:>9.4f} {best['faiss'] / best['torch']:>12.2f} "
              f"{auto:>6}  {'yes' if best[auto] <= best[other] else 'no'}")


def run_synthesis(args) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["search", "crossover", "synthesis"], default="search")
    p.add_argument("--n", type=int, default=100_000, help="search: database rows N")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="synthesis: database sizes"
    )
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--query-counts", type=int, nargs="+", default=[1, 5, 19, 20, 100, 249, 250, 400, 1000],
                   help="crossover: query counts")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--map-size", type=int, default=64, help="synthesis: maps are S x S (paper grid: 310)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="search: interleaved rounds (default 3; fastest shown); synthesis: fresh subprocesses per "
        "(N, method) (default 2; the fastest time and the LARGEST peak are shown)",
    )
    p.add_argument("--memmap", action="store_true", help="search: also time ours on a memory-mapped database")
    p.add_argument("--quick", action="store_true", help="search: 200 queries x 20,000 rows, 2 rounds")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.mode == "search":
        if args.quick:
            args.n, args.queries, args.repeats = 20_000, 200, args.repeats or 2
        args.repeats = args.repeats or 3
        run_search(args)
    elif args.mode == "crossover":
        args.repeats = args.repeats or 2
        run_crossover(args)
    else:
        args.repeats = args.repeats or 2
        run_synthesis(args)


if __name__ == "__main__":
    main()

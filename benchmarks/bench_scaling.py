"""Scaling, measured (issue 16 item 4): how our work grows with processes, volume size, database size and cohort size.

One command runs every measurement on this machine and writes ``docs/scaling.md`` (one table per measurement,
the machine, the date, the command and a short reading) and ``docs/scaling.png`` (log-log, one panel each):

1. **Bundles on 1 and 2 processes.** A synthetic cohort (measurement 4's largest) is the input of

   * ``bundles/thickness`` (``inference.json``, ``--map_size "[64, 64]"``): knee-visits per second;
   * ``bundles/mris`` (``inference.json``; a radiograph folder + landmarks table built from the cohort, an
     UNTRAINED tiny MRIS-C network (``widen_factor`` 0.125, 32 px: timing does not depend on the weights)
     saved as the checkpoint and its embedding database of every cohort knee-visit built with
     :func:`pipeline.mris.evaluate.build_mris_database`): knees per second;

   each as one process (``python -m monai.bundle run inference ...``), as two (``torchrun --standalone
   --nproc_per_node=2`` with ``multi_gpu_inference.json`` added; torchrun gives each process 1 thread) and, as a
   control, as one process with ``OMP_NUM_THREADS=1``; interleaved, 2 rounds (``--quick``: 1), each into a fresh
   output folder. Reported: wall time of the whole command (process start, imports, everything; nothing
   subtracted), items/s = items / wall, the 2-process / 1-process ratio, and the steady-state time per item read
   from the outputs: the outputs manifest lists each item's files; an item's completion time is the newest
   modification time of its files; steady items/s = (items - 1) / (last - first completion), and seconds per
   item per process = processes / steady items/s.
2. **Thickness per knee vs label-volume size**: :func:`pipeline.thickness.atlas.labels_to_maps` (64 x 64 maps,
   computation only, no file I/O) on one synthetic knee's labels sampled in memory by the cohort generator at
   isotropic MR spacings from 1.6 mm down (more voxels); best of 2; log-log slope of seconds vs voxels.
3. **k-NN query vs database size** (10^3 .. 10^6 rows; ``--quick``: up to 10^4): a seeded N x 512 float32 unit
   database written as a ``.npy`` file in a temporary folder and opened memory-mapped in a FRESH subprocess per
   (N, backend); 100 queries, k = 20, :func:`pipeline.mris.knn.cosine_topk` with the default backend
   (``"auto"``) and every other exact backend installed (torch, faiss). After a warm-up search of the
   queries against themselves (lazy imports, thread pools), the time of the first search of the database (its
   pages are in the page cache: the file was just written) and of a second one; peak memory = the kernel's
   peak RSS during the first call minus the RSS just before it (``VmHWM`` reset via ``/proc/self/clear_refs``,
   else ``ru_maxrss``; :func:`bench_knn.reset_peak_rss`). RSS counts the memory-mapped database pages the
   search touches, so the database itself is part of the peak.
4. **Cohort generation per subject**: :func:`pipeline.cohort.generate.generate_cohort` with the ``TINY``
   options (1 mm radiographs, 1.6 mm MR with DICOM series, visits 0/24/48), no DXA, 2 workers, into a fresh
   folder per size; seconds per subject.

Sizes (:data:`FULL` / :data:`QUICK`): cohorts of 2, 4, 8, 16 subjects / 1, 2; spacings 1.6, 1.2, 1.0, 0.8, 0.7 mm /
1.6, 1.2; k-NN 10^3 .. 10^6 rows / 10^3, 10^4 (a size is skipped, and said so, without twice its file size free).

Usage::

    python benchmarks/bench_scaling.py            # full: ~10 min on 2 cores
    python benchmarks/bench_scaling.py --quick    # smoke version: ~2 min
    python benchmarks/bench_scaling.py --out-md /tmp/s.md --out-png /tmp/s.png   # write elsewhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THICKNESS_CONFIGS = ROOT / "bundles" / "thickness" / "configs"
MRIS_CONFIGS = ROOT / "bundles" / "mris" / "configs"
MULTI = "multi_gpu_inference.json"
#: MRIS network used for measurement 1 (tiny, untrained: the timing does not depend on the weights).
MRIS_NET = {"variant": "combined", "widen_factor": 0.125, "image_size": 32}
KNN_DIM, KNN_QUERIES, KNN_K = 512, 100, 20
#: Launches of measurement 1: (processes, OMP_NUM_THREADS forced or None). torchrun sets 1 thread per process
#: itself; the one-process run with 1 thread separates "more processes" from "fewer threads each".
BUNDLE_RUNS = ((1, None), (2, None), (1, 1))


@dataclass
class Plan:
    """Sizes of one run (``--quick`` or full)."""

    cohort_subjects: list[int]
    spacings_mm: list[float]
    knn_sizes: list[int]
    repeats: int


QUICK = Plan(cohort_subjects=[1, 2], spacings_mm=[1.6, 1.2], knn_sizes=[1_000, 10_000], repeats=1)
FULL = Plan(cohort_subjects=[2, 4, 8, 16], spacings_mm=[1.6, 1.2, 1.0, 0.8, 0.7],
            knn_sizes=[1_000, 10_000, 100_000, 1_000_000], repeats=2)


@dataclass
class Report:
    """Everything measured, plus problems met (written into the markdown)."""

    bundles: list[dict] = field(default_factory=list)
    thickness: list[dict] = field(default_factory=list)
    knn: list[dict] = field(default_factory=list)
    cohort: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ pure helpers
def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x) (the exponent b of y ~ a x^b); NaN with < 2 usable points."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    ok = (xa > 0) & (ya > 0) & np.isfinite(xa) & np.isfinite(ya)
    if ok.sum() < 2 or np.unique(xa[ok]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(xa[ok]), np.log(ya[ok]), 1)[0])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits (4 from 1000 up), None as an en dash."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            if not np.isfinite(v):
                return "n/a"
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def steady_rate(completions_s: Sequence[float]) -> float:
    """Items per second between the first and the last completion time (s): (n - 1) / span; NaN if undefined."""
    t = np.sort(np.asarray(completions_s, float))
    if t.size < 2 or t[-1] <= t[0]:
        return float("nan")
    return float((t.size - 1) / (t[-1] - t[0]))


def machine_info() -> dict[str, str]:
    """CPU count, CPU model (``/proc/cpuinfo``), python / torch / numpy / faiss versions, OS."""
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    faiss = "not installed"
    try:
        import faiss as _faiss  # type: ignore[import-not-found]

        faiss = _faiss.__version__
    except ImportError:
        pass
    return {"cpus": str(os.cpu_count()), "cpu model": model, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "faiss": faiss, "os": platform.platform()}


def load_average() -> str:
    """The 1/5/15-minute load averages as text."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------- 4: cohort generation (first)
def cohort_config(n_subjects: int) -> Any:
    """The generator settings of measurements 1 and 4: TINY (1.6 mm MR with DICOM, 1 mm radiographs), no DXA."""
    from pipeline.cohort.generate import TINY, CohortConfig

    return CohortConfig(n_subjects=n_subjects, seed=11, workers=2, write_dxa=False, **TINY)


def measure_cohort(sizes: Sequence[int], work: Path) -> tuple[list[dict], Path]:
    """Seconds per subject of :func:`generate_cohort` for each size (fresh folder each); returns the rows and the
    folder of the largest cohort (measurement 1's input)."""
    from pipeline.cohort.generate import generate_cohort

    rows, last = [], work
    for n in sizes:
        out = work / f"cohort_{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        m = generate_cohort(out, cohort_config(n), progress=False)
        dt = time.perf_counter() - t0
        mib = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
        rows.append({"subjects": n, "knee_visits": len(m), "seconds": dt, "s_per_subject": dt / n,
                     "mib_per_subject": mib / n})
        print(f"[cohort] {n} subjects, {len(m)} knee-visits: {dt:.1f} s, {dt / n:.2f} s/subject", flush=True)
        last = out
    return rows, last


# ------------------------------------------------------------------------------------- 1: bundles, 1 vs 2 procs
def torchrun(nproc: int) -> list[str]:
    """The torchrun launcher next to this python (else ``python -m torch.distributed.run``), standalone."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", f"--nproc_per_node={nproc}"]


def bundle_command(configs: Path, nproc: int, overrides: dict[str, str]) -> list[str]:
    """``monai.bundle run inference`` on ``inference.json`` (one process) or with ``multi_gpu_inference.json``
    under torchrun (``nproc`` processes)."""
    if nproc == 1:
        head, files = [sys.executable], str(configs / "inference.json")
    else:
        head = torchrun(nproc)
        files = "[" + ",".join(f"'{configs / c}'" for c in ("inference.json", MULTI)) + "]"
    cmd = head + ["-m", "monai.bundle", "run", "inference", "--config_file", files]
    for k, v in overrides.items():
        cmd += [f"--{k}", v]
    return cmd


def completion_times(out_dir: Path, manifest: str) -> list[float]:
    """Per ok / flagged item of an outputs manifest: the newest modification time (s) of its listed files."""
    import pandas as pd

    df = pd.read_csv(out_dir / manifest, dtype=str, keep_default_na=False)
    times = []
    for r in df.itertuples():
        files = [out_dir / p for p in r.outputs.split(";") if p]
        if r.status in ("ok", "low_confidence") and files:
            times.append(max(f.stat().st_mtime for f in files))
    return times


def run_bundle(cmd: list[str], out_dir: Path, manifest: str, env: dict[str, str] | None = None) -> dict:
    """Run one bundle command (cwd = repository root); wall time, items written, steady rate from the outputs."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-2500:])
    done = completion_times(out_dir, manifest)
    return {"wall_s": wall, "items": len(done), "steady_items_per_s": steady_rate(done)}


def thickness_job(cohort: Path) -> tuple[Path, dict[str, str], str]:
    """Configs folder, overrides (without output_dir) and manifest name of the thickness bundle run."""
    return THICKNESS_CONFIGS, {"input": str(cohort / "manifest.csv"), "map_size": "[64, 64]"}, "maps_manifest.csv"


def mris_job(cohort: Path, work: Path) -> tuple[Path, dict[str, str], str]:
    """A folder of the cohort's radiographs (copies), its landmarks table (file, side, x, y), the untrained tiny
    MRIS checkpoint and its embedding database (every knee-visit of the cohort); returns as :func:`thickness_job`."""
    import pandas as pd
    import torch

    from pipeline.mris.engine import make_network
    from pipeline.mris.evaluate import build_mris_database

    m = pd.read_csv(cohort / "manifest.csv", dtype={"subject_id": str})
    xdir = work / "mris_radiographs"
    xdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in m.itertuples():
        name = f"{r.subject_id}_{int(r.visit_month):02d}.dcm"
        if not (xdir / name).exists():
            shutil.copy(cohort / r.xray_dicom, xdir / name)
        rows.append({"file": name, "side": r.side, "x": r.joint_centre_x, "y": r.joint_centre_y})
    pd.DataFrame(rows).to_csv(work / "mris_landmarks.csv", index=False)
    ckpt, db = work / "mris_model.pt", work / "mris_database"
    torch.manual_seed(0)
    torch.save(make_network(**MRIS_NET).state_dict(), ckpt)
    build_mris_database(make_network(**MRIS_NET), ckpt, cohort / "manifest.csv", db,
                        split_fractions={"database": 1.0, "downstream": 0.0, "test": 0.0}, progress=False)
    over = {"input": str(xdir), "landmarks": str(work / "mris_landmarks.csv"), "checkpoint": str(ckpt),
            "database_dir": str(db), "image_size": str(MRIS_NET["image_size"]),
            "widen_factor": str(MRIS_NET["widen_factor"])}
    return MRIS_CONFIGS, over, "outputs.csv"


def run_label(nproc: int, threads: int | None) -> str:
    """How a measurement-1 run was launched, for tables and logs."""
    if threads is not None:
        return f"{nproc} process, OMP_NUM_THREADS={threads}"
    return f"{nproc} process" if nproc == 1 else f"{nproc} processes (torchrun: 1 thread each)"


def measure_bundle(name: str, job: tuple[Path, dict[str, str], str], work: Path, repeats: int,
                   problems: list[str]) -> list[dict]:
    """Each of :data:`BUNDLE_RUNS`, interleaved ``repeats`` times, fresh output folder each; one row per launch
    (fastest wall, every wall)."""
    configs, over, manifest = job
    has_multi = (configs / MULTI).is_file()
    if not has_multi:
        problems.append(f"{name}: {configs.relative_to(ROOT) / MULTI} does not exist; 2 processes not measured")
    runs: dict[tuple[int, int | None], list[dict]] = {v: [] for v in BUNDLE_RUNS if v[0] == 1 or has_multi}
    for rep in range(repeats):
        for nproc, threads in runs:
            out = work / f"{name}_{nproc}p{threads or ''}_{rep}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = bundle_command(configs, nproc, {**over, "output_dir": str(out)})
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            label = run_label(nproc, threads)
            try:
                runs[nproc, threads].append(run_bundle(cmd, out, manifest, env))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                problems.append(f"{name}, {label}: `{' '.join(cmd)}` failed: {e}")
                print(f"[{name}] {label} FAILED:\n{e}", flush=True)
                continue
            r = runs[nproc, threads][-1]
            print(f"[{name}] {label}: {r['items']} items in {r['wall_s']:.1f} s", flush=True)
    rows = []
    for (nproc, threads), rs in runs.items():
        if rs:
            best = min(rs, key=lambda r: r["wall_s"])
            rows.append({"bundle": name, "processes": nproc, "threads": threads, "launch": run_label(nproc, threads),
                         **best, "items_per_s": best["items"] / best["wall_s"],
                         "all_walls_s": [r["wall_s"] for r in rs],
                         "s_per_item_per_process": nproc / best["steady_items_per_s"]})
    return rows


def baseline_row(rows: list[dict], bundle: str) -> dict | None:
    """The default one-process row of ``bundle`` (the reference of the ratios)."""
    return next((r for r in rows if r["bundle"] == bundle and r["processes"] == 1 and r["threads"] is None), None)


# ------------------------------------------------------------------------------ 2: thickness vs volume size
def synthetic_labels(spacing_mm: float) -> tuple[np.ndarray, np.ndarray, str]:
    """One cohort knee's label volume (stored PIR) at isotropic ``spacing_mm``, its RAS affine and its side."""
    from pipeline.cohort.anatomy import knee_at_visit
    from pipeline.cohort.mr import MRGrid, label_volume, pir_affine_lps, tissue_sdfs, to_pir
    from pipeline.cohort.subject import sample_subject

    cfg = cohort_config(1)
    side = "L"
    kv = knee_at_visit(sample_subject(cfg.seed, 0).knees[side], 0)
    grid = MRGrid.around_knee((spacing_mm,) * 3, cfg.mr_half_extent_mm)
    lab = to_pir(label_volume(tissue_sdfs(kv, grid), grid.shape), side)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return lab, lps_to_ras @ pir_affine_lps(grid, side, (0.0, 0.0, 0.0)), side


def best_seconds(fn: Callable[[], object], repeat: int = 2) -> float:
    """Fastest wall time (s) of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_thickness(spacings: Sequence[float]) -> list[dict]:
    """Seconds of :func:`labels_to_maps` (64 x 64 maps) per knee for each label-volume spacing (mm)."""
    from pipeline.thickness.atlas import labels_to_maps

    rows = []
    for s in spacings:
        lab, aff, side = synthetic_labels(s)
        sec = best_seconds(lambda lab=lab, aff=aff, side=side: labels_to_maps(lab, aff, side, size=(64, 64)))
        rows.append({"spacing_mm": s, "shape": "x".join(map(str, lab.shape)), "voxels": int(lab.size),
                     "cartilage_voxels": int(np.isin(lab, (2, 4)).sum()), "s_per_knee": sec})
        print(f"[thickness] {s} mm {lab.shape}: {sec:.3f} s/knee", flush=True)
    return rows


# --------------------------------------------------------------------------------- 3: k-NN vs database size
def write_database(path: Path, n: int, dim: int = KNN_DIM, seed: int = 0) -> None:
    """A seeded ``n x dim`` float32 unit-row database as a ``.npy`` file, written in chunks (no full copy)."""
    rng = np.random.default_rng(seed)
    db = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 50_000):
        e = rng.standard_normal((min(50_000, n - s), dim), dtype=np.float32)
        db[s:s + len(e)] = e / np.linalg.norm(e, axis=1, keepdims=True)
    db.flush()
    del db


def knn_worker(path: str, backend: str, threads: int) -> dict:
    """In a fresh process: memory-map the database, then time two ``cosine_topk`` calls and the first's peak RSS."""
    import torch
    from bench_knn import peak_rss_mb, reset_peak_rss

    from pipeline.mris.knn import cosine_topk, resolve_backend

    torch.set_num_threads(threads)
    db = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((KNN_QUERIES, db.shape[1]), dtype=np.float32)
    cosine_topk(q, q, KNN_K, backend=backend)  # warm-up: lazy imports and thread pools, not the database
    base, how = reset_peak_rss()
    t0 = time.perf_counter()
    cosine_topk(q, db, KNN_K, backend=backend)
    first = time.perf_counter() - t0
    peak = peak_rss_mb(how) - base
    t0 = time.perf_counter()
    cosine_topk(q, db, KNN_K, backend=backend)
    second = time.perf_counter() - t0
    return {"backend": backend, "resolved": resolve_backend(backend, n_queries=KNN_QUERIES), "n": int(db.shape[0]), "first_s": first,
            "second_s": second, "peak_extra_mb": peak, "baseline_mb": base, "memory_probe": how}


def knn_backends() -> list[str]:
    """The default backend, plus every other exact backend installed that it does not resolve to (torch, and
    faiss when importable), so the table shows what the default chose and what it passed over."""
    from pipeline.mris.knn import faiss_available, resolve_backend

    chosen = resolve_backend("auto", n_queries=KNN_QUERIES)
    others = ["torch"] + (["faiss"] if faiss_available() else [])
    return ["auto"] + [b for b in others if b != chosen]


def measure_knn(sizes: Sequence[int], work: Path, problems: list[str]) -> list[dict]:
    """Query time and peak memory per database size and backend, each in a fresh subprocess."""
    rows = []
    for n in sizes:
        need = n * KNN_DIM * 4
        free = shutil.disk_usage(work).free
        if free < 2 * need:
            problems.append(f"k-NN N={n}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; skipped")
            continue
        path = work / f"knn_db_{n}.npy"
        write_database(path, n)
        for backend in knn_backends():
            cmd = [sys.executable, __file__, "--knn-worker", str(path), "--backend", backend]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                problems.append(f"k-NN N={n} {backend}: exit {proc.returncode}: {proc.stderr[-1500:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"[knn] N={n} {backend}->{r['resolved']}: {r['first_s']:.3f} s first, {r['second_s']:.3f} s "
                  f"second, peak +{r['peak_extra_mb']:.0f} MB", flush=True)
        path.unlink()
    return rows


# --------------------------------------------------------------------------------------------------- report
def bundle_section(rows: list[dict]) -> str:
    """Table of measurement 1."""
    table = []
    for r in rows:
        one = baseline_row(rows, r["bundle"])
        ratio = r["items_per_s"] / one["items_per_s"] if one else None
        table.append([r["bundle"], r["launch"], r["items"], r["wall_s"], ", ".join(f"{w:.1f}" for w in
                      r["all_walls_s"]), r["items_per_s"], ratio, r["steady_items_per_s"],
                      r["s_per_item_per_process"]])
    head = ["bundle", "launch", "items", "wall s (fastest)", "all walls s", "items/s (wall)",
            "ratio vs 1 process", "steady items/s (outputs)", "s per item per process (outputs)"]
    return markdown_table(head, table)


def thickness_section(rows: list[dict]) -> tuple[str, float]:
    """Table and log-log slope of measurement 2."""
    slope = loglog_slope([r["voxels"] for r in rows], [r["s_per_knee"] for r in rows])
    table = [[r["spacing_mm"], r["shape"], r["voxels"], r["cartilage_voxels"], r["s_per_knee"]] for r in rows]
    return markdown_table(["spacing mm", "shape", "voxels", "cartilage voxels", "s per knee"], table), slope


def knn_section(rows: list[dict]) -> tuple[str, dict[str, float]]:
    """Table and per-backend log-log slope (second-call time vs N) of measurement 3."""
    table = [[r["n"], f"{r['backend']} ({r['resolved']})", r["first_s"], r["second_s"],
              KNN_QUERIES / r["first_s"], r["peak_extra_mb"], r["baseline_mb"], r["n"] * KNN_DIM * 4 / 2**20]
             for r in rows]
    slopes = {b: loglog_slope([r["n"] for r in rows if r["backend"] == b],
                              [r["second_s"] for r in rows if r["backend"] == b]) for b in {r["backend"] for r in rows}}
    head = ["N", "backend", "first call s", "second call s", "queries/s (first)", "peak extra RSS MB",
            "RSS before MB", "database file MiB"]
    return markdown_table(head, table), slopes


def cohort_section(rows: list[dict]) -> tuple[str, float]:
    """Table and log-log slope (wall vs subjects) of measurement 4."""
    slope = loglog_slope([r["subjects"] for r in rows], [r["seconds"] for r in rows])
    table = [[r["subjects"], r["knee_visits"], r["seconds"], r["s_per_subject"], r["mib_per_subject"]] for r in rows]
    return markdown_table(["subjects", "knee-visits", "wall s", "s per subject", "MiB per subject"], table), slope


def bundle_reading(name: str, rows: list[dict]) -> str:
    """A few sentences on measurement 1 for one bundle: start-up share, 2 / 1 process ratios, the 1-thread control."""
    one = baseline_row(rows, name)
    if one is None:
        return f"{name}: the one-process run failed (see Problems)."
    at_rate = one["items"] / one["steady_items_per_s"]
    text = (f"{name}: one process took {one['wall_s']:.1f} s for {one['items']} items, of which about "
            f"{at_rate:.1f} s is the items at the steady rate and the rest process start, imports and set-up.")
    two = next((r for r in rows if r["bundle"] == name and r["processes"] == 2), None)
    if two is None:
        return text + " 2 processes: not measured (see Problems)."
    text += (f" 2 processes: x{two['items_per_s'] / one['items_per_s']:.2f} the items/s of one on the wall clock, "
             f"x{two['steady_items_per_s'] / one['steady_items_per_s']:.2f} in steady state (ideal x2 on 2 idle "
             "cores).")
    ctl = next((r for r in rows if r["bundle"] == name and r["processes"] == 1 and r["threads"] == 1), None)
    if ctl is not None:
        text += (f" One process with 1 thread runs at x{ctl['steady_items_per_s'] / one['steady_items_per_s']:.2f} "
                 "the steady rate of one process with the default threads, so 2 processes give "
                 f"x{two['steady_items_per_s'] / ctl['steady_items_per_s']:.2f} over 1 process at 1 thread each.")
    return text


def reading(rep: Report, slopes: dict[str, Any]) -> list[str]:
    """Short plain statements derived from the numbers (no claims beyond them)."""
    out = [bundle_reading(name, rep.bundles) for name in sorted({r["bundle"] for r in rep.bundles})]
    if np.isfinite(slopes.get("thickness", np.nan)):
        out.append(f"Thickness per knee grows as voxels^{slopes['thickness']:.2f} over this range (1 = linear).")
    for b, s in sorted(slopes.get("knn", {}).items()):
        if np.isfinite(s):
            out.append(f"k-NN query time ({b}, second call) grows as N^{s:.2f} (1 = a linear scan; below 1: fixed "
                       "per-call costs still weigh at the small sizes).")
    if rep.knn:
        big = max(rep.knn, key=lambda r: (r["n"], r["peak_extra_mb"]))
        out.append(f"Largest k-NN peak: +{big['peak_extra_mb']:.0f} MB RSS at N = {big['n']:,} "
                   f"({big['backend']}), database file {big['n'] * KNN_DIM * 4 / 2**20:.0f} MiB (its touched pages "
                   "count in RSS).")
    s = slopes.get("cohort", np.nan)
    if np.isfinite(s):
        why = "; below 1: fixed costs, e.g. the 2-worker pool's start, spread over more subjects" if s < 0.9 else ""
        out.append(f"Cohort wall time grows as subjects^{s:.2f} (1 = constant time per subject{why}); "
                   f"{rep.cohort[-1]['s_per_subject']:.2f} s per subject at {rep.cohort[-1]['subjects']} subjects.")
    return out


def write_markdown(path: Path, rep: Report, info: dict[str, str], command: str, started: str, loads: list[str],
                   total_s: float) -> None:
    """``docs/scaling.md``: machine, date, command, one table per measurement, reading, problems."""
    th_table, th_slope = thickness_section(rep.thickness)
    knn_table, knn_slopes = knn_section(rep.knn)
    co_table, co_slope = cohort_section(rep.cohort)
    slopes = {"thickness": th_slope, "knn": knn_slopes, "cohort": co_slope}
    md = [
        "# Scaling, measured",
        "",
        "Written by `benchmarks/bench_scaling.py` (issue 16 item 4); how each number is measured is in that "
        "script's docstring. Regenerate on a quiet machine: numbers from a shared machine are noisy.",
        "",
        f"- command: `{command}`",
        f"- date (UTC): {started}; total run time {total_s / 60:.1f} min",
        "- machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        f"- load average (1/5/15 min) at start / end: {loads[0]} | {loads[-1]}",
        "",
        "## 1. Bundles: items per second with 1 and 2 processes",
        "",
        "Input: the cohort of measurement 4's largest size. thickness: `--map_size \"[64, 64]\"`, items = "
        "knee-visits; mris: untrained tiny MRIS-C (widen 0.125, 32 px) and its database of every knee-visit, "
        "items = knees. 2 processes = `torchrun --standalone --nproc_per_node=2` with `multi_gpu_inference.json` "
        "(torchrun sets OMP_NUM_THREADS=1 per process; one process uses torch's default threads, so a third launch, "
        "one process with OMP_NUM_THREADS=1, separates more processes from fewer threads). Wall = the "
        "whole command, process start included, nothing subtracted; 'steady' = from the modification times of "
        "each item's output files (excludes start-up and the first item).",
        "",
        bundle_section(rep.bundles) if rep.bundles else "(not measured)",
        "",
        "## 2. Thickness per knee vs label-volume size",
        "",
        "`pipeline.thickness.atlas.labels_to_maps` (64 x 64 maps, no file I/O), one synthetic knee sampled at "
        f"isotropic spacings; best of 2. Log-log slope (seconds vs voxels): **{th_slope:.2f}**.",
        "",
        th_table,
        "",
        "## 3. k-NN query time and peak memory vs database size",
        "",
        f"{KNN_QUERIES} queries, k = {KNN_K}, {KNN_DIM}-d float32 database memory-mapped from a `.npy` file (in the "
        "page cache: just written), `pipeline.mris.knn.cosine_topk`, fresh process per row. Peak extra RSS = peak "
        "RSS during the first call minus RSS before it (VmHWM reset via /proc/self/clear_refs), so the touched "
        "database pages are included. Each process first warms up on its own queries (lazy imports, thread "
        "pools); 'first call' is then the first search of the database (its pages mapped in), 'second call' the "
        "same search again. Log-log slopes (second call vs N): "
        + ", ".join(f"{b} **{s:.2f}**" for b, s in sorted(knn_slopes.items())) + ".",
        "",
        knn_table,
        "",
        "## 4. Cohort generation per subject",
        "",
        "`pipeline.cohort.generate.generate_cohort`, TINY options (1 mm radiographs, 1.6 mm MR with DICOM "
        f"series and NIfTI, visits 0/24/48), no DXA, 2 workers, fresh folder. Log-log slope (wall vs subjects): "
        f"**{co_slope:.2f}**.",
        "",
        co_table,
        "",
        "## Reading",
        "",
        *[f"- {s}" for s in reading(rep, slopes)],
        "",
    ]
    if rep.problems:
        md += ["## Problems", "", *[f"- {p}" for p in rep.problems], ""]
    path.write_text("\n".join(md), encoding="utf-8")


def plot(path: Path, rep: Report) -> None:
    """``docs/scaling.png``: log-log panels (bundles, thickness, k-NN time, k-NN memory, cohort)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    ax = axes[0, 0]
    for name in sorted({r["bundle"] for r in rep.bundles}):
        rs = sorted((r for r in rep.bundles if r["bundle"] == name and r["threads"] is None),
                    key=lambda r: r["processes"])
        if not rs:
            continue
        p = [r["processes"] for r in rs]
        line = ax.plot(p, [r["items_per_s"] for r in rs], "o-", label=f"{name} (wall)")[0]
        ax.plot(p, [r["steady_items_per_s"] for r in rs], "s--", color=line.get_color(), label=f"{name} (steady)")
        ax.plot(p, [rs[0]["items_per_s"] * x for x in p], ":", color=line.get_color(), alpha=0.6,
                label=f"{name} ideal x processes")
        for r in rep.bundles:
            if r["bundle"] == name and r["threads"] is not None:
                ax.plot([r["processes"]], [r["steady_items_per_s"]], "^", color=line.get_color(),
                        label=f"{name} (steady), 1 process, {r['threads']} thread")
    _axes(ax, "1. bundles: throughput", "processes", "items per second", [1, 2])
    ax = axes[0, 1]
    x, y = [r["voxels"] for r in rep.thickness], [r["s_per_knee"] for r in rep.thickness]
    ax.plot(x, y, "o-", label=f"labels_to_maps, slope {loglog_slope(x, y):.2f}")
    _axes(ax, "2. thickness per knee", "label-volume voxels", "seconds per knee", x)
    for b in sorted({r["backend"] for r in rep.knn}):
        rs = sorted((r for r in rep.knn if r["backend"] == b), key=lambda r: r["n"])
        n = [r["n"] for r in rs]
        line = axes[0, 2].plot(n, [r["second_s"] for r in rs], "o-", label=f"{b} ({rs[0]['resolved']}), second "
                               f"call, slope {loglog_slope(n, [r['second_s'] for r in rs]):.2f}")[0]
        axes[0, 2].plot(n, [r["first_s"] for r in rs], "s--", color=line.get_color(),
                        label=f"{b} ({rs[0]['resolved']}), first call")
        axes[1, 0].plot(n, [max(r["peak_extra_mb"], 0.1) for r in rs], "o-", label=f"{b} ({rs[0]['resolved']})")
    if rep.knn:
        n = sorted({r["n"] for r in rep.knn})
        axes[1, 0].plot(n, [v * KNN_DIM * 4 / 2**20 for v in n], "k:", label="database file size")
    n = [r["n"] for r in rep.knn]
    _axes(axes[0, 2], f"3. k-NN: {KNN_QUERIES} queries, k={KNN_K}", "database rows N", "seconds per batch", n)
    _axes(axes[1, 0], "3. k-NN: peak extra RSS", "database rows N", "MB", n)
    ax = axes[1, 1]
    x, y = [r["subjects"] for r in rep.cohort], [r["seconds"] for r in rep.cohort]
    ax.plot(x, y, "o-", label=f"wall, slope {loglog_slope(x, y):.2f}")
    ax.plot(x, [r["s_per_subject"] for r in rep.cohort], "s--", label="seconds per subject")
    _axes(ax, "4. cohort generation (TINY, 2 workers)", "subjects", "seconds", x)
    axes[1, 2].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:  # panel 1's long legend goes into the free sixth cell
        axes[0, 0].get_legend().remove()
        axes[1, 2].legend(handles, labels, loc="center", title="1. bundles", fontsize=9)
    fig.suptitle(f"Scaling on {os.cpu_count()} CPUs (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _short(v: float) -> str:
    """1500 -> '1.5k', 391950 -> '392k', 2e6 -> '2M', 0.5 -> '0.5' (tick labels)."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{round(v / div, 1 if abs(v) < 10 * div else 0):g}{suffix}"
    return f"{v:.3g}"


def _plain_log_labels(ax: Any, xticks: Sequence[float]) -> None:
    """Plain tick labels on log axes: x ticks at the measured values; y labels at decades, plus 2, 3 and 5 x decade
    when the axis spans at most two decades, and at every minor tick when it spans less than a factor 4."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def minor(v: float, _pos: Any) -> str:
        lo, hi = ax.get_ylim()
        lead = round(v / 10 ** np.floor(np.log10(v)), 6)
        return _short(v) if hi / lo < 4 or (hi / lo < 100 and lead in (2.0, 3.0, 5.0)) else ""

    if xticks:
        ax.set_xticks(sorted(set(xticks)), [_short(v) for v in sorted(set(xticks))])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _short(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _axes(ax: Any, title: str, xlabel: str, ylabel: str, xticks: Sequence[float] = ()) -> None:
    """Log-log axes with title, labels (units), grid, plain tick labels and a legend ("not measured" if empty)."""
    ax.set_title(title)
    if not any(len(line.get_xdata()) for line in ax.lines):
        ax.text(0.5, 0.5, "not measured (see scaling.md)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    _plain_log_labels(ax, xticks)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------------- main
def run_all(plan: Plan, work: Path) -> Report:
    """Measurements 4, 1, 2, 3 in that order (1 runs on 4's largest cohort)."""
    rep = Report()
    rep.cohort, cohort = measure_cohort(plan.cohort_subjects, work)
    for name, job in (("thickness", lambda: thickness_job(cohort)), ("mris", lambda: mris_job(cohort, work))):
        try:
            rep.bundles += measure_bundle(name, job(), work, plan.repeats, rep.problems)
        except Exception as e:  # one failing bundle must not lose the other measurements
            rep.problems.append(f"{name}: setup failed: {type(e).__name__}: {e}")
    rep.thickness = measure_thickness(plan.spacings_mm)
    rep.knn = measure_knn(plan.knn_sizes, work, rep.problems)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version (~2 min): small sizes, one repeat")
    ap.add_argument("--out-md", type=Path, default=ROOT / "docs" / "scaling.md")
    ap.add_argument("--out-png", type=Path, default=ROOT / "docs" / "scaling.png")
    ap.add_argument("--workdir", type=Path, default=None, help="temporary files (default: a new temp folder)")
    ap.add_argument("--knn-worker", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.knn_worker:
        print(json.dumps(knn_worker(a.knn_worker, a.backend, min(2, os.cpu_count() or 1))))
        return
    command = "python benchmarks/bench_scaling.py" + (" --quick" if a.quick else "")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    loads = [load_average()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scaling_", dir=a.workdir) as tmp:
        rep = run_all(QUICK if a.quick else FULL, Path(tmp))
    total = time.perf_counter() - t0
    loads.append(load_average())
    write_markdown(a.out_md, rep, machine_info(), command, started, loads, total)
    plot(a.out_png, rep)
    print(f"wrote {a.out_md} and {a.out_png} in {total / 60:.1f} min")
    for p in rep.problems:
        print("PROBLEM:", p)


if __name__ == "__main__":
    main()

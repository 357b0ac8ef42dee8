"""Command line: ``python -m pipeline {cohort,report,demo,compare,bundles} ...``.

Errors in the user's input (bad arguments, unwritable folders, invalid manifests) print one line starting
with ``error:`` and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _months(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated months like 0,12,24 (got {text!r})") from None


def _spacing3(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one or three numbers in mm (got {text!r})") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected one or three numbers in mm (got {text!r})")
    return vals


def _cohort_args(p: argparse.ArgumentParser, default_n: int) -> None:
    p.add_argument("--subjects", "-n", type=int, default=default_n, help="number of subjects (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    # default None = "not given": --tiny fills only the values the user did not pass (see _config)
    p.add_argument("--visits", type=_months, default=None,
                   help="visit months, comma-separated, from 0,12,24,36,48,72,96 (default 0,12,24,48)")
    p.add_argument("--missing-rate", type=float, default=None,
                   help="probability that a follow-up visit is missing (default 0.15)")
    p.add_argument("--xray-spacing", type=float, default=None, help="radiograph pixel spacing in mm (default 0.3)")
    p.add_argument("--mr-spacing", type=_spacing3, default=None,
                   help="MR voxel size in mm: one value or ML,AP,SI (default 0.7,0.7,0.35)")
    p.add_argument("--map-size", type=int, default=None, help="thickness-map grid size in cells (default 128)")
    p.add_argument("--monochrome1", type=float, default=0.3, help="fraction of radiographs stored MONOCHROME1")
    p.add_argument("--no-mr-dicom", action="store_true", help="write the DESS volumes as NIfTI only")
    p.add_argument("--no-mr", action="store_true",
                   help="no MR volumes or labels (radiographs + analytic thickness maps only; fast, for retrieval)")
    p.add_argument("--no-dxa", action="store_true", help="skip the DXA-like images")
    p.add_argument("--tiny", action="store_true", help="tiny, coarse cohort for tests (1 mm X-ray, 1.6 mm MR)")
    p.add_argument("--mr-fast", action="store_true",
                   help="fast MR: 160 x 160 x 64 sagittal grid (0.6 mm in-plane, 1.5 mm slices), NIfTI only, "
                        "baseline MR only (unless --mr-spacing / --mr-visits are given)")
    p.add_argument("--mr-visits", type=_months, default=None,
                   help="months with an MR volume (default: every visit; --mr-fast: 0)")
    p.add_argument("--no-mr-markers", action="store_true",
                   help="no MR progression markers (BML, effusion, meniscal extrusion / damage, cartilage signal)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")


#: The cohort options --tiny may set: CohortConfig field -> (argparse attribute, flag, default without --tiny).
_TINY_OPTIONS = {
    "visits": ("visits", "--visits", (0, 12, 24, 48)),
    "missing_rate": ("missing_rate", "--missing-rate", 0.15),
    "xray_spacing_mm": ("xray_spacing", "--xray-spacing", 0.3),
    "mr_spacing_mm": ("mr_spacing", "--mr-spacing", (0.7, 0.7, 0.35)),
    "map_size": ("map_size", "--map-size", 128),
}


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _config(a: argparse.Namespace):
    """The CohortConfig of the parsed options. ``--tiny`` sets the coarse test values for every option the user
    did NOT pass; values the user passed win and are reported on stderr when they differ from the tiny ones.
    CohortConfig validates the final values."""
    from pipeline.cohort.generate import MR_FAST, TINY, CohortConfig

    kw = dict(n_subjects=a.subjects, seed=a.seed, monochrome1_fraction=a.monochrome1, write_mr=not a.no_mr,
              write_mr_dicom=not a.no_mr_dicom, write_dxa=not a.no_dxa, workers=a.workers)
    for field, (attr, flag, default) in _TINY_OPTIONS.items():
        given = getattr(a, attr, None)
        if given is not None:
            kw[field] = given
            if a.tiny and field in TINY and _as_tuple(given) != _as_tuple(TINY[field]):
                print(f"note: --tiny keeps your {flag} {given} (the tiny cohort would use {TINY[field]})",
                      file=sys.stderr)
        else:
            kw[field] = TINY[field] if a.tiny and field in TINY else default
    # --mr-fast sets the MR grid, NIfTI-only and baseline-only MR; --mr-spacing / --mr-visits given win.
    if a.mr_fast:
        kw.update(mr_half_extent_mm=MR_FAST["mr_half_extent_mm"], write_mr_dicom=MR_FAST["write_mr_dicom"],
                  mr_visits=MR_FAST["mr_visits"])
        if a.mr_spacing is None:
            kw["mr_spacing_mm"] = MR_FAST["mr_spacing_mm"]
    if a.mr_visits is not None:
        kw["mr_visits"] = a.mr_visits
    kw["mr_markers"] = not a.no_mr_markers
    return CohortConfig(**kw)


def _shard(text: str) -> tuple[int, int]:
    from pipeline.cohort.generate import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_cohort(a: argparse.Namespace) -> int:
    from pipeline.cohort.generate import generate_cohort, merge_cohort, shard_from_env

    cfg = _config(a)
    if a.merge:
        m = merge_cohort(a.out, cfg)
        print(f"merged {len(m)} knee-visits of {cfg.n_subjects} subjects; manifest: {Path(a.out) / 'manifest.csv'}")
        return 0
    shard = a.shard if a.shard is not None else shard_from_env()  # torchrun sets RANK / WORLD_SIZE
    t0 = time.time()
    m = generate_cohort(a.out, cfg, shard=shard)
    dt = time.time() - t0
    if shard is not None and not (Path(a.out) / "manifest.csv").exists():
        print(f"shard {shard[0]}/{shard[1]}: wrote {len(m)} knee-visits to {a.out} in {dt:.1f} s; the manifest is "
              "written when every shard is complete (or by the same command with --merge)")
        return 0
    print(f"wrote {len(m)} knee-visits of {cfg.n_subjects} subjects to {a.out} in {dt:.1f} s "
          f"({len(m) / max(dt, 1e-9):.2f} knee-visits/s); manifest: {Path(a.out) / 'manifest.csv'}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from pipeline.cohort.report import write_cohort_report

    path = write_cohort_report(a.cohort, a.out or a.cohort)
    print(f"report: {path}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from pipeline.cohort.generate import generate_cohort
    from pipeline.cohort.report import write_cohort_report

    out = Path(a.out)
    cfg = _config(a)
    t0 = time.time()
    print(f"[demo] 1/5 synthetic cohort: {cfg.n_subjects} subjects, visits {list(cfg.visits)} -> {out / 'cohort'}")
    m = generate_cohort(out / "cohort", cfg)
    print(f"[demo]     {len(m)} knee-visits in {time.time() - t0:.0f} s")
    print("[demo] 2/5 cohort report and contact sheet")
    rep = write_cohort_report(out / "cohort", out)
    text = Path(rep).read_text()
    if cfg.write_mr:
        print("[demo] 3/5 thickness maps from the DESS labels (bundles/thickness)")
        from pipeline.io.atomic import write_text_atomic
        from pipeline.thickness.report import cohort_maps, maps_over_visits_figure, thickness_report_lines

        df = cohort_maps(out / "cohort", out / "maps")
        png = maps_over_visits_figure(df, out / "maps", out / "thickness_maps_over_visits.png")
        text += "\n".join(thickness_report_lines(df, png))
        write_text_atomic(rep, text)
    else:
        print("[demo] 3/5 skipped: no MR volumes (--no-mr), so no labels to map")
    if not a.no_mris:
        from pipeline.io.atomic import write_text_atomic
        from pipeline.mris.demo import run_mris_demo

        t1 = time.time()
        print(f"[demo] 4/5 MRIS: radiograph + map cohort of {a.mris_subjects} subjects, training (demo config: "
              "128 px, half-width ResNet-18s, 40 epochs; the paper uses 256 px, full width and 450 epochs), evaluation -> " + str(out / "mris"))
        mris_report = run_mris_demo(out, seed=a.seed, n_subjects=a.mris_subjects, workers=a.workers)
        text += "\n## MRIS (bundles/mris, demo config)\n\n" + _summary(Path(mris_report).read_text())
        text += f"\nFull MRIS report: `{mris_report}`, example syntheses: `{Path(mris_report).parent / 'examples.png'}`.\n"
        write_text_atomic(rep, text)
        print(f"[demo]     MRIS done in {time.time() - t1:.0f} s")
        if not a.no_compare:
            from pipeline.compare import run_short_report

            t2 = time.time()
            print("[demo] 5/5 short paper-style comparison (python -m pipeline compare --short): MRIS-C vs a U-Net "
                  "trained for 2 epochs, downstream KLG / progression classifiers -> " + str(out / "compare_short"))
            cmp_report = run_short_report(out / "compare_short", out / "mris_cohort" / "manifest.csv",
                                          mris_c_root=out / "mris", seed=a.seed, threads=1)
            summary = Path(cmp_report).parent / "summary.md"
            text += "\n## Short comparison (MRIS-C vs U-Net, downstream classifiers)\n\n"
            text += (summary if summary.is_file() else Path(cmp_report)).read_text()
            text += f"\nFull comparison report: `{cmp_report}`.\n"
            write_text_atomic(rep, text)
            print(f"[demo]     comparison done in {time.time() - t2:.0f} s")
        else:
            print("[demo] 5/5 skipped (--no-compare)")
    else:
        print("[demo] 4/5 and 5/5 skipped (--no-mris)")
    print(text)
    print(f"[demo] done in {time.time() - t0:.0f} s; report: {rep}")
    return 0


def _fractions(text: str) -> dict:
    import ast
    import json

    try:
        d = json.loads(text)
    except ValueError:
        try:
            d = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"expected a dict like '{{\"database\": 0.55, \"downstream\": 0.2, "
                                             f"\"test\": 0.25}}' (got {text!r})") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) for v in d.values()):
        raise argparse.ArgumentTypeError(f"expected a dict of set name -> fraction (got {text!r})")
    return {str(k): float(v) for k, v in d.items()}


def cmd_compare(a: argparse.Namespace) -> int:
    from pipeline.compare import CompareConfig, run_compare, run_short_report

    shared = {k: v for k, v in {"image_size": a.image_size, "epochs": a.epochs, "draws_per_epoch": a.draws_per_epoch,
                                "batch_size": a.batch_size, "split_fractions": a.split_fractions,
                                "split_seed": a.split_seed, "val_fraction": a.val_fraction}.items() if v is not None}
    if not a.config and (not a.manifest or not a.out):
        raise ValueError("compare needs --manifest and --out (or a --config that names them)")
    if a.short:
        if not a.manifest or not a.out:
            raise ValueError("compare --short needs --manifest and --out")
        report = run_short_report(a.out, a.manifest, a.mris_c_root, seed=a.seed if a.seed is not None else 0,
                                  shared=shared, preset=a.preset or "demo", device=a.device, threads=a.threads)
    else:
        kw = {"manifest": a.manifest, "out": a.out, "seed": a.seed, "preset": a.preset, "mris_c_root": a.mris_c_root,
              "mris_s_root": a.mris_s_root, "k": a.k, "device": a.device, "threads": a.threads,
              "resume": a.resume or None,
              "methods": [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None}
        kw = {k: v for k, v in kw.items() if v is not None}
        if a.config:
            cfg = CompareConfig.from_json(a.config, **kw)
            cfg.shared.update(shared)
        else:
            cfg = CompareConfig(**kw, shared=shared)
        report = run_compare(cfg)
    print(Path(report).read_text())
    print(f"report: {report}")
    return 0


def cmd_bundles(a: argparse.Namespace) -> int:
    from pipeline import bundle_paths as bp

    if a.configs:
        path = bp.bundle_configs(a.configs)
        if not path.is_dir():
            raise FileNotFoundError(f"no configs of bundle {a.configs!r} at {path} (bundles: "
                                    f"{', '.join(bp.bundle_names()) or 'none found'})")
        print(path)
        return 0
    env = os.environ.get(bp.ENV_BUNDLES, "").strip()
    where = ("repository checkout" if bp.repository_root() is not None else
             "installed package" if bp.installed_data_dir() is not None else "not found")
    print(f"bundle configs (read-only): {bp.bundles_dir()} ({where}{f'; ${bp.ENV_BUNDLES}={env}' if env else ''})")
    print(f"manifest schema: {bp.manifest_schema_path()}")
    print("bundle             configs -> default outputs (bundle_root; --bundle_root DIR moves them)")
    for name in bp.bundle_names():
        print(f"{name:18s} {bp.bundle_configs(name)} -> {bp.bundle_root(name)}")
    return 0


def _summary(report: str) -> str:
    """The first table of an MRIS report (retrieval recall) and the 'all' rows of the second (synthesis)."""
    tables: list[list[str]] = []
    for line in report.splitlines():
        if line.startswith("|"):
            if not tables or not tables[-1] or not tables[-1][-1].startswith("|"):
                tables.append([])
            tables[-1].append(line)
        elif tables and tables[-1]:
            tables[-1].append("")  # end of a table
    tables = [[ln for ln in t if ln] for t in tables]
    out = tables[0] if tables else []
    if len(tables) > 1:
        out = out + [""] + tables[1][:2] + [ln for ln in tables[1][2:] if "| all |" in ln]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Knee OA imaging toolkit")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cohort", help="generate a synthetic knee cohort")
    c.add_argument("--out", "-o", required=True, help="output folder")
    _cohort_args(c, 40)
    c.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="generate only the subjects with index %% N == I (many processes / machines writing one "
                        "cohort); default: RANK/WORLD_SIZE under torchrun, else all subjects")
    c.add_argument("--merge", action="store_true",
                   help="generate nothing: write manifest.csv / subjects.csv / cohort.json from complete shards")
    c.set_defaults(func=cmd_cohort)
    r = sub.add_parser("report", help="cohort report: counts per KLG and visit, contact sheet")
    r.add_argument("cohort", help="cohort folder (with manifest.csv)")
    r.add_argument("--out", "-o", default=None, help="report folder (default: the cohort folder)")
    r.set_defaults(func=cmd_report)
    d = sub.add_parser("demo", help="the main job on the embedded default cohort")
    d.add_argument("--out", "-o", default="demo_output", help="output folder (default demo_output)")
    d.add_argument("--no-mris", action="store_true", help="skip the MRIS training and evaluation (about 10 min)")
    d.add_argument("--no-compare", action="store_true",
                   help="skip the short MRIS vs U-Net comparison and downstream classifiers (step 5)")
    d.add_argument("--mris-subjects", type=int, default=160,
                   help="subjects of the radiograph-only MRIS cohort (default 160)")
    _cohort_args(d, 40)
    d.set_defaults(func=cmd_demo)
    cp = sub.add_parser("compare", help="MRIS vs direct synthesis: retrieval, synthesis error, downstream classifiers")
    cp.add_argument("--manifest", "-m", default=None,
                    help="knee-visit manifest (MR-extracted maps, KLG, progression); required unless in --config")
    cp.add_argument("--out", "-o", default=None,
                    help="output folder (report.md, CSV tables, figures, config.json); required unless in --config")
    cp.add_argument("--config", default=None, help="CompareConfig JSON (e.g. a previous run's config.json)")
    cp.add_argument("--methods", default=None,
                    help="comma-separated synthesis methods (default mris-c,mris-s,unet,pix2pix,transformer)")
    cp.add_argument("--preset", choices=("demo", "paper"), default=None,
                    help="demo: the bundles' *_demo.json + small classifiers (default); paper: the paper's settings")
    cp.add_argument("--mris-c-root", default=None, help="trained MRIS-C bundle root (models/model.pt); else trained")
    cp.add_argument("--mris-s-root", default=None, help="trained MRIS-S bundle root; else trained")
    cp.add_argument("--seed", type=int, default=None, help="seed of every training (default 0)")
    cp.add_argument("--image-size", type=int, default=None, help="shared image size (default: the MRIS config's)")
    cp.add_argument("--epochs", type=int, default=None, help="shared epochs (default: the MRIS config's)")
    cp.add_argument("--draws-per-epoch", type=int, default=None, help="shared sampler draws per epoch")
    cp.add_argument("--batch-size", type=int, default=None, help="shared batch size")
    cp.add_argument("--split-fractions", type=_fractions, default=None,
                    help="subject split, e.g. '{\"database\": 0.55, \"downstream\": 0.2, \"test\": 0.25}'")
    cp.add_argument("--split-seed", type=int, default=None, help="split seed (default: the MRIS config's)")
    cp.add_argument("--val-fraction", type=float, default=None, help="validation fraction of the database subjects")
    cp.add_argument("--k", type=int, default=None, help="MRIS neighbours (default 20)")
    cp.add_argument("--device", default="cpu", help="torch device for synthesis and classifiers (default cpu)")
    cp.add_argument("--threads", type=int, default=None,
                    help="CPU threads per process (default: PyTorch's); 1 is faster on a machine shared with other jobs")
    cp.add_argument("--resume", action="store_true",
                    help="reuse models trained in --out by an earlier run with the same training settings")
    cp.add_argument("--short", action="store_true",
                    help="the short version: MRIS-C (reused with --mris-c-root) vs a 2-epoch U-Net, short classifiers")
    cp.set_defaults(func=cmd_compare)
    b = sub.add_parser("bundles", help="where the bundle configs are and where their outputs go")
    b.add_argument("--configs", metavar="NAME", default=None,
                   help="print only the configs folder of bundle NAME (e.g. thickness), for scripts")
    b.set_defaults(func=cmd_bundles)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)  # argparse itself prints usage + one error line, exit 2
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("error: interrupted; complete subjects are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, PermissionError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

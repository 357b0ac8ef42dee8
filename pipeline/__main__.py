"""Command line: ``python -m pipeline {cohort,report,demo} ...``.

Errors in the user's input (bad arguments, unwritable folders, invalid manifests) print one line starting
with ``error:`` and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--visits", type=_months, default=(0, 12, 24, 48),
                   help="visit months, comma-separated, from 0,12,24,36,48,72,96 (default 0,12,24,48)")
    p.add_argument("--missing-rate", type=float, default=0.15, help="probability that a follow-up visit is missing")
    p.add_argument("--xray-spacing", type=float, default=0.3, help="radiograph pixel spacing in mm (default 0.3)")
    p.add_argument("--mr-spacing", type=_spacing3, default=(0.7, 0.7, 0.35),
                   help="MR voxel size in mm: one value or ML,AP,SI (default 0.7,0.7,0.35)")
    p.add_argument("--map-size", type=int, default=128, help="thickness-map grid size in cells (default 128)")
    p.add_argument("--monochrome1", type=float, default=0.3, help="fraction of radiographs stored MONOCHROME1")
    p.add_argument("--no-mr-dicom", action="store_true", help="write the DESS volumes as NIfTI only")
    p.add_argument("--no-mr", action="store_true",
                   help="no MR volumes or labels (radiographs + analytic thickness maps only; fast, for retrieval)")
    p.add_argument("--no-dxa", action="store_true", help="skip the DXA-like images")
    p.add_argument("--tiny", action="store_true", help="tiny, coarse cohort for tests (1 mm X-ray, 1.6 mm MR)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")


def _config(a: argparse.Namespace):
    from pipeline.cohort.generate import TINY, CohortConfig

    kw = dict(n_subjects=a.subjects, seed=a.seed, visits=a.visits, missing_rate=a.missing_rate,
              xray_spacing_mm=a.xray_spacing, mr_spacing_mm=a.mr_spacing, map_size=a.map_size,
              monochrome1_fraction=a.monochrome1, write_mr=not a.no_mr, write_mr_dicom=not a.no_mr_dicom,
              write_dxa=not a.no_dxa,
              workers=a.workers)
    if a.tiny:
        kw.update(TINY)
    return CohortConfig(**kw)


def cmd_cohort(a: argparse.Namespace) -> int:
    from pipeline.cohort.generate import generate_cohort

    cfg = _config(a)
    t0 = time.time()
    m = generate_cohort(a.out, cfg)
    dt = time.time() - t0
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
    print(f"[demo] 1/4 synthetic cohort: {cfg.n_subjects} subjects, visits {list(cfg.visits)} -> {out / 'cohort'}")
    m = generate_cohort(out / "cohort", cfg)
    print(f"[demo]     {len(m)} knee-visits in {time.time() - t0:.0f} s")
    print("[demo] 2/4 cohort report and contact sheet")
    rep = write_cohort_report(out / "cohort", out)
    text = Path(rep).read_text()
    if cfg.write_mr:
        print("[demo] 3/4 thickness maps from the DESS labels (bundles/thickness)")
        from pipeline.io.atomic import write_text_atomic
        from pipeline.thickness.report import cohort_maps, maps_over_visits_figure, thickness_report_lines

        df = cohort_maps(out / "cohort", out / "maps")
        png = maps_over_visits_figure(df, out / "maps", out / "thickness_maps_over_visits.png")
        text += "\n".join(thickness_report_lines(df, png))
        write_text_atomic(rep, text)
    else:
        print("[demo] 3/4 skipped: no MR volumes (--no-mr), so no labels to map")
    if not a.no_mris:
        from pipeline.io.atomic import write_text_atomic
        from pipeline.mris.demo import run_mris_demo

        t1 = time.time()
        print(f"[demo] 4/4 MRIS: radiograph + map cohort of {a.mris_subjects} subjects, training (demo config: "
              "96 px, 20 epochs; the paper uses 256 px and 450 epochs), evaluation -> " + str(out / "mris"))
        mris_report = run_mris_demo(out, seed=a.seed, n_subjects=a.mris_subjects, workers=a.workers)
        text += "\n## MRIS (bundles/mris, demo config)\n\n" + _summary(Path(mris_report).read_text())
        text += f"\nFull MRIS report: `{mris_report}`, example syntheses: `{Path(mris_report).parent / 'examples.png'}`.\n"
        write_text_atomic(rep, text)
        print(f"[demo]     MRIS done in {time.time() - t1:.0f} s")
    else:
        print("[demo] 4/4 skipped (--no-mris)")
    print(text)
    print(f"[demo] done in {time.time() - t0:.0f} s; report: {rep}")
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
    c.set_defaults(func=cmd_cohort)
    r = sub.add_parser("report", help="cohort report: counts per KLG and visit, contact sheet")
    r.add_argument("cohort", help="cohort folder (with manifest.csv)")
    r.add_argument("--out", "-o", default=None, help="report folder (default: the cohort folder)")
    r.set_defaults(func=cmd_report)
    d = sub.add_parser("demo", help="the main job on the embedded default cohort")
    d.add_argument("--out", "-o", default="demo_output", help="output folder (default demo_output)")
    d.add_argument("--no-mris", action="store_true", help="skip the MRIS training and evaluation (about 10 min)")
    d.add_argument("--mris-subjects", type=int, default=120,
                   help="subjects of the radiograph-only MRIS cohort (default 120)")
    _cohort_args(d, 40)
    d.set_defaults(func=cmd_demo)
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

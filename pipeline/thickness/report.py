"""Demo report for thickness maps: accuracy against the cohort's analytic maps and maps over visits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io.atomic import atomic_path  # noqa: E402
from pipeline.io.manifest import load_manifest, resolve  # noqa: E402

from .maps_io import batch_maps, items_from_manifest  # noqa: E402


def cohort_maps(cohort: str | Path, out_dir: str | Path, progress: bool = True) -> pd.DataFrame:
    """Maps of every knee-visit of a cohort from its label NIfTIs, on the grid of its analytic maps,
    with the per-knee median absolute error against them (columns ``err_fc_mm``, ``err_tc_mm``)."""
    m = load_manifest(Path(cohort) / "manifest.csv")
    size = np.load(resolve(m, m.fc_map.iloc[0])).shape
    items = items_from_manifest(Path(cohort) / "manifest.csv")
    df = batch_maps(items, out_dir, size=size, png=False, progress=progress)
    truth = {f"{r.subject_id}_{r.side}_{int(r.visit_month):02d}": r for r in m.itertuples()}
    for kind in ("fc", "tc"):
        errs = []
        for r in df.itertuples():
            if r.status != "ok":
                errs.append(np.nan)
                continue
            got = np.load(Path(out_dir) / getattr(r, f"{kind}_map"))
            ref = np.load(resolve(m, getattr(truth[r.stem], f"{kind}_map")))
            errs.append(float(np.nanmedian(np.abs(got - ref))))
        df[f"err_{kind}_mm"] = errs
    df["klg"] = [truth[s].klg for s in df.stem]
    df["side"] = [truth[s].side for s in df.stem]
    df["phenotype"] = [truth[s].phenotype for s in df.stem]
    return df


def maps_over_visits_figure(df: pd.DataFrame, out_dir: str | Path, out_png: str | Path) -> Path:
    """FC / TC maps over visits of the fastest-progressing knee next to a non-progressor (each panel names
    the knee's phenotype)."""
    ok = df[df.status == "ok"].copy()
    ok["knee"] = ok.subject_id.astype(str) + "_" + ok.side
    span = ok.groupby("knee").agg(n=("visit_month", "nunique"), dk=("klg", lambda k: k.max() - k.min()),
                                  phen=("phenotype", "first"))
    # progressor: largest KLG change, fast phenotype first; non-progressor: another knee, "non" phenotype
    span["fast"] = span.phen == "fast"
    prog = span.sort_values(["fast", "dk", "n"], ascending=False).index[:1].tolist()
    rest = span.drop(index=prog)
    non = rest.assign(is_non=rest.phen == "non").sort_values(["is_non", "n", "dk"], ascending=[False, False, True])
    knees = prog + non.index[:1].tolist()
    visits = sorted(ok.visit_month.unique())
    fig, axes = plt.subplots(2 * len(knees), len(visits), figsize=(2.4 * len(visits), 2.3 * 2 * len(knees)),
                             squeeze=False)
    im = None
    for a in axes.ravel():
        a.axis("off")
    for ki, knee in enumerate(knees):
        rows = ok[ok.knee == knee].set_index("visit_month")
        label = f"{span.loc[knee, 'phen']}-progressor phenotype"
        for vi, month in enumerate(visits):
            if month not in rows.index:
                continue
            r = rows.loc[month]
            for j, kind in enumerate(("fc", "tc")):
                a = axes[2 * ki + j, vi]
                im = a.imshow(np.load(Path(out_dir) / r[f"{kind}_map"]), cmap="viridis", vmin=0, vmax=3.5)
                a.set_title(f"{knee} ({label})\n{month} m KLG {r.klg}: {kind.upper()}" if j == 0 else
                            f"{kind.upper()} (medial left)", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="thickness (mm)")
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=85, format="png")
    plt.close(fig)
    return out_png


def thickness_report_lines(df: pd.DataFrame, png: Path) -> list[str]:
    ok = df[df.status == "ok"]
    lines = ["## Thickness maps from the DESS labels (bundles/thickness)", "",
             f"{len(ok)} of {len(df)} knee-visits mapped ({(df.status != 'ok').sum()} failed). "
             "Median absolute error against the analytic maps (mm, inside the footprint):", "",
             "| map | median over knees | 90th percentile |", "|---|---|---|"]
    for kind in ("fc", "tc"):
        e = ok[f"err_{kind}_mm"]
        lines.append(f"| {kind.upper()} | {e.median():.3f} | {e.quantile(0.9):.3f} |")
    lines += ["", f"Maps over visits, a progressor next to a non-progressor: `{png.name}`.", ""]
    return lines

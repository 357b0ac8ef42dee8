"""Cohort report: counts per KLG and visit, progression labels, and a contact sheet to look at.

The contact sheet shows, for a few knees (a fast progressor, a slow one, a non-progressor) and each of
their visits: the radiograph around the knee with its 16 landmarks, a sagittal DESS slice through the
medial compartment with the label overlay, and the analytic FC / TC thickness maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from pipeline.conventions import LABEL_FC, LABEL_TC, ROI_MM  # noqa: E402
from pipeline.io.atomic import atomic_path, write_text_atomic  # noqa: E402
from pipeline.io.manifest import load_manifest, resolve  # noqa: E402

LABEL_CMAP = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.35), (1.0, 0.2, 0.2, 0.8), (0.2, 0.9, 0.3, 0.35),
                             (1.0, 0.85, 0.1, 0.8)])


def pick_knees(m: pd.DataFrame, n: int = 3) -> list[tuple[str, str]]:
    """A fast progressor, a slow progressor and a non-progressor (most visits first), as (subject, side)."""
    picks: list[tuple[str, str]] = []
    nvis = m.groupby(["subject_id", "side"]).visit_month.nunique().rename("nv")
    info = m.groupby(["subject_id", "side"]).agg(phen=("phenotype", "first"), dk=("klg", lambda k: k.max() - k.min()))
    info = info.join(nvis).reset_index()
    for phen in ("fast", "slow", "non"):
        cand = info[(info.phen == phen)].sort_values(["nv", "dk"], ascending=False)
        if len(cand):
            picks.append((cand.iloc[0].subject_id, cand.iloc[0].side))
    for _, r in info.sort_values("nv", ascending=False).iterrows():
        if len(picks) >= n:
            break
        if (r.subject_id, r.side) not in picks:
            picks.append((r.subject_id, r.side))
    return picks[:n]


def _xray_crop(m: pd.DataFrame, row: pd.Series):
    """The knee's 140 mm ROI as the pipeline crops it (no flip, for display) and its landmarks in it."""
    from transforms import KneeROICrop, LoadKneeRadiograph, original_to_crop_points

    img = LoadKneeRadiograph()(str(resolve(m, row.xray_dicom)))
    pts = np.asarray(json.loads(row.landmarks), dtype=float)
    crop = KneeROICrop(ROI_MM, pad_value=float(img.min()), flip_side=None)(img, pts[4], row.side)
    return np.asarray(crop[0]), original_to_crop_points(pts, crop)


def _mr_slice(m: pd.DataFrame, row: pd.Series):
    img = np.asanyarray(nib.load(resolve(m, row.dess_nifti)).dataobj)
    lab = np.asanyarray(nib.load(resolve(m, row.labels_nifti)).dataobj)
    nk = lab.shape[2]
    # stored k runs towards the patient's right: medial is the high-k half for a left knee
    ks = np.arange(nk // 2, nk) if row.side == "L" else np.arange(0, nk // 2)
    counts = ((lab[:, :, ks] == LABEL_FC) | (lab[:, :, ks] == LABEL_TC)).sum(axis=(0, 1))
    k = int(ks[np.argmax(counts)])
    return img[:, :, k].T, lab[:, :, k].T  # rows = inferior, columns = posterior


def contact_sheet(cohort: str | Path, out_png: str | Path, knees=None) -> Path:
    """Write the contact sheet PNG; returns its path."""
    m = load_manifest(Path(cohort) / "manifest.csv")
    knees = knees or pick_knees(m)
    visits = sorted(m.visit_month.unique())
    nrow, ncol = 3 * len(knees), len(visits)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.5 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ki, (sid, side) in enumerate(knees):
        rows = m[(m.subject_id == sid) & (m.side == side)].set_index("visit_month")
        for vi, month in enumerate(visits):
            if month not in rows.index:
                axes[3 * ki, vi].set_title(f"{month} m: missing", fontsize=8)
                continue
            r = rows.loc[month]
            crop, pts = _xray_crop(m, r)
            ax = axes[3 * ki, vi]
            ax.imshow(crop, cmap="gray")
            ax.plot(pts[:9, 0], pts[:9, 1], ".", color="yellow", ms=3)
            ax.plot(pts[9:, 0], pts[9:, 1], ".", color="cyan", ms=3)
            ax.plot(pts[4, 0], pts[4, 1], "+", color="red", ms=8)
            ax.set_title(f"{sid} {side} {month} m  KLG {r.klg}\nmJSW med {r.jsw_medial_mm:.2f} mm", fontsize=7)
            ax = axes[3 * ki + 1, vi]
            if isinstance(r.dess_nifti, str) and r.dess_nifti:
                r2 = r.copy()
                r2["side"] = side
                mri, lab = _mr_slice(m, r2)
                ax.imshow(mri, cmap="gray")
                ax.imshow(lab, cmap=LABEL_CMAP, vmin=0, vmax=4, interpolation="nearest")
                ax.set_title("DESS sagittal, medial + labels", fontsize=7)
            else:
                ax.set_title("no MR in this cohort", fontsize=7)
            fc = np.load(resolve(m, r.fc_map))
            tc = np.load(resolve(m, r.tc_map))
            ax = axes[3 * ki + 2, vi]
            im = ax.imshow(np.concatenate([fc, tc], axis=0), cmap="viridis", vmin=0, vmax=3.5)
            ax.set_title("FC (top) / TC thickness, mm", fontsize=7)
            if vi == ncol - 1:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out_png


def counts_tables(m: pd.DataFrame) -> dict[str, pd.DataFrame]:
    klg = pd.crosstab(m.visit_month, m.klg).rename_axis(index="visit month", columns=None)
    klg.columns = [f"KLG {c}" for c in klg.columns]
    base = m[m.visit_month == 0].drop_duplicates(["subject_id", "side"])
    prog = pd.DataFrame({
        "knees": [len(base)],
        "progression within 72 m": [int(base.progression_72m.sum())],
        "fast (<=36 m)": [int((base.progression_3class == 1).sum())],
        "slow (48-96 m)": [int((base.progression_3class == 2).sum())],
        "KLG4 at baseline (n/a)": [int((base.progression_3class == -1).sum())],
    })
    return {"klg": klg, "progression": prog}


def write_cohort_report(cohort: str | Path, out: str | Path) -> Path:
    """Write ``cohort_report.md`` and ``cohort_contact_sheet.png`` into ``out``; returns the markdown path."""
    cohort, out = Path(cohort), Path(out)
    m = load_manifest(cohort / "manifest.csv")
    t = counts_tables(m)
    png = contact_sheet(cohort, out / "cohort_contact_sheet.png")
    n_sub = m.subject_id.nunique()
    lines = [
        "# Synthetic cohort report",
        "",
        f"{n_sub} subjects, {len(m)} knee-visits, visits {sorted(m.visit_month.unique().tolist())} (months).",
        "",
        "## Knees per KLG and visit",
        "",
        markdown_table(t["klg"].reset_index()),
        "",
        "## Progression labels (baseline knees)",
        "",
        markdown_table(t["progression"]),
        "",
        f"Contact sheet: `{png.name}` (radiograph ROI with landmarks, DESS slice with labels, FC/TC maps).",
        "",
    ]
    md = out / "cohort_report.md"
    write_text_atomic(md, "\n".join(lines))
    return md


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-markdown table of ``df`` (no index), without optional dependencies."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)

"""The three tables of the MRIS paper for one cohort (retrieval, synthesis error, downstream tasks), the
model-size table, and the "who wins each column, by how much" lines. Pure functions on plain data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.downstream.metrics import BUCKET_NAMES

__all__ = ["GROUPS", "downstream_table", "markdown_table", "retrieval_table", "synthesis_wide", "winner_lines",
           "winners"]

#: Column groups of the synthesis table (KLG buckets, then all maps).
GROUPS: tuple[str, ...] = (*BUCKET_NAMES, "all")
RECALL_KS = (1, 5, 10, 20)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a markdown table (floats with ``digits`` decimals, NaN as ``n/a``)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def retrieval_table(retrieval: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows = MRIS variants (+ chance), columns ``FC R@k``, ``TC R@k``, ``combined R@k`` (percent).

    ``retrieval[label]`` is the ``retrieval`` dict of :func:`pipeline.mris.evaluate.evaluate_test`: MRIS-C
    has only the combined recall (one embedding of the stacked maps: per-map recall is n/a); MRIS-S has
    ``recall_percent_fc`` / ``recall_percent_tc`` and the combined recall of the mean FC/TC similarity.
    """
    rows = []
    chance = None
    for label, r in retrieval.items():
        row: dict[str, Any] = {"method": label, "queries": r["n_queries"]}
        for part, key in (("FC", "recall_percent_fc"), ("TC", "recall_percent_tc"), ("combined", "recall_percent")):
            vals = r.get(key)
            for k in RECALL_KS:
                row[f"{part} R@{k}"] = float(vals[f"R@{k}"]) if vals else float("nan")
        rows.append(row)
        chance = r["chance_percent"], r["n_queries"]
    if chance is not None:
        row = {"method": "chance", "queries": chance[1]}
        for part in ("FC", "TC", "combined"):
            for k in RECALL_KS:
                row[f"{part} R@{k}"] = float(chance[0][f"R@{k}"])
        rows.append(row)
    return pd.DataFrame(rows)


def synthesis_wide(long: pd.DataFrame, map_key: str) -> pd.DataFrame:
    """Wide table of one map (``fc`` or ``tc``): rows = methods, columns = groups with ``median ± MAD`` (mm)
    strings, from the long table (columns ``method, map, group, n_maps, median_mm, mad_mm``)."""
    sub = long[long["map"] == map_key]
    methods = list(dict.fromkeys(sub["method"]))
    counts = {g: int(sub[sub["group"] == g]["n_maps"].iloc[0]) if (sub["group"] == g).any() else 0 for g in GROUPS}
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m}
        for g in GROUPS:
            hit = sub[(sub["method"] == m) & (sub["group"] == g)]
            if hit.empty or np.isnan(hit["median_mm"].iloc[0]):
                row[f"KLG {g} (n={counts[g]})" if g != "all" else f"all (n={counts[g]})"] = "n/a"
            else:
                row[f"KLG {g} (n={counts[g]})" if g != "all" else f"all (n={counts[g]})"] = (
                    f"{hit['median_mm'].iloc[0]:.3f} ± {hit['mad_mm'].iloc[0]:.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def downstream_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows = sources; columns: KLG accuracy per bucket, overall and balanced (mean over buckets; 0.25 =
    chance), the number of KLG classes the classifier predicts at all (1 = collapsed onto one class, which
    scores 1.0 in that bucket and 0 elsewhere); progression AP, ROC AUC, and the test prevalence (the AP of a
    random classifier)."""
    rows = []
    for label, r in results.items():
        row: dict[str, Any] = {"source": label}
        klg = r.get("klg", {})
        for b in BUCKET_NAMES:
            row[f"acc KLG {b}"] = klg.get(b, float("nan"))
        row["acc overall"] = klg.get("overall", float("nan"))
        row["acc balanced"] = klg.get("balanced", float("nan"))
        pred = klg.get("n_pred_per_bucket")
        row["KLG classes predicted"] = sum(v > 0 for v in pred.values()) if pred else float("nan")
        prog = r.get("progression", {})
        row["progression AP"] = prog.get("ap", float("nan"))
        row["progression ROC AUC"] = prog.get("roc_auc", float("nan"))
        row["test prevalence"] = prog.get("prevalence_test", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def winners(df: pd.DataFrame, label_col: str, columns: Sequence[str], higher_is_better: bool,
            exclude: Sequence[str] = (), table: str = "") -> list[dict[str, Any]]:
    """For each column: the best row, the runner-up and the margin (absolute, and relative to the runner-up).

    Rows named in ``exclude`` (e.g. ``chance``) are ignored; NaN values are ignored; a column with fewer than
    two values reports the single value with margin NaN. Ties report ``tie`` in ``note``.
    """
    out = []
    for col in columns:
        vals = []
        for lab, v in zip(df[label_col], df[col]):
            if lab in exclude:
                continue
            try:
                f = float(str(v).split(" ± ")[0])
            except ValueError:
                continue
            if not math.isnan(f):
                vals.append((lab, f))
        if not vals:
            continue
        vals.sort(key=lambda t: -t[1] if higher_is_better else t[1])
        best, val = vals[0]
        rec: dict[str, Any] = {"table": table, "column": col, "winner": best, "value": val,
                               "runner_up": None, "runner_up_value": float("nan"), "margin": float("nan"),
                               "relative_margin": float("nan"), "note": ""}
        if len(vals) > 1:
            ru, rv = vals[1]
            margin = abs(val - rv)
            rec.update(runner_up=ru, runner_up_value=rv, margin=margin,
                       relative_margin=(margin / abs(rv)) if rv else float("nan"))
            if margin == 0:
                rec["note"] = "tie: " + ", ".join(lab for lab, v in vals if v == val)
        out.append(rec)
    return out


def winner_lines(recs: Sequence[Mapping[str, Any]], unit: str = "", digits: int = 3) -> list[str]:
    """Markdown bullet lines: ``- column: **winner** value, ahead of runner-up (value) by margin (x %)``."""
    lines = []
    for r in recs:
        note = str(r.get("note") or "")
        extra = "; ".join(p for p in note.split("; ") if p and not p.startswith("tie"))
        extra = f" ({extra})" if extra else ""
        if r["runner_up"] is None:
            lines.append(f"- {r['column']}: **{r['winner']}** {r['value']:.{digits}f}{unit} (no other method){extra}")
        elif note.startswith("tie"):
            lines.append(f"- {r['column']}: {note.split('; ')[0]} at {r['value']:.{digits}f}{unit}{extra}")
        else:
            rel = "" if math.isnan(r["relative_margin"]) else f", {100 * r['relative_margin']:.0f} %"
            lines.append(f"- {r['column']}: **{r['winner']}** {r['value']:.{digits}f}{unit}, ahead of "
                         f"{r['runner_up']} ({r['runner_up_value']:.{digits}f}{unit}) by "
                         f"{r['margin']:.{digits}f}{unit}{rel}{extra}")
    return lines

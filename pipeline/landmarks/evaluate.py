"""Evaluation of the two-stage localiser on held-out subjects (``bundles/kneel/configs/evaluate.json``).

The test knees are the ``split`` subjects of the same seeded subject split as training
(:func:`pipeline.landmarks.data.split_items`). Every test radiograph goes through the full inference path
(:class:`pipeline.landmarks.infer.KneeLocaliser`: DICOM -> global stage -> local stage -> ORIGINAL pixels),
and the predictions are compared with the manifest's landmarks:

* Euclidean error in mm (:func:`pipeline.landmarks.metrics.landmark_errors_mm`), median / mean, recall at
  1 / 1.5 / 2 / 2.5 mm, outliers >= 10 mm, per group: joint centre (4), tibial corners (0, 8), femoral corners
  (9, 15), all 16; and the global stage's centre alone;
* the MRIS ROI: the 140 mm crop that :class:`transforms.KneeROICrop` places around the predicted centre
  versus around the true centre; offset = distance between the two crop centres in mm (includes the crop's
  integer-pixel placement).

Outputs (``output_dir``): ``metrics.json``, ``errors.csv`` (one row per knee), ``report.md`` and
``examples/*.png`` (overlays of a few test images).

Sharded (torchrun, ``bundles/kneel/configs/multi_gpu_evaluate.json``; :class:`pipeline.io.sharding.RankGroup`):
radiograph ``k`` of the sorted test radiographs is localised by rank ``k % world_size``; rank 0 gathers the rows,
computes the metrics and writes every file, the same bytes as one process (same threads per process) but for the
timings (``seconds_*``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.conventions import JOINT_CENTRE_IDX, ROI_MM
from pipeline.geometry import apply_matrix, crop_matrix, crop_start, roi_size_px
from pipeline.io.dicom import read_radiograph
from pipeline.io.sharding import RankGroup, flatten
from pipeline.landmarks.data import manifest_items, split_items
from pipeline.landmarks.infer import OUTPUT_COLUMNS, Checkpoints, KneeLocaliser, landmarks_array, save_overlay
from pipeline.landmarks.metrics import LANDMARK_GROUPS, RECALL_RADII_MM, landmark_errors_mm, summarize_errors

__all__ = ["mris_roi_centre", "mris_roi_offset_mm", "evaluate_landmarks", "format_report"]


def mris_roi_centre(centre_xy: Any, spacing_rc: Any, shape_hw: Any = None, roi_mm: float = ROI_MM) -> np.ndarray:
    """Centre ``(x, y)`` (original px) of the ROI that :class:`transforms.KneeROICrop` cuts around ``centre_xy``
    (the crop snaps to whole pixels: its centre can differ from ``centre_xy`` by up to half a pixel per axis, a
    whole pixel for an even ROI side). ``shape_hw`` (the image size) does not change it and may be omitted."""
    size_rc = roi_size_px(roi_mm, spacing_rc)
    m = crop_matrix(crop_start(np.asarray(centre_xy, dtype=float), size_rc), size_rc)
    return apply_matrix(m, [(size_rc[1] - 1) / 2.0, (size_rc[0] - 1) / 2.0])


def mris_roi_offset_mm(pred_xy: Any, true_xy: Any, spacing_rc: Any, shape_hw: Any = None,
                       roi_mm: float = ROI_MM) -> float:
    """Distance in mm between the MRIS ROI centred on the predicted and on the true joint centre."""
    a = mris_roi_centre(pred_xy, spacing_rc, shape_hw, roi_mm)
    b = mris_roi_centre(true_xy, spacing_rc, shape_hw, roi_mm)
    return float(landmark_errors_mm(a[None], b[None], spacing_rc)[0])


def evaluate_landmarks(manifest: str | Path, global_ckpt: Checkpoints, local_ckpt: Checkpoints | None,
                       output_dir: str | Path, split_fractions: Mapping[str, float] | None = None, split_seed: int = 0,
                       split: str = "test", device: torch.device | str = "cpu", tta: bool = True, refine: bool = False,
                       layout: str = "auto", n_examples: int = 4, progress: bool = True,
                       group: RankGroup | None = None) -> dict[str, Any] | None:
    """Evaluate on the ``split`` subjects (module docstring); returns (and writes) the metrics dict.

    ``group``: the ranks of a sharded run (``None``: one process). Each rank localises its radiographs (radiograph
    ``k`` -> rank ``k % world_size``); rank 0 gathers the rows, computes the metrics, writes the files and returns
    the metrics, the other ranks return ``None``."""
    t0 = time.time()
    sets = split_items(manifest_items(manifest), split_fractions, split_seed)
    if split not in sets or not sets[split]:
        raise ValueError(f"no knees in split {split!r} of {manifest} (sets: { {k: len(v) for k, v in sets.items()} })")
    items = sets[split]
    loc = KneeLocaliser(global_ckpt, local_ckpt, device=device, layout=layout, tta=tta, refine=refine)
    images = sorted({it["image"] for it in items})
    group = group if group is not None else RankGroup(0, 1)
    t1 = time.time()
    per_image = {i: loc.predict_image(Path(f)) for i, f in tqdm(
        list(group.mine(images)), desc=f"KNEEL landmarks{group.label}", unit="image", disable=not progress)}
    merged = group.merge(per_image)  # every rank's rows on rank 0, in radiograph order
    if merged is None:  # another rank of a sharded run: rank 0 computes the metrics and writes the files
        return None
    pred = pd.DataFrame(flatten(merged), columns=OUTPUT_COLUMNS)
    t_pred = time.time() - t1
    by_key = {(r["file"], r["side"]): r for r in pred.to_dict(orient="records")}
    rows, true_all, pred_all, spacing_all, g_err = [], [], [], [], []
    for it in items:
        r = by_key.get((it["image"], it["side"]))
        true = np.asarray(it["landmarks"], dtype=float)
        base = {"subject_id": it["subject_id"], "side": it["side"], "visit_month": it["visit_month"], "file": it["image"]}
        if r is None or r["status"] == "error":
            rows.append({**base, "status": "error" if r is None else r["status"],
                         "message": "no prediction" if r is None else r["message"]})
            continue
        sp = (float(r["spacing_row_mm"]), float(r["spacing_col_mm"]))
        p16 = landmarks_array(pd.DataFrame([r]))[0]
        centre = np.array([r["x"], r["y"]], dtype=float)
        g = np.array([r["global_x"], r["global_y"]], dtype=float)
        e_g = float(landmark_errors_mm(g[None], true[JOINT_CENTRE_IDX][None], sp)[0])
        e_c = float(landmark_errors_mm(centre[None], true[JOINT_CENTRE_IDX][None], sp)[0])
        roi_off = mris_roi_offset_mm(centre, true[JOINT_CENTRE_IDX], sp)
        row = {**base, "status": r["status"], "message": r["message"], "confidence": r["confidence"],
               "centre_error_mm": e_c, "global_centre_error_mm": e_g, "mris_roi_offset_mm": roi_off}
        if np.isfinite(p16).all():
            e16 = landmark_errors_mm(p16, true, sp)
            row.update({f"err_{i}_mm": float(v) for i, v in enumerate(e16)})
            pred_all.append(p16)
            true_all.append(true)
            spacing_all.append(sp)
        g_err.append(e_g)
        rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "errors.csv", index=False)
    ok = df[df["status"] != "error"] if "status" in df else df
    metrics: dict[str, Any] = {
        "split": split, "n_subjects": len({it["subject_id"] for it in items}), "n_images": len(images),
        "n_knees": len(items), "n_predicted": int(len(ok)), "n_low_confidence": int((df["status"] == "low_confidence").sum()),
        "global_ckpt": [str(p) for p in ([global_ckpt] if isinstance(global_ckpt, (str, Path)) else global_ckpt)],
        "local_ckpt": None if local_ckpt is None else str(local_ckpt), "tta": tta, "refine": refine,
        "global_stage_centre": summarize_errors(np.asarray(g_err), {"centre": (0,)})["centre"],
        "joint_centre": summarize_errors(ok["centre_error_mm"].to_numpy(), {"centre": (0,)})["centre"],
        "mris_roi_offset_mm": {"mean": float(ok["mris_roi_offset_mm"].mean()),
                               "median": float(ok["mris_roi_offset_mm"].median()),
                               "max": float(ok["mris_roi_offset_mm"].max()),
                               "roi_mm": ROI_MM},
        "seconds_per_image": t_pred / max(1, len(images)),
    }
    if pred_all:
        e = landmark_errors_mm(np.stack(pred_all), np.stack(true_all), np.asarray(spacing_all))
        metrics["groups"] = summarize_errors(e, LANDMARK_GROUPS)
        metrics["per_landmark_median_mm"] = [float(v) for v in np.nanmedian(e, axis=0)]
    metrics["seconds_total"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(format_report(metrics))
    if n_examples > 0:
        for f in images[:n_examples]:
            rr = [r for r in pred.to_dict(orient="records") if r["file"] == f]
            img, _ = read_radiograph(f)
            truth = [it["landmarks"] for it in items if it["image"] == f]
            name = "_".join(Path(f).parts[-5:])
            save_overlay(out / "examples" / f"{name}.png", img, rr, truth_points=truth,
                         title=f"{name}: prediction (tibial red, femoral cyan, centre +, global centre o), truth x")
    return metrics


def format_report(m: Mapping[str, Any]) -> str:
    """Markdown table of :func:`evaluate_landmarks` metrics."""
    radii = [f"recall@{r:g}mm" for r in RECALL_RADII_MM]
    lines = [f"# KNEEL landmarks on the {m['split']} subjects", "",
             f"{m['n_knees']} knees ({m['n_images']} radiographs, {m['n_subjects']} subjects); "
             f"{m['n_predicted']} predicted, {m['n_low_confidence']} flagged low-confidence. "
             f"Test-time flip: {m['tta']}, refinement: {m['refine']}.", "",
             "| group | points | median mm | mean mm | " + " | ".join(r.replace('recall@', 'R@') for r in radii)
             + " | outliers >= 10 mm |",
             "|---|---|---|---|" + "---|" * len(radii) + "---|"]

    def line(name: str, g: Mapping[str, float]) -> str:
        return (f"| {name} | {g['n']} | {g['median_mm']:.2f} | {g['mean_mm']:.2f} | "
                + " | ".join(f"{g[r]:.1f} %" for r in radii) + f" | {g['outliers_pct']:.1f} % |")

    lines.append(line("global stage centre", m["global_stage_centre"]))
    lines.append(line("joint centre (final)", m["joint_centre"]))
    for name, g in m.get("groups", {}).items():
        if name != "centre":
            lines.append(line(name.replace("_", " "), g))
    r = m["mris_roi_offset_mm"]
    lines += ["", f"MRIS {r['roi_mm']:.0f} mm ROI around the predicted vs the true joint centre: offset mean "
              f"{r['mean']:.2f} mm, median {r['median']:.2f} mm, max {r['max']:.2f} mm.",
              f"Inference: {m['seconds_per_image']:.2f} s per radiograph (both knees)."]
    return "\n".join(lines) + "\n"

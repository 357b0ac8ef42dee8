"""Figures shared by the methods and the comparison report: example FC / TC maps of thickness-map synthesis per
method, one test knee per KLG bucket (maps ``H x W`` mm on the atlas grid, left-knee convention: medial on the
image's left, NaN outside the footprint shown blank); ROC and precision-recall curves of binary classifiers
(:func:`roc_pr_figure`: downstream progression classifiers, MR progression models)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.conventions import KLG_BUCKETS, MAP_KEYS, klg_bucket
from pipeline.metrics.classification import average_precision, precision_recall_curve, roc_auc, roc_curve
from pipeline.metrics.synthesis import per_map_errors

__all__ = ["example_maps_figure", "pick_examples", "roc_pr_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_examples(items: Sequence[dict]) -> list[tuple[str, int]]:
    """``(bucket name, item index)``: the first item (in item order) of each KLG bucket that has one."""
    picks = []
    for bucket in KLG_BUCKETS:
        name = klg_bucket(bucket[0])
        idx = [i for i, it in enumerate(items) if it["klg"] >= 0 and klg_bucket(it["klg"]) == name]
        if idx:
            picks.append((name, idx[0]))
    return picks


def example_maps_figure(path: str | Path, items: Sequence[dict], truth: Mapping[str, np.ndarray],
                        synth: Mapping[str, Mapping[str, np.ndarray]], images: torch.Tensor | None = None,
                        title: str = "Synthesized thickness maps (mm) per method, one test knee per KLG bucket"
                        ) -> Path | None:
    """Rows: per KLG bucket an FC row and a TC row; columns: radiograph ROI (if ``images``), MR-extracted
    map, then each method's map (``synth[method][key]``: ``N x H x W``), with |error| (mm) in the titles
    as the per-map median. One shared colour scale (0 .. max thickness)."""
    plt = _plt()
    picks = pick_examples(items)
    if not picks:
        return None
    methods = list(synth)
    ncol = 2 + len(methods)
    vmax = float(max(np.nanmax(truth[k]) for k in MAP_KEYS))
    fig, axes = plt.subplots(2 * len(picks), ncol, figsize=(1.9 * ncol, 1.9 * 2 * len(picks)), squeeze=False)
    im = None
    for r, (name, i) in enumerate(picks):
        for j, key in enumerate(MAP_KEYS):
            row = 2 * r + j
            ax = axes[row, 0]
            ax.axis("off")
            if j == 0:
                ax.set_title(f"KLG {name}: {items[i]['knee_id']} m{items[i]['visit_month']}", fontsize=7)
                if images is not None:
                    ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            t = truth[key][i]
            ax = axes[row, 1]
            ax.axis("off")
            ax.set_title(f"MR {key.upper()}", fontsize=7)
            im = ax.imshow(t, cmap="viridis", vmin=0, vmax=vmax)
            mask = np.isfinite(t)
            for c, m in enumerate(methods):
                s = synth[m][key][i]
                err = per_map_errors(s, np.where(mask, t, 0.0), mask)["median_mm"].iloc[0]
                ax = axes[row, 2 + c]
                ax.axis("off")
                ax.set_title(f"{m} {key.upper()}\nmedian |err| {err:.2f}", fontsize=7)
                ax.imshow(s, cmap="viridis", vmin=0, vmax=vmax)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="thickness (mm)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def roc_pr_figure(path: str | Path, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                  title: str = "Progression (72 months), test set") -> Path | None:
    """ROC (left) and precision-recall (right) curves; ``curves[source] = (labels 0/1, scores)``. Sources
    without both classes are skipped. The PR panel shows the prevalence (a random classifier's AP)."""
    plt = _plt()
    usable = {k: (np.asarray(y), np.asarray(s)) for k, (y, s) in curves.items()
              if len(y) and 0 < int(np.sum(y)) < len(y)}
    if not usable:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
    for name, (y, s) in usable.items():
        fpr, tpr, _ = roc_curve(y, s)
        a1.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, s):.3f})")
        prec, rec, _ = precision_recall_curve(y, s)
        a2.step(rec, prec, where="post", label=f"{name} (AP {average_precision(y, s):.3f})")
    a1.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    prev = float(np.mean(next(iter(usable.values()))[0]))
    a2.axhline(prev, color="k", ls="--", lw=0.8, label=f"prevalence {prev:.2f}")
    a1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    a2.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    a1.legend(fontsize=7, loc="lower right")
    a2.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)

"""Figures of thickness-map synthesis shared by every map-synthesis method and the comparison report:
example FC / TC maps per method, one test knee per KLG bucket. Maps are ``H x W`` mm on the atlas grid
(left-knee convention: medial on the image's left), NaN outside the footprint (shown blank)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.conventions import KLG_BUCKETS, MAP_KEYS, klg_bucket
from pipeline.metrics.synthesis import per_map_errors

__all__ = ["example_maps_figure", "pick_examples"]


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

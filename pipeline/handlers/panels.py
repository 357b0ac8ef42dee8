"""Grids of image panels rendered to an RGB array (matplotlib, Agg canvas; no pyplot state).

Used by the TensorBoard example renderers. One colour scale for every thickness-map panel:
``0 .. MAP_VMAX_MM`` mm (viridis, NaN blank) with one shared colour bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.conventions import THICKNESS_SCALE_MM
from pipeline.io.results import DEFAULT_VMAX_MM

__all__ = ["MAP_VMAX_MM", "LABEL_COLOURS", "Panel", "PointSet", "render_panels", "to_numpy", "network_to_mm"]

#: Upper end of the colour scale of every thickness-map panel (mm).
MAP_VMAX_MM = DEFAULT_VMAX_MM  # one colour scale for every map panel and PNG
MAP_CMAP = "viridis"
#: RGBA of DESS labels 1-4 (femur, femoral cartilage, tibia, tibial cartilage); 0 is transparent.
LABEL_COLOURS: dict[int, tuple[float, float, float, float]] = {
    1: (0.95, 0.85, 0.35, 0.45),
    2: (0.10, 0.85, 0.95, 0.80),
    3: (0.95, 0.55, 0.25, 0.45),
    4: (0.95, 0.15, 0.75, 0.80),
}


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / MetaTensor / array -> float32 numpy (CPU, detached)."""
    if isinstance(x, torch.Tensor):
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def network_to_mm(x: Any, mask: Any | None = None) -> np.ndarray:
    """Network-unit thickness (mm / ``THICKNESS_SCALE_MM``, 0 outside) -> mm with NaN outside ``mask``
    (bool / 0-1 array of the same shape; None: NaN where the value is not finite)."""
    mm = to_numpy(x) * THICKNESS_SCALE_MM
    if mask is not None:
        mm = np.where(to_numpy(mask) > 0.5, mm, np.nan)
    return mm


@dataclass
class PointSet:
    """Points drawn over a panel: ``xy`` ``(N, 2)`` pixel (column, row) coordinates."""

    xy: np.ndarray
    colour: str = "lime"
    marker: str = "o"
    label: str | None = None
    size: float = 14.0


@dataclass
class Panel:
    """One panel. ``kind``: ``"gray"`` (image scaled to [vmin, vmax], default [0, 1]), ``"mm"`` (thickness
    map in mm on the shared 0..``MAP_VMAX_MM`` scale, NaN blank). ``labels``: an integer label map drawn
    over the image with :data:`LABEL_COLOURS`; ``points``: point sets drawn over it."""

    title: str
    image: np.ndarray | None = None
    kind: str = "gray"
    labels: np.ndarray | None = None
    points: Sequence[PointSet] = field(default_factory=tuple)
    vmin: float = 0.0
    vmax: float = 1.0


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels).astype(np.int64)
    rgba = np.zeros((*lab.shape, 4), dtype=np.float32)
    for value, colour in LABEL_COLOURS.items():
        rgba[lab == value] = colour
    return rgba


def render_panels(rows: Sequence[Sequence[Panel]], title: str | None = None, panel_inches: float = 2.2,
                  dpi: int = 80) -> np.ndarray:
    """Draw a grid (one list of panels per row) and return it as an ``(H, W, 3)`` uint8 array; a colour
    bar (thickness, mm) is added when any panel is a map."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n_rows = max(1, len(rows))
    n_cols = max([len(r) for r in rows] + [1])
    has_map = any(p.kind == "mm" for r in rows for p in r)
    fig = Figure(figsize=(panel_inches * n_cols + (0.9 if has_map else 0.2), panel_inches * n_rows + 0.5),
                 dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    cmap = colormaps[MAP_CMAP].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    norm = Normalize(0.0, MAP_VMAX_MM)
    any_legend = False
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if r >= len(rows) or c >= len(rows[r]):
                continue
            p = rows[r][c]
            ax.set_title(p.title, fontsize=7)
            if p.image is not None:
                img = np.asarray(p.image, dtype=np.float32)
                if p.kind == "mm":
                    ax.imshow(np.ma.masked_invalid(img), cmap=cmap, norm=norm, interpolation="nearest")
                else:
                    ax.imshow(img, cmap="gray", vmin=p.vmin, vmax=p.vmax, interpolation="nearest")
            if p.labels is not None:
                ax.imshow(_label_rgba(p.labels), interpolation="nearest")
            for ps in p.points:
                xy = np.asarray(ps.xy, dtype=np.float32).reshape(-1, 2)
                ax.scatter(xy[:, 0], xy[:, 1], s=ps.size, c=ps.colour, marker=ps.marker, label=ps.label,
                           linewidths=1.0)
                any_legend = any_legend or ps.label is not None
            if p.image is None and p.labels is None and not p.points:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    if any_legend:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=7)
    if has_map:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.03, pad=0.01,
                     label="cartilage thickness (mm)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return rgb.astype(np.uint8)

"""Registration overlays a person can judge at a glance (issue 14 item 7), written as PNG.

:func:`save_registration_overlay` draws one pair in five panels, left to right:

1. **fixed** (with the fixed bone contours when ``fixed_labels`` is given);
2. **moving**;
3. **warped moving** with the FIXED bone contours on top (solid) and the warped moving contours (dashed) when
   given: where they coincide the registration is right;
4. **composite**: fixed in magenta, warped moving in green; aligned structures turn grey / white, misaligned
   ones stay coloured (magenta / green is readable with red-green colour blindness);
5. **deformed grid** over the fixed image: the lines where ``phi`` crosses every ``grid_step``-th row /
   column of the moving image, i.e. the moving image's regular grid as it appears after warping. The identity
   gives straight lines; the lines bend where the map deforms and cross where it folds.

Bone colours: femur yellow, tibia cyan, fibula orange (never magenta / green, which the composite uses).

Inputs are numpy arrays (torch CPU tensors also work): images ``H x W`` (a leading singleton channel or batch
axis is dropped), label maps ``H x W`` integer (0 background, 1 femur, 2 tibia, 3 fibula) and ``phi``
``2 x H x W`` on [0, 1] (channel 0 row, channel 1 column; ``phi(x)`` = position in the moving image), as in
``maps.py``. The PNG is ``5 * panel_px`` pixels wide and ``header + subtitle + panel`` high (see
:func:`overlay_size`), written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io.atomic import atomic_path  # noqa: E402

__all__ = ["BONE_COLOURS", "BONE_NAMES", "format_scores", "overlay_size", "save_method_grid",
           "save_registration_overlay"]

BONE_NAMES = {1: "femur", 2: "tibia", 3: "fibula"}
BONE_COLOURS = {1: "#ffd21f", 2: "#19d3ff", 3: "#ff8a1f"}
GRID_COLOUR = "#ffe45c"
GRID_DIM = 0.45  # the grid panel shows the fixed image at this brightness so the lines stand out on bone
DPI = 100
SUBTITLE_PX = 24
LINE_PX = 20



def _np(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as a numpy array with exactly ``ndim`` axes (leading singleton axes dropped)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} axes, got shape {tuple(np.shape(x))}")
    return a


def _display(img: np.ndarray) -> np.ndarray:
    """Image scaled to [0, 1] for display by its 1st / 99.5th percentiles (a constant image gives zeros)."""
    img = np.nan_to_num(img.astype(np.float64))
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi <= lo:
        lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _composite(fixed: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """RGB image: fixed in magenta (red + blue), warped in green; equal intensities give grey."""
    f, w = _display(fixed), _display(warped)
    return np.stack([f, w, f], axis=-1)


def format_scores(dice: Optional[Mapping[str, float]] = None, fold_percent: Optional[float] = None) -> str:
    """One line like ``Dice femur 0.951 · tibia 0.932 · mean 0.94 | folds 0.00 %`` (empty when nothing given)."""
    parts = []
    if dice:
        items = []
        for k, v in dice.items():
            try:
                items.append(f"{k} {float(v):.3f}")
            except (TypeError, ValueError):
                continue
        if items:
            parts.append("Dice " + " · ".join(items))
    if fold_percent is not None:
        parts.append(f"folds {float(fold_percent):.2f} %")
    return " | ".join(parts)


def _contours(ax, labels: Optional[np.ndarray], linestyle: str = "solid", linewidth: float = 1.4) -> None:
    if labels is None:
        return
    for k, colour in BONE_COLOURS.items():
        mask = (labels == k).astype(np.float32)
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=linewidth, linestyles=linestyle)


def _grid(ax, phi: np.ndarray, step: int, background: np.ndarray) -> None:
    """The dimmed ``background`` with the iso-lines of ``phi`` (in moving-image pixels) at multiples of
    ``step`` on top: the moving image's regular grid as warped into the fixed frame."""
    h, w = phi.shape[1:]
    ax.imshow(GRID_DIM * _display(background), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    rows, cols = phi[0] * (h - 1), phi[1] * (w - 1)
    for field in (rows, cols):
        lo = np.floor(np.nanmin(field) / step) * step
        hi = np.ceil(np.nanmax(field) / step) * step
        levels = np.arange(lo, hi + step, step)
        levels = levels[(levels > np.nanmin(field)) & (levels < np.nanmax(field))]
        if levels.size:
            ax.contour(field, levels=levels, colors=[GRID_COLOUR], linewidths=0.9)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def _bare(ax, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10, pad=3)


def overlay_size(shape: Tuple[int, int], panel_px: int = 256, title_lines: int = 1) -> Tuple[int, int]:
    """``(height, width)`` in pixels of the PNG :func:`save_registration_overlay` writes for images of
    ``shape`` (rows, columns) with ``title_lines`` header lines (title and / or scores; at least 1)."""
    h, w = int(shape[0]), int(shape[1])
    panel_h = int(round(panel_px * h / w))
    return LINE_PX * max(1, title_lines) + 8 + SUBTITLE_PX + panel_h, 5 * int(panel_px)


def _save(fig, path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return path


def save_registration_overlay(
    path: Union[str, os.PathLike],
    fixed,
    moving,
    warped,
    phi,
    fixed_labels=None,
    warped_labels=None,
    title: str = "",
    dice: Optional[Mapping[str, float]] = None,
    fold_percent: Optional[float] = None,
    grid_step: int = 16,
    panel_px: int = 256,
) -> Path:
    """Write the five-panel overlay of one registered pair (see the module docstring) to ``path`` (PNG).

    Args:
        path: output PNG; its folder is created; written atomically.
        fixed, moving, warped: images ``H x W`` (``warped`` = moving resampled by ``phi``).
        phi: map ``2 x H x W`` on [0, 1] (row, column), fixed frame -> moving frame.
        fixed_labels, warped_labels: optional bone label maps ``H x W`` (1 femur, 2 tibia, 3 fibula); the
            fixed contours are drawn solid on the fixed and warped panels, the warped ones dashed.
        title: first header line (e.g. the pair's ids and the method).
        dice: optional per-bone Dice (e.g. ``metrics.bone_dice`` output), shown in the header.
        fold_percent: optional % of pixels with negative Jacobian determinant, shown in the header.
        grid_step: grid spacing in moving-image pixels.
        panel_px: width of one panel in pixels.

    Returns:
        The path written. Size: :func:`overlay_size`.
    """
    fixed = _np(fixed, "fixed", 2)
    moving = _np(moving, "moving", 2)
    warped = _np(warped, "warped", 2)
    phi = _np(phi, "phi", 3).astype(np.float64)
    shape = fixed.shape
    for name, arr in (("moving", moving), ("warped", warped)):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, fixed has {shape}: the overlay needs one size")
    if phi.shape != (2, *shape):
        raise ValueError(f"phi has shape {phi.shape}, expected (2, {shape[0]}, {shape[1]})")
    labels = {}
    for name, lab in (("fixed_labels", fixed_labels), ("warped_labels", warped_labels)):
        if lab is not None:
            lab = _np(lab, name, 2)
            if lab.shape != shape:
                raise ValueError(f"{name} has shape {lab.shape}, the images have {shape}")
        labels[name] = lab
    if int(grid_step) < 1:
        raise ValueError(f"grid_step must be >= 1 pixel, got {grid_step}")

    header = [line for line in (title, format_scores(dice, fold_percent)) if line]
    height, width = overlay_size(shape, panel_px, len(header))
    panel_h = height - (LINE_PX * max(1, len(header)) + 8 + SUBTITLE_PX)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    for i, line in enumerate(header):
        fig.text(0.005, 1.0 - (4 + LINE_PX * (i + 0.5)) / height, line, fontsize=11, va="center",
                 ha="left", weight="bold" if i == 0 and title else "normal")
    if labels["fixed_labels"] is not None or labels["warped_labels"] is not None:
        x = 0.995
        for k in sorted(BONE_NAMES, reverse=True):
            t = fig.text(x, 1.0 - (4 + LINE_PX * 0.5) / height, BONE_NAMES[k], fontsize=11, va="center",
                         ha="right", color=BONE_COLOURS[k], weight="bold",
                         bbox={"facecolor": "#333333", "edgecolor": "none", "pad": 1.5})
            fig.canvas.draw()
            x = t.get_window_extent().x0 / width - 0.006

    frac_w, frac_h = panel_px / width, panel_h / height
    axes = [fig.add_axes((i * frac_w, 0.0, frac_w, frac_h)) for i in range(5)]
    ax_f, ax_m, ax_w, ax_c, ax_g = axes
    ax_f.imshow(_display(fixed), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _contours(ax_f, labels["fixed_labels"])
    _bare(ax_f, "fixed")
    ax_m.imshow(_display(moving), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _bare(ax_m, "moving")
    ax_w.imshow(_display(warped), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _contours(ax_w, labels["warped_labels"], linestyle="dashed", linewidth=1.0)
    _contours(ax_w, labels["fixed_labels"])
    _bare(ax_w, "warped moving" + (" + fixed contours" if labels["fixed_labels"] is not None else ""))
    ax_c.imshow(_composite(fixed, warped), interpolation="nearest")
    _bare(ax_c, "fixed magenta / warped green")
    _grid(ax_g, phi, int(grid_step), fixed)
    _bare(ax_g, f"deformed grid ({int(grid_step)} px)")
    return _save(fig, path)


def save_method_grid(
    path: Union[str, os.PathLike],
    rows: Sequence[tuple],
    fixed_labels=None,
    title: str = "",
    panel_px: int = 192,
    grid_step: int = 16,
) -> Path:
    """One pair, one row per method: ``fixed | warped (+ fixed contours) | composite [| deformed grid]``.

    Args:
        path: output PNG (written atomically).
        rows: tuples ``(method_name, fixed, warped, dice)`` or ``(method_name, fixed, warped, dice, phi)``;
            ``dice`` is a dict (or ``None``) shown under the name; a ``phi`` adds the grid column.
        fixed_labels: optional fixed bone labels ``H x W``, drawn as contours on each warped panel.
        title: header line.
        panel_px: width of one panel in pixels.
        grid_step: grid spacing in moving-image pixels.
    """
    if not rows:
        raise ValueError("save_method_grid needs at least one row (method_name, fixed, warped, dice)")
    parsed = []
    for i, row in enumerate(rows):
        if len(row) not in (4, 5):
            raise ValueError(f"row {i}: expected (name, fixed, warped, dice[, phi]), got {len(row)} items")
        name, fixed, warped, dice = row[:4]
        fixed, warped = _np(fixed, f"{name}: fixed", 2), _np(warped, f"{name}: warped", 2)
        if warped.shape != fixed.shape:
            raise ValueError(f"{name}: warped has shape {warped.shape}, fixed has {fixed.shape}")
        phi = _np(row[4], f"{name}: phi", 3).astype(np.float64) if len(row) == 5 and row[4] is not None else None
        if phi is not None and phi.shape != (2, *fixed.shape):
            raise ValueError(f"{name}: phi has shape {phi.shape}, expected (2, {fixed.shape[0]}, {fixed.shape[1]})")
        parsed.append((str(name), fixed, warped, dice, phi))
    labels = _np(fixed_labels, "fixed_labels", 2) if fixed_labels is not None else None
    n_cols = 4 if any(p[4] is not None for p in parsed) else 3
    shape = parsed[0][1].shape
    panel_h = int(round(panel_px * shape[0] / shape[1]))
    name_px, head_px = 150, (LINE_PX + 8 if title else 4) + SUBTITLE_PX
    width, height = name_px + n_cols * panel_px, head_px + len(parsed) * panel_h
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    if title:
        fig.text(0.005, 1.0 - (4 + LINE_PX * 0.5) / height, title, fontsize=11, weight="bold", va="center")
    headers = ["fixed", "warped" + (" + fixed contours" if labels is not None else ""),
               "fixed magenta / warped green", f"deformed grid ({int(grid_step)} px)"][:n_cols]
    head_font = 10 if panel_px >= 240 else 8
    for j, text in enumerate(headers):
        fig.text((name_px + (j + 0.5) * panel_px) / width, 1.0 - (head_px - SUBTITLE_PX / 2) / height, text,
                 ha="center", va="center", fontsize=head_font)
    for i, (name, fixed, warped, dice, phi) in enumerate(parsed):
        bottom = (len(parsed) - 1 - i) * panel_h / height
        scores = format_scores(dice).replace("Dice ", "").replace(" · ", "\n")
        fig.text(6 / width, bottom + 0.5 * panel_h / height, name + ("\n" + scores if scores else ""),
                 fontsize=9, va="center", ha="left", weight="normal")
        axes = [fig.add_axes(((name_px + j * panel_px) / width, bottom, panel_px / width, panel_h / height))
                for j in range(n_cols)]
        axes[0].imshow(_display(fixed), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[1].imshow(_display(warped), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if labels is not None and labels.shape == fixed.shape:
            _contours(axes[1], labels)
        axes[2].imshow(_composite(fixed, warped), interpolation="nearest")
        if n_cols == 4:
            if phi is not None:
                _grid(axes[3], phi, int(grid_step), fixed)
            else:
                axes[3].imshow(GRID_DIM * _display(fixed), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)

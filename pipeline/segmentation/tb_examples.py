"""TensorBoard validation examples of DESS segmentation (:class:`pipeline.handlers.TensorBoardExamples`).

Per example (one row): one sagittal slice of the DESS image, of the true labels and of the prediction
(argmax), labels drawn over the image (femur yellow, femoral cartilage cyan, tibia orange, tibial
cartilage magenta). The slice is the sagittal slice (fixed medio-lateral index, :data:`ML_AXIS` of the
canonical PIR volume) with the most cartilage voxels in the true labels (the middle slice when there are
none), shown superior up, anterior left.

Layout: the validation ``SupervisedEvaluator`` decollates, so ``engine.state.output`` is a list of
per-item dicts ``{"image": 1 x P x I x R, "label": C x P x I x R, "pred": C x P x I x R}`` (one-hot after
the post-processing, or 1-channel label indices). :func:`sagittal_slices` is the handler's
``output_transform``: it keeps only the chosen 2D slices (``{"image", "label", "pred"}: I x P``), so no
whole volume is held between iterations. :func:`render_examples` accepts both the volumes and the slices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.conventions import DESS_LABELS, LABEL_FC, LABEL_TC
from pipeline.handlers.panels import Panel, render_panels, to_numpy
from pipeline.segmentation.transforms import ML_AXIS

__all__ = ["render_examples", "sagittal_slices", "to_label_map", "pick_slice"]

#: Colour names of :data:`pipeline.handlers.panels.LABEL_COLOURS` (for the figure title).
LABEL_COLOUR_NAMES = {1: "yellow", 2: "cyan", 3: "orange", 4: "magenta"}


def to_label_map(x: Any) -> np.ndarray:
    """Channel-first one-hot / probabilities (``C > 1``: argmax) or 1-channel indices -> integer label map;
    a 2D array (an already sliced map) is returned as integers."""
    a = to_numpy(x)
    if a.ndim in (3, 4):
        a = a.argmax(0) if a.shape[0] > 1 else a[0]
    return np.rint(a).astype(np.int16)


def pick_slice(labels: np.ndarray, axis: int = ML_AXIS) -> int:
    """Index along ``axis`` (spatial, no channel) with the most cartilage voxels; the middle if none."""
    cart = np.isin(labels, (LABEL_FC, LABEL_TC))
    other = tuple(a for a in range(labels.ndim) if a != axis)
    counts = cart.sum(axis=other)
    return int(counts.argmax()) if counts.max() > 0 else labels.shape[axis] // 2


def _slice(vol: np.ndarray, index: int, axis: int = ML_AXIS) -> np.ndarray:
    """2D sagittal slice of a ``P x I x R`` volume shown superior up, anterior left: ``I x P``."""
    return np.take(vol, index, axis=axis).T


def _items(data: Any) -> list[Mapping[str, Any]]:
    """Per-item dicts from a decollated list or a collated dict (``B x ...`` tensors)."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        n = len(next(iter(v for v in data.values() if isinstance(v, (torch.Tensor, np.ndarray)))))
        return [{k: v[i] for k, v in data.items() if isinstance(v, (torch.Tensor, np.ndarray))} for i in range(n)]
    return [d for d in data if isinstance(d, Mapping)]


def sagittal_slices(data: Any) -> list[dict[str, np.ndarray]] | None:
    """``output_transform`` of the handler: each item -> ``{"image": I x P float, "label", "pred": I x P
    int}`` at the slice chosen by :func:`pick_slice` (on the label, else the prediction). Items that are
    already 2D pass through."""
    items = _items(data)
    if not items:
        return None
    out = []
    for it in items:
        image = to_numpy(it["image"]) if "image" in it else None
        if image is not None and image.ndim == 2:
            out.append({k: (to_numpy(v) if k == "image" else to_label_map(v)) for k, v in it.items()
                        if k in ("image", "label", "pred")})
            continue
        label = to_label_map(it["label"]) if "label" in it else None
        pred = to_label_map(it["pred"]) if "pred" in it else None
        ref = label if label is not None else pred
        vol = image[0] if image is not None else None
        if ref is None and vol is None:
            continue
        index = pick_slice(ref) if ref is not None else vol.shape[ML_AXIS] // 2
        sl = {}
        if vol is not None:
            sl["image"] = _slice(vol, index).astype(np.float32)
        if label is not None:
            sl["label"] = _slice(label, index)
        if pred is not None:
            sl["pred"] = _slice(pred, index)
        out.append(sl)
    return out


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    s = x.sum() + y.sum()
    return float("nan") if s == 0 else float(2.0 * (x & y).sum() / s)


def render_examples(batch: Any, output: Any, n: int = 4) -> np.ndarray:
    """``n`` rows: the DESS slice, true labels and predicted labels over it (slice Dice FC / TC in the title).
    ``output``: volumes or :func:`sagittal_slices` output; the image comes from ``output`` (else ``batch``)."""
    slices = sagittal_slices(output) or []
    if slices and "image" not in slices[0]:
        images = sagittal_slices(batch) or []
        for s, b in zip(slices, images):
            if "image" in b:
                s["image"] = b["image"]
    rows = []
    for i, s in enumerate(slices[: max(0, int(n))]):
        img = s.get("image")
        vmax = float(np.percentile(img, 99.5)) if img is not None and img.size else 1.0
        row = [Panel(f"example {i}: DESS sagittal", img, vmax=max(vmax, 1e-6))]
        true, pred = s.get("label"), s.get("pred")
        row.append(Panel("true labels", img, labels=true, vmax=max(vmax, 1e-6)) if true is not None
                   else Panel("true labels: n/a"))
        if pred is not None:
            title = "predicted"
            if true is not None:
                title += f" (slice Dice FC {_dice(true, pred, LABEL_FC):.2f}, TC {_dice(true, pred, LABEL_TC):.2f})"
            row.append(Panel(title, img, labels=pred, vmax=max(vmax, 1e-6)))
        else:
            row.append(Panel("predicted: n/a"))
        rows.append(row)
    legend = ", ".join(f"{colour} {DESS_LABELS[v].replace('_', ' ')}" for v, colour in LABEL_COLOUR_NAMES.items())
    return render_panels(rows or [[Panel("no examples")]], title=f"DESS segmentation validation ({legend})",
                         panel_inches=2.6)

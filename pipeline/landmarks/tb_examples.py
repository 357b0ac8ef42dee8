"""TensorBoard validation examples of KNEEL (:class:`pipeline.handlers.TensorBoardExamples` render function).

Per example: the stage canvas with the true landmarks (green circles) and the predicted ones (red
crosses). Layout (MONAI's default ``SupervisedEvaluator`` iteration, ``decollate=False``):
``output["image"]`` (or ``batch["image"]``) ``K x 1 x S x S`` canvas in [0, 1]; ``output["label"]`` and
``output["pred"]`` ``K x N x 2`` normalised canvas ``(x, y)`` (pixel ``u = x * S - 0.5``,
:func:`pipeline.landmarks.soft_argmax.normalised_to_pixels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.handlers.panels import Panel, PointSet, render_panels, to_numpy
from pipeline.landmarks.soft_argmax import normalised_to_pixels

__all__ = ["render_examples"]


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, Mapping) else None


def render_examples(batch: Mapping[str, Any] | None, output: Mapping[str, Any] | None, n: int = 4,
                    mm_per_unit: float | None = None, max_cols: int = 4) -> np.ndarray:
    """Canvases with true / predicted landmarks, ``max_cols`` per row; titles give the mean point error
    (mm when ``mm_per_unit``, the canvas side in mm, is given; else canvas pixels)."""
    image = _get(output, "image")
    if image is None:
        image = _get(batch, "image")
    label = _get(output, "label")
    if label is None:
        label = _get(batch, "label")
    pred = _get(output, "pred")
    images = to_numpy(image)[:, 0]
    size_hw = images.shape[1:]
    m = min(int(n), len(images))
    panels = []
    for i in range(m):
        sets, err = [], None
        true_px = pred_px = None
        if label is not None:
            true_px = normalised_to_pixels(torch.as_tensor(label[i]).float(), size_hw).numpy()
            sets.append(PointSet(true_px, colour="lime", marker="o", label="true", size=18))
        if pred is not None:
            pred_px = normalised_to_pixels(torch.as_tensor(pred[i]).float(), size_hw).numpy()
            sets.append(PointSet(pred_px, colour="red", marker="x", label="predicted", size=18))
        if true_px is not None and pred_px is not None:
            d = np.linalg.norm(true_px - pred_px, axis=-1).mean()
            err = f"{d * mm_per_unit / size_hw[1]:.2f} mm" if mm_per_unit else f"{d:.1f} px"
        title = f"example {i}" + (f": mean error {err}" if err else "")
        panels.append(Panel(title, images[i], points=sets))
    cols = max(1, min(int(max_cols), m))
    rows = [panels[r:r + cols] for r in range(0, len(panels), cols)]
    return render_panels(rows, title="KNEEL validation: true (green) and predicted (red) landmarks",
                         panel_inches=2.8)

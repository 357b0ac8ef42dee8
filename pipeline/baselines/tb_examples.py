"""TensorBoard validation examples of the direct-synthesis baselines (:class:`pipeline.handlers.TensorBoardExamples`).

Per example (one row): the radiograph ROI, the true FC / TC maps and the predicted FC / TC maps, all in mm
(network value x 3 mm) on the shared 0-4 mm colour scale, blank outside the footprint; the prediction
titles give the median ``|pred - true|`` inside the footprint.

Layout (:class:`pipeline.baselines.engine.SynthesisEvalStep`, ``decollate=False``): ``batch["image"]``
``K x 1 x S x S``; ``output["pred"]``, ``output["label"]`` ``K x 2 x S x S`` (channel 0 FC, 1 TC; mm / 3) and
``output["mask"]`` ``K x 2 x S x S`` (1 inside the footprint). ``label`` / ``mask`` fall back to
``batch["maps"]`` / ``batch["mask"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.conventions import MAP_KEYS
from pipeline.handlers.panels import Panel, network_to_mm, render_panels, to_numpy

__all__ = ["render_examples"]


def _first(*candidates: Any) -> Any:
    for c in candidates:
        if c is not None:
            return c
    return None


def render_examples(batch: Mapping[str, Any], output: Mapping[str, Any] | None, n: int = 4) -> np.ndarray:
    """``n`` rows: radiograph ROI, true FC, true TC, predicted FC, predicted TC (mm)."""
    out = output if isinstance(output, Mapping) else {}
    images = to_numpy(_first(batch.get("image"), out.get("image")))[:, 0]
    label = _first(out.get("label"), batch.get("maps"))
    mask = _first(out.get("mask"), batch.get("mask"))
    if mask is None and label is not None:
        mask = to_numpy(label) > 0
    true = network_to_mm(label, mask) if label is not None else None
    pred = network_to_mm(out["pred"], mask) if out.get("pred") is not None else None
    rows = []
    for i in range(min(int(n), len(images))):
        row = [Panel(f"example {i}", images[i])]
        for c, key in enumerate(MAP_KEYS):
            row.append(Panel(f"true {key.upper()}", true[i, c], kind="mm") if true is not None
                       else Panel(f"true {key.upper()}: n/a"))
        for c, key in enumerate(MAP_KEYS):
            if pred is None:
                row.append(Panel(f"predicted {key.upper()}: n/a"))
                continue
            title = f"predicted {key.upper()}"
            if true is not None:
                err = np.abs(pred[i, c] - true[i, c])
                if np.isfinite(err).any():
                    title += f" (median |err| {np.nanmedian(err):.2f} mm)"
            row.append(Panel(title, pred[i, c], kind="mm"))
        rows.append(row)
    return render_panels(rows, title="Direct synthesis validation: true and predicted thickness maps")

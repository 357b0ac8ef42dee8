"""TensorBoard validation examples of MRIS (:class:`pipeline.handlers.TensorBoardExamples` render function).

Per example (one row): the radiograph ROI, the true FC / TC thickness maps (mm = network value x 3 mm,
blank outside the footprint) and the FC / TC maps synthesized by k-NN retrieval
(:func:`pipeline.mris.knn.knn_synthesize`, MRIS-S :func:`pipeline.mris.knn.knn_synthesize_separate`)
with the example's radiograph embedding as the query and the OTHER kept items of the validation batch as
the database (items of the same subject excluded). It is a within-batch preview, not the evaluation
(which queries the database split): with a few dozen items it shows whether the retrieval finds
similar maps.

Layout (:class:`pipeline.mris.engine.MRISEvalStep`, ``decollate=False``): ``batch["image"]`` ``K x 1 x S x S``;
MRIS-C ``batch["maps"]`` ``K x 1 x 2S x S`` (FC rows over TC rows) or MRIS-S ``batch["fc"]``, ``batch["tc"]``
``K x 1 x S x S`` (mm / 3, 0 outside); ``batch["subject_id"]`` list; ``output["xray_emb"]`` /
``output["map_emb"]`` ``K x D`` (MRIS-S: ``{"fc": K x D, "tc": K x D}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.conventions import MAP_KEYS
from pipeline.handlers.panels import Panel, network_to_mm, render_panels, to_numpy
from pipeline.mris.knn import knn_synthesize, knn_synthesize_separate

__all__ = ["render_examples", "true_maps_mm", "batch_knn_maps"]


def true_maps_mm(batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``({fc, tc}: K x S x S mm, NaN outside), {fc, tc}: S x S footprint}`` from an MRIS batch. The
    footprint is the set of pixels that are > 0 in any kept item (the atlas footprint is shared)."""
    if "maps" in batch:
        stacked = to_numpy(batch["maps"])[:, 0]
        half = stacked.shape[1] // 2
        raw = {MAP_KEYS[0]: stacked[:, :half], MAP_KEYS[1]: stacked[:, half:]}
    else:
        raw = {k: to_numpy(batch[k])[:, 0] for k in MAP_KEYS}
    maps, masks = {}, {}
    for k, v in raw.items():
        masks[k] = (v > 0).any(0)
        maps[k] = network_to_mm(v, np.broadcast_to(masks[k][None], v.shape)).astype(np.float32)
    return maps, masks


def _rows(emb: Any, idx: Sequence[int]) -> Any:
    index = torch.as_tensor(list(idx), dtype=torch.long)
    if isinstance(emb, Mapping):
        return {k: torch.as_tensor(v).float()[index] for k, v in emb.items()}
    return torch.as_tensor(emb).float()[index]


def batch_knn_maps(i: int, xray_emb: Any, map_emb: Any, maps: Mapping[str, np.ndarray],
                   masks: Mapping[str, np.ndarray], subject_ids: Sequence[str] | None = None,
                   k: int = 20) -> tuple[dict[str, np.ndarray] | None, int, int]:
    """k-NN synthesis of item ``i`` from the other items (same subject excluded): ``(maps {fc, tc}: S x S mm
    or None when no other item is left, k used, database size)``."""
    n = len(next(iter(maps.values())))
    cand = [j for j in range(n) if j != i and (subject_ids is None or str(subject_ids[j]) != str(subject_ids[i]))]
    if not cand:
        return None, 0, 0
    k_used = min(int(k), len(cand))
    db_maps = {key: torch.from_numpy(np.ascontiguousarray(maps[key][cand])) for key in MAP_KEYS}
    q, db = _rows(xray_emb, [i]), _rows(map_emb, cand)
    if isinstance(q, Mapping):
        res = knn_synthesize_separate(q, db, db_maps, k=k_used, masks=dict(masks))
        out = {key: res[key].maps[0].numpy() for key in MAP_KEYS}
    else:
        res = knn_synthesize(q, db, db_maps, k=k_used, masks=dict(masks))
        out = {key: res.maps[key][0].numpy() for key in MAP_KEYS}
    return out, k_used, len(cand)


def _item_title(batch: Mapping[str, Any], i: int) -> str:
    parts = []
    for key, fmt in (("knee_id", "{}"), ("visit_month", "m{}"), ("klg", "KLG {}")):
        vals = batch.get(key)
        if vals is not None and i < len(vals):
            v = vals[i]
            v = v.item() if isinstance(v, torch.Tensor) else v
            parts.append(fmt.format(v))
    return " ".join(parts) or f"item {i}"


def render_examples(batch: Mapping[str, Any], output: Mapping[str, Any] | None, n: int = 4,
                    k: int = 20) -> np.ndarray:
    """``n`` rows: radiograph ROI, true FC, true TC, k-NN FC, k-NN TC (maps in mm, shared 0-4 mm scale)."""
    images = to_numpy(batch["image"])[:, 0]
    maps, masks = true_maps_mm(batch)
    subjects = batch.get("subject_id")
    has_emb = isinstance(output, Mapping) and "xray_emb" in output and "map_emb" in output
    rows = []
    for i in range(min(int(n), len(images))):
        synth, k_used, n_db = (batch_knn_maps(i, output["xray_emb"], output["map_emb"], maps, masks, subjects, k)
                               if has_emb else (None, 0, 0))
        row = [Panel(_item_title(batch, i), images[i])]
        row += [Panel(f"true {key.upper()}", maps[key][i], kind="mm") for key in MAP_KEYS]
        for key in MAP_KEYS:
            if synth is None:
                row.append(Panel(f"k-NN {key.upper()}: no other subject"))
            else:
                row.append(Panel(f"k-NN {key.upper()} (k={k_used} of {n_db})", synth[key], kind="mm"))
        rows.append(row)
    return render_panels(rows, title="MRIS validation: true maps and k-NN synthesis from the other batch items")

"""Per-class Dice helpers for MONAI's ``MeanDice`` handler / ``DiceMetric``.

MONAI's Dice reduces over every channel it is given; to report femoral and tibial cartilage separately
(and their mean as the model-selection metric) we hand it only the wanted one-hot channels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.handlers import from_engine

from pipeline.conventions import LABEL_FC, LABEL_TC

#: One-hot channels of the cartilage classes in the 5-class output.
CARTILAGE_CHANNELS: dict[str, int] = {"fc": LABEL_FC, "tc": LABEL_TC}


def select_channels(channels: Sequence[int] | int, keys: Sequence[str] = ("pred", "label")) -> Callable:
    """``output_transform`` for ignite metrics: decollated ``[{"pred": (C, ...), "label": (C, ...)}]``
    -> ``(preds, labels)`` lists keeping only one-hot ``channels`` (in that order)."""
    chans = [int(channels)] if isinstance(channels, int) else [int(c) for c in channels]
    getter = from_engine(list(keys))

    def transform(output) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds, labels = getter(output)
        return [p[chans] for p in preds], [lab[chans] for lab in labels]

    return transform


def cartilage_dice(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Dice of FC and TC between two label maps of identical shape (any layout; values 0..4)."""
    out = {}
    for name, c in CARTILAGE_CHANNELS.items():
        p, t = pred == c, label == c
        denom = float(p.sum() + t.sum())
        out[name] = float("nan") if denom == 0 else 2.0 * float((p & t).sum()) / denom
    return out

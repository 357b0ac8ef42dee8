"""Masked L1 loss of the direct-synthesis baselines (the one home of this formula)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskedL1Loss", "masked_l1"]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``|pred - target|`` over the pixels where ``mask`` > 0 (all channels and batch items pooled).

    Args:
        pred, target: ``B x C x H x W`` maps in network units (mm / 3; target 0 outside the footprint).
        mask: ``B x C x H x W`` (or broadcastable) weights, 1 inside the footprint and 0 outside.

    Returns:
        scalar tensor ``sum(mask * |pred - target|) / sum(mask)``.

    Raises:
        ValueError: shape mismatch or an all-zero mask.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    m = mask.to(pred.dtype).expand_as(pred)
    total = m.sum()
    if float(total) <= 0:
        raise ValueError("masked_l1: the mask is empty (no footprint pixel)")
    return (m * (pred - target).abs()).sum() / total


class MaskedL1Loss(nn.Module):
    """``nn.Module`` wrapper of :func:`masked_l1`: ``loss(pred, target, mask)``."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_l1(pred, target, mask)

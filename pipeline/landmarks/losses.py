"""Wing loss (Feng et al., CVPR 2018) as used by KNEEL (w = 15, c = 3) on normalised coordinates."""

from __future__ import annotations

import math

import torch

__all__ = ["wing_loss", "WingLoss"]


def wing_loss(pred: torch.Tensor, target: torch.Tensor, width: float = 15.0, curvature: float = 3.0,
              scale: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Wing loss of every coordinate difference ``x = scale * (pred - target)``:

    ``wing(x) = width * ln(1 + |x| / curvature)`` if ``|x| < width``, else ``|x| - C`` with
    ``C = width - width * ln(1 + width / curvature)`` (continuous at ``|x| = width``).

    Args:
        pred, target: same shape, e.g. ``(B, N, 2)`` normalised ``(x, y)`` (unit: canvas extent).
        width, curvature: ``w`` and ``c`` of the paper (KNEEL: 15 and 3).
        scale: multiplies the differences first (1 = normalised coordinates as in KNEEL; the canvas
            size in pixels would give a loss in pixel units).
        reduction: ``"mean"`` (over every coordinate), ``"sum"`` or ``"none"``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if width <= 0 or curvature <= 0:
        raise ValueError(f"width and curvature must be positive, got {width}, {curvature}")
    x = (float(scale) * (pred - target)).abs()
    c = width - width * math.log1p(width / curvature)
    loss = torch.where(x < width, width * torch.log1p(x / curvature), x - c)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class WingLoss(torch.nn.Module):
    """Module form of :func:`wing_loss` (``loss_function`` of a MONAI ``SupervisedTrainer``)."""

    def __init__(self, width: float = 15.0, curvature: float = 3.0, scale: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.width, self.curvature, self.scale, self.reduction = float(width), float(curvature), float(scale), reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return wing_loss(pred, target, self.width, self.curvature, self.scale, self.reduction)

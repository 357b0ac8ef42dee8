"""Multi-class softmax focal loss (Lin et al. 2017), the training loss of the progression models (gamma 2).

For logits ``z`` (``B x C``, or ``B x C x ...``) and integer targets ``t`` (``B`` or ``B x ...``), with
``p_t = softmax(z)[t]``:

    FL = - alpha_t * (1 - p_t) ** gamma * log(p_t)

* ``gamma = 0`` and ``alpha = None`` give the cross-entropy ``-log p_t`` (``torch.nn.functional.cross_entropy``);
* ``alpha``: optional per-class weights (a length-``C`` sequence or tensor). Like ``cross_entropy(weight=...)``,
  ``reduction="mean"`` then divides by the sum of the weights of the targets (a weighted mean), so at
  ``gamma = 0`` the loss equals ``cross_entropy(logits, target, weight=alpha)`` for every reduction.
* ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the per-sample terms, shape of ``target``).

``log p_t`` comes from ``log_softmax`` (no ``log(softmax)``) and ``1 - p_t`` from ``expm1``, so confident logits
give neither ``NaN`` nor cancellation. Computed in float32 at least (float64 inputs stay float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocalLoss", "focal_loss"]

AlphaLike = Union[Sequence[float], torch.Tensor, None]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: AlphaLike = None,
               reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss of ``logits`` (``B x C [x ...]``) against class indices ``target`` (``B [x ...]``,
    int64); see the module docstring for the formula, ``alpha`` and ``reduction``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"focal_loss expects logits B x C [x ...] and target B [x ...], got "
                         f"{list(logits.shape)} and {list(target.shape)}")
    target = target.long()
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32, float64 kept
    log_pt = F.log_softmax(z, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    # 1 - p_t = -expm1(log p_t): accurate for confident samples; log_softmax <= 0 so it is >= 0 (the clamp
    # only guards rounding for non-integer gamma).
    loss = -((-torch.expm1(log_pt)).clamp_min(0.0) ** gamma) * log_pt
    weight = None
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device).reshape(-1)
        if a.numel() != logits.shape[1]:
            raise ValueError(f"alpha needs one weight per class ({logits.shape[1]}), got {a.numel()}")
        weight = a[target]
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weight.sum() if weight is not None else loss.mean()


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a module (for configs): ``FocalLoss(gamma=2.0)(logits, target)``."""

    def __init__(self, gamma: float = 2.0, alpha: AlphaLike = None, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.reduction = reduction
        self.alpha: Optional[torch.Tensor]
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, self.gamma, self.alpha, self.reduction)

"""Soft-argmax: heat-map logits -> expected (x, y) position, normalised to the image extent.

Coordinate convention (used everywhere in :mod:`pipeline.landmarks`)
--------------------------------------------------------------------
A heat map (or canvas) of ``H`` rows and ``W`` columns covers the unit square: pixel ``(row i, col j)``
has its CENTRE at normalised ``x = (j + 0.5) / W``, ``y = (i + 0.5) / H``. A normalised coordinate is
therefore independent of the heat-map resolution: a heat map at 1/4 of the canvas resolution and the
canvas itself share it, and canvas pixel ``u = x * S - 0.5`` (:func:`normalised_to_pixels`).
Axis order: ``(..., 2)`` arrays hold ``(x, y)`` = (column, row).
"""

from __future__ import annotations

import torch

__all__ = ["soft_argmax_2d", "heatmap_probabilities", "normalised_to_pixels", "pixels_to_normalised"]


def heatmap_probabilities(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Spatial softmax ``p = softmax(beta * logits)`` over the last two axes of ``(B, N, H, W)``."""
    if logits.ndim != 4:
        raise ValueError(f"expected heat-map logits (B, N, H, W), got shape {list(logits.shape)}")  # TorchScript
    b, n, h, w = logits.shape
    p = torch.softmax(float(beta) * logits.reshape(b, n, h * w).float(), dim=-1)
    return p.reshape(b, n, h, w)


def soft_argmax_2d(logits: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable arg-max of ``(B, N, H, W)`` heat-map logits.

    ``p = softmax(beta * logits)`` over each ``H x W`` map; the result is the expectation
    ``x = sum_ij p_ij (j + 0.5) / W``, ``y = sum_ij p_ij (i + 0.5) / H`` (module docstring).

    Returns:
        ``(coords, probs)``: ``coords`` ``(B, N, 2)`` float32 normalised ``(x, y)`` in ``[0, 1]``;
        ``probs`` ``(B, N, H, W)`` the probability maps (each sums to 1).
    """
    probs = heatmap_probabilities(logits, beta)
    _, _, h, w = probs.shape
    xs = (torch.arange(w, device=probs.device, dtype=probs.dtype) + 0.5) / w
    ys = (torch.arange(h, device=probs.device, dtype=probs.dtype) + 0.5) / h
    x = (probs.sum(dim=2) * xs).sum(dim=-1)  # marginal over rows, then E[x]
    y = (probs.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1), probs


def normalised_to_pixels(coords: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Normalised ``(x, y)`` -> pixel ``(x, y)`` of an ``H x W`` image: ``u = x * W - 0.5``, ``v = y * H - 0.5``."""
    h, w = size_hw
    scale = torch.tensor([w, h], dtype=coords.dtype, device=coords.device)
    return coords * scale - 0.5


def pixels_to_normalised(points: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`normalised_to_pixels`: ``x = (u + 0.5) / W``, ``y = (v + 0.5) / H``."""
    h, w = size_hw
    scale = torch.tensor([w, h], dtype=points.dtype, device=points.device)
    return (points + 0.5) / scale

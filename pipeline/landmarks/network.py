"""KNEEL-style hourglass landmark network with a soft-argmax head (plain torch, no torchvision).

Architecture (Tiulpin et al. 2019, after Newell et al. 2016), for an input ``(B, C, S, S)``:

* stem: conv 7x7 stride 2 (``width`` channels) + BN + ReLU, residual block -> ``2 * width``, max-pool 2,
  residual block, residual block -> ``4 * width`` (1/4 of the input resolution);
* a ``depth``-level hourglass (default 4) of pre-activation bottleneck residual blocks at ``4 * width``
  channels (max-pool down, nearest/bilinear up, skip branches added);
* mixer: dropout, 1x1 conv + BN + ReLU, 1x1 conv -> ``n_points`` heat-map logits at 1/4 resolution;
* soft-argmax (:func:`pipeline.landmarks.soft_argmax.soft_argmax_2d`) -> ``(B, n_points, 2)`` normalised
  ``(x, y)`` in ``[0, 1]`` (pixel-centre convention; ``x`` = column, ``y`` = row).

``width=64`` gives about 4 M parameters (the paper's size); tests use ``width=4`` and the CPU demo 12.
The network carries its own description (architecture, stage, canvas size and spacing, canvas normalisation) in
its ``state_dict`` (``_extra_state``, :mod:`pipeline.nets.describe`), so
:func:`pipeline.landmarks.engine.load_landmark_model` rebuilds it from a checkpoint file alone. Checkpoints
written with the earlier ``kneel-hourglass-v1`` description still load (:func:`upgrade_description`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.landmarks.geometry import StageSpec
from pipeline.landmarks.soft_argmax import soft_argmax_2d
from pipeline.nets.describe import DescribedModule, make_description, network_factory

__all__ = ["ResidualBlock", "Hourglass", "KneelHourglass", "count_parameters", "upgrade_description"]

#: The description format of checkpoints written before the common shape of :mod:`pipeline.nets.describe`.
LEGACY_FORMAT = "kneel-hourglass-v1"
#: Canvas intensities the network expects (:func:`pipeline.landmarks.data.normalise_canvas`).
CANVAS_NORMALISATION = "percentile: min -> 0, 99th percentile -> 0.99, clipped to [0, 1]; no image -> 0"


class ResidualBlock(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1 (out/2) -> BN-ReLU-3x3 (out/2) -> BN-ReLU-1x1 (out) + skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = max(1, out_ch // 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, out_ch, 1, bias=True),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Hourglass(nn.Module):
    """Recursive hourglass of ``depth`` levels at ``ch`` channels; output has the input's size."""

    def __init__(self, depth: int, ch: int, upmode: str = "nearest") -> None:
        super().__init__()
        self.up1 = ResidualBlock(ch, ch)
        self.low1 = ResidualBlock(ch, ch)
        self.low2 = Hourglass(depth - 1, ch, upmode) if depth > 1 else ResidualBlock(ch, ch)
        self.low3 = ResidualBlock(ch, ch)
        self.upmode = upmode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up1 = self.up1(x)
        low = F.max_pool2d(x, 2, ceil_mode=True)
        low = self.low3(self.low2(self.low1(low)))
        # two explicit calls rather than ``**kwargs``: TorchScript (``ckpt_export``) has no kwarg expansion
        if self.upmode in ("bilinear", "bicubic"):
            up2 = F.interpolate(low, size=up1.shape[-2:], mode=self.upmode, align_corners=False)
        else:
            up2 = F.interpolate(low, size=up1.shape[-2:], mode=self.upmode)
        return up1 + up2


@network_factory
class KneelHourglass(DescribedModule, nn.Module):
    """Hourglass landmark regressor (module docstring).

    Args:
        n_points: landmarks to regress (1 = global stage joint centre, 16 = local stage, KNEEL order).
        width: base width (hourglass at ``4 * width`` channels); 64 ~ 4 M parameters.
        in_channels: input channels (1: grey radiograph canvas in [0, 1]).
        depth: hourglass levels (KNEEL: 4).
        beta: soft-argmax temperature (``softmax(beta * logits)``).
        dropout: dropout-2d probability in the mixer.
        upmode: hourglass up-sampling mode (``"nearest"`` or ``"bilinear"``).
        stage, canvas_size, canvas_spacing_mm: the stage this model was trained for
            (:class:`pipeline.landmarks.geometry.StageSpec`); stored with the weights.

    ``forward(x)`` returns ``(B, n_points, 2)`` normalised ``(x, y)``; :meth:`forward_heatmaps` also
    returns the ``(B, n_points, S/4, S/4)`` probability maps.
    """

    def __init__(self, n_points: int = 16, width: int = 64, in_channels: int = 1, depth: int = 4,
                 beta: float = 1.0, dropout: float = 0.25, upmode: str = "nearest", stage: str = "local",
                 canvas_size: int = 128, canvas_spacing_mm: float = 1.1) -> None:
        super().__init__()
        if width < 1 or depth < 1 or n_points < 1:
            raise ValueError(f"width, depth and n_points must be >= 1, got {width}, {depth}, {n_points}")
        self.arch = {"n_points": int(n_points), "width": int(width), "in_channels": int(in_channels),
                     "depth": int(depth), "beta": float(beta), "dropout": float(dropout), "upmode": str(upmode)}
        self.spec = StageSpec(stage=stage, canvas_size=int(canvas_size), canvas_spacing_mm=float(canvas_spacing_mm))
        if self.spec.n_points != n_points:
            raise ValueError(f"stage {stage!r} regresses {self.spec.n_points} point(s), got n_points={n_points}")
        w = int(width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            ResidualBlock(w, 2 * w), nn.MaxPool2d(2, ceil_mode=True),
            ResidualBlock(2 * w, 2 * w), ResidualBlock(2 * w, 4 * w),
        )
        self.hourglass = Hourglass(depth, 4 * w, upmode)
        self.mixer = nn.Sequential(
            nn.Dropout2d(dropout), ResidualBlock(4 * w, 4 * w),
            nn.Conv2d(4 * w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(4 * w, n_points, 1)
        self.beta = float(beta)
        self.describe(KneelHourglass, {**self.arch, **self.spec.to_dict()}, _preprocessing(self.spec))

    def heatmap_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_points, ceil(S/4), ceil(S/4))`` heat-map logits."""
        return self.head(self.mixer(self.hourglass(self.stem(x))))

    def forward_heatmaps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coords (B, N, 2) normalised (x, y), probs (B, N, h, w))``."""
        return soft_argmax_2d(self.heatmap_logits(x), self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heatmaps(x)[0]

def _preprocessing(spec: StageSpec) -> dict[str, Any]:
    return {"stage": spec.stage, "canvas_size": spec.canvas_size, "canvas_spacing_mm": spec.canvas_spacing_mm,
            "normalisation": CANVAS_NORMALISATION}


def upgrade_description(old: Mapping[str, Any]) -> dict[str, Any]:
    """A ``kneel-hourglass-v1`` description (``{"format", "arch", "spec"}``) -> the common shape."""
    if old.get("format") != LEGACY_FORMAT:
        raise ValueError(f"not a {LEGACY_FORMAT} description: {str(old)[:120]!r}")
    spec = StageSpec.from_dict(old["spec"])
    return make_description(KneelHourglass, {**dict(old["arch"]), **spec.to_dict()}, _preprocessing(spec))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

"""The GradICON registration network: a cascade of U-Nets at 1/4, 1/2 and full resolution, composed two-step.

Every registration module here is an ``nn.Module`` with ``forward(moving, fixed) -> phi``, ``phi`` a map
``B x 2 x H x W`` on [0, 1] from fixed-frame points to moving-frame points (:mod:`pipeline.registration.maps`),
so ``warp(moving, phi)`` lies on ``fixed``. The pieces follow ICON's composable wrappers (uncbiag/ICON
``network_wrappers.py``), with maps kept as tensors instead of Python functions:

* :class:`RegistrationUNet`: ICON's ``tallUNet2`` shape: 5 levels, down channels ``[2C, 16, 32, 64, 256, 512]``,
  up ``[16, 32, 64, 128, 256]`` (times ``width``), stride-2 3 x 3 convolutions down with an average-pooled
  residual, 4 x 4 transposed convolutions up with an upsampled residual and batch norm, skip concatenation,
  leaky ReLU before each convolution; the last 3 x 3 convolution is zero-initialised and its output divided by
  10: a displacement ``B x 2 x H x W`` in [0, 1] units (row, column) that starts at 0.
* :class:`DisplacementMap`: U-Net displacement -> map ``identity + u``.
* :class:`DownsampleRegistration`: run a module on both images average-pooled by 2, then evaluate its map at
  the full-resolution pixel centres (bilinear interpolation of its displacement, which is what ICON's
  function-valued maps do when the coarse map is applied to the fine identity grid).
* :class:`TwoStepRegistration`: ``phi = first(A, B)``, ``psi = second(warp(A, phi), B)``, returns
  ``compose(phi, psi)``.
* :func:`make_registration_network`: the self-describing cascade (:mod:`pipeline.nets.describe`), checkpoints of
  which rebuild it through :func:`pipeline.io.checkpoints.load_network`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nets.describe import DescribedModule, network_factory
from pipeline.registration.maps import compose, displacement_to_map, identity_map, sample_map, warp

__all__ = ["DOWN_CHANNELS", "DisplacementMap", "DownsampleRegistration", "RegistrationNetwork", "RegistrationUNet",
           "TwoStepRegistration", "UP_CHANNELS", "make_registration_network", "required_divisor"]

#: ICON tallUNet2 channels at width 1 (after the input, which has 2 x input_channels).
DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)
#: Stride-2 levels of each U-Net whose sizes must divide evenly (the 5th may end at 1 pixel, as in ICON).
UNET_DIVISOR = 2 ** 4
#: What a network with 1 or 4 input channels expects (recorded in its description).
INPUTS = {1: "image, float intensities in [0, 1], affinely pre-aligned pair",
          4: "one-hot bone label map (0 background, 1 femur, 2 tibia, 3 fibula), affinely pre-aligned pair"}


def _scaled(channels: tuple[int, ...], width: float) -> list[int]:
    return [max(1, int(round(c * float(width)))) for c in channels]


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x`` with its channels cut to, or zero-padded (in front) up to, ``channels`` (residual connections)."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, channels - x.shape[1], 0))


class RegistrationUNet(nn.Module):
    """``forward(moving, fixed)`` -> displacement ``B x 2 x H x W`` in [0, 1] units (module docstring).

    Args:
        input_channels: channels of each image (1: images; 4: one-hot label maps).
        width: channel multiplier (1.0 = ICON's tallUNet2; < 1 for tests and CPU demos).
        down_channels, up_channels: channels at width 1 (5 levels each).
    """

    def __init__(self, input_channels: int = 1, width: float = 1.0,
                 down_channels: tuple[int, ...] = DOWN_CHANNELS, up_channels: tuple[int, ...] = UP_CHANNELS) -> None:
        super().__init__()
        if len(down_channels) != len(up_channels):
            raise ValueError("down_channels and up_channels need one entry per level")
        self.levels = len(down_channels)
        down = [2 * int(input_channels)] + _scaled(tuple(down_channels), width)
        up_out = _scaled(tuple(up_channels), width)
        up_in = [down[d + 1] + (up_out[d + 1] if d + 1 < self.levels else 0) for d in range(self.levels)]
        self.down = nn.ModuleList(nn.Conv2d(down[d], down[d + 1], 3, stride=2, padding=1) for d in range(self.levels))
        self.up = nn.ModuleList(nn.ConvTranspose2d(up_in[d], up_out[d], 4, stride=2, padding=1)
                                for d in range(self.levels))
        self.norms = nn.ModuleList(nn.BatchNorm2d(up_out[d]) for d in range(self.levels))
        self.last = nn.Conv2d(down[0] + up_out[0], 2, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], 1)
        skips = []
        for conv in self.down:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _match_channels(F.avg_pool2d(x, 2, ceil_mode=True), y.shape[1])
        for d in reversed(range(self.levels)):
            y = self.up[d](F.leaky_relu(x))
            x = y + F.interpolate(_match_channels(x, y.shape[1]), scale_factor=2, mode="bilinear", align_corners=False)
            x = self.norms[d](x)
            skip = skips[d]
            x = torch.cat([x[:, :, :skip.shape[2], :skip.shape[3]], skip], 1)
        return self.last(x) / 10.0


class DisplacementMap(nn.Module):
    """A displacement network (``forward(moving, fixed)`` -> ``B x 2 x H x W`` in [0, 1] units) as a
    registration module returning the map ``identity + displacement``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return displacement_to_map(self.net(moving, fixed))


class DownsampleRegistration(nn.Module):
    """Run ``net`` on both images average-pooled by 2 (``ceil_mode``), and return its map evaluated at this
    resolution's pixel centres (``B x 2 x H x W``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        coarse = self.net(F.avg_pool2d(moving, 2, ceil_mode=True), F.avg_pool2d(fixed, 2, ceil_mode=True))
        grid = identity_map(fixed.shape, batch=fixed.shape[0], device=fixed.device, dtype=coarse.dtype)
        return sample_map(coarse, grid)


class TwoStepRegistration(nn.Module):
    """``phi = first(A, B)``; ``psi = second(warp(A, phi), B)``; returns ``compose(phi, psi)`` (``phi o psi``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        phi = self.first(moving, fixed)
        psi = self.second(warp(moving, phi), fixed)
        return compose(phi, psi)


def required_divisor(levels: int) -> int:
    """Height and width of a ``levels``-level cascade's input must be multiples of this (``2**(levels-1) * 2**4``;
    64 for 3 levels)."""
    return 2 ** (int(levels) - 1) * UNET_DIVISOR


class RegistrationNetwork(DescribedModule):
    """The cascade: U-Nets at ``1 / 2**(levels-1)``, ..., 1/2, full resolution, each refining the previous
    levels' map two-step, then ``full_resolution_steps`` more full-resolution U-Nets (the paper's optional 4th
    step). ``forward(moving, fixed)`` -> ``phi`` ``B x 2 x H x W``; starts at the identity (zero-initialised
    last convolutions). Inputs ``B x C x H x W`` with ``C = input_channels`` and ``H, W`` multiples of
    :func:`required_divisor` (else ``ValueError``)."""

    def __init__(self, input_channels: int = 1, levels: int = 3, width: float = 1.0,
                 full_resolution_steps: int = 0) -> None:
        super().__init__()
        if int(levels) < 1 or int(full_resolution_steps) < 0:
            raise ValueError(f"levels must be >= 1 and full_resolution_steps >= 0, got {levels}, {full_resolution_steps}")
        self.input_channels, self.levels = int(input_channels), int(levels)

        def unet() -> nn.Module:
            return DisplacementMap(RegistrationUNet(self.input_channels, width))

        net: nn.Module = unet()
        for _ in range(self.levels - 1):
            net = TwoStepRegistration(DownsampleRegistration(net), unet())
        for _ in range(int(full_resolution_steps)):
            net = TwoStepRegistration(net, unet())
        self.net = net

    def check_input(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """``ValueError`` naming the problem if ``moving`` / ``fixed`` cannot go through the network."""
        if moving.ndim != 4 or fixed.ndim != 4:
            raise ValueError(f"moving and fixed must be B x C x H x W, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed images differ in shape: {tuple(moving.shape)} vs {tuple(fixed.shape)}")
        if moving.shape[1] != self.input_channels:
            raise ValueError(f"the registration network takes {self.input_channels} channel(s) per image, got "
                             f"{moving.shape[1]}")
        div = required_divisor(self.levels)
        h, w = moving.shape[-2:]
        if h % div or w % div:
            fit = f"{max(div, round(h / div) * div)} x {max(div, round(w / div) * div)}"
            raise ValueError(f"image size {h} x {w}: a {self.levels}-level registration network needs height and "
                             f"width divisible by {div} (= 2**{self.levels - 1} x 2**4), e.g. {fit}; resize or pad "
                             "the pair")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        self.check_input(moving, fixed)
        return self.net(moving, fixed)


@network_factory
def make_registration_network(input_channels: int = 1, levels: int = 3, width: float = 1.0,
                              full_resolution_steps: int = 0, image_size: Optional[int] = None) -> RegistrationNetwork:
    """The GradICON cascade (:class:`RegistrationNetwork`), self-describing: settings ``input_channels`` (1 for
    images, 4 for one-hot label maps), ``levels`` (3: 1/4, 1/2, full), ``width`` (1.0 = the paper's; smaller for
    tests and CPU demos), ``full_resolution_steps``; preprocessing ``image_size`` (``None`` = not specified, taken
    from a checkpoint loaded into it) and the expected input."""
    settings = {"input_channels": int(input_channels), "levels": int(levels), "width": float(width),
                "full_resolution_steps": int(full_resolution_steps)}
    net = RegistrationNetwork(**settings)
    if image_size is not None and int(image_size) % required_divisor(levels):
        raise ValueError(f"image_size {image_size} is not divisible by {required_divisor(levels)} "
                         f"(needed by a {levels}-level registration network)")
    prep = {"image_size": None if image_size is None else int(image_size),
            "input": INPUTS.get(int(input_channels), f"{int(input_channels)}-channel image")}
    return net.describe(make_registration_network, settings, prep)

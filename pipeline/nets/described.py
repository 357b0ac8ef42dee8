"""MONAI networks that carry their description (:class:`pipeline.nets.describe.DescribedModule`): the same
modules and state-dict keys as MONAI's, plus ``_extra_state``. Factories build these and call ``describe``."""

from __future__ import annotations

from monai.networks.nets import SegResNet, UNet

from pipeline.nets.describe import DescribedModule

__all__ = ["DescribedSegResNet", "DescribedUNet"]


class DescribedUNet(DescribedModule, UNet):
    """MONAI ``UNet`` that carries its description."""


class DescribedSegResNet(DescribedModule, SegResNet):
    """MONAI ``SegResNet`` that carries its description."""

"""Network factory of the DESS cartilage segmentation bundle.

Output: ``out_channels`` logits, softmax over the label table. The default (5) predicts the full DESS
label table of :data:`pipeline.conventions.DESS_LABELS` (0 background, 1 femur, 2 femoral cartilage,
3 tibia, 4 tibial cartilage), so the argmax IS a label map in the repository's convention and the
bones come for free (the thickness code uses the bone side to split inner/outer cartilage surfaces).
The UNC reference uses 2 sigmoid outputs (FC, TC); cartilage Dice is reported on channels 2 and 4 only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import SegResNet, UNet

from pipeline.conventions import DESS_LABELS

#: Number of output channels for the full label table.
N_CLASSES = len(DESS_LABELS)


def build_network(arch: str = "unet", in_channels: int = 1, out_channels: int = N_CLASSES,
                  channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                  num_res_units: int = 2, norm: str = "instance", dropout: float = 0.0,
                  init_filters: int = 16) -> torch.nn.Module:
    """A 3D MONAI ``UNet`` (default) or ``SegResNet`` for channel-first ``(B, 1, I, J, K)`` DESS patches.

    Args:
        arch: ``"unet"`` or ``"segresnet"``.
        in_channels: input channels (1: the DESS intensity scaled to [0, 1]).
        out_channels: logits channels; 5 = full label table (default), see the module doc.
        channels, strides, num_res_units, norm, dropout: ``UNet`` arguments. Every spatial patch size
            must be divisible by ``prod(strides)`` (16 by default; 128 x 128 x 32 works).
        init_filters: ``SegResNet`` width (its patch sizes must be divisible by 8).
    """
    if arch == "unet":
        if len(strides) != len(channels) - 1:
            raise ValueError(f"UNet needs len(strides) == len(channels) - 1, got {strides} / {channels}")
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                    strides=tuple(strides), num_res_units=num_res_units, norm=norm, dropout=dropout)
    if arch == "segresnet":
        return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         init_filters=init_filters, dropout_prob=dropout or None)
    raise ValueError(f"arch must be 'unet' or 'segresnet', got {arch!r}")

"""Network factory of the DESS cartilage segmentation bundle.

Output: ``out_channels`` logits, softmax over the label table. The default (5) predicts the full DESS
label table of :data:`pipeline.conventions.DESS_LABELS` (0 background, 1 femur, 2 femoral cartilage,
3 tibia, 4 tibial cartilage), so the argmax IS a label map in the repository's convention and the
bones come for free (the thickness code uses the bone side to split inner/outer cartilage surfaces).
The UNC reference uses 2 sigmoid outputs (FC, TC); cartilage Dice is reported on channels 2 and 4 only.

The network describes itself (:mod:`pipeline.nets.describe`): its checkpoints record the factory settings and the
preprocessing of ``bundles/dess_seg`` (:data:`PREPROCESSING`), so inference rebuilds it from the checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.conventions import DESS_LABELS
from pipeline.nets.describe import network_factory
from pipeline.nets.described import DescribedSegResNet, DescribedUNet

#: Number of output channels for the full label table.
N_CLASSES = len(DESS_LABELS)
#: The input the network expects (``bundles/dess_seg/configs/*.json`` preprocessing), recorded in its checkpoints.
PREPROCESSING = {"orientation": "PIR", "knee": "left (right knees flipped along the medio-lateral axis)",
                 "spacing": "native (no resampling)",
                 "normalisation": "percentiles 0.1 / 99.9 -> [0, 1], clipped"}


@network_factory
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
    settings = {"arch": arch, "in_channels": int(in_channels), "out_channels": int(out_channels),
                "channels": list(channels), "strides": list(strides), "num_res_units": int(num_res_units),
                "norm": norm, "dropout": float(dropout), "init_filters": int(init_filters)}
    if arch == "unet":
        if len(strides) != len(channels) - 1:
            raise ValueError(f"UNet needs len(strides) == len(channels) - 1, got {strides} / {channels}")
        net = DescribedUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                            channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units, norm=norm,
                            dropout=dropout)
    elif arch == "segresnet":
        net = DescribedSegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                                 init_filters=init_filters, dropout_prob=dropout or None)
    else:
        raise ValueError(f"arch must be 'unet' or 'segresnet', got {arch!r}")
    return net.describe(build_network, settings, PREPROCESSING)

"""Data chains of the direct-synthesis baselines (items and splits are MRIS's: :mod:`pipeline.mris.data`).

Items come from :func:`pipeline.mris.data.manifest_items` / :func:`pipeline.mris.data.train_items`, so the
baselines see exactly the subjects, visits and training / validation split of MRIS. Batch keys:

* ``image``: ``1 x S x S`` radiograph ROI in [0, 1] (the MRIS chain :func:`pipeline.mris.data.radiograph_transforms`,
  right knees flipped to left; training adds the same per-sample :class:`transforms.RandKneeAugmentd`);
* ``maps``: ``2 x S x S`` target (channel 0 = FC, 1 = TC), thickness in mm / 3, 0 outside the footprint
  (the atlas grid resized NaN-aware to ``S x S``);
* ``mask``: ``2 x S x S`` float, 1 inside the footprint (the finite pixels of the resized maps), 0 outside;
* ``subject_id``, ``knee_id``, ``side``, ``visit_month``, ``klg`` (:data:`pipeline.mris.data.BATCH_META_KEYS`).
"""

from __future__ import annotations

import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    SelectItemsd,
)

from pipeline.conventions import MAP_KEYS
from pipeline.mris.data import BATCH_META_KEYS, radiograph_transforms
from transforms import FillNaNd, NaNAwareResized, RandKneeAugmentd, ScaleThicknessd

__all__ = ["MASK_KEY", "TARGET_KEY", "synthesis_target_transforms", "synthesis_transforms"]

TARGET_KEY = "maps"
MASK_KEY = "mask"


def synthesis_target_transforms(image_size: int) -> list:
    """``fc``/``tc`` ``.npy`` paths (mm, NaN outside) -> ``maps`` (``2 x S x S``, mm / 3, NaN -> 0) and
    ``mask`` (``2 x S x S``, 1 inside the resized footprint)."""
    keys = list(MAP_KEYS)
    masks = [f"{k}_mask" for k in keys]
    return [
        LoadImaged(keys, reader="NumpyReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        NaNAwareResized(keys, image_size),
        FillNaNd(keys, mask_key_postfix="mask"),
        ScaleThicknessd(keys),
        ConcatItemsd(keys, TARGET_KEY),
        ConcatItemsd(masks, MASK_KEY),
    ]


def synthesis_transforms(image_size: int, train: bool = False, augment: bool = True,
                         with_maps: bool = True) -> Compose:
    """Full chain: the MRIS radiograph chain (+ targets with ``with_maps``); with ``train`` and ``augment`` the
    per-sample radiograph augmentation of MRIS follows the cached deterministic part. Outputs are plain
    float32 tensors plus the batch metadata keys."""
    chain = radiograph_transforms(image_size)
    tensor_keys = ["image"]
    if with_maps:
        chain += synthesis_target_transforms(image_size)
        tensor_keys += [TARGET_KEY, MASK_KEY]
    chain.append(SelectItemsd(tensor_keys + list(BATCH_META_KEYS)))
    if train and augment:
        chain.append(RandKneeAugmentd("image"))
    chain.append(EnsureTyped(tensor_keys, dtype=torch.float32, track_meta=False))
    return Compose(chain)

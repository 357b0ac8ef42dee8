"""Left-knee convention for volumes: mirror RIGHT knees along their medial-lateral axis.

One home for the mirror every DESS flow applies (segmentation: ``PIR`` layout, medial-lateral = spatial axis 2;
progression: ``RPI`` layout, axis 0). MONAI's ``Flip`` keeps the MetaTensor affine truthful (every voxel still
maps to its true world position); the decision is pushed onto ``applied_operations`` (``Invertd`` undoes it)
and recorded as ``meta["knee_flipped"]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, InvertibleTransform, MapTransform

__all__ = ["FLIP_META_KEY", "FlipToLeftKneed", "normalise_side"]

#: Meta-data key recording whether the volume was mirrored to left-knee convention.
FLIP_META_KEY = "knee_flipped"


class FlipToLeftKneed(MapTransform, InvertibleTransform):
    """Mirror RIGHT knees along the medial-lateral axis so that every knee is in left-knee convention.

    Applies :class:`monai.transforms.Flip` on ``spatial_axis`` (default 2: the medial-lateral axis after
    ``Orientationd(axcodes="PIR")``) to every key when ``data[side_key]`` is in ``flip_sides``; left
    knees pass unchanged. Either way the decision is pushed onto the tensor's ``applied_operations`` so
    ``inverse`` (and hence ``Invertd`` on a prediction) restores the original orientation, and
    ``meta["knee_flipped"]`` is set.

    Args:
        keys: image / label keys (channel-first MetaTensors).
        side_key: key of the knee side (``"R"`` / ``"L"``, case-insensitive, ``"RIGHT"`` / ``"LEFT"``
            accepted). A missing or empty side counts as ``default_side``.
        spatial_axis: spatial axis to mirror (channel excluded).
        default_side: side assumed when ``side_key`` is absent or empty.
        allow_missing_keys: do not raise when a key is missing (e.g. no label at inference).
    """

    backend = Flip.backend

    def __init__(self, keys: KeysCollection, side_key: str = "side", spatial_axis: int = 2,
                 default_side: str = "L", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.side_key = side_key
        self.spatial_axis = int(spatial_axis)
        self.default_side = default_side
        self.flipper = Flip(spatial_axis=self.spatial_axis)

    def is_right(self, data: Mapping[Hashable, Any]) -> bool:
        """Whether the item is a right knee (``side`` in ``{"R", "RIGHT"}``)."""
        side = data.get(self.side_key) or self.default_side
        return normalise_side(side) == "R"

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        flip = self.is_right(d)
        for key in self.key_iterator(d):
            img = d[key]
            if flip:
                img = self.flipper(img)
            if isinstance(img, MetaTensor):
                img.meta[FLIP_META_KEY] = flip
            self.push_transform(img, extra_info={"flipped": flip})
            d[key] = img
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d[key])
            img = d[key]
            if info["extra_info"]["flipped"]:
                img = self.flipper.inverse(img)
            if isinstance(img, MetaTensor):
                img.meta[FLIP_META_KEY] = False
            d[key] = img
        return d


def normalise_side(side: Any) -> str:
    """``"R"`` / ``"L"`` from ``"R"``, ``"right"``, ``"RIGHT"``, ``"L"``, ... ; raises on anything else."""
    s = str(side).strip().upper()
    if s in ("R", "RIGHT"):
        return "R"
    if s in ("L", "LEFT"):
        return "L"
    raise ValueError(f"knee side must be 'R' or 'L', got {side!r}")

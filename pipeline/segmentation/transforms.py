"""DESS loading / orientation transforms: canonical sagittal PIR orientation and left-knee convention.

Canonical array layout (after :func:`canonical_transforms`), channel first ``(C, I, J, K)``:

* ``I`` (spatial axis 0) points **posterior**,
* ``J`` (spatial axis 1) points **inferior**,
* ``K`` (spatial axis 2) is the medial-lateral axis. Before the flip it points to the **patient's right**;
  after :class:`FlipToLeftKneed` every knee is in LEFT-knee convention, i.e. ``K`` runs lateral -> medial
  for left knees and (mirrored) right knees alike.

MONAI / nibabel axis codes name the direction each axis points TO in world (RAS) terms, so the
canonical code string is ``"PIR"`` (:data:`CANONICAL_AXCODES`). That is the same as the DICOM
"PIR" of the UNC reference (i -> posterior, j -> inferior, k -> patient's right); ITK's orientation
enums (e.g. ``ITK_COORDINATE_ORIENTATION_RAI``) name the direction an axis comes FROM and would spell
it differently. The synthetic cohort stores DESS volumes already in this layout, so the orientation
step is the identity on it (tests check this on a volume re-stored in RAS).

Mirroring keeps the MetaTensor affine truthful: MONAI's ``Flip`` updates the affine so that every voxel
still maps to its true world position (a flipped right knee's ``K`` axis therefore reads "L" in its
affine). The flip is recorded twice: in ``applied_operations`` (so :class:`monai.transforms.Invertd`
undoes it) and as ``meta["knee_flipped"]`` (a plain bool for humans and downstream code).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, InvertibleTransform, MapTransform, Orientationd

#: MONAI ``Orientationd`` axis codes of the canonical layout (i -> P, j -> I, k -> patient's R).
CANONICAL_AXCODES = "PIR"
#: Spatial axis (0-based, channel excluded) of the medial-lateral direction in the canonical layout.
ML_AXIS = 2
#: Meta-data key recording whether the volume was mirrored to left-knee convention.
FLIP_META_KEY = "knee_flipped"
#: RAS labels, passed explicitly so Orientation does not depend on a MetaTensor "space" default.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class FlipToLeftKneed(MapTransform, InvertibleTransform):
    """Mirror RIGHT knees along the medial-lateral axis so that every knee is in left-knee convention.

    Applies :class:`monai.transforms.Flip` on ``spatial_axis`` (default :data:`ML_AXIS`, valid after
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

    def __init__(self, keys: KeysCollection, side_key: str = "side", spatial_axis: int = ML_AXIS,
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


def canonical_transforms(keys: Sequence[str] = ("image", "label"), side_key: str = "side",
                         default_side: str = "L", allow_missing_keys: bool = True) -> list:
    """``[Orientationd("PIR"), FlipToLeftKneed]`` for channel-first loaded volumes (see module doc)."""
    return [
        Orientationd(keys=keys, axcodes=CANONICAL_AXCODES, labels=RAS_LABELS, allow_missing_keys=allow_missing_keys),
        FlipToLeftKneed(keys=keys, side_key=side_key, default_side=default_side,
                        allow_missing_keys=allow_missing_keys),
    ]

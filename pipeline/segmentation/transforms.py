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

from collections.abc import Sequence

from monai.transforms import Orientationd

from transforms.knee_side import FLIP_META_KEY, FlipToLeftKneed, normalise_side

__all__ = ["CANONICAL_AXCODES", "FLIP_META_KEY", "FlipToLeftKneed", "ML_AXIS", "RAS_LABELS", "canonical_transforms",
           "normalise_side"]

#: MONAI ``Orientationd`` axis codes of the canonical layout (i -> P, j -> I, k -> patient's R).
CANONICAL_AXCODES = "PIR"
#: Spatial axis (0-based, channel excluded) of the medial-lateral direction in the canonical layout.
ML_AXIS = 2
#: RAS labels, passed explicitly so Orientation does not depend on a MetaTensor "space" default.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def canonical_transforms(keys: Sequence[str] = ("image", "label"), side_key: str = "side",
                         default_side: str = "L", allow_missing_keys: bool = True) -> list:
    """``[Orientationd("PIR"), FlipToLeftKneed]`` for channel-first loaded volumes (see module doc)."""
    return [
        Orientationd(keys=keys, axcodes=CANONICAL_AXCODES, labels=RAS_LABELS, allow_missing_keys=allow_missing_keys),
        FlipToLeftKneed(keys=keys, side_key=side_key, spatial_axis=ML_AXIS, default_side=default_side,
                        allow_missing_keys=allow_missing_keys),
    ]

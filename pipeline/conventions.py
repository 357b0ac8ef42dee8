"""Conventions shared by every module. Keep them identical everywhere; import, never re-type.

Coordinates
-----------
* World coordinates are DICOM patient coordinates **LPS** in millimetres: +x towards the patient's left,
  +y posterior, +z superior. NIfTI files store the equivalent RAS affine.
* Radiograph pixel coordinates are ``(x, y) = (column, row)`` of the ORIGINAL image, float, pixels.
  A bilateral PA radiograph is displayed with the patient's RIGHT knee on the image's LEFT half.
* Images inside the pipeline are channel-first MetaTensors; spacing (mm) lives in the metadata.

Sides, visits, subjects
-----------------------
* Sides are ``"R"`` / ``"L"``. Visits are integer months. Subject ids are strings.
* Splits are by subject, never by knee or visit.
"""

from __future__ import annotations

import re
from typing import Optional

SIDES: tuple[str, ...] = ("R", "L")
SIDE_NAMES: dict[str, str] = {"R": "RIGHT", "L": "LEFT"}

#: Protocol visits in months (OAI-like).
VISITS: tuple[int, ...] = (0, 12, 24, 36, 48, 72, 96)


def visit_folder(month: int) -> str:
    """Folder name of a visit, OAI/MRIS style: ``0 -> "00_MONTH"``, ``96 -> "96_MONTH"``."""
    return f"{int(month):02d}_MONTH"


#: DESS label table (voxel labels in ``labels.nii.gz``).
DESS_LABELS: dict[int, str] = {
    0: "background",
    1: "femur",
    2: "femoral_cartilage",
    3: "tibia",
    4: "tibial_cartilage",
}
LABEL_FEMUR, LABEL_FC, LABEL_TIBIA, LABEL_TC = 1, 2, 3, 4

#: DXA label table (2D label maps).
DXA_LABELS: dict[int, str] = {0: "background", 1: "femur", 2: "tibia", 3: "fibula"}

# KNEEL landmark order: 16 points, tibial 0-8 then femoral 9-15, each group ordered left -> right in
# the ORIGINAL image. The joint centre is tibial index 4.
N_LANDMARKS = 16
TIBIAL_IDX: tuple[int, ...] = tuple(range(0, 9))
FEMORAL_IDX: tuple[int, ...] = tuple(range(9, 16))
JOINT_CENTRE_IDX = 4
#: Index permutation under a horizontal flip: landmark i of the flipped image is landmark
#: ``FLIP_PERMUTATION[i]`` of the original (tibial i -> 8 - i, femoral 9 + j -> 15 - j).
FLIP_PERMUTATION: tuple[int, ...] = tuple([8 - i for i in range(9)] + [24 - i for i in range(9, 16)])

#: MRIS ROI side length in millimetres.
ROI_MM = 140.0
#: Thickness maps are divided by this (mm) before entering a network (about the 95th percentile).
THICKNESS_SCALE_MM = 3.0
#: Keys of the two thickness maps.
MAP_KEYS: tuple[str, ...] = ("fc", "tc")

#: KLG buckets used in the MRIS tables (0 and 1 merged).
KLG_BUCKETS: tuple[tuple[int, ...], ...] = ((0, 1), (2,), (3,), (4,))


def klg_bucket(klg: int) -> str:
    """Name of the KLG bucket of ``klg``: ``"0-1"``, ``"2"``, ``"3"`` or ``"4"``."""
    k = int(klg)
    if k < 0 or k > 4:
        raise ValueError(f"KLG must be in 0..4, got {klg}")
    return "0-1" if k <= 1 else str(k)


_SIDE_WORD = re.compile(r"(?:^|[^A-Za-z])(RIGHT|LEFT)(?:[^A-Za-z]|$)", re.IGNORECASE)
_SIDE_LETTER = re.compile(r"(?:^|[^A-Za-z0-9])([RL])(?:[^A-Za-z0-9]|$)", re.IGNORECASE)


def side_from_name(text: str, short_tokens: bool = False) -> Optional[str]:
    """``"R"`` / ``"L"`` from a ``RIGHT`` / ``LEFT`` token in a path or name (last match wins), else, with
    ``short_tokens``, from a lone ``R`` / ``L`` token (``9001_R_00``, ``R_knee``); ``None`` if neither."""
    hits = _SIDE_WORD.findall(str(text))
    if hits:
        return "R" if hits[-1].upper() == "RIGHT" else "L"
    if short_tokens:
        letters = _SIDE_LETTER.findall(str(text))
        if letters:
            return letters[-1].upper()
    return None

"""Plausibility checks of the thickness bundle: one validator for label volumes, one for map results.

* :func:`validate_label_volume` (input): a 3D volume (trailing size-1 axes are dropped), every value finite
  and an integer of the DESS label table (0 background, 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial
  cartilage), and an affine whose voxel sizes lie in :data:`VOXEL_MM_RANGE` (0.1-2 mm: knee MR is acquired at
  about 0.3-1.5 mm; 100 mm "voxels" mean a header in cm or m, or a wrong file). A volume that fails raises
  :class:`ImplausibleLabelsError`; the thickness bundle records that knee as ``failed``.
* :func:`check_map_result` (output): thickness values within :data:`THICKNESS_RANGE_MM` (0-8 mm: adult knee
  cartilage is at most about 6 mm thick) and a coverage of each footprint of at least :data:`COVERAGE_FLOOR`;
  it returns the problems (empty when plausible); the bundle writes the maps but records the knee as flagged
  (status ``low_confidence`` of :mod:`pipeline.io.results`), never ``ok``.

Every message says what was wrong and what a user can do about it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["COVERAGE_FLOOR", "DESS_LABELS", "ImplausibleLabelsError", "THICKNESS_RANGE_MM", "VOXEL_MM_RANGE",
           "check_map_result", "validate_label_volume"]

#: The DESS label table (README "Label tables").
DESS_LABELS = {0: "background", 1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage"}
#: Accepted voxel size (mm) along every axis of a label volume.
VOXEL_MM_RANGE = (0.1, 2.0)
#: Plausible cartilage thickness (mm) in a map.
THICKNESS_RANGE_MM = (0.0, 8.0)
#: Smallest plausible fraction of a map's footprint with measured cartilage.
COVERAGE_FLOOR = 0.5


class ImplausibleLabelsError(ValueError):
    """A label volume is not a usable DESS label volume; the message says why and what to do."""


def validate_label_volume(data: np.ndarray, affine: np.ndarray, name: str = "labels") -> np.ndarray:
    """Check a label volume read from ``name`` and return it as ``int16``; raises
    :class:`ImplausibleLabelsError` with the reason otherwise (see the module docstring)."""
    data = np.asanyarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImplausibleLabelsError(f"{name}: expected a 3D label volume, got shape {data.shape}; pass the DESS "
                                     f"segmentation volume (one label per voxel)")
    if min(data.shape) < 2:
        raise ImplausibleLabelsError(f"{name}: a {data.shape} volume is too thin to hold a knee")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ImplausibleLabelsError(f"{name}: voxel type {data.dtype} is not a label type (integers 0-4)")
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            raise ImplausibleLabelsError(
                f"{name}: {int(bad.sum())} of {data.size} voxels are NaN or infinite; a label volume holds only "
                f"the integers 0-4; re-export the segmentation (a damaged or probability file?)")
        frac = np.abs(data - np.rint(data)) > 1e-3
        if frac.any():
            raise ImplausibleLabelsError(
                f"{name}: {int(frac.sum())} voxels hold non-integer values (e.g. {float(data[frac][0]):g}); this "
                f"looks like an image or probability map, not labels 0-4; pass the label volume")
    values = np.unique(np.rint(data).astype(np.int64)) if data.size else np.array([], np.int64)
    unknown = [int(v) for v in values if int(v) not in DESS_LABELS]
    if unknown:
        raise ImplausibleLabelsError(
            f"{name}: labels {unknown[:8]} are not in the DESS table {DESS_LABELS}; map your labels onto it "
            f"(0 background, 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial cartilage)")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ImplausibleLabelsError(f"{name}: the file's affine (voxel-to-world matrix) is missing or not finite")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = VOXEL_MM_RANGE
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12 or not ((spacing >= lo) & (spacing <= hi)).all():
        raise ImplausibleLabelsError(
            f"{name}: voxel size {tuple(round(float(s), 4) for s in spacing)} mm is outside the plausible "
            f"{lo}-{hi} mm of knee MR (a header in cm or m, or a wrong file?); fix the file's voxel size / affine")
    return np.rint(data).astype(np.int16)


def check_map_result(maps: Mapping[str, np.ndarray], coverage: Mapping[str, float]) -> list[str]:
    """Problems of a knee's thickness maps (``{"fc": 2D mm, "tc": 2D mm}``) and their ``coverage`` (fraction
    of the footprint measured); empty when plausible."""
    lo, hi = THICKNESS_RANGE_MM
    problems = []
    for kind, m in maps.items():
        a = np.asarray(m, dtype=float)
        vals = a[np.isfinite(a)]
        if vals.size == 0:
            problems.append(f"{kind.upper()} map is empty")
            continue
        if vals.min() < lo or vals.max() > hi:
            problems.append(f"{kind.upper()} thickness {vals.min():.2f}-{vals.max():.2f} mm is outside the "
                            f"plausible {lo:g}-{hi:g} mm")
        if np.isinf(a).any():
            problems.append(f"{kind.upper()} map holds infinite values")
    for kind, c in coverage.items():
        if not np.isfinite(c) or c < COVERAGE_FLOOR:
            problems.append(f"{kind.upper()} coverage {c:.2f} is below {COVERAGE_FLOOR:g} (most of the "
                            f"footprint without measured cartilage)")
    if problems:
        problems.append("check the segmentation and the voxel size of this knee before using its maps")
    return problems

"""Plausibility checks of inputs, one per input kind, and the real reason of a per-item error.

Every inference bundle runs its inputs through these before it trusts them, so garbage becomes a ``failed`` or
flagged (``low_confidence``) row with a reason, never an ``ok`` row (issue 12, item 3).

* :func:`describe_exception`: ``"Type: first line"`` of the ROOT cause of an exception (MONAI wraps every
  transform error in ``RuntimeError("applying transform <...>")``; the wrapper is dropped).
* :func:`radiograph_problems`: a decoded radiograph (``(H, W)`` pixels + its header record from
  :func:`pipeline.io.dicom.read_radiograph`) -> ``(errors, flags)``. Errors (the item fails): pixel spacing
  outside :data:`RADIOGRAPH_SPACING_MM` (0.05-2 mm), a constant image
  (blank: nothing to see), a joint centre outside the image. Flags (``low_confidence``): a modality that is not
  a projection radiograph (:data:`RADIOGRAPH_MODALITIES`).
* :func:`dess_volume_problems`: a DESS volume file (NIfTI) or array -> errors: unreadable to the end (truncated),
  not 3D, non-finite values, a constant volume, voxel size outside :data:`DESS_SPACING_MM` (0.1-5 mm).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DESS_SPACING_MM", "RADIOGRAPH_MODALITIES", "RADIOGRAPH_SPACING_MM", "describe_exception",
           "dess_volume_problems", "radiograph_problems", "root_cause"]

#: Plausible pixel spacing (mm) of a knee radiograph: detector pixels are 0.1-0.2 mm; up to 2 mm as the cohort
#: generator allows (`python -m pipeline cohort --xray-spacing`, its tiny cohorts use 1 mm).
RADIOGRAPH_SPACING_MM = (0.05, 2.0)
#: Modalities of projection radiographs ("" = not given; OT = secondary capture of a radiograph).
RADIOGRAPH_MODALITIES = ("DX", "CR", "RG", "DR", "OT", "")
#: Plausible voxel size (mm) of a knee DESS volume, every axis.
DESS_SPACING_MM = (0.1, 5.0)

_MONAI_WRAPPER = "applying transform"


def root_cause(exc: BaseException) -> BaseException:
    """The original exception under MONAI's ``applying transform`` wrappers (``__cause__`` chain)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def describe_exception(exc: BaseException, max_chars: int = 300) -> str:
    """One line ``"Type: first line of message"`` of the root cause (:func:`root_cause`), at most ``max_chars``
    characters; never MONAI's ``applying transform <...>`` wrapper."""
    root = root_cause(exc)
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    if lines and _MONAI_WRAPPER in lines[0] and len(lines) > 1:  # a wrapper without __cause__: its message is last
        lines = lines[1:]
    text = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return " ".join(text.split())[:max_chars]


def radiograph_problems(image: Any, meta: Mapping[str, Any], centre_xy: Sequence[float] | None = None,
                        spacing_mm: Sequence[float] = RADIOGRAPH_SPACING_MM) -> tuple[list[str], list[str]]:
    """``(errors, flags)`` of a decoded radiograph (module docstring). ``image``: ``(H, W)`` or ``(1, H, W)``;
    ``meta``: its header record (``spacing_mm``, ``spacing_known``, ``Modality``); ``centre_xy``: a joint centre
    ``(x, y)`` in its pixels, checked to lie inside."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    errors: list[str] = []
    flags: list[str] = []
    lo, hi = spacing_mm
    if meta.get("spacing_known", True):
        sp = [float(s) for s in meta.get("spacing_mm", [])]
        if len(sp) != 2 or not all(np.isfinite(sp)) or not all(lo <= s <= hi for s in sp):
            errors.append(f"pixel spacing {sp} mm is outside the plausible range {lo}-{hi} mm of a knee radiograph "
                          f"({meta.get('spacing_source') or 'pixel spacing'}); check the file's ImagerPixelSpacing / "
                          "PixelSpacing")
    if arr.size == 0:
        errors.append("the image is empty (0 pixels)")
    else:
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            errors.append("the image has no finite pixel value")
        elif float(finite.max()) == float(finite.min()):
            errors.append(f"the image is blank (every pixel is {float(finite.min()):g}): nothing to analyse")
    if centre_xy is not None and arr.ndim == 2:
        x, y = (float(v) for v in centre_xy)
        h, w = arr.shape
        if not (np.isfinite([x, y]).all() and -0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            errors.append(f"joint centre ({x:g}, {y:g}) lies outside the {w} x {h} px image; check the landmarks")
    modality = str(meta.get("Modality", "")).strip().upper()
    if modality not in RADIOGRAPH_MODALITIES:
        flags.append(f"Modality '{modality}' is not a projection radiograph (expected DX or CR)")
    return errors, flags


def dess_volume_problems(source: Any, affine: Any = None, spacing_mm: Sequence[float] = DESS_SPACING_MM
                         ) -> list[str]:
    """Errors of a DESS volume: ``source`` a NIfTI path (read to the end here; a DICOM series folder is not
    checked: []) or an array (with ``affine`` for the voxel size). Empty list = plausible."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir() or not p.name.lower().endswith((".nii", ".nii.gz")):
            return []
        import nibabel as nib

        try:
            img = nib.load(str(p))
        except Exception as e:  # noqa: BLE001 - any failure is the reason
            return [f"not a readable NIfTI file ({describe_exception(e)})"]
        shape = tuple(int(s) for s in img.shape)
        if len([s for s in shape if s > 1]) < 3 or len(shape) < 3:
            return [f"not a 3D volume (shape {shape}); DESS segmentation needs a 3D MR volume"]
        try:
            data = np.asarray(img.dataobj)
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data
            return [f"cannot read the volume to the end (truncated or corrupt file: {describe_exception(e)})"]
        affine = img.affine
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    shape = arr.shape
    spatial = [s for s in shape if s > 1]
    if len(spatial) < 3:
        return [f"not a 3D volume (shape {tuple(shape)}); DESS segmentation needs a 3D MR volume"]
    errors = []
    finite = np.isfinite(arr)
    if not finite.all():
        n = int((~finite).sum())
        errors.append(f"{n} of {arr.size} voxels are NaN or infinite; the volume is corrupt")
    vals = arr[finite]
    if vals.size and float(vals.max()) == float(vals.min()):
        errors.append(f"the volume is blank (every voxel is {float(vals.min()):g})")
    if affine is not None:
        a = np.asarray(affine, dtype=float)
        vox = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
        lo, hi = spacing_mm
        if not np.isfinite(vox).all() or (vox < lo).any() or (vox > hi).any():
            errors.append(f"voxel size {np.round(vox, 3).tolist()} mm is outside the plausible range {lo}-{hi} mm "
                          "of a knee DESS volume; check the file's header")
    return errors

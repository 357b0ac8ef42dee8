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
  not 3D, non-finite values, a constant volume, voxel size outside :data:`DESS_SPACING_MM` (0.1-5 mm), orientation
  unknown (a NIfTI header with qform_code = sform_code = 0, an affine whose 3 x 3 part is singular or not finite;
  for a DICOM series folder: a slice without a usable ImageOrientationPatient, :func:`series_orientation_problems`).
* :func:`dess_series_problems`: a DICOM series folder (headers only) -> errors: a file that is not readable
  DICOM, several series in one folder, a single slice (a 2D image), slices of differing orientation or size,
  a slice normal that is not along the patient's left-right axis (not sagittal, :data:`SAGITTAL_MAX_TILT_DEG`),
  missing slices (a gap in the ImagePositionPatient spacing, :data:`SLICE_SPACING_TOLERANCE`), duplicates.
* :func:`sagittal_problem`: the one home of the "is the slice normal left-right" rule (DICOM and NIfTI).
* :func:`dess_problems`: any DESS input (a NIfTI file or a DICOM series folder) -> errors that each name the
  file, say what is wrong and what to do; the sagittal-DESS inputs of ``progression_mr`` go through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DESS_SPACING_MM", "RADIOGRAPH_MODALITIES", "RADIOGRAPH_SPACING_MM", "SAGITTAL_MAX_TILT_DEG",
           "SLICE_SPACING_TOLERANCE", "describe_exception", "dess_problems", "dess_series_problems",
           "dess_volume_problems", "nifti_slice_axis", "orientation_problem", "radiograph_problems", "root_cause",
           "sagittal_problem", "series_orientation_problems"]

#: Plausible pixel spacing (mm) of a knee radiograph: detector pixels are 0.1-0.2 mm; up to 2 mm as the cohort
#: generator allows (`python -m pipeline cohort --xray-spacing`, its tiny cohorts use 1 mm).
RADIOGRAPH_SPACING_MM = (0.05, 2.0)
#: Modalities of projection radiographs ("" = not given; OT = secondary capture of a radiograph).
RADIOGRAPH_MODALITIES = ("DX", "CR", "RG", "DR", "OT", "")
#: Plausible voxel size (mm) of a knee DESS volume, every axis.
DESS_SPACING_MM = (0.1, 5.0)
#: Largest angle (degrees) between the slice normal of a sagittal series and the patient's left-right axis
#: (sagittal knee series are often tilted 10-20 degrees to follow the femoral condyles; 45 would be as much
#: coronal or axial as sagittal).
SAGITTAL_MAX_TILT_DEG = 30.0
#: Largest relative deviation of one slice step from the series' median step (ImagePositionPatient along the
#: slice normal); a larger step is a gap (missing slices), a smaller one a duplicate or an irregular series.
SLICE_SPACING_TOLERANCE = 0.1
#: An affine's 3 x 3 part counts as singular when ``|det| <= SINGULAR_RTOL * product of its column norms`` (the
#: voxel axes are (nearly) coplanar: sin of the smallest angle ~ 1e-6), whatever the voxel size.
SINGULAR_RTOL = 1e-6
_REEXPORT_HINT = "re-export it with its orientation, e.g. from the DICOM series with dcm2niix"

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


def orientation_problem(affine: Any, header: Any = None) -> str:
    """``""`` when the orientation of a volume is known, else why not (with what to do). Unknown: a NIfTI
    ``header`` whose ``qform_code`` and ``sform_code`` are both 0 (nibabel then makes up an affine from the
    voxel sizes alone), or an ``affine`` (4 x 4 or 3 x 3, voxel -> world mm) whose 3 x 3 part is not finite or
    singular (:data:`SINGULAR_RTOL`)."""
    if header is not None:
        try:
            codes = int(header["qform_code"]), int(header["sform_code"])
        except (KeyError, TypeError, ValueError):  # not a NIfTI header: nothing to say here
            codes = None
        if codes == (0, 0):
            return ("orientation unknown: the file's header has no qform/sform (qform_code and sform_code are 0); "
                    + _REEXPORT_HINT)
    if affine is None:
        return ""
    a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=float)
    m = a[:3, :3] if a.ndim == 2 and a.shape[0] >= 3 and a.shape[1] >= 3 else None
    if m is None:
        return f"orientation unknown: the affine has shape {a.shape} (expected 4 x 4); {_REEXPORT_HINT}"
    if not np.isfinite(m).all():
        return f"orientation unknown: the affine holds NaN or infinite values (a degenerate affine); {_REEXPORT_HINT}"
    if abs(float(np.linalg.det(m))) <= SINGULAR_RTOL * float(np.prod(np.linalg.norm(m, axis=0))):
        return ("orientation unknown: the affine's 3 x 3 part is singular (a degenerate affine: its voxel axes are "
                f"coplanar or zero); {_REEXPORT_HINT}")
    return ""


def series_orientation_problems(folder: str | os.PathLike) -> list[str]:
    """Errors of a DICOM series folder's orientation (headers only): an image file (one with Rows) without
    ImageOrientationPatient, or whose 6 values are not finite / give zero or parallel row and column
    directions. Files pydicom cannot read and non-image files are left to the loader; [] = known."""
    import pydicom

    from pipeline.io.dicom import quiet_pydicom

    root = Path(folder)
    hint = "export the series again with its orientation (ImageOrientationPatient) from the scanner or PACS"
    with quiet_pydicom():
        for f in _dicom_files(root):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM / unreadable: the loader reports it
                continue
            if "Rows" not in ds:
                continue
            if "ImageOrientationPatient" not in ds:
                return [f"orientation unknown: {f} has no ImageOrientationPatient; {hint}"]
            try:
                iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
            except (TypeError, ValueError):
                iop = np.full(1, np.nan)
            ok = iop.shape == (6,) and np.isfinite(iop).all()
            if ok:
                r, c = iop[:3], iop[3:]
                nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
                ok = nr > 0 and nc > 0 and float(np.linalg.norm(np.cross(r, c))) > 1e-3 * nr * nc
            if not ok:
                return [f"orientation unknown: {f} has an unusable ImageOrientationPatient "
                        f"({list(ds.ImageOrientationPatient)}: zero, parallel or not 6 finite numbers); {hint}"]
    return []


def dess_volume_problems(source: Any, affine: Any = None, spacing_mm: Sequence[float] = DESS_SPACING_MM,
                         needed_for: str = "DESS segmentation") -> list[str]:
    """Errors of a DESS volume: ``source`` a NIfTI path (read to the end here), a DICOM series folder (only its
    orientation is checked here, headers only: :func:`series_orientation_problems`) or an array (with ``affine``
    for the voxel size and orientation). Other files: []. Empty list = plausible. ``needed_for`` names the use in
    the "not a 3D volume" message."""
    data = source
    header = None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return series_orientation_problems(p)
        if not p.name.lower().endswith((".nii", ".nii.gz")):
            return []
        import nibabel as nib

        try:
            img = nib.load(str(p))
        except Exception as e:  # noqa: BLE001 - any failure is the reason
            return [f"not a readable NIfTI file ({describe_exception(e)})"]
        shape = tuple(int(s) for s in img.shape)
        if len([s for s in shape if s > 1]) < 3 or len(shape) < 3:
            return [f"not a 3D volume (shape {shape}); {needed_for} needs a 3D MR volume"]
        try:
            data = np.asarray(img.dataobj)
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data
            return [f"cannot read the volume to the end (truncated or corrupt file: {describe_exception(e)})"]
        affine, header = img.affine, img.header
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    shape = arr.shape
    spatial = [s for s in shape if s > 1]
    if len(spatial) < 3:
        return [f"not a 3D volume (shape {tuple(shape)}); {needed_for} needs a 3D MR volume"]
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
    orientation = orientation_problem(affine, header)
    if orientation:
        errors.append(orientation)
    return errors


# --------------------------------------------------------------------------------------- sagittal DESS inputs
_AXIS_NAMES = ("left-right", "anterior-posterior", "superior-inferior")
_PLANE_OF_NORMAL = ("sagittal", "coronal", "axial")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SERIES_HINT = ("export the complete sagittal DESS series again (every slice file) into its own folder")


def sagittal_problem(normal: Sequence[float], max_tilt_deg: float = SAGITTAL_MAX_TILT_DEG) -> str:
    """``""`` when the slice normal (3 world components, LPS or RAS: only magnitudes are used; any length) lies
    within ``max_tilt_deg`` of the patient's left-right axis, else why the series is not sagittal."""
    n = np.asarray(normal, dtype=float).reshape(3)
    norm = float(np.linalg.norm(n))
    if not np.isfinite(norm) or norm == 0.0:
        return "the slice direction is undefined (zero or non-finite orientation vectors)"
    n = np.abs(n) / norm
    tilt = float(np.degrees(np.arccos(np.clip(n[0], -1.0, 1.0))))
    if tilt <= max_tilt_deg:
        return ""
    dominant = int(np.argmax(n))
    plane = _PLANE_OF_NORMAL[dominant] if n[dominant] >= np.cos(np.radians(max_tilt_deg)) else "oblique"
    return (f"not a sagittal series: the slice normal is {tilt:.0f} degrees from the patient's left-right axis "
            f"(mostly {_AXIS_NAMES[dominant]}: a {plane} series; at most {max_tilt_deg:g} degrees allowed); "
            "give the sagittal DESS series (slices stacked medial -> lateral)")


def nifti_slice_axis(header: Any, zooms: Sequence[float]) -> int:
    """Array axis (0-2) of a NIfTI volume's acquisition slices: the header's ``dim_info`` slice axis when set,
    else the one axis whose voxel size (mm, ``zooms``) is at least 1.2 x both others (thick slices), else axis 2
    (DICOM -> NIfTI converters keep the slices along the third axis)."""
    try:
        _, _, slice_dim = header.get_dim_info()
    except Exception:  # noqa: BLE001 - no dim_info (e.g. not a NIfTI-1 header)
        slice_dim = None
    if slice_dim is not None and 0 <= int(slice_dim) < 3:
        return int(slice_dim)
    z = np.asarray(list(zooms)[:3], dtype=float)
    k = int(np.argmax(z))
    others = np.delete(z, k)
    if len(z) == 3 and (z[k] >= 1.2 * others).all():
        return k
    return 2


def _dicom_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"]


def dess_series_problems(folder: str | os.PathLike, max_tilt_deg: float = SAGITTAL_MAX_TILT_DEG,
                         tolerance: float = SLICE_SPACING_TOLERANCE) -> list[str]:
    """Errors of a DICOM series folder (one file per slice; headers only are read). Empty list = plausible.

    Checks, in order: every file is readable DICOM with ImageOrientationPatient / ImagePositionPatient (the
    first unreadable file is named), one SeriesInstanceUID, at least 2 slices (else a 2D image), one
    orientation and one Rows x Columns, a sagittal slice normal (:func:`sagittal_problem`), and slice steps
    along the normal within ``tolerance`` (relative) of their median: larger steps are gaps (``n`` missing
    slices between two named files), near-zero steps duplicates, anything else an irregular series.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from pipeline.io.dicom import quiet_pydicom

    root = Path(folder)
    if not root.is_dir():
        return [f"{root}: not a folder of DICOM files"]
    files = _dicom_files(root)
    if not files:
        return [f"{root}: the folder holds no files; a DICOM series folder holds one file per slice"]
    headers = []
    with quiet_pydicom():
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except InvalidDicomError:
                return [f"{f}: not a DICOM file (no DICM header); remove it from the series folder or "
                        f"{_SERIES_HINT}"]
            except Exception as e:  # noqa: BLE001 - truncated header, bad VR, unreadable file
                return [f"{f}: not a readable DICOM file ({describe_exception(e)}); {_SERIES_HINT}"]
            if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
                return [f"{f}: no ImageOrientationPatient / ImagePositionPatient (not a cross-sectional MR "
                        f"slice); {_SERIES_HINT}"]
            headers.append((f, ds))
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers}
    if len(uids) > 1:
        return [f"{root}: {len(uids)} series (SeriesInstanceUID) in one folder; put each series in its own folder"]
    frames = int(getattr(headers[0][1], "NumberOfFrames", 1) or 1)
    if len(headers) < 2 and frames <= 1:
        return [f"{root}: a 2D image (one slice, {headers[0][0].name}), not a 3D DESS series; give the folder of "
                "the whole sagittal series"]
    if len(headers) < 2:
        return [f"{headers[0][0]}: a multi-frame DICOM file; give the series as one file per slice"]
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    sizes = {(int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))) for _, ds in headers}
    errors: list[str] = []
    if iops.shape[1] != 6 or np.abs(iops - iops[0]).max() > 1e-3:
        errors.append(f"{root}: the slices have different orientations (ImageOrientationPatient); {_SERIES_HINT}")
    if len(sizes) > 1:
        errors.append(f"{root}: the slices have different sizes (Rows x Columns {sorted(sizes)}); {_SERIES_HINT}")
    if errors:
        return errors
    normal = np.cross(iops[0, :3], iops[0, 3:])
    sag = sagittal_problem(normal, max_tilt_deg)
    if sag:
        errors.append(f"{root}: {sag}")
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers]) @ normal
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    step = float(np.median(steps))
    names = [headers[i][0].name for i in order]
    if step <= 1e-6:
        errors.append(f"{root}: most slices share one position along the slice normal (duplicates); "
                      f"{_SERIES_HINT}")
        return errors
    for i, d in enumerate(steps):
        if abs(d - step) <= tolerance * step + 1e-3:
            continue
        where = f"between {names[i]} and {names[i + 1]} ({pos[order][i]:.2f} and {pos[order][i + 1]:.2f} mm)"
        ratio = d / step
        if d <= 1e-3 + tolerance * step:
            errors.append(f"{root}: two slices at one position {where}: a duplicate slice; {_SERIES_HINT}")
        elif abs(ratio - round(ratio)) <= tolerance and round(ratio) >= 2:
            errors.append(f"{root}: {int(round(ratio)) - 1} missing slice(s) {where}: a gap of {d:.2f} mm where "
                          f"the slice spacing is {step:.2f} mm; {_SERIES_HINT}")
        else:
            errors.append(f"{root}: irregular slice spacing {where}: a step of {d:.2f} mm where the spacing is "
                          f"{step:.2f} mm; {_SERIES_HINT}")
        break  # the first problem says what to do; the rest would repeat it
    return errors


def dess_problems(source: str | os.PathLike, max_tilt_deg: float = SAGITTAL_MAX_TILT_DEG,
                  needed_for: str = "the progression model") -> list[str]:
    """Errors of one sagittal DESS input, each naming the file and what to do; empty list = plausible.

    ``source``: a DICOM series folder (:func:`dess_series_problems`) or a NIfTI file (:func:`dess_volume_problems`
    -- readable to the end, 3D, finite, not blank, voxel size -- then the slice axis of :func:`nifti_slice_axis`
    must be sagittal, :func:`sagittal_problem`). Anything else (a missing path, another file type) is an error.
    """
    p = Path(source)
    if not p.exists():
        return [f"{p}: not found"]
    if p.is_dir():
        return dess_series_problems(p, max_tilt_deg)
    if not p.name.lower().endswith(_NIFTI_SUFFIXES):
        return [f"{p}: not a DESS volume (expected a NIfTI file .nii / .nii.gz or a folder holding one DICOM "
                "series, one file per slice)"]
    errors = dess_volume_problems(p, needed_for=needed_for)
    if errors:
        what = "convert the series again (e.g. dcm2niix) or give the DICOM series folder"
        return [f"{p}: {e}; {what}" if e.startswith(("not a readable", "cannot read")) else f"{p}: {e}"
                for e in errors]
    import nibabel as nib

    img = nib.load(str(p))
    axis = nifti_slice_axis(img.header, img.header.get_zooms())
    sag = sagittal_problem(np.asarray(img.affine)[:3, axis], max_tilt_deg)
    return [f"{p}: {sag} (slices along array axis {axis})"] if sag else []

"""Reading knee radiographs from DICOM with pydicom (the core used by ``transforms.LoadKneeRadiograph``).

Array layout
------------
:func:`read_radiograph` returns a float32 array of shape ``(H, W) = (Rows, Columns)``: the same axis
order as pydicom's ``pixel_array`` (axis 0 = row = image y, axis 1 = column = image x). Nothing is
transposed (MONAI's ITK/Pydicom readers return ``(W, H)``; this reader does not).

Values
------
1. Stored values are decoded by pydicom (native little/big endian, deflate, and whichever compressed
   transfer syntaxes pydicom's installed plugins can decode; here: RLE, JPEG baseline and JPEG 2000
   through Pillow). Bits above ``BitsStored`` are discarded (sign-extended when signed).
2. ``MONOCHROME1`` is inverted in the stored-value domain, ``v -> vmax + vmin - v`` with ``[vmin, vmax]``
   the range representable with ``BitsStored`` bits, so bone is bright and the value range is unchanged.
3. ``RescaleSlope`` / ``RescaleIntercept`` are applied (defaults 1 and 0).

Spacing
-------
``spacing_mm = [row spacing, column spacing]`` in mm (the DICOM order: the first value is the distance
between rows, i.e. along axis 0). ``ImagerPixelSpacing`` wins over ``PixelSpacing``. A file with neither
raises :class:`RadiographReadError` unless ``allow_missing_spacing=True``; then the spacing is reported as
``[1.0, 1.0]`` with ``spacing_known=False`` in the metadata.

Errors
------
Every problem with a file is raised as :class:`RadiographReadError` (a ``ValueError``) whose message
names the file and the reason (not DICOM, missing pixel data, unsupported compression, not a 2D
grayscale image, no pixel spacing, corrupt pixel data).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# Metadata keys written by read_radiograph (also used by the transforms).
META_FILENAME = "filename_or_obj"  # MONAI's standard key
META_SPACING = "spacing_mm"  # [row spacing, column spacing] in mm
META_SPACING_KNOWN = "spacing_known"
META_SPACING_SOURCE = "spacing_source"  # "ImagerPixelSpacing" | "PixelSpacing" | "" (unknown)
META_LATERALITY = "laterality"
META_INVERTED = "monochrome1_inverted"

#: Transfer syntaxes that are not compressed (pixel data is stored natively).
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}
_DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ""}


class RadiographReadError(ValueError):
    """A radiograph file could not be read. The message names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read radiograph '{self.path}': {reason}")


def has_dicm_preamble(path: PathLike) -> bool:
    """True if ``path`` is a readable file with the DICOM Part 10 ``DICM`` marker after its 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: PathLike) -> bool:
    """A ``.dcm`` file or any file with the ``DICM`` marker (OAI's extension-less files)."""
    p = Path(path)
    return p.suffix.lower() == ".dcm" or has_dicm_preamble(p)


def series_laterality(folder: PathLike) -> str | None:
    """``"R"`` / ``"L"`` from Laterality (0020,0060), else ImageLaterality (0020,0062), of the first readable
    DICOM file of a series folder (headers only); ``None`` when it holds neither (or no readable file)."""
    import pydicom

    for f in sorted(Path(folder).iterdir()):
        if not (f.is_file() and is_dicom_file(f)):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - an unreadable header: the validators report it; try the next file
            continue
        for kw in ("Laterality", "ImageLaterality"):
            val = str(getattr(ds, kw, "") or "").strip().upper()
            if val in ("R", "L"):
                return val
        return None
    return None


def list_radiographs(folder: PathLike) -> list[Path]:
    """DICOM files directly inside ``folder`` (not recursive), sorted by name.

    A file counts if it carries the ``DICM`` preamble marker, or if its extension is ``.dcm`` /
    ``.dicom`` / ``.dic`` / none (OAI stores the radiograph as ``<visit folder>/001``). ``DICOMDIR``
    index files and hidden files are skipped. Dangling symbolic links and link loops are listed (not skipped),
    so that reading them fails with a row that says so.
    """
    folder = Path(folder)
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        if p.is_symlink() and _link_problem(p):  # dangling link or loop: listed, so that it gets a row with why
            out.append(p)
            continue
        if not p.is_file():
            continue
        if has_dicm_preamble(p) or p.suffix.lower() in _DICOM_EXTENSIONS:
            out.append(p)
    return out


def _link_problem(p: Path) -> str:
    """Why the symbolic link ``p`` cannot be followed ("" when it can)."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop ({p} -> {os.readlink(p)})"
        return f"dangling symbolic link ({p} -> {os.readlink(p)}: target not found)"
    return ""


def resolve_radiograph_path(path: PathLike) -> Path:
    """The file to read for ``path``: ``path`` itself, or the single radiograph file inside a folder."""
    p = Path(path)
    if p.is_symlink() and _link_problem(p):
        raise RadiographReadError(p, _link_problem(p))
    if not p.exists():
        raise RadiographReadError(p, "file not found")
    if p.is_dir():
        files = list_radiographs(p)
        if not files:
            raise RadiographReadError(p, "folder contains no DICOM file")
        if len(files) > 1:
            names = ", ".join(f.name for f in files[:5])
            raise RadiographReadError(
                p,
                f"folder contains {len(files)} DICOM files ({names}{', ...' if len(files) > 5 else ''}); "
                "pass one file, or iterate over pipeline.io.dicom.list_radiographs(folder)",
            )
        return files[0]
    return p


class _QuietTracebacks(logging.Filter):
    """pydicom logs a decoder failure at ERROR with its full traceback before it raises; we catch that exception
    and report it in ONE line (a ``failed`` row naming the file and the reason), so the library's record is
    dropped unless DEBUG is on (``logging.getLogger("pipeline.io.dicom").setLevel(logging.DEBUG)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not logging.getLogger(__name__).isEnabledFor(logging.DEBUG):
            return False
        return True


_QUIET = _QuietTracebacks()


@contextlib.contextmanager
def quiet_pydicom():
    """While a file is read here: pydicom's failure records with tracebacks go only to DEBUG (see above)."""
    import pydicom.pixels  # noqa: F401 - creates the decoder loggers, so that they get the filter
    names = ["pydicom"] + [n for n in list(logging.Logger.manager.loggerDict) if n.startswith("pydicom.")]
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(_QUIET)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(_QUIET)


def _dcmread(path: Path):
    with quiet_pydicom():
        return _dcmread_loud(path)


def _dcmread_loud(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble/file meta: try the raw dataset (valid for old files), checked below
    except Exception as exc:  # truncated header, bad VR, ...
        raise RadiographReadError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            ok = "PixelData" in ds or "Rows" in ds
            looks_dicom = any(k in ds for k in ("SOPClassUID", "Modality", "PatientID", "StudyInstanceUID"))
    except Exception as exc:
        raise RadiographReadError(path, f"not a DICOM file ({type(exc).__name__}: {exc})") from exc
    if not ok:
        if looks_dicom:
            raise RadiographReadError(path, "missing pixel data (DICOM dataset without file meta or image)")
        raise RadiographReadError(path, "not a DICOM file (no DICM header and no image attributes)")
    return ds


def _ensure_transfer_syntax(ds) -> str:
    """Transfer syntax UID of ``ds``; set from the dataset's encoding when the file meta lacks it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    fm = getattr(ds, "file_meta", None)
    if fm is None:
        fm = ds.file_meta = FileMetaDataset()
    ts = fm.get("TransferSyntaxUID")
    if ts is None:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if implicit is None:
            implicit, little = True, True
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        fm.TransferSyntaxUID = ts
    return str(ts)


def _get_float_pair(ds, keyword: str) -> list[float] | None:
    if keyword not in ds:
        return None
    val = ds[keyword].value
    if val is None or val == "":
        return None
    seq = list(val) if isinstance(val, (list, tuple)) or type(val).__name__ == "MultiValue" else [val]
    try:
        vals = [float(v) for v in seq]
    except (TypeError, ValueError):
        return None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(np.isfinite(vals)) or min(vals) <= 0:
        return None
    return vals


def read_spacing(ds) -> tuple[list[float] | None, str]:
    """``([row spacing, column spacing] in mm, tag name)`` from ImagerPixelSpacing, else PixelSpacing.

    Returns ``(None, "")`` when neither tag holds two positive numbers.
    """
    for kw in ("ImagerPixelSpacing", "PixelSpacing"):
        sp = _get_float_pair(ds, kw)
        if sp is not None:
            return sp, kw
    return None, ""


def invalid_spacing(ds) -> str:
    """``"ImagerPixelSpacing = 0\\0"``-like description of spacing tags that are present but not two positive
    finite numbers ("" when none): zero, negative, NaN or unparsable values are not "missing"."""
    bad = []
    for kw in ("ImagerPixelSpacing", "PixelSpacing"):
        if kw in ds and ds[kw].value not in (None, "") and _get_float_pair(ds, kw) is None:
            bad.append(f"{kw} = {_str(ds, kw)}")
    return "; ".join(bad)


def _str(ds, keyword: str) -> str:
    val = ds.get(keyword, "")
    if val is None:
        return ""
    if isinstance(val, (list, tuple)) or type(val).__name__ == "MultiValue":
        return "\\".join(str(v) for v in val)
    return str(val)


def _apply_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Drop the bits above ``bits_stored`` (sign-extend when ``signed``). Idempotent for in-range values."""
    nbits = arr.dtype.itemsize * 8
    if bits_stored <= 0 or bits_stored >= nbits or arr.dtype.kind not in "iu":
        return arr
    mask = (1 << bits_stored) - 1
    a = arr.astype(np.int64) & mask
    if signed:
        sign = 1 << (bits_stored - 1)
        a = (a ^ sign) - sign
    return a


def read_radiograph(path: PathLike, allow_missing_spacing: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a knee radiograph DICOM.

    Args:
        path: a DICOM file (any name, e.g. OAI's extension-less ``001``), or a folder that holds exactly
            one DICOM file.
        allow_missing_spacing: if False (default), a file without ImagerPixelSpacing/PixelSpacing raises
            :class:`RadiographReadError`; if True, spacing is reported as ``[1.0, 1.0]`` with
            ``meta["spacing_known"] = False``.

    Returns:
        ``(image, meta)``: ``image`` is float32 with shape ``(H, W) = (Rows, Columns)`` (pydicom's
        ``pixel_array`` axis order), MONOCHROME1 inverted, BitsStored and rescale applied; ``meta`` holds
        ``filename_or_obj``, ``spacing_mm`` ([row, column] mm), ``spacing_known``, ``spacing_source``,
        ``PatientID``, ``StudyDate``, ``laterality`` (ImageLaterality, else Laterality, else ""),
        ``ViewPosition``, ``Modality``, ``PatientOrientation`` (backslash-joined), ``SOPInstanceUID``,
        ``PhotometricInterpretation``, ``monochrome1_inverted``, ``BitsStored``, ``RescaleSlope``,
        ``RescaleIntercept``, ``TransferSyntaxUID``, ``original_shape`` ([H, W]). No value is None
        (missing strings are ""), so the dict collates in a MONAI DataLoader.

    Raises:
        RadiographReadError: for any unreadable file; the message names the file and the reason.
    """
    p = resolve_radiograph_path(path)
    ds = _dcmread(p)
    try:
        with quiet_pydicom():
            return _decode(p, ds, allow_missing_spacing)
    except RadiographReadError:
        raise
    except Exception as exc:  # malformed attribute values (bad VR, ...) surface lazily in pydicom
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise RadiographReadError(p, f"invalid DICOM attributes ({type(exc).__name__}: {msg})") from exc


def _decode(p: Path, ds, allow_missing_spacing: bool) -> tuple[np.ndarray, dict[str, Any]]:
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        reason = f"float pixel data ({kinds[0]}) is not supported" if kinds else "missing pixel data"
        raise RadiographReadError(p, reason)
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(kw) is None:
            raise RadiographReadError(p, f"missing required attribute {kw}")
    photometric = _str(ds, "PhotometricInterpretation").strip().upper() or "MONOCHROME2"
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RadiographReadError(
            p, f"not a 2D grayscale image (PhotometricInterpretation {photometric}, SamplesPerPixel {spp})"
        )
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames != 1:
        raise RadiographReadError(p, f"not a 2D image ({n_frames} frames)")

    spacing, source = read_spacing(ds)
    if spacing is None and not allow_missing_spacing:
        bad = invalid_spacing(ds)
        if bad:
            raise RadiographReadError(p, f"invalid pixel spacing {bad} (must be two positive, finite numbers in mm)")
        raise RadiographReadError(
            p, "no pixel spacing (neither ImagerPixelSpacing nor PixelSpacing; pass allow_missing_spacing=True)"
        )

    ts = _ensure_transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if ts not in _NATIVE_SYNTAXES:
            from pydicom.uid import UID

            reason = f"unsupported or undecodable compression {UID(ts).name} ({ts}): {msg}"
        else:
            reason = f"corrupt pixel data ({type(exc).__name__}: {msg})"
        raise RadiographReadError(p, reason) from exc
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise RadiographReadError(p, f"not a 2D image (pixel array shape {tuple(raw.shape)})")

    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    if raw.dtype.kind in "iu":
        bits_stored = min(bits_stored, raw.dtype.itemsize * 8)
        vals = _apply_bits_stored(raw, bits_stored, signed).astype(np.float64)
        if signed:
            vmin, vmax = -float(1 << (bits_stored - 1)), float((1 << (bits_stored - 1)) - 1)
        else:
            vmin, vmax = 0.0, float((1 << bits_stored) - 1)
    else:
        vals = raw.astype(np.float64)
        vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
    inverted = photometric == "MONOCHROME1"
    if inverted:
        vals = (vmax + vmin) - vals

    try:
        slope_v, intercept_v = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope = 1.0 if slope_v is None or slope_v == "" else float(slope_v)
        intercept = 0.0 if intercept_v is None or intercept_v == "" else float(intercept_v)
    except (TypeError, ValueError) as exc:
        raise RadiographReadError(p, f"invalid RescaleSlope/RescaleIntercept ({exc})") from exc
    if slope != 1.0 or intercept != 0.0:
        vals = vals * slope + intercept
    image = vals.astype(np.float32)

    laterality = _str(ds, "ImageLaterality") or _str(ds, "Laterality")
    meta: dict[str, Any] = {
        META_FILENAME: str(p),
        META_SPACING: [float(s) for s in (spacing or [1.0, 1.0])],
        META_SPACING_KNOWN: spacing is not None,
        META_SPACING_SOURCE: source,
        "PatientID": _str(ds, "PatientID"),
        "StudyDate": _str(ds, "StudyDate"),
        META_LATERALITY: laterality.strip().upper(),
        "ViewPosition": _str(ds, "ViewPosition"),
        "Modality": _str(ds, "Modality"),
        "PatientOrientation": _str(ds, "PatientOrientation"),
        "SOPInstanceUID": _str(ds, "SOPInstanceUID"),
        "PhotometricInterpretation": photometric,
        META_INVERTED: inverted,
        "BitsStored": bits_stored,
        "RescaleSlope": slope,
        "RescaleIntercept": intercept,
        "TransferSyntaxUID": ts,
        "original_shape": [int(image.shape[0]), int(image.shape[1])],
    }
    return image, meta

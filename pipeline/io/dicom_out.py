"""DICOM outputs of the inference bundles (``--dicom True``), written with highdicom and read back with pydicom.

What is written
---------------
* **Thickness maps** (``thickness``, ``mris``, ``direct_synthesis``): one **Parametric Map** per map
  (:func:`write_parametric_maps`; FC = instance 1, TC = instance 2 of one series), 32-bit float pixel data
  = thickness in mm, with a Real World Value Mapping (identity slope / intercept, unit UCUM ``mm``,
  LUT label ``FC_THICKNESS`` / ``TC_THICKNESS``) whose mapped range is ``[min(0, map min), max(10 mm, map
  max)]``.
* **KNEEL overlays**: the overlay PNG as an RGB **Secondary Capture** (:func:`write_secondary_capture`)
  that references the radiograph (SourceImageSequence).
* **DESS segmentations** (``dess_seg``): a **DICOM SEG** (:func:`write_segmentation`), type ``BINARY``
  (read by every SEG reader; the 2024 ``LABELMAP`` type is not yet), segments 1 femur, 2 femoral cartilage,
  3 tibia, 4 tibial cartilage = the DESS label values (:data:`DESS_SEGMENTS`: category SCT 91723000
  "Anatomical Structure"; type SCT 71341001 "Femur", SCT 309312004 "Cartilage" with primary anatomic
  structure Femur, SCT 12611008 "Tibia", SCT 309312004 "Cartilage" + Tibia; anatomic region SCT 49076000
  "Knee joint"), one frame per source slice that holds a segment, geometry (Frame of Reference, positions,
  orientation, spacing) and references from the source DESS series. Needs a DICOM series input.

NaN (outside the cartilage footprint)
-------------------------------------
Stored as a value BELOW the mapping's first mapped value: ``floor(min(0, map min)) - 1``, i.e. ``-1.0``
for thickness maps (never negative). The standard gives pixels outside the Real World Value Mapping's
range no real-world value; the same value is declared as ``FloatPixelPaddingValue``. :func:`read_parametric_map`
returns NaN there and the exact float32 values elsewhere (the round trip is lossless).

Geometry of the maps
--------------------
Thickness maps live on the normalised atlas grid (:mod:`pipeline.thickness.grid`), not in patient space.
The Parametric Map IOD requires a Frame of Reference, so every map gets the ATLAS frame of reference: a
deterministic UID per grid size (:func:`atlas_frame_of_reference`), identity orientation, nominal 1 mm
cells, FC at plane 0 and TC at plane 1. The source reference says ``SpatialLocationsPreserved NO``.

Identifiers and UIDs
--------------------
Patient (PatientID, PatientName, PatientBirthDate, PatientSex) and study (StudyInstanceUID, StudyDate,
StudyTime, StudyID, AccessionNumber, ReferringPhysicianName) attributes are copied from the source DICOM:
the radiograph (MRIS, direct synthesis, KNEEL), the DESS series (dess_seg; thickness maps whose item names
a DESS DICOM series). Inputs without DICOM (NIfTI labels) get a GENERATED study (:func:`generated_source`:
PatientID = the subject or item, StudyInstanceUID derived from it, StudyDescription saying so) and no
source references. New UIDs are deterministic (:func:`derived_uid`, pydicom's ``generate_uid`` with entropy
sources): series = f(source study, source series, output kind, item name, SHA-1 of the pixel content),
instance = f(series, instance key). A re-run on the same input with the same result gives the same UIDs;
any change of the values gives new ones (no two different objects share a UID).

Checks
------
:func:`validate` lists missing type 1 / type 2 attributes of the IOD's mandatory modules (the standard's
tables shipped with highdicom) and values that pydicom's VR validation rejects.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from pipeline.io.atomic import atomic_path

__all__ = ["DESS_SEGMENTS", "DicomOutputUnavailable", "atlas_frame_of_reference", "derived_uid",
           "generated_source", "labels_on_frames", "read_parametric_map", "read_segmentation", "read_source",
           "validate", "write_parametric_maps", "write_secondary_capture", "write_segmentation"]

PathLike = Union[str, Path]

MANUFACTURER = "kneeoa-pipeline"
#: Series numbers of the derived series.
SERIES_NUMBER = {"maps": 900, "overlay": 910, "seg": 920}
#: DESS label value -> (segment label, property type keyword of SCT, primary anatomic structure or None).
DESS_SEGMENTS: dict[int, tuple[str, str, str | None]] = {
    1: ("femur", "Femur", None),
    2: ("femoral cartilage", "Cartilage", "Femur"),
    3: ("tibia", "Tibia", None),
    4: ("tibial cartilage", "Cartilage", "Tibia"),
}
_MAP_NAMES = {"fc": "femoral cartilage", "tc": "tibial cartilage"}
# Type 2 patient / study attributes that highdicom copies from a source header (empty when unknown).
_TYPE2 = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
          "ReferringPhysicianName")
_IDENTIFIERS = ("PatientID", "StudyInstanceUID", *_TYPE2, "SpecificCharacterSet")


class DicomOutputUnavailable(ImportError):
    """DICOM output was asked for but highdicom is not installed."""


def _highdicom():
    try:
        import highdicom
    except ImportError as e:  # pragma: no cover - highdicom is an install requirement on Python >= 3.10
        raise DicomOutputUnavailable(
            "DICOM output (--dicom True) needs highdicom >= 0.28 (Python >= 3.10): pip install 'highdicom>=0.28'"
        ) from e
    return highdicom


def _version() -> str:
    from pipeline import __version__

    return str(__version__)


# ----------------------------------------------------------------------------------------------- UIDs
def derived_uid(*parts: Any) -> str:
    """Deterministic UID from ``parts`` (pydicom's ``generate_uid`` with entropy sources)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["kneeoa-pipeline derived object", *(str(p) for p in parts)])


def content_digest(*arrays: np.ndarray) -> str:
    """SHA-1 of the arrays' shapes, dtypes and bytes (the content part of the series UID)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atlas_frame_of_reference(shape: Sequence[int]) -> str:
    """The Frame of Reference UID of the atlas grid of ``(rows, cols)`` (the same for every knee)."""
    return derived_uid("atlas grid frame of reference", *(int(s) for s in shape))


def _series_uid(src: Any, kind: str, name: str, digest: str) -> str:
    return derived_uid(src.StudyInstanceUID, src.get("SeriesInstanceUID", ""), kind, name, digest)


# -------------------------------------------------------------------------------------------- sources
def _is_dicom_file(p: Path) -> bool:
    from pipeline.io.dicom import has_dicm_preamble

    return p.is_file() and (p.suffix.lower() == ".dcm" or has_dicm_preamble(p))


def read_source(source: Any) -> list:
    """Headers (no pixel data) of the source DICOM: a file, every DICOM file of a series folder (sorted by
    InstanceNumber, then name), a pydicom Dataset or a list of them; ``[]`` when ``source`` is None or not
    DICOM (e.g. a NIfTI file)."""
    import pydicom

    if source is None or (isinstance(source, str) and not source.strip()):
        return []
    if isinstance(source, pydicom.Dataset):
        return [source]
    if isinstance(source, (list, tuple)):
        return [s for s in source if isinstance(s, pydicom.Dataset)]
    p = Path(source)
    files = sorted(f for f in p.iterdir() if _is_dicom_file(f)) if p.is_dir() else ([p] if _is_dicom_file(p) else [])
    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - a non-DICOM file in the folder is not a source
            continue
    return sorted(headers, key=lambda d: (int(d.get("InstanceNumber", 0) or 0), str(d.filename)))


def generated_source(patient_id: str, study_key: Any = "", note: str = "") -> Any:
    """Header of a GENERATED study for outputs of inputs without DICOM: ``PatientID`` = ``patient_id``,
    ``StudyInstanceUID`` derived from (``patient_id``, ``study_key``: e.g. the visit), StudyDescription
    ``"kneeoa-pipeline generated study (no DICOM source)"``; no source instance (outputs carry no source
    references)."""
    import pydicom

    ds = pydicom.Dataset()
    ds.PatientID = str(patient_id)[:64] or "UNKNOWN"
    ds.StudyInstanceUID = derived_uid("generated study", patient_id, study_key)
    for kw in _TYPE2:
        setattr(ds, kw, None)
    ds.StudyDescription = ("kneeoa-pipeline generated study (no DICOM source" + (f": {note}" if note else "") + ")")[:64]
    ds.SeriesInstanceUID = derived_uid("generated series", patient_id, study_key)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # placeholder, removed from the outputs' references
    ds.SOPInstanceUID = derived_uid("generated source instance", patient_id, study_key)
    ds.is_generated_source = True
    return ds


def _filled(ds: Any) -> Any:
    """A copy of a header with the type 2 patient / study attributes present (empty when unknown)."""
    out = copy.deepcopy(ds)
    for kw in _TYPE2:
        if kw not in out:
            setattr(out, kw, None)
    return out


def _save(ds: Any, path: PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _strip_references(ds: Any) -> None:
    """Remove references to the (placeholder) source of a generated study."""
    for kw in ("SourceImageSequence", "ReferencedSeriesSequence", "ReferencedImageSequence"):
        if kw in ds:
            delattr(ds, kw)
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        if "DerivationImageSequence" in item:
            item.DerivationImageSequence = []


def _not_spatially_preserved(ds: Any) -> None:
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        for der in item.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                src.SpatialLocationsPreserved = "NO"


# ------------------------------------------------------------------------------------- parametric maps
def _encode_map(hd: Any, key: str, m: np.ndarray) -> tuple[np.ndarray, Any, float]:
    """(float32 pixels with NaN -> padding value, Real World Value Mapping in mm, padding value)."""
    from pydicom.sr.codedict import codes

    m = np.asarray(m, dtype=np.float32)
    finite = np.isfinite(m)
    lo = min(0.0, float(m[finite].min())) if finite.any() else 0.0
    hi = max(10.0, float(m[finite].max())) if finite.any() else 10.0
    pad = float(math.floor(lo) - 1.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=f"{key.upper()}_THICKNESS"[:16],
        lut_explanation=f"{_MAP_NAMES.get(key, key)} thickness (mm)"[:64],
        unit=codes.UCUM.Millimeter, value_range=(lo, hi), slope=1.0, intercept=0.0)
    return np.where(finite, m, np.float32(pad)).astype(np.float32), mapping, pad


def _atlas_reference(src: Any, shape: Sequence[int], for_uid: str, plane: int) -> Any:
    """The source header placed on the atlas grid (the geometry highdicom gives the map)."""
    ref = _filled(src)
    for kw in ("ImagerPixelSpacing", "PixelData", "NumberOfFrames", "SharedFunctionalGroupsSequence",
               "PerFrameFunctionalGroupsSequence"):
        if kw in ref:
            delattr(ref, kw)
    ref.FrameOfReferenceUID = for_uid
    ref.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ref.ImagePositionPatient = [0.0, 0.0, float(plane)]
    ref.PixelSpacing = [1.0, 1.0]
    ref.SliceThickness = 1.0
    ref.Rows, ref.Columns = int(shape[0]), int(shape[1])
    return ref


def write_parametric_maps(folder: PathLike, name: str, maps: Mapping[str, np.ndarray], source: Any = None,
                          prefix: str = "", label: str = "", model: str = MANUFACTURER,
                          study: Mapping[str, Any] | None = None) -> list[Path]:
    """One Parametric Map per map (``folder/<prefix><key>.dcm``) of knee ``name`` (module docstring).

    ``source``: the DICOM the maps derive from (:func:`read_source`); without one, a generated study named
    by ``study`` (``{"patient_id": ..., "study_key": ...}``, default: ``name``). Returns the files."""
    hd = _highdicom()
    headers = read_source(source)
    study = dict(study or {})
    src = headers[0] if headers else generated_source(study.get("patient_id") or name, study.get("study_key", ""),
                                                      note=Path(str(source)).name if source else "")
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in maps.items()}
    for_uid = atlas_frame_of_reference(next(iter(arrays.values())).shape)
    series_uid = _series_uid(src, "parametric map", name, content_digest(*arrays.values()))
    written = []
    for i, (key, m) in enumerate(arrays.items(), start=1):
        pixels, mapping, pad = _encode_map(hd, key, m)
        pm = hd.pm.ParametricMap(
            [_atlas_reference(src, m.shape, for_uid, i - 1)], pixels, series_uid, SERIES_NUMBER["maps"],
            derived_uid(series_uid, key), i, MANUFACTURER, model[:64], _version(), "0", False, [mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=2.0, window_width=4.0)],
            content_label=f"{key.upper()}_THICKNESS"[:16],
            content_description=f"{_MAP_NAMES.get(key, key)} thickness mm, left-knee atlas"[:64],
            further_source_images=[_filled(h) for h in headers[1:]] or None,
        )
        pm.FloatPixelPaddingValue = pad
        pm.SeriesDescription = f"cartilage thickness maps (mm) {label}".strip()[:64]
        pm.ImageComments = (f"{name}: {_MAP_NAMES.get(key, key)} thickness in mm on the atlas grid (rows anterior->"
                            f"posterior, columns medial->lateral, left-knee convention); pixels below the mapped "
                            f"range ({pad:g}) are outside the cartilage footprint")
        if getattr(src, "is_generated_source", False):
            _strip_references(pm)
            pm.StudyDescription = src.StudyDescription
        else:
            _not_spatially_preserved(pm)
        written.append(_save(pm, Path(folder) / f"{prefix}{key}.dcm"))
    return written


def read_parametric_map(path: PathLike) -> np.ndarray:
    """Values of a Parametric Map in real-world units (float32; 2D for one frame): the Real World Value Mapping
    applied, NaN where a pixel lies outside the mapped range or equals ``FloatPixelPaddingValue``."""
    import pydicom

    ds = pydicom.dcmread(path)
    raw = np.asarray(ds.pixel_array, dtype=np.float64)
    shared = ds.SharedFunctionalGroupsSequence[0]
    seq = shared.get("RealWorldValueMappingSequence") or ds.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    m = seq[0]
    first = m.get("DoubleFloatRealWorldValueFirstValueMapped", m.get("RealWorldValueFirstValueMapped"))
    last = m.get("DoubleFloatRealWorldValueLastValueMapped", m.get("RealWorldValueLastValueMapped"))
    out = raw * float(m.RealWorldValueSlope) + float(m.RealWorldValueIntercept)
    outside = (raw < float(first)) | (raw > float(last))
    if "FloatPixelPaddingValue" in ds:
        outside |= raw == float(ds.FloatPixelPaddingValue)
    return np.where(outside, np.nan, out).astype(np.float32)


# --------------------------------------------------------------------------------- secondary capture
def write_secondary_capture(path: PathLike, image: Any, source: Any, name: str, description: str = "",
                            model: str = MANUFACTURER) -> Path:
    """An RGB Secondary Capture of ``image`` (a PNG path or an ``H x W x 3`` uint8 array) with the patient /
    study identifiers of ``source`` (:func:`read_source`; a generated study when it is not DICOM), referencing
    it. Patient orientation is the source's (default ``L\\F``, the PA radiograph convention)."""
    hd = _highdicom()
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"))
    else:
        rgb = np.asarray(image)
    rgb = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8)
    headers = read_source(source)
    src = headers[0] if headers else generated_source(name, note=Path(str(source)).name if source else "")
    orientation = tuple(str(v) for v in src.get("PatientOrientation", ["L", "F"]))
    if len(orientation) != 2 or not all(orientation):
        orientation = ("L", "F")
    series_uid = _series_uid(src, "secondary capture", name, content_digest(rgb))
    sc = hd.sc.SCImage.from_ref_dataset(
        _filled(src), rgb, "RGB", 8, "PATIENT", series_uid, SERIES_NUMBER["overlay"], derived_uid(series_uid, "sc"),
        1, MANUFACTURER, patient_orientation=orientation)
    sc.SeriesDescription = (description or f"{model} overlay")[:64]
    sc.ImageComments = f"{name}: {description}" if description else name
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    if getattr(src, "is_generated_source", False):
        sc.StudyDescription = src.StudyDescription
    else:
        import pydicom

        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [item]
        sc.DerivationDescription = f"rendered by {model} from the source image with its results drawn on it"[:1024]
    return _save(sc, path)


# ------------------------------------------------------------------------------------------ segmentation
def labels_on_frames(labels: np.ndarray, affine_lps: np.ndarray, headers: Sequence[Any]) -> np.ndarray:
    """The label volume (``labels[i, j, k]``, ``affine_lps`` voxel -> LPS mm) sampled (nearest voxel) at every
    pixel centre of every source slice: ``(n_slices, Rows, Columns)`` uint8, 0 outside the volume."""
    inv = np.linalg.inv(np.asarray(affine_lps, dtype=np.float64))
    labels = np.asarray(labels)
    out = np.zeros((len(headers), int(headers[0].Rows), int(headers[0].Columns)), np.uint8)
    for n, ds in enumerate(headers):
        ipp = np.asarray(ds.ImagePositionPatient, np.float64)
        iop = np.asarray(ds.ImageOrientationPatient, np.float64)
        dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
        r, c = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
        pos = ipp[:, None, None] + iop[:3, None, None] * (c * dc) + iop[3:, None, None] * (r * dr)
        vox = np.rint(np.tensordot(inv[:3, :3], pos, 1) + inv[:3, 3][:, None, None]).astype(np.int64)
        inside = np.all([(vox[a] >= 0) & (vox[a] < labels.shape[a]) for a in range(3)], axis=0)
        out[n][inside] = labels[vox[0][inside], vox[1][inside], vox[2][inside]]
    return out


def _segment_descriptions(hd: Any, model: str) -> list:
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=model[:64], version=_version(), family=codes.DCM.ArtificialIntelligence)
    out = []
    for number, (label, prop, structure) in DESS_SEGMENTS.items():
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=getattr(codes.SCT, prop), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, anatomic_regions=[codes.SCT.KneeJoint],
            primary_anatomic_structures=[getattr(codes.SCT, structure)] if structure else None))
    return out


def write_segmentation(path: PathLike, labels: np.ndarray, affine_lps: np.ndarray, source: Any, name: str,
                       model: str = "dess_seg") -> Path:
    """A DICOM SEG (BINARY, segments :data:`DESS_SEGMENTS`) of a DESS label volume that lies in the geometry
    of the source DICOM series ``source`` (a folder or its headers), referencing every source slice."""
    hd = _highdicom()
    headers = read_source(source)
    if not headers:
        raise ValueError(f"a DICOM SEG needs the source DICOM series; {source} is not one")
    frames = labels_on_frames(labels, affine_lps, headers)
    src = headers[0]
    series_uid = _series_uid(src, "segmentation", name, content_digest(frames))
    seg = hd.seg.Segmentation(
        [_filled(h) for h in headers], frames, "BINARY", _segment_descriptions(hd, model), series_uid,
        SERIES_NUMBER["seg"], derived_uid(series_uid, "seg"), 1, MANUFACTURER, model[:64], _version(), "0",
        content_label="DESS_LABELS", content_description=f"{name}: femur, FC, tibia, TC"[:64])
    seg.SeriesDescription = f"{model} segmentation"[:64]
    return _save(seg, path)


def read_segmentation(path: PathLike, source: Any) -> np.ndarray:
    """The label frames of a SEG on the source slices (``(n_slices, Rows, Columns)`` uint8, segment number per
    pixel, 0 background) in the order of :func:`read_source`."""
    hd = _highdicom()
    uids = [h.SOPInstanceUID for h in read_source(source)]
    seg = hd.seg.segread(path)
    return np.asarray(seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False), np.uint8)


# -------------------------------------------------------------------------------------------- checks
def _datasets_at(ds: Any, path: Sequence[str]) -> Iterable[Any]:
    if not path:
        yield ds
        return
    for item in ds.get(path[0], None) or []:
        yield from _datasets_at(item, path[1:])


def validate(ds_or_path: Any) -> list[str]:
    """Problems of a DICOM object: type 1 attributes of the IOD's mandatory modules missing or empty, type 2
    ones missing (nested ones checked in the sequence items present), and values pydicom's VR validation
    rejects. An empty list means it passes."""
    import pydicom
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    from pydicom import config
    from pydicom.valuerep import validate_value

    ds = ds_or_path if isinstance(ds_or_path, pydicom.Dataset) else pydicom.dcmread(ds_or_path)
    problems = []
    iod = get_sop_class_iod_map().get(str(ds.SOPClassUID))
    if iod is None:
        return [f"unknown SOP class {ds.SOPClassUID}"]
    attrs = get_module_attribute_map()
    for module in get_iod_module_map()[iod]:
        if module["usage"] != "M":
            continue
        for a in attrs[module["key"]]:
            # functional-group macros may sit in the shared or the per-frame items: only the top level is checked
            if a["type"] not in ("1", "2") or ("functional-groups" in module["key"] and a["path"]):
                continue
            kw, path = a["keyword"], a["path"]
            for d in _datasets_at(ds, path):
                if kw not in d:
                    problems.append(f"{module['key']}: type {a['type']} {'/'.join([*path, kw])} missing")
                elif a["type"] == "1" and (d[kw].value is None or d[kw].value == "" or
                                           (d[kw].VR == "SQ" and len(d[kw].value) == 0)):
                    problems.append(f"{module['key']}: type 1 {'/'.join([*path, kw])} empty")

    def check_values(d: Any, where: str) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value):
                    check_values(item, f"{where}{elem.keyword}[{i}]/")
            elif elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and elem.value is not None:
                for v in (elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]):
                    v = str(v) if elem.VR in ("IS", "DS", "PN") else v  # the validators read the string form
                    try:
                        validate_value(elem.VR, v, config.RAISE)
                    except (ValueError, TypeError) as e:
                        problems.append(f"{where}{elem.keyword or elem.tag}: {e}")

    check_values(ds, "")
    return sorted(set(problems))

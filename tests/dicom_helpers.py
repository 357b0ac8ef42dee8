"""Writing small radiograph DICOMs for tests and benchmarks (pydicom only): a test helper, not part of the
installed package (``transforms.testing`` before). Examples for users write their DICOMs with the cohort
generator's writer, ``pipeline.cohort.writers.write_radiograph_dicom``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["write_radiograph_dicom", "synthetic_knee_image"]

_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def synthetic_knee_image(rows: int, cols: int, centres_xy: Sequence[Sequence[float]], seed: int = 0,
                         bits: int = 12) -> np.ndarray:
    """A uint16 ``(rows, cols)`` image: background noise plus a bright blob at each centre ``(x, y)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = np.full((rows, cols), 0.15, np.float32)
    sigma = 0.08 * max(rows, cols)
    for x, y in centres_xy:
        img += 0.7 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    top = (1 << bits) - 1
    return np.clip(img * top, 0, top).astype(np.uint16)


def write_radiograph_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    imager_spacing: Sequence[float] | None = (0.3, 0.3),
    pixel_spacing: Sequence[float] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    patient_id: str = "P0001",
    study_date: str = "20240101",
    image_laterality: str | None = "B",
    laterality: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``pixels`` (2D uint16/int16/uint8 array, rows x columns) as an Explicit VR Little Endian DX file.

    ``pixels`` is stored as is (raw stored values, including any bits above ``bits_stored``).
    Spacing tags are written only when given (``[row spacing, column spacing]`` mm).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = np.ascontiguousarray(pixels)
    if arr.ndim != 2:
        raise ValueError("pixels must be 2D")
    bits_alloc = arr.dtype.itemsize * 8
    fm = FileMetaDataset()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.MediaStorageSOPClassUID = _DX_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = _DX_SOP_CLASS
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.StudyDate = study_date
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    if image_laterality is not None:
        ds.ImageLaterality = image_laterality
    if laterality is not None:
        ds.Laterality = laterality
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = int(bits_stored or bits_alloc)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [f"{float(v):.6g}" for v in imager_spacing]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{float(v):.6g}" for v in pixel_spacing]
    if slope is not None:
        ds.RescaleSlope = f"{float(slope):.6g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{float(intercept):.6g}"
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)

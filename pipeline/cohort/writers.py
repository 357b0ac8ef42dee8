"""DICOM and NIfTI writers of the synthetic cohort. Deterministic: UIDs derive from the cohort seed and the
item's identity, no timestamps, so the same seed gives byte-identical files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from pipeline.io.atomic import atomic_path

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def uid(*parts) -> str:
    """Deterministic DICOM UID from the given identity parts."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _base_dataset(sop_class: str, sop_uid: str, patient: dict) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = patient["PatientID"]
    ds.PatientName = f"SYNTH^{patient['PatientID']}"
    ds.PatientSex = patient["PatientSex"]
    ds.PatientAge = f"{int(patient['PatientAge']):03d}Y"
    ds.StudyDate = patient["StudyDate"]
    ds.SeriesDate = patient["StudyDate"]
    ds.StudyInstanceUID = patient["StudyInstanceUID"]
    ds.StudyDescription = "Synthetic knee OA cohort"
    ds.Manufacturer = "kneeoa-pipeline synthetic cohort"
    ds.InstitutionName = f"Site {patient.get('Site', '')}"
    return ds


def write_radiograph_dicom(path: str | Path, values: np.ndarray, spacing_mm: float, patient: dict, *,
                           series_uid: str, sop_uid: str, monochrome1: bool, bits_stored: int,
                           rescale: tuple[float, float] = (1.0, 0.0)) -> None:
    """Bilateral PA radiograph as a DX DICOM file (uint16, ImagerPixelSpacing, bone bright after VOI).

    ``values`` are the modality values (after rescale); ``rescale = (slope, intercept)`` is applied in
    reverse to store them. MONOCHROME1 stores ``max - value`` (low = bright).
    """
    slope, intercept = rescale
    stored = np.round((values.astype(np.float64) - intercept) / slope)
    top = 2**bits_stored - 1
    if monochrome1:
        stored = top - stored
    stored = np.clip(stored, 0, top).astype(np.uint16)
    ds = _base_dataset(DX_SOP_CLASS, sop_uid, patient)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "Bilateral PA fixed flexion knee"
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "B"
    ds.Laterality = "B"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [f"{spacing_mm:.6g}", f"{spacing_mm:.6g}"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:.6g}"
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_mr_series(folder: str | Path, volume_pir: np.ndarray, affine_lps: np.ndarray, patient: dict, *,
                    series_uid: str, laterality: str, description: str = "SAG_3D_DESS") -> None:
    """Sagittal MR series, one DICOM file per slice ``k`` of a ``[i, j, k]`` volume (written in place:
    write into a temporary folder and rename it for an atomic series).

    Slice pixel arrays are ``volume[:, :, k].T`` (rows = j, columns = i). ``affine_lps`` maps (i, j, k) to
    LPS mm, so ImageOrientationPatient = (column direction of i, row direction of j) and
    ImagePositionPatient = affine @ (0, 0, k). Files are ``001``, ``002``, ... (OAI style, no extension).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vol = np.clip(np.round(volume_pir), 0, 65535).astype(np.uint16)
    sx = np.linalg.norm(affine_lps[:3, :3], axis=0)
    row_dir = affine_lps[:3, 0] / sx[0]
    col_dir = affine_lps[:3, 1] / sx[1]
    ds = _base_dataset(MR_SOP_CLASS, uid(series_uid, 0), patient)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid(series_uid, "for")
    ds.SeriesNumber = 2
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.BodyPartExamined = "KNEE"
    ds.Laterality = laterality
    ds.ImageLaterality = laterality
    ds.MRAcquisitionType = "3D"
    ds.ScanningSequence = "GR"
    ds.ImageOrientationPatient = [f"{x:.6f}" for x in (*row_dir, *col_dir)]
    ds.PixelSpacing = [f"{sx[1]:.6g}", f"{sx[0]:.6g}"]  # [row spacing (along j), column spacing (along i)]
    ds.SliceThickness = f"{sx[2]:.6g}"
    ds.SpacingBetweenSlices = f"{sx[2]:.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    normal = np.cross(row_dir, col_dir)
    for k in range(vol.shape[2]):  # one dataset, per-slice fields updated in place (fast)
        pos = affine_lps @ np.array([0.0, 0.0, k, 1.0])
        sop = uid(series_uid, k)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x:.4f}" for x in pos[:3]]
        ds.SliceLocation = f"{float(np.dot(pos[:3], normal)):.4f}"
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        # No per-slice rename: the series folder is made complete-or-absent by the caller (the cohort
        # generator writes each subject into a temporary folder that is renamed when done).
        ds.save_as(folder / f"{k + 1:03d}", enforce_file_format=True)


def write_nifti(path: str | Path, array: np.ndarray, affine_lps: np.ndarray, dtype=None) -> None:
    """NIfTI (``.nii.gz``) with the RAS affine equivalent to ``affine_lps``; gzip without timestamp."""
    arr = np.asarray(array if dtype is None else array.astype(dtype))
    img = nib.Nifti1Image(arr, LPS_TO_RAS @ affine_lps)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(raw)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        tmp.write_bytes(buf.getvalue())


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)

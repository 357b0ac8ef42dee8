"""pipeline.io.dicom.read_radiograph: spacing tags, MONOCHROME1, rescale, BitsStored, errors, real files."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from dicom_helpers import write_radiograph_dicom

from pipeline.io.dicom import RadiographReadError, list_radiographs, read_radiograph


def _pixels(rows=6, cols=9, seed=0, top=4095):
    return np.random.default_rng(seed).integers(0, top + 1, size=(rows, cols)).astype(np.uint16)


@pytest.mark.parametrize(
    "imager,pixel,expected,source",
    [
        ((0.3, 0.3), None, [0.3, 0.3], "ImagerPixelSpacing"),
        (None, (0.25, 0.25), [0.25, 0.25], "PixelSpacing"),
        ((0.3, 0.3), (0.1, 0.1), [0.3, 0.3], "ImagerPixelSpacing"),  # both: Imager wins
        ((0.2, 0.4), None, [0.2, 0.4], "ImagerPixelSpacing"),  # anisotropic: [row, col]
        (None, (0.5, 0.125), [0.5, 0.125], "PixelSpacing"),
    ],
)
def test_spacing_tag_variants(tmp_path, imager, pixel, expected, source):
    px = _pixels()
    p = write_radiograph_dicom(tmp_path / "a.dcm", px, imager_spacing=imager, pixel_spacing=pixel)
    img, meta = read_radiograph(p)
    assert meta["spacing_mm"] == pytest.approx(expected)
    assert meta["spacing_source"] == source
    assert meta["spacing_known"] is True
    assert img.shape == (6, 9) and img.dtype == np.float32  # (rows, cols), pydicom order
    np.testing.assert_array_equal(img, px.astype(np.float32))


def test_monochrome1_inverted_in_stored_range(tmp_path):
    px = np.array([[0, 1, 100], [4000, 4095, 2048]], np.uint16)
    p = write_radiograph_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", bits_stored=12)
    img, meta = read_radiograph(p)
    np.testing.assert_array_equal(img, np.array([[4095, 4094, 3995], [95, 0, 2047]], np.float32))
    assert meta["monochrome1_inverted"] is True and meta["PhotometricInterpretation"] == "MONOCHROME1"
    # MONOCHROME2 untouched
    img2, meta2 = read_radiograph(write_radiograph_dicom(tmp_path / "m2.dcm", px, bits_stored=12))
    np.testing.assert_array_equal(img2, px.astype(np.float32))
    assert meta2["monochrome1_inverted"] is False


def test_rescale_slope_intercept(tmp_path):
    px = np.array([[0, 10], [100, 1000]], np.uint16)
    img, meta = read_radiograph(write_radiograph_dicom(tmp_path / "r.dcm", px, slope=2.0, intercept=-100.0))
    np.testing.assert_array_equal(img, np.array([[-100, -80], [100, 1900]], np.float32))
    assert meta["RescaleSlope"] == 2.0 and meta["RescaleIntercept"] == -100.0


def test_monochrome1_then_rescale(tmp_path):
    px = np.array([[0, 255]], np.uint16)
    p = write_radiograph_dicom(tmp_path / "r.dcm", px, photometric="MONOCHROME1", bits_stored=8, slope=0.5,
                               intercept=10.0)
    img, _ = read_radiograph(p)
    # inverted stored values 255, 0 -> 0.5 * v + 10
    np.testing.assert_array_equal(img, np.array([[137.5, 10.0]], np.float32))


def test_bits_stored_masks_high_bits(tmp_path):
    px = np.array([[0xF00A, 0x1FFF], [0x8001, 5]], np.uint16)  # garbage above bit 11
    img, meta = read_radiograph(write_radiograph_dicom(tmp_path / "b.dcm", px, bits_stored=12))
    np.testing.assert_array_equal(img, np.array([[10, 4095], [1, 5]], np.float32))
    assert meta["BitsStored"] == 12


def test_bits_stored_signed(tmp_path):
    # 12-bit two's complement stored in 16 bits: 0x0FFF = -1, 0x0800 = -2048, 0x07FF = 2047
    px = np.array([[0x0FFF, 0x0800, 0x07FF, 3]], np.uint16).view(np.int16)
    img, _ = read_radiograph(write_radiograph_dicom(tmp_path / "s.dcm", px, bits_stored=12, signed=True))
    np.testing.assert_array_equal(img, np.array([[-1, -2048, 2047, 3]], np.float32))


def test_metadata_tags(tmp_path):
    p = write_radiograph_dicom(tmp_path / "t.dcm", _pixels(), patient_id="9001", study_date="20200229")
    _, meta = read_radiograph(p)
    assert meta["PatientID"] == "9001" and meta["StudyDate"] == "20200229"
    assert meta["laterality"] == "B" and meta["filename_or_obj"].endswith("t.dcm")
    assert meta["ViewPosition"] == "PA" and meta["Modality"] == "DX"
    assert meta["original_shape"] == [6, 9]
    assert all(v is not None for v in meta.values())
    p2 = write_radiograph_dicom(tmp_path / "u.dcm", _pixels(), image_laterality=None, laterality="R")
    assert read_radiograph(p2)[1]["laterality"] == "R"


def test_missing_spacing_error_and_option(tmp_path):
    p = write_radiograph_dicom(tmp_path / "nospacing.dcm", _pixels(), imager_spacing=None)
    with pytest.raises(RadiographReadError, match="nospacing.dcm.*no pixel spacing"):
        read_radiograph(p)
    img, meta = read_radiograph(p, allow_missing_spacing=True)
    assert meta["spacing_mm"] == [1.0, 1.0] and meta["spacing_known"] is False and meta["spacing_source"] == ""
    assert img.shape == (6, 9)


def test_not_dicom_and_missing_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(RadiographReadError, match="notes.txt.*not a DICOM"):
        read_radiograph(bad)
    with pytest.raises(RadiographReadError, match="missing.dcm.*not found"):
        read_radiograph(tmp_path / "missing.dcm")
    assert issubclass(RadiographReadError, ValueError)


def test_no_pixel_data(tmp_path):
    p = write_radiograph_dicom(tmp_path / "nopix.dcm", _pixels())
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(RadiographReadError, match="nopix.dcm.*missing pixel data"):
        read_radiograph(p)


def test_multiframe_and_colour_rejected(tmp_path):
    import pydicom

    p = write_radiograph_dicom(tmp_path / "multi.dcm", np.zeros((4, 3), np.uint16))
    ds = pydicom.dcmread(p)
    ds.Rows, ds.NumberOfFrames = 2, 2
    ds.save_as(p)
    with pytest.raises(RadiographReadError, match="multi.dcm.*not a 2D image .2 frames"):
        read_radiograph(p)
    p = write_radiograph_dicom(tmp_path / "rgb.dcm", np.zeros((4, 3), np.uint16))
    ds = pydicom.dcmread(p)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(p)
    with pytest.raises(RadiographReadError, match="rgb.dcm.*grayscale"):
        read_radiograph(p)


def test_folder_oai_style(tmp_path):
    visit = tmp_path / "1.C.2" / "9000099" / "20040101" / "00000001"
    visit.mkdir(parents=True)
    px = _pixels(seed=3)
    write_radiograph_dicom(visit / "001", px)
    img, meta = read_radiograph(visit)
    np.testing.assert_array_equal(img, px.astype(np.float32))
    assert meta["filename_or_obj"].endswith("001")
    assert [f.name for f in list_radiographs(visit)] == ["001"]
    write_radiograph_dicom(visit / "002.dcm", px)
    with pytest.raises(RadiographReadError, match="2 DICOM files"):
        read_radiograph(visit)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadiographReadError, match="no DICOM"):
        read_radiograph(empty)


# ---------------------------------------------------------------- real files nobody here wrote
def _pydicom_test_files():
    from pydicom.data import DATA_ROOT  # local files only: never triggers a download

    return sorted(glob.glob(os.path.join(DATA_ROOT, "test_files", "*.dcm")))


PYDICOM_FILES = _pydicom_test_files()


@pytest.mark.parametrize("allow_missing", [False, True])
def test_pydicom_test_files_read_or_clear_error(allow_missing):
    assert len(PYDICOM_FILES) > 20
    n_ok = 0
    for path in PYDICOM_FILES:
        name = os.path.basename(path)
        try:
            img, meta = read_radiograph(path, allow_missing_spacing=allow_missing)
        except RadiographReadError as exc:
            assert name in str(exc), str(exc)
            assert exc.reason
            continue
        n_ok += 1
        assert img.ndim == 2 and img.dtype == np.float32 and img.size > 0, name
        assert np.isfinite(img).all(), name
        assert all(s > 0 for s in meta["spacing_mm"]), name
    assert n_ok >= 8


@pytest.mark.parametrize(
    "name,reason",
    [
        ("rtplan.dcm", "missing pixel data"),
        ("SC_rgb_small_odd.dcm", "grayscale"),
        ("rtdose.dcm", "15 frames"),
        ("image_dfl.dcm", "no pixel spacing"),
        ("MR_truncated.dcm", "corrupt pixel data"),
    ],
)
def test_pydicom_known_failures(name, reason):
    path = [p for p in PYDICOM_FILES if os.path.basename(p) == name]
    if not path:
        pytest.skip(f"{name} not shipped with this pydicom")
    with pytest.raises(RadiographReadError) as info:
        read_radiograph(path[0])
    assert name in str(info.value) and reason in str(info.value)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_expb.dcm"])
def test_pydicom_variants_match_reference(name):
    import pydicom

    by_name = {os.path.basename(p): p for p in PYDICOM_FILES}
    if name not in by_name or "MR_small.dcm" not in by_name:
        pytest.skip("pydicom test file missing")
    ref, ref_meta = read_radiograph(by_name["MR_small.dcm"])
    img, meta = read_radiograph(by_name[name])
    np.testing.assert_array_equal(img, ref)
    assert meta["spacing_mm"] == pytest.approx([0.3125, 0.3125]) and meta["spacing_source"] == "PixelSpacing"
    ds = pydicom.dcmread(by_name["MR_small.dcm"])
    np.testing.assert_array_equal(ref, ds.pixel_array.astype(np.float32))


def test_ct_small_rescale_applied():
    import pydicom

    path = [p for p in PYDICOM_FILES if os.path.basename(p) == "CT_small.dcm"]
    if not path:
        pytest.skip("CT_small.dcm missing")
    ds = pydicom.dcmread(path[0])
    img, meta = read_radiograph(path[0])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img, expected.astype(np.float32))
    assert meta["PatientID"] == str(ds.PatientID)

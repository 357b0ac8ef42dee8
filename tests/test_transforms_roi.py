"""Loader transform, KNEEL/MRIS ROI crop, flip, padding, point mapping and inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dicom_helpers import synthetic_knee_image, write_radiograph_dicom


def _ramp(h=20, w=30):
    """Image whose value encodes its index: row * 100 + col."""
    from monai.data import MetaTensor

    from transforms import radiograph_affine

    r, c = np.mgrid[0:h, 0:w]
    return MetaTensor(torch.as_tensor((r * 100 + c)[None], dtype=torch.float32), affine=radiograph_affine((1.0, 1.0)))


def test_loader_transform_shape_affine_meta(tmp_path):
    from monai.data import MetaTensor

    from transforms import LoadKneeRadiograph, LoadKneeRadiographd, RadiographReadError

    px = synthetic_knee_image(40, 64, [(16, 20), (48, 20)])
    p = write_radiograph_dicom(tmp_path / "k.dcm", px, imager_spacing=(0.2, 0.4), patient_id="42")
    img = LoadKneeRadiograph()(p)
    assert isinstance(img, MetaTensor) and img.shape == (1, 40, 64) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), px.astype(np.float32))
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.2, 0.4, 1.0]))
    np.testing.assert_allclose(img.pixdim.numpy(), [0.2, 0.4])
    assert img.meta["PatientID"] == "42" and img.meta["filename_or_obj"] == str(p)
    d = LoadKneeRadiographd("image")({"image": str(p), "other": 1})
    assert torch.equal(d["image"], img) and d["other"] == 1
    with pytest.raises(RadiographReadError, match="nothere.dcm"):
        LoadKneeRadiograph()(tmp_path / "nothere.dcm")


@pytest.mark.parametrize(
    "spacing,expected",
    [((0.3, 0.3), (467, 467)), ((0.2, 0.2), (700, 700)), ((0.3, 0.2), (467, 700)), ((0.28, 0.35), (500, 400))],
)
def test_roi_size_px(spacing, expected):
    from transforms import roi_size_px

    assert roi_size_px(140.0, spacing) == expected


def test_crop_hand_computed_no_flip():
    from transforms import KneeROICrop

    img = _ramp()
    crop = KneeROICrop(roi_mm=7.0)(img, (10.2, 5.4), "L")  # 7 px; r0 = 5 - 3 = 2, c0 = 10 - 3 = 7
    assert crop.shape == (1, 7, 7)
    r, c = np.mgrid[0:7, 0:7]
    np.testing.assert_array_equal(crop[0].numpy(), (r + 2) * 100 + (c + 7))
    info = crop.meta["knee_roi"]
    assert info["start_rc"] == [2, 7] and info["size_rc"] == [7, 7] and info["flipped"] is False
    np.testing.assert_allclose(crop.affine.numpy(), [[1, 0, 2], [0, 1, 7], [0, 0, 1]])
    assert "knee_roi" not in img.meta and len(img.applied_operations) == 0  # input untouched


def test_crop_near_border_pads_not_wraps():
    from transforms import KneeROICrop

    img = _ramp()
    crop = KneeROICrop(roi_mm=7.0, pad_value=-5.0)(img, (1.0, 1.0), "L")  # r0 = c0 = -2
    x = crop[0].numpy()
    assert (x[:2, :] == -5).all() and (x[:, :2] == -5).all()
    np.testing.assert_array_equal(x[2:, 2:], img[0, 0:5, 0:5].numpy())
    # bottom-right corner: rows 17..23, cols 26..32 -> 3 padded rows, 3 padded cols
    crop2 = KneeROICrop(roi_mm=7.0, pad_value=-5.0)(img, (29.0, 20.0), "L")
    y = crop2[0].numpy()
    assert (y[3:, :] == -5).all() and (y[:, 4:] == -5).all()
    np.testing.assert_array_equal(y[:3, :4], img[0, 17:20, 26:30].numpy())
    # a ROI entirely outside the image is all padding
    crop3 = KneeROICrop(roi_mm=7.0, pad_value=3.0)(img, (-50.0, -50.0), "L")
    assert (crop3 == 3.0).all()


def test_flip_parity_right_left():
    from transforms import KneeROICrop

    img = _ramp()
    flip = KneeROICrop(roi_mm=9.0)
    noflip = KneeROICrop(roi_mm=9.0, flip_side=None)
    right = flip(img, (12.0, 9.0), "R")
    left = flip(img, (12.0, 9.0), "L")
    raw = noflip(img, (12.0, 9.0), "R")
    torch.testing.assert_close(right.as_tensor(), torch.flip(raw.as_tensor(), dims=(2,)))
    torch.testing.assert_close(left.as_tensor(), raw.as_tensor())
    assert right.meta["knee_roi"]["flipped"] is True and right.meta["knee_roi"]["side"] == "R"
    assert left.meta["knee_roi"]["flipped"] is False and left.meta["knee_roi"]["side"] == "L"
    # in the flipped crop, column increases towards the ORIGINAL image's left
    assert right[0, 0, 0] > right[0, 0, 1]
    assert KneeROICrop(roi_mm=9.0)(img, (12.0, 9.0), "RIGHT").meta["knee_roi"]["flipped"] is True


@pytest.mark.parametrize("side,flip_side", [("L", "R"), ("R", "R"), ("R", None)])
def test_point_mapping_anisotropic(side, flip_side):
    from monai.data import MetaTensor
    from monai.transforms import Resize

    from transforms import (
        KneeROICrop,
        crop_to_original_points,
        image_to_original_points,
        original_to_crop_points,
        original_to_image_points,
        radiograph_affine,
    )

    h, w = 60, 50
    img = MetaTensor(torch.zeros(1, h, w), affine=radiograph_affine((0.5, 1.0)))
    img.meta["original_affine"] = img.affine.clone()
    crop = KneeROICrop(roi_mm=10.0, flip_side=flip_side)(img, (20.3, 30.6), side)
    n_r, n_c = 20, 10  # 10 mm / 0.5 mm, 10 mm / 1.0 mm: physically square
    assert crop.shape == (1, n_r, n_c)
    r0, c0 = 31 - 10, 20 - 5
    pts = np.array([[20.3, 30.6], [17.0, 25.25], [24.9, 39.0]])
    flipped = side == flip_side
    exp_x = (c0 + n_c - 1 - pts[:, 0]) if flipped else (pts[:, 0] - c0)
    expected = np.stack([exp_x, pts[:, 1] - r0], axis=1)
    q = original_to_crop_points(pts, crop)
    np.testing.assert_allclose(q, expected, atol=1e-9)
    np.testing.assert_allclose(crop_to_original_points(q, crop), pts, atol=1e-9)
    np.testing.assert_allclose(image_to_original_points(q, crop), pts, atol=1e-9)
    # after a later MONAI Resize (align_corners=False): (i + 0.5) * S / n - 0.5
    out = (64, 48)
    resized = Resize(out)(crop)
    exp_r = np.stack([(expected[:, 0] + 0.5) * out[1] / n_c - 0.5, (expected[:, 1] + 0.5) * out[0] / n_r - 0.5], 1)
    q2 = original_to_crop_points(pts, crop, out_size_rc=out)
    np.testing.assert_allclose(q2, exp_r, atol=1e-9)
    np.testing.assert_allclose(original_to_image_points(pts, resized), exp_r, atol=1e-6)
    back = crop_to_original_points(q2, crop.meta["knee_roi"], out_size_rc=out)
    assert np.abs(back - pts).max() < 0.5 and np.abs(image_to_original_points(q2, resized) - pts).max() < 1e-6


def test_crop_pixel_maps_back_to_original_pixel_exactly():
    from transforms import KneeROICrop, crop_to_original_points

    img = _ramp()
    for side in ("R", "L"):
        crop = KneeROICrop(roi_mm=9.0)(img, (12.0, 9.0), side)
        rr, cc = np.mgrid[0:9, 0:9]
        pts = np.stack([cc.ravel(), rr.ravel()], 1).astype(float)
        orig = crop_to_original_points(pts, crop)
        vals = orig[:, 1] * 100 + orig[:, 0]
        np.testing.assert_array_equal(crop[0].numpy().ravel(), vals)


def test_landmark_permutation_on_flip():
    from pipeline.conventions import FLIP_PERMUTATION
    from transforms import KneeROICrop, original_to_crop_points

    img = _ramp(40, 60)
    crop = KneeROICrop(roi_mm=30.0)(img, (20.0, 20.0), "R")
    lm = np.stack([np.r_[np.linspace(10, 30, 9), np.linspace(12, 28, 7)], np.r_[[22.0] * 9, [18.0] * 7]], 1)
    q = original_to_crop_points(lm, crop, permute_landmarks=True)
    np.testing.assert_allclose(q, original_to_crop_points(lm, crop)[list(FLIP_PERMUTATION)])
    assert np.all(np.diff(q[:9, 0]) > 0) and np.all(np.diff(q[9:, 0]) > 0)  # left -> right again


def test_numpy_input_needs_spacing():
    from transforms import KneeROICrop

    arr = np.arange(200, dtype=np.float32).reshape(1, 10, 20)
    with pytest.raises(ValueError, match="spacing"):
        KneeROICrop(roi_mm=4.0)(arr, (5, 5), "L")
    out = KneeROICrop(roi_mm=4.0, spacing=(1.0, 2.0))(arr, (5.0, 5.0), "L")  # 4 x 2 px
    assert out.shape == (1, 4, 2)
    np.testing.assert_array_equal(np.asarray(out[0]), arr[0, 3:7, 4:6])


def test_inverse_pastes_back_and_compose_with_resize():
    from monai.transforms import Compose, Resized

    from transforms import KneeROICrop, KneeROICropd

    img = _ramp()
    cropper = KneeROICrop(roi_mm=9.0, pad_value=-1.0)
    crop = cropper(img, (3.0, 10.0), "R")
    back = cropper.inverse(crop)
    assert back.shape == img.shape and "knee_roi" not in back.meta
    np.testing.assert_allclose(back.affine.numpy(), img.affine.numpy())
    # rows 6..14, cols -1..7 -> inside the image: rows 6..14, cols 0..7
    np.testing.assert_array_equal(back[0, 6:15, 0:8].numpy(), img[0, 6:15, 0:8].numpy())
    assert (back[0, :6] == -1).all() and (back[0, :, 8:] == -1).all()
    pipe = Compose([KneeROICropd("image", side="R", roi_mm=9.0), Resized("image", (32, 32))])
    out = pipe({"image": img, "centre": (12.0, 9.0)})
    assert out["image"].shape == (1, 32, 32)
    inv = pipe.inverse(out)
    assert inv["image"].shape == (1, 20, 30)


def test_bilateral_dict(tmp_path):
    from transforms import BilateralKneeROICropd, LoadKneeRadiographd

    px = synthetic_knee_image(48, 80, [(20, 24), (60, 24)])
    p = write_radiograph_dicom(tmp_path / "bi.dcm", px, imager_spacing=(0.5, 0.5))
    d = LoadKneeRadiographd("image")({"image": p})
    t = BilateralKneeROICropd("image", roi_mm=10.0)
    out = t({**d, "centres": {"R": (20.0, 24.0), "L": (60.0, 24.0)}})
    assert out["image_R"].shape == out["image_L"].shape == (1, 20, 20)
    assert out["image_R"].meta["knee_roi"]["side"] == "R" and out["image_R"].meta["knee_roi"]["flipped"]
    assert out["image_L"].meta["knee_roi"]["side"] == "L" and not out["image_L"].meta["knee_roi"]["flipped"]
    assert "knee_roi" not in out["image"].meta
    # right knee (image left half) flipped: equals the mirrored raw crop
    raw = torch.as_tensor(px[14:34, 10:30].astype(np.float32))
    torch.testing.assert_close(out["image_R"][0].as_tensor(), torch.flip(raw, dims=(1,)))
    # array form in SIDES order, NaN centre skips that knee
    out2 = t({**d, "centres": np.array([[20.0, 24.0], [np.nan, np.nan]])})
    assert "image_R" in out2 and "image_L" not in out2
    inv = t.inverse(out)
    assert inv["image_R"].shape == (1, 48, 80)
    np.testing.assert_array_equal(inv["image_R"][0, 14:34, 10:30].numpy(), px[14:34, 10:30].astype(np.float32))


def test_torch_crop_path_matches_numpy_path(monkeypatch):
    import transforms.roi as roi_mod
    from transforms import KneeROICrop

    img = _ramp()
    expected = [KneeROICrop(roi_mm=9.0)(img, (2.0, 17.0), side) for side in ("R", "L")]
    monkeypatch.setattr(roi_mod, "numpy_fast_path", lambda x: False)  # the path used on CUDA
    for side, exp in zip(("R", "L"), expected):
        got = KneeROICrop(roi_mm=9.0)(img, (2.0, 17.0), side)
        assert torch.equal(got.as_tensor(), exp.as_tensor())
        np.testing.assert_allclose(got.affine.numpy(), exp.affine.numpy())
    bf = KneeROICrop(roi_mm=9.0)(img.to(torch.bfloat16), (2.0, 17.0), "R")
    assert bf.dtype == torch.bfloat16

"""DESS segmentation library (pipeline.segmentation): canonical orientation + left-knee flip, data lists,
network factory and per-class Dice helpers. Fast (a few seconds after the shared tiny cohort)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged

from pipeline.conventions import LABEL_FC, LABEL_TC
from pipeline.io.manifest import load_manifest
from pipeline.segmentation import (
    CANONICAL_AXCODES,
    FLIP_META_KEY,
    build_datalist,
    build_network,
    canonical_transforms,
    cartilage_dice,
    datalist_from_folder,
    datalist_from_manifest,
    select_channels,
    side_from_path,
)

KEYS = ["image", "label"]


def _pipeline(reader: str = "ITKReader") -> Compose:
    return Compose([LoadImaged(keys=KEYS, reader=reader, image_only=True), EnsureChannelFirstd(keys=KEYS),
                    *canonical_transforms(KEYS)])


def _raw(path: str) -> np.ndarray:
    """The stored array (i, j, k) of a NIfTI, as nibabel reads it."""
    return np.asarray(nib.load(path).dataobj)


def _item(cohort, side: str) -> dict:
    root, _ = cohort
    items = datalist_from_manifest(root / "manifest.csv", split="all")
    return next(x for x in items if x["side"] == side)


def test_canonical_code_is_pir_and_reorients_ras_input(tiny_cohort, tmp_path):
    """The cohort stores P, I, R arrays; the transform maps a RAS re-store back to the same array."""
    item = _item(tiny_cohort, "L")
    img = nib.load(item["image"])
    assert CANONICAL_AXCODES == "PIR"
    assert nib.aff2axcodes(img.affine) == ("P", "I", "R")  # i -> posterior, j -> inferior, k -> right
    ras_img = img.as_reoriented(nib.orientations.io_orientation(img.affine))
    lab = nib.load(item["label"])
    ras_lab = lab.as_reoriented(nib.orientations.io_orientation(lab.affine))
    assert nib.aff2axcodes(ras_img.affine) == ("R", "A", "S")
    nib.save(ras_img, tmp_path / "ras.nii.gz")
    nib.save(ras_lab, tmp_path / "ras_lab.nii.gz")
    out = _pipeline()({"image": str(tmp_path / "ras.nii.gz"), "label": str(tmp_path / "ras_lab.nii.gz"),
                       "side": "L"})
    np.testing.assert_array_equal(out["image"][0].numpy(), _raw(item["image"]))
    np.testing.assert_array_equal(out["label"][0].numpy(), _raw(item["label"]))
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("P", "I", "R")
    np.testing.assert_allclose(out["image"].affine.numpy(), img.affine, atol=1e-4)
    assert out["image"].meta[FLIP_META_KEY] is False


def test_right_knee_is_mirrored_and_inverse_restores(tiny_cohort):
    item = _item(tiny_cohort, "R")
    pre = _pipeline()
    out = pre(dict(item))
    raw_img, raw_lab = _raw(item["image"]), _raw(item["label"])
    # mirrored along k (medial-lateral): left-knee convention
    np.testing.assert_array_equal(out["image"][0].numpy(), raw_img[:, :, ::-1])
    np.testing.assert_array_equal(out["label"][0].numpy(), raw_lab[:, :, ::-1])
    assert out["image"].meta[FLIP_META_KEY] is True
    # the affine stays truthful: the mirrored k axis now points to the patient's left
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("P", "I", "L")
    # a "prediction" in canonical space goes back to the input geometry with Invertd
    out["pred"] = MetaTensor(out["label"].as_tensor().clone())
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(out)
    np.testing.assert_array_equal(inv["pred"][0].numpy(), raw_lab)
    np.testing.assert_allclose(inv["pred"].affine.numpy(), nib.load(item["image"]).affine, atol=1e-4)
    # left knees pass unchanged
    left = _item(tiny_cohort, "L")
    out_l = pre(dict(left))
    np.testing.assert_array_equal(out_l["label"][0].numpy(), _raw(left["label"]))


def test_datalist_split_is_by_subject(tiny_cohort):
    root, _ = tiny_cohort
    manifest = root / "manifest.csv"
    df = load_manifest(manifest)
    sets = {s: datalist_from_manifest(manifest, split=s, seed=3) for s in ("train", "val", "test")}
    subjects = {s: {x["subject_id"] for x in items} for s, items in sets.items()}
    assert all(subjects.values())
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["val"] & subjects["test"])
    assert sum(len(v) for v in sets.values()) == len(df)  # every knee-visit lands in exactly one set
    for s, items in sets.items():  # all knees and visits of a subject stay together
        for sid in subjects[s]:
            assert len([x for x in items if x["subject_id"] == sid]) == int((df["subject_id"] == sid).sum())
    assert sets["train"] == datalist_from_manifest(manifest, split="train", seed=3)  # deterministic
    first = sets["train"][0]
    assert set(first) >= {"image", "label", "side", "subject_id"} and first["image"].startswith("/")
    # inference lists have no label; a bad split name is refused
    assert "label" not in build_datalist(manifest, split="all")[0]
    with pytest.raises(ValueError):
        datalist_from_manifest(manifest, split="nope")


def test_datalist_from_folder_finds_nifti_and_dicom_series(tiny_cohort, tmp_path):
    root, _ = tiny_cohort
    item = _item(tiny_cohort, "R")
    knee = (root / item["image"]).parent
    (tmp_path / "RIGHT_KNEE").mkdir()
    shutil.copy(knee / "dess.nii.gz", tmp_path / "RIGHT_KNEE" / "dess.nii.gz")
    shutil.copy(knee / "labels.nii.gz", tmp_path / "RIGHT_KNEE" / "labels.nii.gz")  # excluded by name
    shutil.copytree(knee / "dicom", tmp_path / "series_a")  # Laterality tag says R
    shutil.copy(knee / "dess.nii.gz", tmp_path / "no_side.nii.gz")
    items = {x["image"].split("/")[-1]: x for x in datalist_from_folder(tmp_path)}
    assert set(items) == {"dess.nii.gz", "series_a", "no_side.nii.gz"}
    assert (items["dess.nii.gz"]["side"], items["dess.nii.gz"]["side_source"]) == ("R", "path")
    assert (items["series_a"]["side"], items["series_a"]["side_source"]) == ("R", "dicom")
    assert (items["no_side.nii.gz"]["side"], items["no_side.nii.gz"]["side_source"]) == ("L", "default")
    assert side_from_path("a/LEFT_KNEE/x.nii.gz") == "L" and side_from_path("leftover/x.nii") is None


def test_network_and_dice_helpers():
    net = build_network(channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    with torch.no_grad():
        y = net(torch.zeros(1, 1, 32, 32, 16))
    assert y.shape == (1, 5, 32, 32, 16)
    with pytest.raises(ValueError):
        build_network(channels=(4, 8), strides=(2, 2))
    pred = torch.zeros(5, 4, 4, 4)
    pred[LABEL_FC] = 1
    out = select_channels([LABEL_FC, LABEL_TC])([{"pred": pred, "label": pred.clone()}])
    assert out[0][0].shape == (2, 4, 4, 4) and torch.equal(out[0][0][0], pred[LABEL_FC])
    a = torch.tensor([0, 2, 2, 4, 4, 4])
    b = torch.tensor([0, 2, 0, 4, 4, 0])
    d = cartilage_dice(a, b)
    assert d["fc"] == pytest.approx(2 / 3) and d["tc"] == pytest.approx(0.8)

"""One radiograph geometry (pipeline.geometry): the ROI / canvas affine against hand-computed values, its exact
inverse, the right-knee mirror and its landmark permutation, padding, the ROI record; and MRIS inference that
decodes each DICOM once and writes ROI records that map back to the true joint centre."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.conventions import FLIP_PERMUTATION
from pipeline.geometry import (
    apply_matrix,
    canvas_matrix,
    crop_matrix,
    crop_overlap,
    crop_start,
    invert,
    mirror_matrix,
    original_to_output_points,
    output_to_original_points,
    permute_if_flipped,
    resize_matrix,
    roi_record,
    roi_size_px,
    swap_xy_rc,
)


# ------------------------------------------------------------------------------------------- matrices
def test_crop_matrix_hand_computed_both_ways():
    # 7 x 5 crop (rows x cols) starting at original pixel (x0, y0) = (10, 20)
    m = crop_matrix((10, 20), (7, 5))
    np.testing.assert_array_equal(m, [[1, 0, 10], [0, 1, 20], [0, 0, 1]])
    np.testing.assert_array_equal(apply_matrix(m, [[0, 0], [4, 6]]), [[10, 20], [14, 26]])
    # mirrored (a right knee shown as a left knee): crop column u is original column x0 + (5 - 1) - u
    mf = crop_matrix((10, 20), (7, 5), flip=True)
    np.testing.assert_array_equal(mf, [[-1, 0, 14], [0, 1, 20], [0, 0, 1]])
    np.testing.assert_array_equal(apply_matrix(mf, [[0, 0], [4, 6], [2, 3]]), [[14, 20], [10, 26], [12, 23]])
    np.testing.assert_array_equal(mf, m @ mirror_matrix(5))  # the mirror is folded into the affine
    np.testing.assert_array_equal(mirror_matrix(5) @ mirror_matrix(5), np.eye(3))  # an involution
    # the exact inverse maps original pixels into the crop
    np.testing.assert_array_equal(invert(mf), [[-1, 0, 14], [0, 1, -20], [0, 0, 1]])
    np.testing.assert_array_equal(apply_matrix(invert(mf), [[12.0, 23.0]]), [[2.0, 3.0]])


def test_roi_size_and_placement():
    assert roi_size_px(140.0, (0.3, 0.3)) == (467, 467)
    assert roi_size_px(140.0, (0.3, 0.2)) == (467, 700)  # physically square
    assert roi_size_px(7.0, (1.0, 1.0)) == (7, 7)
    # the pixel holding the centre becomes index n // 2: x0 = round(10.2) - 3 = 7, y0 = round(5.5) - 3 = 3
    assert crop_start((10.2, 5.5), (7, 7)) == (7, 3)
    assert crop_start((-0.5, 0.49), (4, 4)) == (-2, -2)  # half up, also below zero
    x0, y0 = crop_start((215.0, 500.0), (467, 467))
    assert (x0, y0) == (215 - 233, 500 - 233)
    np.testing.assert_array_equal(apply_matrix(crop_matrix((x0, y0), (467, 467)), [233, 233]), [215, 500])
    np.testing.assert_array_equal(apply_matrix(crop_matrix((x0, y0), (467, 467), True), [233, 233]), [215, 500])


def test_resize_then_crop_reproduces_the_readme_point():
    """README: resized pixel 128 of the flipped 467 px right-knee crop around (215, 500) at 0.3 mm is original
    (214.0879, 500.9121): crop pixel (128 + 0.5) * 467 / 256 - 0.5 = 233.90, mirrored in x."""
    r = resize_matrix((467, 467), (256, 256))
    np.testing.assert_allclose(apply_matrix(r, [128.0, 128.0]), [(128.5) * 467 / 256 - 0.5] * 2, atol=1e-12)
    m = crop_matrix(crop_start((215.0, 500.0), (467, 467)), (467, 467), flip=True) @ r
    np.testing.assert_allclose(apply_matrix(m, [[128.0, 128.0]]), [[214.08789062, 500.91210938]], atol=1e-8)
    # non-square resize: x follows columns, y rows
    np.testing.assert_allclose(apply_matrix(resize_matrix((10, 20), (5, 40)), [0.0, 0.0]), [-0.25, 0.5])
    np.testing.assert_array_equal(resize_matrix((10, 20), None), np.eye(3))


def test_canvas_matrix_flip_is_the_mirror_and_inverse_is_exact():
    m = canvas_matrix((100.0, 80.0), (32, 48), 2.0, (0.5, 0.25), angle_rad=0.3, zoom=1.1)
    mf = canvas_matrix((100.0, 80.0), (32, 48), 2.0, (0.5, 0.25), angle_rad=0.3, zoom=1.1, flip=True)
    np.testing.assert_allclose(mf, m @ mirror_matrix(48), atol=1e-12)
    # canvas centre -> the source centre; one canvas pixel is 2 / 1.1 mm along both source axes
    np.testing.assert_allclose(apply_matrix(mf, [23.5, 15.5]), [100.0, 80.0], atol=1e-12)
    step_mm = np.hypot(m[0, 0] * 0.25, m[1, 0] * 0.5)
    assert step_mm == pytest.approx(2.0 / 1.1)
    pts = np.array([[3.25, -7.5], [120.0, 44.0]])
    np.testing.assert_allclose(apply_matrix(mf, apply_matrix(invert(mf), pts)), pts, atol=1e-9)
    np.testing.assert_allclose(invert(mf), np.linalg.inv(mf), atol=1e-12)


def test_swap_xy_rc_matches_the_crop_metadata():
    from monai.data import MetaTensor

    from transforms import KneeROICrop, radiograph_affine

    img = MetaTensor(torch.zeros(1, 20, 30), affine=radiograph_affine((1.0, 1.0)))
    for side in ("R", "L"):
        info = KneeROICrop(roi_mm=7.0)(img, (10.2, 5.4), side).meta["knee_roi"]
        expected = crop_matrix((7, 2), (7, 7), flip=side == "R")  # x0 = 10 - 3, y0 = 5 - 3
        np.testing.assert_array_equal(swap_xy_rc(info["crop_to_original"]), expected)
        np.testing.assert_array_equal(swap_xy_rc(swap_xy_rc(expected)), expected)


def test_crop_overlap_is_the_pad_policy():
    # start (-2, -2): the first two rows / columns of the crop are padding
    src, dst = crop_overlap((-2, -2), (7, 7), (20, 30))
    assert src == (slice(0, 5), slice(0, 5)) and dst == (slice(2, 7), slice(2, 7))
    # bottom-right corner: rows 17..23, cols 26..32 of a 20 x 30 image
    src, dst = crop_overlap((26, 17), (7, 7), (20, 30))
    assert src == (slice(17, 20), slice(26, 30)) and dst == (slice(0, 3), slice(0, 4))
    assert crop_overlap((-50, -50), (7, 7), (20, 30)) is None


# ------------------------------------------------------------------------------------------- landmarks
def test_flip_and_permutation_keep_groups_left_to_right():
    """16 landmarks mirrored into a right-knee crop: permuted, each group runs left -> right again; the same
    permutation maps back (an involution), and the round trip returns the original points exactly."""
    tib = np.stack([np.linspace(40, 72, 9), np.full(9, 60.0)], 1)
    fem = np.stack([np.linspace(42, 70, 7), np.full(7, 50.0)], 1)
    pts = np.concatenate([tib, fem])
    m = crop_matrix(crop_start(pts[4], (51, 51)), (51, 51), flip=True)
    in_crop = permute_if_flipped(apply_matrix(invert(m), pts), True)
    assert (np.diff(in_crop[:9, 0]) > 0).all() and (np.diff(in_crop[9:, 0]) > 0).all()
    np.testing.assert_array_equal(in_crop[0], apply_matrix(invert(m), pts[8]))  # tibial 0 <- 8
    np.testing.assert_array_equal(in_crop[9], apply_matrix(invert(m), pts[15]))  # femoral 9 <- 15
    np.testing.assert_array_equal(apply_matrix(m, permute_if_flipped(in_crop, True)), pts)
    assert permute_if_flipped(pts, False) is not None and np.array_equal(permute_if_flipped(pts, False), pts)
    np.testing.assert_array_equal(permute_if_flipped(pts[:3], True), pts[:3])  # not 16 points: unchanged
    batch = np.stack([pts, pts + 1])
    np.testing.assert_array_equal(permute_if_flipped(batch, True)[1], (pts + 1)[list(FLIP_PERMUTATION)])


# ------------------------------------------------------------------------------------------- the record
def test_roi_record_round_trip_and_json():
    m = crop_matrix((-18, 267), (467, 467), flip=True) @ resize_matrix((467, 467), (256, 256))
    rec = roi_record("R", True, (215.0, 500.0), (467, 467), (0.3, 0.3), m, (256, 256), file="k.dcm")
    assert json.loads(json.dumps(rec)) == rec
    assert rec["size_mm"] == pytest.approx([140.1, 140.1]) and rec["spacing_rc"] == [0.3, 0.3]
    np.testing.assert_allclose(output_to_original_points([[128.0, 128.0]], rec), [[214.08789062, 500.91210938]],
                               atol=1e-8)
    pts = np.array([[215.0, 500.0], [100.25, 420.5]])
    np.testing.assert_allclose(output_to_original_points(original_to_output_points(pts, rec), rec), pts, atol=1e-9)
    lm = np.random.default_rng(0).uniform(100, 300, (16, 2))
    back = output_to_original_points(original_to_output_points(lm, rec, permute_landmarks=True), rec,
                                     permute_landmarks=True)
    np.testing.assert_allclose(back, lm, atol=1e-9)
    with pytest.raises(ValueError, match="ROI record"):
        output_to_original_points([[0.0, 0.0]], {"side": "R"})


def test_knee_roi_record_of_the_inference_chain_maps_output_pixels_to_original(tmp_path):
    from dicom_helpers import synthetic_knee_image, write_radiograph_dicom
    from monai.transforms import Compose

    from pipeline.mris.data import radiograph_transforms
    from transforms import crop_to_original_points, knee_roi_record

    path = write_radiograph_dicom(tmp_path / "k.dcm", synthetic_knee_image(600, 500, [(130, 300), (370, 300)]),
                                  imager_spacing=(0.3, 0.25))
    for side, centre in (("R", (130.4, 300.6)), ("L", (370.0, 299.2))):
        x = Compose(radiograph_transforms(64))({"image": str(path), "centre": centre, "side": side})["image"]
        rec = knee_roi_record(x)
        assert rec["file"] == str(path) and rec["side"] == side and rec["flipped"] == (side == "R")
        assert rec["size_rc"] == [467, 560] and rec["output_size_rc"] == [64, 64]
        assert rec["size_mm"] == pytest.approx([140.1, 140.0])
        uv = np.array([[0.0, 0.0], [31.5, 31.5], [63.0, 10.0]])
        expected = crop_to_original_points(uv, x.meta["knee_roi"], out_size_rc=(64, 64))
        np.testing.assert_allclose(output_to_original_points(uv, rec), expected, atol=1e-6)
        # the output's centre lies on the joint centre: the crop snaps to whole pixels, so within 0.5 px along
        # an odd side (467 rows), 1 px along an even one (560 columns: its centre falls between two pixels)
        err = np.abs(output_to_original_points([31.5, 31.5], rec) - centre)
        assert err[1] <= 0.5 + 1e-6 and err[0] <= 1.0 + 1e-6, err
    assert knee_roi_record(torch.zeros(1, 4, 4)) is None


# ------------------------------------------------------------------------------------------- decode once
def _count_decodes(monkeypatch) -> list[str]:
    """Count the calls of the one DICOM reader, ``pipeline.io.dicom.read_radiograph``, wherever it was imported
    (every ``pipeline`` / ``transforms`` module that bound the name), and of its pixel decoder."""
    import pipeline.io.dicom as dicom
    import pipeline.knee_inference  # noqa: F401  (import the users first, then patch the names they bound)
    import pipeline.landmarks.infer  # noqa: F401
    import transforms.radiograph_io  # noqa: F401

    calls: list[str] = []
    real, real_decode = dicom.read_radiograph, dicom._decode

    def counting(path, *args, **kwargs):
        calls.append(str(Path(path).resolve()))
        return real(path, *args, **kwargs)

    def counting_decode(p, *args, **kwargs):
        calls.append(f"decode:{Path(p).resolve()}")
        return real_decode(p, *args, **kwargs)

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("pipeline", "transforms") and vars(mod).get("read_radiograph") is real:
            monkeypatch.setattr(mod, "read_radiograph", counting)
    monkeypatch.setattr(dicom, "_decode", counting_decode)
    return calls


def test_loader_passes_a_decoded_radiograph_through(tmp_path, monkeypatch):
    from dicom_helpers import synthetic_knee_image, write_radiograph_dicom
    from monai.transforms import Compose

    from pipeline.io.dicom import read_radiograph
    from pipeline.landmarks.engine import make_network
    from pipeline.landmarks.infer import KneeLocaliser
    from pipeline.mris.data import radiograph_transforms
    from transforms import LoadKneeRadiograph, radiograph_metatensor

    path = write_radiograph_dicom(tmp_path / "k.dcm", synthetic_knee_image(300, 700, [(175, 150), (525, 150)]),
                                  imager_spacing=(0.4, 0.4))
    item = {"centre": (175.0, 150.0), "side": "R"}
    chain = Compose(radiograph_transforms(32))
    from_path = chain({**item, "image": str(path)})["image"]
    image, meta = read_radiograph(path)
    torch.save(make_network("global", 32, 8.0, width=2).state_dict(), tmp_path / "g.pt")
    loc = KneeLocaliser(tmp_path / "g.pt")
    rows_path = loc.predict_image(path)
    read = LoadKneeRadiograph()(path)
    calls = _count_decodes(monkeypatch)
    decoded = radiograph_metatensor(image, meta)
    loaded = LoadKneeRadiograph()(decoded)
    assert torch.equal(loaded, read) and loaded is not decoded and torch.equal(loaded.affine, read.affine)
    from_image = chain({**item, "image": decoded})["image"]
    assert torch.equal(from_image.as_tensor(), from_path.as_tensor())
    assert from_image.meta["knee_roi"] == from_path.meta["knee_roi"] and "knee_roi" not in decoded.meta
    rows, img_back, meta_back = loc.locate(path, decoded)
    assert [r["x"] for r in rows] == [r["x"] for r in rows_path] and img_back.shape == image.shape
    assert meta_back["spacing_mm"] == meta["spacing_mm"]
    assert calls == []  # nothing was read again


def _oracle_localiser(monkeypatch, truth: dict[str, np.ndarray]) -> None:
    """The KNEEL global stage answers the true joint centre: its canvases are sampled as usual, and the
    "network" returns the true centre mapped into each canvas through the inverse of the canvas matrix."""
    from pipeline.landmarks import infer

    seen: list[tuple[np.ndarray, str]] = []
    real = infer.KneeLocaliser._stage_canvases

    def spy(self, stage, img, spacing, centres, boxes, flips):
        canv, mats = real(self, stage, img, spacing, centres, boxes, flips)
        seen[:] = [(m, "R" if f else "L") for m, f in zip(mats, flips)]  # bilateral: right knees are mirrored
        return canv, mats

    def oracle(self, canvases, tta):
        s = self.spec.canvas_size
        coords = np.stack([(apply_matrix(invert(m), truth[side][None]) + 0.5) / s for m, side in seen])
        return coords, np.ones(coords.shape[:2]), np.zeros(coords.shape[:2])

    monkeypatch.setattr(infer.KneeLocaliser, "_stage_canvases", spy)
    monkeypatch.setattr(infer._Stage, "predict", oracle)


@pytest.mark.usefixtures("one_torch_thread")
def test_mris_inference_decodes_once_and_roi_maps_back_to_the_joint_centre(tiny_cohort, tmp_path, monkeypatch):
    """Acceptance (issue 13, item 1): one bilateral DICOM, MRIS inference without a landmarks CSV (KNEEL
    checkpoint) -> the file is decoded once, and each knee's ROI record in summary.json maps the centre of the
    network input back to within 1 px of the true joint centre (right knee mirrored, left knee not)."""
    from pipeline.mris.engine import make_network
    from pipeline.mris.evaluate import build_mris_database
    from pipeline.mris.infer import run_inference

    root = Path(tiny_cohort[0])
    manifest = root / "manifest.csv"
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    dicom = (root / m["xray_dicom"].iloc[0]).resolve()
    rows = m[m["xray_dicom"] == m["xray_dicom"].iloc[0]]
    truth = {r.side: np.array([r.joint_centre_x, r.joint_centre_y]) for r in rows.itertuples()}
    assert set(truth) == {"R", "L"}

    torch.manual_seed(0)
    net = make_network("combined", widen_factor=0.125, image_size=32)
    ckpt = tmp_path / "mris.pt"
    torch.save(net.state_dict(), ckpt)
    split = {"database": 0.67, "downstream": 0.0, "test": 0.33}
    build_mris_database(net, ckpt, manifest, tmp_path / "db", split_fractions=split, progress=False)
    from pipeline.landmarks.engine import make_network as make_kneel

    torch.save(make_kneel("global", 32, 8.0, width=2).state_dict(), tmp_path / "kneel_global.pt")
    _oracle_localiser(monkeypatch, truth)
    calls = _count_decodes(monkeypatch)

    summary = run_inference(net, ckpt, dicom, tmp_path / "db", tmp_path / "out", landmarks=None,
                            kneel_global_ckpt=tmp_path / "kneel_global.pt", png=False, progress=False)
    assert calls == [str(dicom), f"decode:{dicom}"], calls  # read once, decoded once
    assert summary["n_knees_ok"] == 2 and summary["n_failed"] == 0
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    for knee in on_disk["knees"]:
        side, roi = knee["side"], knee["roi"]
        assert roi["file"] == str(dicom) and roi["side"] == side and roi["flipped"] == (side == "R")
        assert roi["spacing_rc"] == [1.0, 1.0] and roi["size_rc"] == [140, 140] and roi["size_mm"] == [140.0, 140.0]
        np.testing.assert_allclose(roi["centre_xy"], truth[side], atol=1e-6)
        h, w = roi["output_size_rc"]
        assert (h, w) == (32, 32) and np.asarray(roi["output_to_original"]).shape == (3, 3)
        centre_px = [(w - 1) / 2.0, (h - 1) / 2.0]  # the centre of the network input
        back = output_to_original_points(centre_px, roi)
        assert np.abs(back - truth[side]).max() <= 1.0, (side, back, truth[side])
        # mirrored right knee: the output's x runs against the radiograph's x
        assert (np.asarray(roi["output_to_original"])[0][0] < 0) == (side == "R")

"""KNEEL building blocks: soft-argmax, Wing loss, flip permutation, exact two-stage point mapping, network,
mm metrics and subject-level folds. Small synthetic arrays only (a few seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.conventions import FLIP_PERMUTATION, N_LANDMARKS


# ------------------------------------------------------------------------------------------- soft-argmax
def test_soft_argmax_returns_subpixel_peak_of_a_gaussian_heatmap():
    from pipeline.landmarks.soft_argmax import normalised_to_pixels, soft_argmax_2d

    h, w = 24, 32
    peaks = [(10.3, 7.6), (20.75, 15.2)]  # (x, y) heat-map pixels, off the pixel grid
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    logits = torch.stack([-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2) for x, y in peaks])[None]  # (1, 2, h, w)
    coords, probs = soft_argmax_2d(logits.float())
    assert coords.shape == (1, 2, 2) and torch.allclose(probs.sum(dim=(-2, -1)), torch.ones(1, 2))
    px = normalised_to_pixels(coords[0].double(), (h, w))
    assert torch.allclose(px, torch.tensor(peaks, dtype=torch.float64), atol=2e-3), px
    # a single hot pixel with a large beta -> exactly its centre (j + 0.5) / W, (i + 0.5) / H
    one = torch.full((1, 1, h, w), -1e4)
    one[0, 0, 5, 9] = 0.0
    c, _ = soft_argmax_2d(one)
    assert torch.allclose(c[0, 0], torch.tensor([(9 + 0.5) / w, (5 + 0.5) / h]), atol=1e-6)


# ------------------------------------------------------------------------------------------- Wing loss
def test_wing_loss_matches_its_formula():
    from pipeline.landmarks.losses import WingLoss, wing_loss

    w, c = 15.0, 3.0
    big_c = w - w * math.log(1 + w / c)  # = 15 - 15 ln 6 = -11.8759...
    diffs = torch.tensor([0.0, 0.6, -2.0, 14.99, 15.0, -20.0, 40.0])
    expect = [0.0, w * math.log(1.2), w * math.log(1 + 2 / 3), w * math.log(1 + 14.99 / 3), 15.0 - big_c,
              20.0 - big_c, 40.0 - big_c]
    got = wing_loss(diffs, torch.zeros_like(diffs), reduction="none")
    assert torch.allclose(got, torch.tensor(expect, dtype=got.dtype), atol=1e-4)
    assert abs(big_c - (15 - 15 * math.log(6))) < 1e-12
    assert abs(float(got[3]) - float(got[4])) < 0.02  # continuous at |x| = w
    pred = torch.tensor([[[0.50, 0.25]]])
    tgt = torch.tensor([[[0.40, 0.45]]])
    hand = (w * math.log(1 + 0.1 / c) + w * math.log(1 + 0.2 / c)) / 2  # mean over the 2 coordinates
    assert abs(float(WingLoss()(pred, tgt)) - hand) < 1e-5
    assert abs(float(WingLoss(scale=100.0)(pred, tgt)) - (w * math.log(1 + 10 / c) + (20 - big_c)) / 2) < 1e-4


# ------------------------------------------------------------------------------------------- flips
def _knee_landmarks(cx: float, cy: float) -> np.ndarray:
    """16 plausible KNEEL landmarks (x, y) px: each group ordered left -> right, joint centre = 4."""
    tib = np.stack([cx + np.linspace(-36, 36, 9), cy + 6 + 0.3 * np.abs(np.linspace(-4, 4, 9))], 1)
    tib[4, 1] -= 8
    fem = np.stack([cx + np.linspace(-33, 33, 7), cy - 10 - np.array([0, 4, 2, 12, 3, 5, 1.0])], 1)
    return np.concatenate([tib, fem])


def _dot_image(shape, pts, sigma=1.2):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    img = np.zeros(shape, np.float32)
    for x, y in pts:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
    return img


def test_flip_permutation_is_the_mirror_involution():
    perm = list(FLIP_PERMUTATION)
    assert sorted(perm) == list(range(N_LANDMARKS))
    assert [perm[i] for i in perm] == list(range(N_LANDMARKS))  # involution
    assert perm[4] == 4 and perm[0] == 8 and perm[9] == 15 and perm[12] == 12
    assert set(perm[:9]) == set(range(9)) and set(perm[9:]) == set(range(9, 16))  # groups kept


@pytest.mark.parametrize("side, extra_flip, mirrored", [("L", True, True), ("R", False, True), ("R", True, False)])
def test_canvas_targets_follow_the_mirrored_landmark(side, extra_flip, mirrored):
    """The local-stage canvas transform: target i sits on the image dot of original landmark
    FLIP_PERMUTATION[i] when the canvas is mirrored (and on landmark i otherwise); every group is left -> right."""
    from pipeline.landmarks.data import RandKneeCanvasd
    from pipeline.landmarks.geometry import StageSpec, apply_matrix, make_view

    spacing = (0.5, 0.5)
    lm = _knee_landmarks(100.0, 90.0)
    img = _dot_image((180, 200), lm)
    spec = StageSpec("local", 96, 1.0)
    view, m_view = make_view(img, spacing, lm[4], 140.0, 1.0)
    d = {"view": view, "view_matrix": m_view, "view_centre": lm[4], "spacing_rc": np.array(spacing), "side": side,
         "landmarks": lm.tolist()}
    t = RandKneeCanvasd(spec, augment=True, shift_mm=3.0, rotate_deg=8.0, zoom_range=(0.95, 1.05),
                        prob_flip=1.0 if extra_flip else 0.0).set_random_state(1)
    out = t(d)
    assert out["flipped"] is mirrored
    label = out["label"].astype(np.float64) * spec.canvas_size - 0.5  # canvas px
    src = [FLIP_PERMUTATION[i] for i in range(16)] if mirrored else list(range(16))
    back = apply_matrix(out["canvas_matrix"], label)
    assert np.abs(back - lm[src]).max() < 1e-4  # target i is (mirrored) landmark src[i] (float32 labels)
    assert (np.diff(label[:9, 0]) > 0).all() and (np.diff(label[9:, 0]) > 0).all()  # left -> right in the canvas
    canvas = out["image"][0]
    for x, y in label:  # the image moved with the targets: each target sits on a bright dot
        r, c = int(round(y)), int(round(x))
        assert canvas[r, c] > 0.5 * canvas.max(), (x, y)


# ------------------------------------------------------------------------------------------- geometry
def _centroid(canvas: np.ndarray) -> np.ndarray:
    c = np.nan_to_num(canvas.astype(np.float64))
    c = np.where(c > 0.05 * c.max(), c, 0.0)
    yy, xx = np.mgrid[0 : c.shape[0], 0 : c.shape[1]]
    return np.array([(c * xx).sum() / c.sum(), (c * yy).sum() / c.sum()])


def test_point_round_trips_through_both_stages_within_half_a_pixel():
    """A dot at a known sub-pixel spot of an ANISOTROPIC bilateral image is found in the global canvas (right
    knee: mirrored half) and in the local canvas; both map back to the original within 0.5 px. The pure matrix
    round trip (original -> normalised canvas -> original) is exact."""
    from pipeline.landmarks.geometry import (
        StageSpec,
        apply_matrix,
        field_centre,
        knee_field,
        make_view,
        sample_canvas,
    )

    spacing = (0.4, 0.25)  # (row, col) mm
    shape = (420, 900)
    p = np.array([233.37, 180.62])  # right knee (image LEFT half)
    sig = np.array([4.0 / spacing[1], 4.0 / spacing[0]])  # 4 mm wide dot
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    img = np.exp(-(((xx - p[0]) / sig[0]) ** 2 + ((yy - p[1]) / sig[1]) ** 2) / 2).astype(np.float32)

    box = knee_field(shape, "R", "bilateral")
    g = StageSpec("global", 64, 2.5)
    view, mv = make_view(img, spacing, field_centre(box), g.canvas_mm + 10, g.canvas_spacing_mm, valid_box=box)
    canvas, m_g = sample_canvas(view, mv, g.canvas_spacing_mm, field_centre(box), g, flip=True)
    found = apply_matrix(m_g, _centroid(canvas))
    assert np.abs(found - p).max() < 0.5, found - p
    norm = (apply_matrix(np.linalg.inv(m_g), p) + 0.5) / g.canvas_size
    assert np.abs(apply_matrix(m_g, norm * g.canvas_size - 0.5) - p).max() < 1e-9

    loc = StageSpec("local", 64, 0.6)
    centre = tuple(found + np.array([7.0, -5.0]))  # the local canvas is centred on an imperfect estimate
    view, mv = make_view(img, spacing, centre, loc.canvas_mm + 5, loc.canvas_spacing_mm)
    canvas, m_l = sample_canvas(view, mv, loc.canvas_spacing_mm, centre, loc, flip=True)
    found_l = apply_matrix(m_l, _centroid(canvas))
    assert np.abs(found_l - p).max() < 0.5, found_l - p
    # the canvas is physically square: one canvas pixel = 0.6 mm along both source axes
    step = np.linalg.norm((m_l[:2, :2] @ np.eye(2)) * np.array([[spacing[1]], [spacing[0]]]), axis=0)
    assert np.allclose(step, 0.6)


def test_bilateral_halves_are_masked():
    from pipeline.landmarks.geometry import StageSpec, field_centre, knee_field, make_view, sample_canvas

    img = np.ones((100, 200), np.float32)
    box = knee_field(img.shape, "L", "bilateral")
    assert box[0] == pytest.approx(99.5) and field_centre(box)[0] == pytest.approx(149.5)
    spec = StageSpec("global", 32, 8.0)  # 256 mm canvas on a 100 x 100 mm half (1 mm pixels)
    view, mv = make_view(img, (1.0, 1.0), field_centre(box), 260, 8.0, valid_box=box)
    canvas, _ = sample_canvas(view, mv, 8.0, field_centre(box), spec)
    assert np.isnan(canvas[:, :4]).all() and np.isfinite(canvas[14:18, 14:18]).all()


# ------------------------------------------------------------------------------------------- network
def test_network_shapes_size_and_self_describing_checkpoint(tmp_path):
    from pipeline.landmarks.engine import LandmarkCheckpointError, load_landmark_model, make_network
    from pipeline.landmarks.network import KneelHourglass, count_parameters

    with torch.device("meta"):  # no memory, no init cost
        full = KneelHourglass(n_points=16, width=70)
    assert 3.5e6 < count_parameters(full) < 4.5e6  # KNEEL size (~4 M)
    torch.manual_seed(0)
    net = make_network("local", 64, 1.0, width=4).eval()
    x = torch.rand(2, 1, 64, 64)
    coords, probs = net.forward_heatmaps(x)
    assert coords.shape == (2, 16, 2) and probs.shape == (2, 16, 16, 16)
    assert (coords >= 0).all() and (coords <= 1).all()
    torch.save(net.state_dict(), tmp_path / "m.pt")
    back = load_landmark_model(tmp_path / "m.pt")
    assert back.spec == net.spec and back.arch == net.arch
    assert torch.allclose(back(x), net(x))
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "ddp.pt")
    assert load_landmark_model(tmp_path / "ddp.pt").spec.stage == "local"
    with pytest.raises(ValueError, match="regresses 1 point"):
        KneelHourglass(n_points=16, stage="global")
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(LandmarkCheckpointError, match="no network description"):
        load_landmark_model(tmp_path / "other.pt")
    with pytest.raises(LandmarkCheckpointError, match="not found"):
        load_landmark_model(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------- metrics
def test_errors_in_mm_recall_and_outliers_by_group():
    from pipeline.landmarks.metrics import LandmarkErrorMetric, landmark_errors_mm, summarize_errors

    e = landmark_errors_mm([[10.0, 20.0]], [[7.0, 16.0]], (0.5, 0.2))  # dx 3 px * 0.2, dy 4 px * 0.5
    assert e.shape == (1,) and abs(e[0] - math.sqrt(0.6**2 + 2.0**2)) < 1e-12
    per_knee = landmark_errors_mm(np.zeros((2, 3, 2)), np.ones((2, 3, 2)), np.array([[1.0, 1.0], [3.0, 4.0]]))
    assert np.allclose(per_knee, [[math.sqrt(2)] * 3, [5.0] * 3])
    errs = np.tile(np.arange(16, dtype=float) * 0.0, (4, 1))
    errs[:, 4] = [0.5, 1.2, 2.2, 12.0]  # centre
    errs[:, 0] = [1.0, 1.0, 3.0, 3.0]
    errs[:, 8] = [2.5, 2.5, 2.5, 2.5]
    s = summarize_errors(errs)
    c = s["centre"]
    assert c["n"] == 4 and c["recall@1mm"] == 25.0 and c["recall@1.5mm"] == 50.0 and c["recall@2.5mm"] == 75.0
    assert c["outliers_pct"] == 25.0 and c["median_mm"] == pytest.approx(1.7)
    t = s["tibial_corners"]
    assert t["n"] == 8 and t["recall@1mm"] == 25.0 and t["recall@2.5mm"] == 75.0 and t["outliers_pct"] == 0.0
    assert set(s) == {"centre", "tibial_corners", "femoral_corners", "all"}
    m = LandmarkErrorMetric(mm_per_unit=100.0, reduce="recall", radius_mm=2.5)
    m.reset()
    m.update((torch.tensor([[[0.50, 0.50], [0.10, 0.10]]]), torch.tensor([[[0.52, 0.50], [0.10, 0.13]]])))
    assert m.compute() == 50.0  # 2 mm and 3 mm errors


def test_subject_level_folds_and_split():
    from pipeline.landmarks.data import fold_subjects, manifest_items, split_items

    lm = json.dumps(_knee_landmarks(100, 100).tolist())
    rows = [{"subject_id": f"S{i:02d}", "side": s, "visit_month": v, "xray_dicom": f"x/{i}_{v}.dcm", "landmarks": lm}
            for i in range(20) for v in (0, 48) for s in ("R", "L")]
    df = pd.DataFrame(rows)
    df.attrs["root"] = "/data"
    items = manifest_items(df)
    assert len(items) == 80 and items[0]["image"].startswith("/data/") and items[0]["side"] == "L"
    sets = split_items(items, {"train": 0.8, "test": 0.2}, seed=3)
    tr, te = ({it["subject_id"] for it in sets[k]} for k in ("train", "test"))
    assert len(te) == 4 and not tr & te
    folds = fold_subjects(sorted(tr), 5, seed=3)
    assert sorted(s for f in folds for s in f) == sorted(tr) and all(len(f) in (3, 4) for f in folds)
    assert fold_subjects(sorted(tr, reverse=True), 5, seed=3) == folds  # order independent

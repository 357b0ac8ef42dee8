"""Classical B-spline registration baseline and registration overlays (issue 14 items 6, 7).

The map convention is checked independently of the torch warp: a numpy / scipy resampling
``out[x] = moving(phi(x))`` (``map_coordinates``, pixel units = phi * (size - 1)) must reproduce the fixed image.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread
from scipy.ndimage import map_coordinates

from pipeline.registration.classical import bspline_register, bspline_registration, transform_to_map
from pipeline.registration.overlay import (
    BONE_COLOURS,
    overlay_size,
    save_method_grid,
    save_registration_overlay,
)

H = W = 64
SHIFT = (3.0, 5.0)  # fixed = moving moved down 3 rows and right 5 columns


def blobs(shift=(0.0, 0.0), h: int = H, w: int = W) -> np.ndarray:
    """Smooth test image: a few Gaussian blobs of different sizes and heights, moved by ``shift`` pixels."""
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for y, x, s, a in [(20, 22, 6, 1.0), (40, 40, 8, 0.7), (30, 50, 5, 0.9), (48, 18, 7, 0.5), (14, 44, 4, 0.8)]:
        img += a * np.exp(-((r - y - shift[0]) ** 2 + (c - x - shift[1]) ** 2) / (2.0 * s * s))
    return img


def scipy_warp(moving: np.ndarray, phi: np.ndarray, order: int = 1) -> np.ndarray:
    """Independent reference warp: out[x] = moving(phi(x)) with phi on [0, 1] (row, column)."""
    h, w = moving.shape
    return map_coordinates(moving, [phi[0] * (h - 1), phi[1] * (w - 1)], order=order, mode="nearest")


def pixel_displacement(phi: np.ndarray) -> np.ndarray:
    h, w = phi.shape[1:]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([phi[0] * (h - 1) - rows, phi[1] * (w - 1) - cols])


@pytest.fixture(scope="module")
def translated():
    moving, fixed = blobs(), blobs(SHIFT)
    result = bspline_registration(moving, fixed, mesh_size=(4, 4), iterations=40)
    return moving, fixed, result


# ------------------------------------------------------------------ transform -> map conversion
def test_transform_to_map_translation_hand_computed():
    # ITK maps fixed (x, y) = (column, row) to moving (x + 5, y + 3): phi = ((row + 3) / 4, (col + 5) / 6).
    phi = transform_to_map(sitk.TranslationTransform(2, (5.0, 3.0)), (5, 7))
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    assert phi.shape == (2, 5, 7) and phi.dtype == np.float32
    np.testing.assert_allclose(phi[0], (rows + 3.0) / 4.0, atol=1e-6)
    np.testing.assert_allclose(phi[1], (cols + 5.0) / 6.0, atol=1e-6)


def test_transform_to_map_rotation_about_centre():
    # Rotation by +90 degrees about pixel (row 2, col 2): ITK (x, y) -> (cx - (y - cy), cy + (x - cx)).
    tx = sitk.Euler2DTransform((2.0, 2.0), np.pi / 2, (0.0, 0.0))
    phi = transform_to_map(tx, (5, 5)) * 4.0
    # fixed pixel (row 0, col 4) = (x 4, y 0) -> (x 4, y 4) = (row 4, col 4)
    np.testing.assert_allclose(phi[:, 0, 4], [4.0, 4.0], atol=1e-5)
    # fixed pixel (row 1, col 2) = (x 2, y 1) -> (x 3, y 2) = (row 2, col 3)
    np.testing.assert_allclose(phi[:, 1, 2], [2.0, 3.0], atol=1e-5)


# ------------------------------------------------------------------ registration
def test_translation_recovered_with_the_right_sign(translated):
    moving, fixed, result = translated
    disp = pixel_displacement(result.phi)[:, 16:48, 16:48]
    # fixed(x) = moving(x - shift), so phi(x) = x - shift: displacement (-3, -5) pixels.
    assert np.abs(disp[0] + SHIFT[0]).max() < 0.5
    assert np.abs(disp[1] + SHIFT[1]).max() < 0.5
    warped = scipy_warp(moving, result.phi)
    before = np.abs(moving - fixed)[8:56, 8:56].max()
    after = np.abs(warped - fixed)[8:56, 8:56].max()
    assert after < 0.1 * before


def test_map_shape_dtype_range_and_info(translated):
    _, _, result = translated
    assert result.phi.shape == (2, H, W) and result.phi.dtype == np.float32
    assert np.isfinite(result.phi).all()
    assert result.phi.min() > -0.2 and result.phi.max() < 1.2
    assert len(result.iterations_per_level) == 3
    assert result.iterations == sum(result.iterations_per_level) > 0
    assert result.evaluations >= result.iterations
    assert np.isfinite(result.metric_value) and result.metric_value < 0  # negative Mattes MI
    assert result.stop_condition
    assert set(result.info()) >= {"iterations", "metric_value", "stop_condition"}


def test_identical_images_give_the_identity():
    img = blobs()
    for metric in ("ncc", "meansquares"):  # optimum exactly at the identity: zero gradient, no step
        phi = bspline_register(img, img, mesh_size=(4, 4), iterations=20, metric=metric)
        assert np.abs(pixel_displacement(phi)).max() < 1e-4, metric
    # Mattes MI (Parzen-window histogram) drifts slightly where the image is flat; stays sub-pixel.
    phi = bspline_register(img, img, mesh_size=(4, 4), iterations=20)
    assert np.abs(pixel_displacement(phi)).max() < 0.5


def test_deterministic_two_runs_identical():
    moving, fixed = blobs(), blobs((1.0, -2.0))
    a = bspline_register(moving, fixed, mesh_size=(4, 4), iterations=15)
    b = bspline_register(moving, fixed, mesh_size=(4, 4), iterations=15)
    assert np.array_equal(a, b)
    c = bspline_register(moving, fixed, mesh_size=(4, 4), iterations=15, sampling_percentage=0.5, seed=3)
    d = bspline_register(moving, fixed, mesh_size=(4, 4), iterations=15, sampling_percentage=0.5, seed=3)
    assert np.array_equal(c, d)


def test_ncc_metric_recovers_translation_direction():
    moving, fixed = blobs(), blobs(SHIFT)
    phi = bspline_register(moving, fixed, mesh_size=(4, 4), metric="ncc", iterations=40)
    disp = pixel_displacement(phi)[:, 24:40, 24:40]
    assert np.abs(disp.mean(axis=(1, 2)) + np.array(SHIFT)).max() < 1.0


def test_bad_inputs_raise_clear_errors():
    img = blobs()
    with pytest.raises(ValueError, match=r"a\.png: image is constant"):
        bspline_register(np.zeros((H, W)), img, moving_name="a.png")
    with pytest.raises(ValueError, match=r"b\.png: image is constant"):
        bspline_register(img, np.full((H, W), 7.0), fixed_name="b.png")
    with pytest.raises(ValueError, match=r"sizes differ: moving is \(64, 64\), fixed is \(64, 48\)"):
        bspline_register(img, img[:, :48])
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bspline_register(bad, img)
    with pytest.raises(ValueError, match="2D image"):
        bspline_register(np.stack([img, img]), img)
    with pytest.raises(ValueError, match="metric"):
        bspline_register(img, img, metric="mi")


def test_consistent_with_package_warp(translated):
    maps = pytest.importorskip("pipeline.registration.maps")
    torch = pytest.importorskip("torch")
    moving, _, result = translated
    ours = scipy_warp(moving, result.phi)
    theirs = maps.warp(torch.from_numpy(moving.astype(np.float32))[None, None],
                       torch.from_numpy(result.phi)[None])
    np.testing.assert_allclose(theirs[0, 0].numpy(), ours, atol=1e-4)


# ------------------------------------------------------------------ overlays
def knee_labels(h: int = H, w: int = W) -> np.ndarray:
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    lab = np.zeros((h, w), np.int64)
    lab[((r - 16) / 14) ** 2 + ((c - 32) / 10) ** 2 < 1] = 1
    lab[((r - 46) / 14) ** 2 + ((c - 30) / 9) ** 2 < 1] = 2
    lab[((r - 48) / 12) ** 2 + ((c - 46) / 3) ** 2 < 1] = 3
    return lab


def test_overlay_png_size_content_and_colours(tmp_path, translated):
    moving, fixed, result = translated
    labels = knee_labels()
    out = tmp_path / "sub" / "pair.png"
    written = save_registration_overlay(out, fixed, moving, scipy_warp(moving, result.phi), result.phi,
                                        fixed_labels=labels, warped_labels=labels, title="pair 0",
                                        dice={"femur": 0.9, "tibia": 0.8, "fibula": 0.7, "mean": 0.8},
                                        fold_percent=0.0, grid_step=8, panel_px=128)
    assert written == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["pair.png"]  # no temporary left behind
    img = imread(out)
    assert img.shape[:2] == overlay_size((H, W), panel_px=128, title_lines=2)
    rgb = np.round(img[..., :3] * 255).astype(int)
    assert rgb.std() > 10
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100
    for colour in BONE_COLOURS.values():  # each bone contour / legend colour is present
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - target).sum(axis=-1) < 40).sum() > 20, colour


def test_overlay_grid_bends_only_for_a_deformation(tmp_path):
    """The grid panel (last fifth) differs between the identity and a deformed map."""
    img = blobs()
    rows, cols = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    ident = np.stack([rows, cols]).astype(np.float32)
    bent = ident.copy()
    bent[1] += 0.05 * np.sin(np.pi * rows) * np.sin(np.pi * cols)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    save_registration_overlay(a, img, img, img, ident, panel_px=128)
    save_registration_overlay(b, img, img, img, bent, panel_px=128)
    ia, ib = imread(a)[..., :3], imread(b)[..., :3]
    assert np.array_equal(ia[:, : 4 * 128], ib[:, : 4 * 128])  # image panels identical
    assert np.abs(ia[:, 4 * 128:] - ib[:, 4 * 128:]).sum() > 50  # grid panel bent


def test_overlay_rejects_mismatched_inputs(tmp_path):
    img = blobs()
    phi = np.zeros((2, H, W), np.float32)
    with pytest.raises(ValueError, match="phi has shape"):
        save_registration_overlay(tmp_path / "x.png", img, img, img, phi[:, :32])
    with pytest.raises(ValueError, match="warped has shape"):
        save_registration_overlay(tmp_path / "x.png", img, img, img[:32], phi)
    assert not list(tmp_path.iterdir())


def test_method_grid_png(tmp_path, translated):
    moving, fixed, result = translated
    rows, cols = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    ident = np.stack([rows, cols]).astype(np.float32)
    out = tmp_path / "grid.png"
    save_method_grid(out, [("affine only", fixed, moving, {"mean": 0.5}, ident),
                           ("B-spline", fixed, scipy_warp(moving, result.phi), {"mean": 0.9}, result.phi)],
                     fixed_labels=knee_labels(), title="pair 0", panel_px=96)
    img = imread(out)
    assert img.shape[1] == 150 + 4 * 96 and img.shape[0] > 2 * 96
    with pytest.raises(ValueError, match="at least one row"):
        save_method_grid(tmp_path / "empty.png", [])

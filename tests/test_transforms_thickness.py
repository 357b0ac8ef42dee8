"""Thickness maps: NaN-aware resize, NaN fill + mask, / 3 mm scaling, MRIS-C stack/unstack."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _disc_map(h=40, w=36, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    m = rng.uniform(0.5, 3.5, size=(h, w)).astype(np.float32)
    m[((yy - h / 2) ** 2 / (0.4 * h) ** 2 + (xx - w / 2) ** 2 / (0.4 * w) ** 2) > 1] = np.nan
    return m[None]


def _neighbours_all_valid(valid, out_size):
    """Output pixels whose bilinear (align_corners=False) input neighbours are all valid."""
    h, w = valid.shape
    hs, ws = out_size
    res = np.zeros(out_size, bool)
    for i in range(hs):
        u = min(max((i + 0.5) * h / hs - 0.5, 0), h - 1)
        r = sorted({int(np.floor(u)), min(int(np.floor(u)) + 1, h - 1)})
        for j in range(ws):
            v = min(max((j + 0.5) * w / ws - 0.5, 0), w - 1)
            c = sorted({int(np.floor(v)), min(int(np.floor(v)) + 1, w - 1)})
            res[i, j] = valid[np.ix_(r, c)].all()
    return res


@pytest.mark.parametrize("out_size", [(64, 64), (17, 23), (40, 36)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_nan_aware_resize_mask_and_range(out_size, mode):
    from transforms import nan_aware_resize

    m = _disc_map()
    out = nan_aware_resize(torch.as_tensor(m), out_size, mode=mode).numpy()
    assert out.shape == (1, *out_size)
    valid_in = np.isfinite(m[0])
    lo, hi = np.nanmin(m), np.nanmax(m)
    finite = out[np.isfinite(out)]
    assert finite.min() >= lo and finite.max() <= hi  # never outside [min, max] of the valid input
    if mode == "bilinear":
        must_be_valid = _neighbours_all_valid(valid_in, out_size)
        assert must_be_valid.sum() > 50
        assert np.isfinite(out[0][must_be_valid]).all()
    assert np.isnan(out[0, 0, 0]) and np.isnan(out[0, -1, -1])  # far outside the footprint stays NaN


def test_nan_aware_resize_no_zero_bleed():
    from transforms import nan_aware_resize

    m = np.full((1, 30, 30), 2.0, np.float32)
    m[:, :, :10] = np.nan
    out = nan_aware_resize(torch.as_tensor(m), (45, 45)).numpy()
    finite = out[np.isfinite(out)]
    np.testing.assert_allclose(finite, 2.0, rtol=1e-6)  # a naive 0-filled resize would darken the edge
    assert np.isfinite(out[0, :, 16:]).all() and np.isnan(out[0, :, :14]).all()


def test_nan_aware_resize_transform_meta_and_inverse():
    from monai.data import MetaTensor

    from transforms import NaNAwareResize, NaNAwareResized

    img = MetaTensor(torch.as_tensor(_disc_map()), meta={"filename_or_obj": "fc.npy"})
    t = NaNAwareResize((20, 18))
    out = t(img)
    assert out.shape == (1, 20, 18) and out.meta["filename_or_obj"] == "fc.npy"
    np.testing.assert_allclose(out.pixdim.numpy()[:2], [2.0, 2.0])
    back = t.inverse(out)
    assert back.shape == (1, 40, 36) and len(back.applied_operations) == 0
    d = NaNAwareResized("fc", 8)({"fc": _disc_map()})
    assert d["fc"].shape == (1, 8, 8)


def test_fill_nan_and_mask():
    from transforms import FillNaN, FillNaNd

    m = _disc_map()
    filled = FillNaN()(m)
    assert not torch.isnan(filled).any()
    np.testing.assert_array_equal(filled.numpy()[np.isnan(m)], 0.0)
    np.testing.assert_array_equal(filled.numpy()[~np.isnan(m)], m[~np.isnan(m)])
    both = FillNaN(append_mask=True)(m)
    assert both.shape == (2, 40, 36)
    np.testing.assert_array_equal(both[1].numpy(), np.isfinite(m[0]).astype(np.float32))
    d = FillNaNd(("fc", "tc"))({"fc": m, "tc": m * 2})
    np.testing.assert_array_equal(d["fc_mask"].numpy(), np.isfinite(m).astype(np.float32))
    assert not torch.isnan(d["tc"]).any() and d["tc_mask"].shape == m.shape


def test_scale_thickness_and_inverse():
    from pipeline.conventions import THICKNESS_SCALE_MM
    from transforms import ScaleThickness, ScaleThicknessd

    assert THICKNESS_SCALE_MM == 3.0
    exact = np.array([[[0.0, 0.75, 1.5, 3.0, 6.0, np.nan]]], np.float32)
    t = ScaleThickness()
    s = t(exact)
    np.testing.assert_array_equal(s.numpy()[..., :5], [[[0.0, 0.25, 0.5, 1.0, 2.0]]])
    np.testing.assert_array_equal(t.inverse(s).numpy(), exact)  # NaN preserved (array_equal: nan == nan)
    x = np.random.default_rng(1).uniform(0, 6, size=(1, 50, 50)).astype(np.float32)
    rt = t.inverse(t(x)).numpy()
    np.testing.assert_allclose(rt, x, rtol=1.2e-7, atol=0)  # float32: within 1 ulp
    t64 = ScaleThickness(dtype=torch.float64)
    assert np.array_equal(t64.inverse(t64(x)).numpy().astype(np.float32), x)  # float64: exact
    unscale = ScaleThickness(invert=True)
    np.testing.assert_array_equal(unscale(s).numpy(), t.inverse(s).numpy())
    d = ScaleThicknessd("fc")({"fc": exact})
    np.testing.assert_array_equal(ScaleThicknessd("fc").inverse(d)["fc"].numpy(), exact)


def test_stack_unstack_round_trip():
    from transforms import (
        StackThicknessMaps,
        StackThicknessMapsd,
        UnstackThicknessMaps,
        UnstackThicknessMapsd,
    )

    fc, tc = _disc_map(16, 16, 1), _disc_map(16, 16, 2)
    st = StackThicknessMaps(16)([fc, tc])
    assert st.shape == (1, 32, 16)
    np.testing.assert_array_equal(st[:, :16].numpy(), fc)  # FC on top, TC below
    np.testing.assert_array_equal(st[:, 16:].numpy(), tc)
    fc2, tc2 = UnstackThicknessMaps()(st)
    np.testing.assert_array_equal(fc2.numpy(), fc)
    np.testing.assert_array_equal(tc2.numpy(), tc)
    d = StackThicknessMapsd(spatial_size=8)({"fc": _disc_map(), "tc": _disc_map(seed=3)})
    assert d["maps"].shape == (1, 16, 8)
    u = UnstackThicknessMapsd("maps", spatial_size=(40, 36))(d)
    assert u["fc"].shape == (1, 40, 36) and u["tc"].shape == (1, 40, 36)
    with pytest.raises(ValueError):
        UnstackThicknessMaps(n_maps=3)(st)

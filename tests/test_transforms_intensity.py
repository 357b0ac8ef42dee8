"""MRIS percentile normalisation: min -> 0, 99th percentile -> 0.99."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_hand_computed_values():
    from transforms import PercentileNormalize

    x = torch.arange(10, 111, dtype=torch.float32)[None, None]  # 101 values: p99 = 10 + 99 = 109
    out = PercentileNormalize()(x)
    torch.testing.assert_close(out, (x - 10) * 0.01)
    assert out.min() == 0 and abs(float(out.max()) - 1.0) < 1e-6  # 110 -> 1.0: above 0.99, not clipped


def test_matches_numpy_percentile_and_clip():
    from transforms import PercentileNormalize

    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, size=(1, 37, 41)).astype(np.float32)
    out = PercentileNormalize()(x)
    assert isinstance(out, torch.Tensor)
    ref = (x - x.min()) * 0.99 / (np.percentile(x, 99) - x.min())
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    clipped = PercentileNormalize(clip=True)(x)
    assert float(clipped.max()) == 1.0 and float(clipped.min()) == 0.0
    assert float(out.max()) > 1.0


def test_constant_and_nan_handling():
    from transforms import PercentileNormalize

    const = torch.full((1, 8, 8), 7.0)
    out = PercentileNormalize()(const)
    assert torch.equal(out.as_tensor(), torch.zeros(1, 8, 8))
    x = torch.arange(10, 111, dtype=torch.float32)[None, None].repeat(1, 2, 1)
    x[0, 1, 5] = float("nan")
    x[0, 1, 6] = float("nan")
    out = PercentileNormalize()(x)
    assert torch.isnan(out[0, 1, 5]) and torch.isnan(out[0, 1, 6])
    # statistics ignore NaN (numpy nanpercentile as the reference)
    p99 = float(np.nanpercentile(x.numpy(), 99))
    assert 108.0 < p99 < 110.0
    torch.testing.assert_close(out[0, 0], (x[0, 0] - 10) * (0.99 / (p99 - 10)))
    filled = PercentileNormalize(nan_fill=0.0)(x)
    assert not torch.isnan(filled).any() and filled[0, 1, 5] == 0
    allnan = PercentileNormalize()(torch.full((1, 3, 3), float("nan")))
    assert torch.isnan(allnan).all()


def test_meta_device_and_dict():
    from monai.data import MetaTensor

    from transforms import PercentileNormalize, PercentileNormalized, nan_quantile

    img = MetaTensor(torch.rand(1, 16, 16) * 1000, meta={"filename_or_obj": "x.dcm"})
    out = PercentileNormalized("image")({"image": img})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.dcm"
    assert out.device == img.device and out.dtype == torch.float32
    v = torch.randn(1001)
    for q in (0.0, 0.37, 0.99, 1.0):
        assert float(nan_quantile(v, q)) == pytest.approx(float(np.quantile(v.numpy(), q)), abs=1e-5)
    ints = PercentileNormalize()(np.arange(101, dtype=np.uint16).reshape(1, 1, 101))
    assert ints.dtype == torch.float32 and float(ints[0, 0, 99]) == pytest.approx(0.99)


def test_torch_path_matches_numpy_path():
    from transforms import PercentileNormalize

    x = torch.as_tensor(np.random.default_rng(3).gamma(2.0, 50.0, size=(1, 20, 30)).astype(np.float32))
    x[0, 3, 4] = float("nan")
    for t in (PercentileNormalize(), PercentileNormalize(clip=True, nan_fill=-1.0)):
        torch.testing.assert_close(t._normalise_torch(x), torch.from_numpy(t._normalise_np(x.numpy().copy())),
                                   equal_nan=True, check_dtype=False, rtol=1e-5, atol=1e-6)
    const = torch.full((1, 4, 4), 2.0)
    assert torch.equal(PercentileNormalize()._normalise_torch(const), torch.zeros(1, 4, 4))

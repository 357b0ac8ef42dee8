"""Per-sample MRIS augmentation: reproducibility, per-sample draws, device, inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def _img(n=48):
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (((xx - 20) ** 2 + (yy - 28) ** 2) < 100).float()[None] * 0.8 + 0.1


def test_reproducible_with_set_random_state():
    from transforms import RandKneeAugment

    a = RandKneeAugment(prob_noise=1.0, prob_contrast=1.0).set_random_state(123)
    b = RandKneeAugment(prob_noise=1.0, prob_contrast=1.0).set_random_state(123)
    c = RandKneeAugment(prob_noise=1.0, prob_contrast=1.0).set_random_state(7)
    x = _img()
    ya, yb, yc = a(x), b(x), c(x)
    torch.testing.assert_close(ya, yb)
    assert not torch.allclose(ya, yc)
    assert ya.shape == x.shape and ya.dtype == torch.float32


def test_different_per_sample_in_batch():
    from transforms import RandKneeAugment

    aug = RandKneeAugment().set_random_state(0)
    batch = _img()[None].repeat(6, 1, 1, 1)
    out = aug(batch)
    assert out.shape == batch.shape
    for i in range(1, 6):
        assert not torch.allclose(out[0], out[i])
    again = RandKneeAugment().set_random_state(0)(batch)
    torch.testing.assert_close(out, again)


def test_draw_distribution():
    from transforms import RandKneeAugment

    aug = RandKneeAugment().set_random_state(5)
    angles, noise, contrast, gammas = [], 0, 0, []
    for _ in range(400):
        aug.randomize()
        angles.append(aug.angle)
        noise += aug.do_noise
        contrast += aug.do_contrast
        if aug.do_contrast:
            gammas.append(aug.gamma)
    assert max(abs(a) for a in angles) <= math.radians(15) and np.std(angles) > math.radians(5)
    assert 140 < noise < 260 and 140 < contrast < 260  # p = 0.5
    assert min(gammas) >= 0.5 and max(gammas) <= 4.5


def test_dict_shares_draws_and_inverse_restores_geometry():
    from monai.data import MetaTensor

    from transforms import RandKneeAugment, RandKneeAugmentd

    img = MetaTensor(_img(), affine=torch.diag(torch.tensor([0.3, 0.3, 1.0], dtype=torch.float64)))
    t = RandKneeAugmentd(["a", "b"], prob_noise=0.0).set_random_state(3)
    out = t({"a": img, "b": img.clone()})
    torch.testing.assert_close(out["a"].as_tensor(), out["b"].as_tensor())
    assert not torch.allclose(out["a"].as_tensor(), img.as_tensor())  # rotated (prob_rotate = 1)
    assert len(img.applied_operations) == 0
    inv = t.inverse(out)
    np.testing.assert_allclose(inv["a"].affine.numpy(), img.affine.numpy(), atol=1e-6)
    assert len(inv["a"].applied_operations) == 0
    noop = RandKneeAugment(prob_rotate=0.0, prob_noise=0.0, prob_contrast=0.0)
    y = noop(img)
    assert y is not img and torch.equal(y.as_tensor(), img.as_tensor())
    assert noop.inverse(y).shape == img.shape


def test_numpy_input():
    from transforms import RandKneeAugment

    out = RandKneeAugment().set_random_state(1)(_img().numpy())
    assert isinstance(out, torch.Tensor) and out.shape == (1, 48, 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_device():
    from monai.data import MetaTensor

    from transforms import KneeROICrop, PercentileNormalize, RandKneeAugment, nan_aware_resize

    x = MetaTensor(_img().cuda(), affine=torch.diag(torch.tensor([0.3, 0.3, 1.0], dtype=torch.float64)))
    y = RandKneeAugment(prob_noise=1.0, prob_contrast=1.0).set_random_state(0)(x)
    assert y.is_cuda
    y_cpu = RandKneeAugment(prob_noise=1.0, prob_contrast=1.0).set_random_state(0)(x.cpu())
    torch.testing.assert_close(y.cpu().as_tensor(), y_cpu.as_tensor(), atol=1e-4, rtol=1e-4)
    assert RandKneeAugment().set_random_state(0)(x.as_tensor()[None].repeat(3, 1, 1, 1)).is_cuda
    assert KneeROICrop(roi_mm=6.0)(x, (20.0, 28.0), "R").is_cuda
    assert PercentileNormalize()(x).is_cuda
    m = x.as_tensor().clone()
    m[:, :5] = float("nan")
    assert nan_aware_resize(m, 64).is_cuda

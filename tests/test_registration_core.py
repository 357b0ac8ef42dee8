"""GradICON core of segmentation-guided registration (issue 14): maps, losses, metrics, network, training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.io.checkpoints import load_network
from pipeline.registration.losses import gradicon_penalty, lncc, lncc_loss, mi_loss, soft_dice_loss
from pipeline.registration.maps import (
    compose,
    displacement_to_map,
    identity_map,
    map_to_pixels,
    pixels_to_map,
    sample_map,
    warp,
    warp_labels,
)
from pipeline.registration.metrics import bone_dice, fold_percent, jacobian_determinant
from pipeline.registration.network import (
    RegistrationNetwork,
    TwoStepRegistration,
    make_registration_network,
)
from pipeline.registration.step import GradICONTrainStep, gradicon_loss, onehot_labels, register

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 24, 32


def affine_map(matrix, offset, shape=(H, W), batch=1) -> torch.Tensor:
    """The map ``x -> M (x - c) + c + t`` on [0, 1] (row, column), c = (0.5, 0.5), sampled on ``shape``."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    t = torch.as_tensor(offset, dtype=torch.float64)
    return affine_fn(m, t)(identity_map(shape, batch, dtype=torch.float64)).float()


def inside(phi: torch.Tensor) -> bool:
    """Whether every point of ``phi`` lies in the image domain [0, 1]^2 (where sampling a map is exact)."""
    return bool(((phi >= 0) & (phi <= 1)).all())


def affine_fn(m: torch.Tensor, t: torch.Tensor):
    """The same affine map as a function of coordinate tensors ``B x 2 x ...`` (exact, ICON style)."""
    def f(x: torch.Tensor) -> torch.Tensor:
        c = 0.5
        y = torch.einsum("ij,bj...->bi...", m.to(x.dtype), x - c)
        return y + c + t.to(x.dtype).view(1, 2, *([1] * (x.ndim - 2)))
    return f


def rotation_scale(angle_deg: float, scale: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


# A contraction about the centre (maps the image domain into itself) and its exact inverse (an expansion).
CONTRACT = rotation_scale(5.0, 0.9)
EXPAND = np.linalg.inv(CONTRACT)


# ---------------------------------------------------------------- maps


def test_identity_map_layout():
    phi = identity_map((H, W), batch=2)
    assert phi.shape == (2, 2, H, W) and phi.dtype == torch.float32
    assert torch.allclose(phi[0, 0, :, 0], torch.linspace(0, 1, H))  # channel 0: row coordinate
    assert torch.allclose(phi[0, 1, 0, :], torch.linspace(0, 1, W))  # channel 1: column coordinate
    assert torch.all(phi[:, 0, 3, :] == phi[0, 0, 3, 0]) and torch.all(phi[:, 1, :, 5] == phi[0, 1, 0, 5])
    px = map_to_pixels(phi)
    assert torch.allclose(px[0, 0, 7, 3], torch.tensor(7.0)) and torch.allclose(px[0, 1, 7, 3], torch.tensor(3.0))
    assert torch.allclose(pixels_to_map(px), phi)


def test_warp_identity_returns_image():
    img = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp(img, identity_map(img.shape, 2)), img, atol=1e-5)
    assert torch.allclose(warp(img, identity_map(img.shape)), img, atol=1e-5)  # batch-1 map broadcast


def test_warp_integer_shift():
    img = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(1))
    k_row, k_col = 2, 5
    disp = torch.zeros(1, 2, H, W)
    disp[:, 0] = k_row / (H - 1)
    disp[:, 1] = k_col / (W - 1)
    out = warp(img, displacement_to_map(disp))  # out(r, c) = img(r + 2, c + 5)
    assert torch.allclose(out[..., :H - k_row, :W - k_col], img[..., k_row:, k_col:], atol=1e-5)
    # border padding: beyond the last column the last column is repeated
    assert torch.allclose(out[0, 0, :H - k_row, W - 1], img[0, 0, k_row:, W - 1], atol=1e-5)
    # nearest mode gives the same on integer shifts
    out_nn = warp(img, displacement_to_map(disp), mode="nearest")
    assert torch.equal(out_nn[..., :H - k_row, :W - k_col], img[..., k_row:, k_col:])


def test_compose_identity_and_associativity():
    a = affine_map(CONTRACT, (0.01, -0.01))
    b = affine_map(rotation_scale(-8.0, 0.85), (0.0, 0.01))
    c = affine_map(rotation_scale(3.0, 0.9), (-0.01, 0.0))
    assert inside(a) and inside(b) and inside(c)  # so compositions are exact, not border-extended
    ident = identity_map((H, W))
    assert torch.allclose(compose(a, ident), a, atol=1e-6)
    assert torch.allclose(compose(ident, a), a, atol=1e-6)
    left, right = compose(compose(a, b), c), compose(a, compose(b, c))
    assert torch.allclose(left, right, atol=1e-5)
    # and both equal the product of the affine maps: a(b(c(x)))
    ma, mb, mc = (torch.as_tensor(m) for m in (CONTRACT, rotation_scale(-8.0, 0.85), rotation_scale(3.0, 0.9)))
    fa, fb, fc = (affine_fn(m, torch.as_tensor(t)) for m, t in
                  ((ma, (0.01, -0.01)), (mb, (0.0, 0.01)), (mc, (-0.01, 0.0))))
    exact = fa(fb(fc(identity_map((H, W), dtype=torch.float64)))).float()
    assert torch.allclose(left, exact, atol=1e-5)


def test_compose_with_exact_inverse_is_identity():
    phi, inv = affine_map(CONTRACT, (0, 0)), affine_map(EXPAND, (0, 0))
    ident = identity_map((H, W))
    # inv(phi(x)): phi maps the domain into itself, so the result is exact everywhere
    assert torch.allclose(compose(inv, phi), ident, atol=1e-5)
    # phi(inv(x)): exact where inv(x) stays inside the domain
    inside = ((inv >= 0) & (inv <= 1)).all(1, keepdim=True).expand_as(inv)
    assert inside.float().mean() > 0.5
    assert torch.allclose(compose(phi, inv)[inside], ident[inside], atol=1e-5)
    # translations stay translations beyond the border (displacements are border-extended)
    shift = displacement_to_map(torch.full((1, 2, H, W), 0.1))
    back = displacement_to_map(torch.full((1, 2, H, W), -0.1))
    assert torch.allclose(compose(shift, back), ident, atol=1e-6)
    assert torch.allclose(compose(back, shift), ident, atol=1e-6)


def test_sample_map_at_off_grid_points():
    phi = affine_map(CONTRACT, (0.02, 0.0))
    pts = torch.rand(1, 2, 50, generator=torch.Generator().manual_seed(2))
    exact = affine_fn(torch.as_tensor(CONTRACT), torch.tensor([0.02, 0.0]))(pts.double()).float()
    assert sample_map(phi, pts).shape == (1, 2, 50)
    assert torch.allclose(sample_map(phi, pts), exact, atol=1e-5)


@pytest.mark.parametrize("method", ["nearest", "onehot"])
def test_warp_labels_holds_only_label_values(method):
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 1, H, W, dtype=torch.long)
    labels[:, :, 4:14, 3:15] = 1
    labels[:, :, 6:20, 15:28] = 3  # label 2 absent: 1 and 3 touch
    labels[1, 0, 20:, :10] = 2
    disp = torch.randn(2, 2, H // 4, W // 4, generator=gen) * 0.05
    phi = compose(affine_map(rotation_scale(17.0, 1.1), (0.03, -0.05)),
                  displacement_to_map(torch.nn.functional.interpolate(disp, size=(H, W), mode="bilinear")))
    out = warp_labels(labels, phi, method=method)
    assert out.dtype == torch.int64 and out.shape == labels.shape
    for b in range(2):
        assert set(out[b].unique().tolist()) <= set(labels[b].unique().tolist())
    assert 2 not in out[0].unique().tolist()
    assert (out != labels).any()  # the map did move things
    # the defect the paper's code had: bilinear warping + rounding invents label 2 between 1 and 3
    rounded = warp(labels.float(), phi).round().long()
    assert 2 in rounded[0].unique().tolist()


def test_warp_labels_nearest_integer_shift_exact():
    labels = torch.randint(0, 4, (1, 1, H, W), generator=torch.Generator().manual_seed(4))
    disp = torch.zeros(1, 2, H, W)
    disp[:, 1] = 3 / (W - 1)
    for method in ("nearest", "onehot"):
        out = warp_labels(labels, displacement_to_map(disp), method=method)
        assert torch.equal(out[..., :W - 3], labels[..., 3:])


def test_warp_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        warp_labels(torch.zeros(1, H, W, dtype=torch.long), identity_map((H, W)))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        warp_labels(torch.full((1, 1, H, W), 5), identity_map((H, W)), method="onehot")
    with pytest.raises(ValueError, match="method"):
        warp_labels(torch.zeros(1, 1, H, W, dtype=torch.long), identity_map((H, W)), method="bilinear")


# ---------------------------------------------------------------- losses


def _lncc_scipy(a: np.ndarray, b: np.ndarray, sigma: float = 3.0, eps: float = 1e-5) -> np.ndarray:
    """Direct per-item LNCC with scipy's Gaussian filter (zero padding, truncate 2 sigma = 13 taps)."""
    def g(x):
        return ndimage.gaussian_filter(x, sigma, mode="constant", cval=0.0, truncate=2.0)
    out = []
    for ai, bi in zip(a, b):
        vals = []
        for ac, bc in zip(ai, bi):
            ga, gb = g(ac), g(bc)
            cov = g(ac * bc) - ga * gb
            va = np.maximum(g(ac * ac) - ga ** 2, 0) + eps
            vb = np.maximum(g(bc * bc) - gb ** 2, 0) + eps
            vals.append(cov / np.sqrt(va * vb))
        out.append(np.mean(vals))
    return np.array(out)


def test_lncc_matches_scipy():
    rng = np.random.default_rng(5)
    a = rng.random((2, 2, H, W))
    b = 0.6 * a + 0.4 * rng.random((2, 2, H, W))
    ours = lncc(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()
    ref = _lncc_scipy(a, b)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    ours32 = lncc(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours32, ref, atol=1e-4)
    assert 0.2 < ref.min() < 1.0  # a non-trivial correlation


def test_lncc_signed_extremes():
    a = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(lncc(a, a), torch.ones(2), atol=1e-3)
    assert torch.allclose(lncc(a, -a), -torch.ones(2), atol=1e-3)
    assert torch.allclose(lncc(a, 3 * a), torch.ones(2), atol=1e-3)  # invariant to intensity scale
    assert abs(float(lncc_loss(a, a))) < 1e-3 and abs(float(lncc_loss(a, -a)) - 2.0) < 1e-3


def test_mi_and_soft_dice_losses():
    gen = torch.Generator().manual_seed(7)
    a = torch.rand(1, 1, H, W, generator=gen)
    assert float(mi_loss(a, a)) < float(mi_loss(a, torch.rand(1, 1, H, W, generator=gen)))
    lab = torch.zeros(1, 1, H, W, dtype=torch.long)
    lab[..., 2:10, 2:10] = 1
    oh = onehot_labels(lab)
    assert oh.shape == (1, 4, H, W)
    other = oh.clone()
    other[:, 1], other[:, 2] = oh[:, 2], oh[:, 1]
    assert float(soft_dice_loss(oh[:, :2], oh[:, :2])) < 1e-6
    assert float(soft_dice_loss(oh[:, :3], other[:, :3])) > 0.5


def test_gradicon_penalty_zero_for_inverse_consistent_pairs():
    gen = torch.Generator().manual_seed(8)
    ident = identity_map((H, W), batch=2)
    assert float(gradicon_penalty(ident, ident, generator=gen)) < 1e-8
    # map tensors: phi_AB = expansion, phi_BA = its exact inverse (a contraction), jittered points
    p = gradicon_penalty(affine_map(EXPAND, (0.01, 0.0)), _inverse_of_shifted_expansion(), generator=gen)
    assert float(p) < 1e-6
    # functions (ICON style): a general affine (rotation, shear, translation) and its exact inverse, both orders
    m = torch.tensor([[1.1, 0.2], [-0.15, 0.9]], dtype=torch.float64)
    t = torch.tensor([0.05, -0.03], dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    f, f_inv = affine_fn(m, t), affine_fn(m_inv, -m_inv @ t)
    for ab, ba in ((f, f_inv), (f_inv, f)):
        assert float(gradicon_penalty(ab, ba, shape=(H, W), batch=2, generator=gen)) < 1e-6


def _inverse_of_shifted_expansion() -> torch.Tensor:
    """Exact inverse of ``x -> E (x - c) + c + (0.01, 0)``: ``y -> C (y - c - (0.01, 0)) + c``."""
    m = torch.as_tensor(CONTRACT)
    t = -(m @ torch.tensor([0.01, 0.0], dtype=torch.float64))
    return affine_fn(m, t)(identity_map((H, W), dtype=torch.float64)).float()


def test_gradicon_penalty_positive_for_non_invertible_pair():
    gen = torch.Generator().manual_seed(9)
    s = 0.8
    phi = affine_map(np.eye(2) * s, (0, 0))  # not an involution: phi o phi = scaling by s^2
    p = float(gradicon_penalty(phi, phi, generator=gen))
    # hand-computed: J - I = (s^2 - 1) I, sum_d mean_components ((s^2 - 1) e_d)^2 = (s^2 - 1)^2
    assert p == pytest.approx((s * s - 1) ** 2, rel=1e-3)
    assert p > 0.1
    # an expansion paired with a contraction rotated the wrong way (not its inverse)
    wrong = affine_map(rotation_scale(-5.0, 0.9), (0, 0))
    assert float(gradicon_penalty(affine_map(EXPAND, (0.01, 0.0)), wrong, generator=gen)) > 0.01
    # a folding map paired with the identity
    fold = _band_fold_map(H, W, 10, 16)
    assert float(gradicon_penalty(fold, identity_map((H, W)), generator=gen)) > 0.1


def test_gradicon_penalty_jitter_is_seeded():
    disp = 0.02 * torch.randn(1, 2, H, W, generator=torch.Generator().manual_seed(10))
    phi = displacement_to_map(disp)
    p1 = gradicon_penalty(phi, phi, generator=torch.Generator().manual_seed(0))
    p2 = gradicon_penalty(phi, phi, generator=torch.Generator().manual_seed(0))
    p3 = gradicon_penalty(phi, phi, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


# ---------------------------------------------------------------- metrics


def _band_fold_map(h: int, w: int, c0: int, c1: int) -> torch.Tensor:
    """Column pixel coordinate f(c): c up to c0, then reversed (2 c0 - c) up to c1, then increasing again;
    forward differences are negative exactly on columns c0 .. c1 - 1."""
    c = np.arange(w, dtype=np.float64)
    f = np.where(c <= c0, c, np.where(c <= c1, 2 * c0 - c, c - 2 * (c1 - c0)))
    phi = identity_map((h, w), dtype=torch.float64)
    phi[:, 1] = torch.as_tensor(f / (w - 1)).view(1, w).expand(h, w)
    return phi.float()


def test_fold_percent_of_known_fold():
    c0, c1 = 10, 16
    fold = _band_fold_map(H, W, c0, c1)
    expected = 100.0 * (c1 - c0) / (W - 1)  # (c1 - c0) of the W - 1 forward-difference columns, every row
    assert fold_percent(fold) == pytest.approx(expected, abs=1e-9)
    det = jacobian_determinant(fold)
    assert det.shape == (1, H - 1, W - 1)
    expected_det = torch.ones(1, H - 1, W - 1, dtype=det.dtype)
    expected_det[:, :, c0:c1] = -1
    assert torch.allclose(det, expected_det, atol=1e-4)


def test_fold_percent_zero_for_identity_and_affine():
    assert fold_percent(identity_map((H, W), batch=2)) == 0.0
    assert fold_percent(affine_map(rotation_scale(30.0, 1.3), (0.1, -0.1))) == 0.0
    flip = identity_map((H, W))
    flip[:, 1] = 1 - flip[:, 1]
    assert fold_percent(flip) == 100.0  # a reflection reverses orientation everywhere
    det = jacobian_determinant(affine_map(np.eye(2) * 2.0, (0, 0)))  # pixel units: scale 2 -> area 4
    assert torch.allclose(det, torch.full_like(det, 4.0), atol=1e-5)


def test_bone_dice_hand_computed():
    warped = np.array([[0, 1, 1, 0],
                       [0, 1, 1, 0],
                       [2, 2, 0, 0],
                       [2, 2, 0, 0]])
    fixed = np.array([[0, 1, 1, 1],
                      [0, 0, 1, 0],
                      [2, 2, 2, 0],
                      [0, 0, 0, 0]])
    d = bone_dice(warped, fixed)
    assert d["femur"] == pytest.approx(2 * 3 / (4 + 4))  # overlap 3, sizes 4 and 4
    assert d["tibia"] == pytest.approx(2 * 2 / (4 + 3))  # overlap 2, sizes 4 and 3
    assert math.isnan(d["fibula"])  # absent from both
    assert d["mean"] == pytest.approx((0.75 + 4 / 7) / 2)
    same = bone_dice(torch.as_tensor(fixed)[None, None], torch.as_tensor(fixed)[None, None])
    assert same["femur"] == 1.0 and same["tibia"] == 1.0
    with pytest.raises(ValueError, match="one shape"):
        bone_dice(warped, fixed[:3])


# ---------------------------------------------------------------- network and training step


def _tiny_net(input_channels: int = 1, seed: int = 0) -> RegistrationNetwork:
    torch.manual_seed(seed)
    return make_registration_network(input_channels=input_channels, levels=3, width=0.125)


def test_network_starts_at_identity_and_output_shape():
    net = _tiny_net()
    gen = torch.Generator().manual_seed(11)
    a, b = torch.rand(2, 1, 64, 64, generator=gen), torch.rand(2, 1, 64, 64, generator=gen)
    phi = net(a, b)
    assert phi.shape == (2, 2, 64, 64)
    assert torch.allclose(phi, identity_map((64, 64), batch=2), atol=1e-6)
    assert torch.allclose(warp(a, phi), a, atol=1e-5)
    wide = make_registration_network(input_channels=4, levels=3, width=0.125)
    assert wide(torch.rand(1, 4, 64, 128), torch.rand(1, 4, 64, 128)).shape == (1, 2, 64, 128)


def test_network_size_and_channel_errors():
    net = _tiny_net()
    with pytest.raises(ValueError, match=r"divisible by 64.*e\.g\. 128 x 64"):
        net(torch.rand(1, 1, 100, 64), torch.rand(1, 1, 100, 64))
    with pytest.raises(ValueError, match="differ in shape"):
        net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 128, 64))
    with pytest.raises(ValueError, match="1 channel"):
        net(torch.rand(1, 4, 64, 64), torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        make_registration_network(levels=2, width=0.125)(torch.rand(1, 1, 48, 48), torch.rand(1, 1, 48, 48))


class _Const(torch.nn.Module):
    def __init__(self, phi: torch.Tensor) -> None:
        super().__init__()
        self.phi = phi
        self.seen = None

    def forward(self, moving, fixed):
        self.seen = moving
        return self.phi


def test_two_step_composes_phi_then_psi():
    phi, psi = affine_map(CONTRACT, (0.01, 0.0)), affine_map(rotation_scale(-6.0, 0.85), (0.0, -0.01))
    assert inside(phi) and inside(psi)
    first, second = _Const(phi), _Const(psi)
    img = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(12))
    out = TwoStepRegistration(first, second)(img, img)
    assert torch.allclose(out, compose(phi, psi))
    assert torch.allclose(second.seen, warp(img, phi))  # psi is computed on the moving image warped by phi
    smooth = torch.as_tensor(ndimage.gaussian_filter(np.random.default_rng(0).random((H, W)), 3))[None, None].float()
    assert torch.allclose(warp(smooth, out), warp(warp(smooth, phi), psi), atol=2e-3)


def test_gradicon_loss_steps_run():
    net = _tiny_net(seed=1)
    gen = torch.Generator().manual_seed(13)
    a = torch.as_tensor(ndimage.gaussian_filter(np.random.default_rng(1).random((2, 1, 64, 64)), (0, 0, 2, 2))).float()
    b = torch.roll(a, 3, dims=-1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for sim in ("lncc", "mi"):
        for _ in range(2):
            opt.zero_grad()
            total, parts = gradicon_loss(net, a, b, similarity=sim, generator=gen)
            total.backward()
            opt.step()
            assert torch.isfinite(total)
            assert set(parts) >= {"similarity_ab", "similarity_ba", "icon", "total"}
            assert float(parts["icon"]) >= 0
    assert not torch.allclose(register(net, a, b), identity_map((64, 64), batch=2))  # the net has moved


def test_train_step_on_label_maps_with_supervised_trainer():
    from monai.engines import SupervisedTrainer

    net = _tiny_net(input_channels=4, seed=2)
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[:, :, 8:30, 10:50] = 1
    labels[:, :, 34:60, 12:44] = 2
    labels[:, :, 36:60, 48:54] = 3
    batch = {"moving": labels, "fixed": torch.roll(labels, 2, dims=-2)}
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch, batch],
                                network=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
                                loss_function=None, iteration_update=GradICONTrainStep("dice", labels=True),
                                amp=False)
    trainer.run()
    out = trainer.state.output
    assert trainer.state.iteration == 2 and torch.isfinite(out["loss"])
    assert out["image"].shape == (2, 4, 64, 64) and out["phi"].shape == (2, 2, 64, 64)
    with pytest.raises(KeyError, match="moving"):
        GradICONTrainStep().prepare({"fixed": labels}, "cpu")


def test_register_keeps_mode_and_no_grad():
    net = _tiny_net()
    net.train()
    a = torch.rand(1, 1, 64, 64)
    phi = register(net, a, a)
    assert net.training and not phi.requires_grad


def test_checkpoint_round_trip(tmp_path):
    net = _tiny_net(seed=3)
    with torch.no_grad():  # give the last convolutions weights so the map is not the identity
        for name, p in net.named_parameters():
            if ".last." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    path = tmp_path / "registration.pt"
    torch.save(net.state_dict(), path)
    loaded = load_network(path)
    assert isinstance(loaded, RegistrationNetwork)
    assert loaded.description["factory"] == "pipeline.registration.network.make_registration_network"
    assert loaded.description["settings"] == {"input_channels": 1, "levels": 3, "width": 0.125,
                                              "full_resolution_steps": 0}
    a, b = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    phi = register(net, a, b)
    assert not torch.allclose(phi, identity_map((64, 64)), atol=1e-3)
    assert torch.allclose(register(loaded, a, b), phi, atol=1e-6)

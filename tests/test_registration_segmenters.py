"""Stage 2 of segmentation-guided registration: the DXA segmenter (pipeline.registration.segmenters) and the
CycleGAN with semantic consistency (pipeline.registration.cyclegan). Tiny networks, 32 x 32 images, a few steps:
no accuracy is asserted, only shapes, ranges, hand-computed loss values and which weights move."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.io.checkpoints import load_network
from pipeline.registration.cyclegan import (
    CycleGANWeights,
    ImagePool,
    UnpairedDataset,
    linear_decay_factor,
    lsgan_loss,
    make_cyclegan_networks,
    make_discriminator,
    make_generator,
    make_lr_scheduler,
    semantic_consistency_loss,
    train_cyclegan,
)
from pipeline.registration.segmenters import (
    DEFAULT_CHANNELS,
    NUM_CLASSES,
    make_segmenter,
    predict_labels,
    to_model_range,
    train_segmenter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"channels": (4, 8), "num_res_units": 1}


def _data(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and labels 0..3 that are a function of the image (a learnable toy task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    y = ((x + 1) * 2).clamp(0, 3.999).long()
    return x, y


def _tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}


def _changed(before: dict[str, torch.Tensor], net: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in _tensors(net).items())


def _onehot_logits(labels: list[list[int]], scale: float = 50.0) -> torch.Tensor:
    """1 x 4 x H x W logits that are ``scale`` on the labelled class and 0 elsewhere (softmax ~ one-hot)."""
    y = torch.tensor(labels)[None]
    return scale * F.one_hot(y, NUM_CLASSES).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------------ segmenter
def test_segmenter_defaults_are_the_papers() -> None:
    net = make_segmenter()
    assert net.description["settings"]["channels"] == list(DEFAULT_CHANNELS) == [4, 8, 16, 32, 64, 128]
    assert net.description["settings"]["num_res_units"] == 8
    assert tuple(net.strides) == (1, 1, 1, 1, 1)
    assert (net.in_channels, net.out_channels, net.dimensions) == (1, 4, 2)


def test_segmenter_output_shape_and_predict_labels() -> None:
    torch.manual_seed(0)
    net = make_segmenter(**TINY).train()
    x, _ = _data(3, size=24)
    assert net(x).shape == (3, NUM_CLASSES, 24, 24)
    labels = predict_labels(net, x[:, 0], batch_size=2)  # N x H x W input accepted
    assert labels.shape == (3, 1, 24, 24) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(labels, net.eval()(x).argmax(1, keepdim=True))
    assert not net.training  # predict_labels restored the mode it was given (eval here)
    net.train()
    predict_labels(net, x)
    assert net.training


def test_to_model_range() -> None:
    x = torch.stack([torch.linspace(2.0, 6.0, 16).view(1, 4, 4), torch.full((1, 4, 4), 3.0)])
    out = to_model_range(x)
    assert out.shape == (2, 1, 4, 4)
    assert out[0].min() == -1 and out[0].max() == 1
    assert torch.allclose(out[0, 0, 0, 1], torch.tensor(2 * (1 / 15) - 1))
    assert torch.all(out[1] == -1)  # constant image


def test_segmenter_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    net = make_segmenter(channels=(4, 8, 16), num_res_units=1).eval()
    path = tmp_path / "seg.pt"
    torch.save(net.state_dict(), path)
    again = load_network(path).eval()
    assert again.description == net.description
    x, _ = _data(2)
    assert torch.allclose(again(x), net(x))
    # same round trip for a CycleGAN generator (also self-describing)
    gen = make_generator(ngf=4, n_blocks=1).eval()
    torch.save(gen.state_dict(), tmp_path / "g.pt")
    assert torch.allclose(load_network(tmp_path / "g.pt").eval()(x), gen(x))


def test_train_segmenter_runs_and_keeps_best(tmp_path) -> None:
    x, y = _data(6, seed=2)
    torch.manual_seed(0)
    before = make_segmenter(**TINY)
    start = _tensors(before)
    net, hist = train_segmenter(x[:4], y[:4], x[4:], y[4:], network=before, steps=6, batch_size=2, val_interval=3,
                                lr=5e-3, augment=True, seed=3, save_path=tmp_path / "best.pt")
    assert net is before and not net.training
    assert len(hist["loss"]) == 6 and all(math.isfinite(v) for v in hist["loss"])
    assert all(0.0 <= v <= 1.0 for v in hist["loss"])  # a Dice loss
    assert hist["val_step"] == [3, 6] and len(hist["val_dice"]) == 2
    assert hist["best_dice"] == max(hist["val_dice"])
    assert hist["best_step"] == hist["val_step"][hist["val_dice"].index(max(hist["val_dice"]))]
    assert _changed(start, net)
    saved = load_network(tmp_path / "best.pt").eval()
    assert torch.equal(predict_labels(saved, x), predict_labels(net, x))


def test_train_segmenter_is_seeded() -> None:
    x, y = _data(5, seed=4)
    runs = [train_segmenter(x[:3], y[:3], x[3:], y[3:], steps=3, batch_size=2, val_interval=3, seed=7, **TINY)[1]
            for _ in range(2)]
    assert runs[0]["loss"] == runs[1]["loss"]


def test_train_segmenter_rejects_mismatched_labels() -> None:
    x, y = _data(4)
    with pytest.raises(ValueError, match="labels"):
        train_segmenter(x, y[:3], x, y, steps=1, **TINY)


# ------------------------------------------------------------------------------------------ CycleGAN parts
def test_generator_range_and_shape() -> None:
    torch.manual_seed(0)
    gen = make_generator(ngf=4, n_blocks=2)
    for x in (_data(2)[0], 100.0 * _data(2, seed=1)[0]):
        out = gen(x)
        assert out.shape == x.shape
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert make_generator().description["settings"] == {"in_channels": 1, "out_channels": 1, "ngf": 64,
                                                        "n_blocks": 9, "n_downsampling": 2}


def test_discriminator_returns_features_then_patch_scores() -> None:
    disc = make_discriminator(ndf=4)
    out = disc(_data(2)[0])
    assert isinstance(out, list) and out[-1].shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 3


def test_lsgan_loss_matches_hand_formula() -> None:
    p = torch.tensor([[[[-2.0, 0.5], [1.0, 3.0]]]])
    assert torch.isclose(lsgan_loss(p, True), torch.tensor((9 + 0.25 + 0 + 4) / 4))
    assert torch.isclose(lsgan_loss(p, False), torch.tensor((4 + 0.25 + 1 + 9) / 4))
    # a PatchDiscriminator output list: the last entry (the patch scores) is used
    assert torch.isclose(lsgan_loss([torch.zeros(1, 3, 4, 4), p], False), torch.tensor(14.25 / 4))


def test_semantic_consistency_loss_hand_example() -> None:
    a = [[0, 1], [2, 3]]
    b = [[0, 1], [2, 2]]  # differs from a in one pixel
    y = torch.tensor(a)[None, None]
    la, lb = _onehot_logits(a), _onehot_logits(b)
    total, parts = semantic_consistency_loss(y, la, la, la, la, la)
    assert set(parts) == {"fake_t", "rec_s", "real_t", "rec_t"}
    assert total.item() < 1e-4 and all(v.item() < 1e-4 for v in parts.values())
    # per class Dice of a vs b: 1, 1, 2 * 1 / (1 + 2), 0 -> loss (0 + 0 + 1/3 + 1) / 4 = 1/3
    total, parts = semantic_consistency_loss(y, la, lb, la, la, lb)
    assert parts["fake_t"].item() < 1e-4 and parts["real_t"].item() < 1e-4
    assert parts["rec_s"].item() == pytest.approx(1 / 3, abs=1e-4)
    assert parts["rec_t"].item() == pytest.approx(1 / 3, abs=1e-4)
    assert total.item() == pytest.approx(2 / 3, abs=2e-4)
    # the soft terms compare two segmenters: S_T(x_t) vs S_S(G_TS(x_t)) disagreeing
    _, parts = semantic_consistency_loss(y, la, la, lb, la, la)
    assert parts["real_t"].item() == pytest.approx(1 / 3, abs=1e-4) and parts["rec_t"].item() < 1e-4


def test_gradients_flow_through_frozen_source_segmenter() -> None:
    torch.manual_seed(0)
    nets = make_cyclegan_networks(make_segmenter(**TINY), ngf=4, n_blocks=1, ndf=4)
    assert not nets.seg_s.training and not any(p.requires_grad for p in nets.seg_s.parameters())
    x_t = _data(1)[0]
    _, y = _data(1, seed=1)
    loss, _ = semantic_consistency_loss(y, nets.seg_s(nets.g_ts(x_t)), nets.seg_s(nets.g_ts(x_t)),
                                        nets.seg_t(x_t), nets.seg_s(nets.g_ts(x_t)), nets.seg_t(x_t))
    loss.backward()
    assert all(p.grad is None for p in nets.seg_s.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.g_ts.parameters())


def test_target_segmenter_starts_from_source_weights() -> None:
    seg_s = make_segmenter(**TINY)
    nets = make_cyclegan_networks(seg_s, ngf=4, n_blocks=1, ndf=4, seed=0)
    assert nets.seg_s is seg_s and nets.seg_t is not seg_s
    assert nets.seg_t.description == seg_s.description
    src = _tensors(seg_s)
    assert all(torch.equal(src[k], v) for k, v in _tensors(nets.seg_t).items())
    assert all(p.requires_grad for p in nets.seg_t.parameters())


def test_image_pool() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 4)
    assert ImagePool(0).query(q) is q
    pool = ImagePool(2, seed=0)
    assert torch.equal(pool.query(q), q)  # empty pool: the query comes back and is stored
    assert len(pool.images) == 2
    stored = {tuple(t.flatten().tolist()) for t in pool.images}
    returned_old = returned_new = 0
    for i in range(10):
        new = torch.full((1, 1, 4, 4), float(i))
        out = pool.query(new)
        assert out.shape == new.shape
        key = tuple(out.flatten().tolist())
        if torch.equal(out, new):
            returned_new += 1
        else:
            assert key in stored  # a previously stored image
            returned_old += 1
        stored |= {tuple(t.flatten().tolist()) for t in pool.images}
        assert len(pool.images) == 2
    assert returned_old > 0 and returned_new > 0  # mixes (seeded: deterministic)


def test_linear_decay_schedule() -> None:
    assert linear_decay_factor(0, 150, 50) == 1.0
    assert linear_decay_factor(149, 150, 50) == 1.0
    assert linear_decay_factor(150, 150, 50) == pytest.approx(1 - 1 / 51)
    assert linear_decay_factor(199, 150, 50) == pytest.approx(1 / 51)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = make_lr_scheduler(opt, 2, 3)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4])


def test_unpaired_dataset() -> None:
    x, y = _data(3)
    ds = UnpairedDataset(x, y, x[:2], seed=0)
    assert len(ds) == 3
    item = ds[2]
    assert set(item) == {"source", "source_label", "target"}
    assert torch.equal(item["source"], x[2]) and torch.equal(item["source_label"], y[2])
    with pytest.raises(ValueError):
        UnpairedDataset(x, y[:2], x)


def test_cyclegan_training_moves_the_right_weights() -> None:
    xs, ys = _data(3, seed=5)
    xt, _ = _data(2, seed=6)
    seg_s = make_segmenter(**TINY)
    nets = make_cyclegan_networks(seg_s, ngf=4, n_blocks=1, ndf=4, seed=0)
    before = {name: _tensors(getattr(nets, name)) for name in ("g_st", "g_ts", "d_s", "d_t", "seg_s", "seg_t")}
    seg_t, hist = train_cyclegan(xs, ys, xt, seg_s, networks=nets, epochs_constant=1, epochs_decay=1, epoch_length=2,
                                 pool_size=2, weights=CycleGANWeights(), seed=0)
    assert seg_t is nets.seg_t and not seg_t.training
    assert hist["iterations"] == 4 and hist["lr"] == pytest.approx([2e-4, 1e-4])
    for k in ("loss_g", "gan", "cycle", "identity", "semantic", "loss_d", "sem_fake_t", "sem_rec_s", "sem_real_t",
              "sem_rec_t"):
        assert len(hist["parts"][k]) == 4 and all(math.isfinite(v) for v in hist["parts"][k])
    assert not _changed(before["seg_s"], nets.seg_s)  # frozen
    for name in ("g_st", "g_ts", "d_s", "d_t", "seg_t"):
        assert _changed(before[name], getattr(nets, name)), name
    # the generators' tanh keeps translated images in [-1, 1]
    with torch.no_grad():
        fake = nets.g_st(xs)
    assert fake.min() >= -1 and fake.max() <= 1


def test_cyclegan_is_seeded_and_checks_its_networks() -> None:
    xs, ys = _data(2, seed=7)
    xt, _ = _data(2, seed=8)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        seg_s = make_segmenter(**TINY)
        _, hist = train_cyclegan(xs, ys, xt, seg_s, epochs_constant=1, epochs_decay=0, ngf=4, n_blocks=1, ndf=4,
                                 pool_size=1, seed=3)
        runs.append(hist["parts"])
    assert runs[0] == runs[1] and len(runs[0]["loss_g"]) == 2
    nets = make_cyclegan_networks(make_segmenter(**TINY), ngf=4, n_blocks=1, ndf=4)
    with pytest.raises(ValueError, match="seg_s"):
        train_cyclegan(xs, ys, xt, make_segmenter(**TINY), networks=nets, epochs_constant=1, epochs_decay=0)

"""MRIS dual encoder: shapes, normalisation, parameter count, local weight loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.mris.network import PAPER_PARAMETERS, DualEncoder, ImageEncoder, MRISSeparate, count_parameters
from pipeline.nets import WeightsMismatchError, load_encoder_weights

NARROW = {"widen_factor": 0.125}  # 64-d output, ~0.35 M parameters per trunk


def test_full_width_pair_matches_paper_parameter_count():
    model = DualEncoder()
    n = count_parameters(model)
    assert abs(n - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.01, n
    # two independent trunks of identical size, no fc head
    assert count_parameters(model.xray) == count_parameters(model.map) == n // 2
    assert model.xray.net.fc is None
    assert model.out_dim == 512


def test_encoder_output_is_unit_norm_and_stem_stride_two():
    torch.manual_seed(0)
    enc = ImageEncoder(**NARROW).eval()
    assert enc.net.conv1.stride == (2, 2)
    assert enc.net.conv1.in_channels == 1
    with torch.no_grad():
        z = enc(torch.randn(3, 1, 64, 64))
    assert z.shape == (3, enc.out_dim) == (3, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    raw = ImageEncoder(normalize=False, **NARROW).eval()
    raw.load_state_dict(enc.state_dict())
    with torch.no_grad():
        r = raw(torch.randn(2, 1, 64, 64))
    assert not torch.allclose(r.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        enc(torch.randn(2, 3, 64, 64))


def test_dual_encoder_encoders_are_independent():
    torch.manual_seed(0)
    model = DualEncoder(**NARROW)
    x, y = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    fx, gy = model(x, y)
    assert fx.shape == gy.shape == (2, 64)
    fx.sum().backward()
    assert all(p.grad is None for p in model.map.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.xray.parameters())
    groups = model.parameter_groups(lr_xray=1e-4, lr_map=1e-5, weight_decay=1e-3)
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mris_separate_has_one_pair_per_map():
    torch.manual_seed(0)
    model = MRISSeparate(**NARROW).eval()
    assert model.keys == ("fc", "tc")
    assert count_parameters(model) == 2 * count_parameters(DualEncoder(**NARROW))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x, {"fc": torch.randn(2, 1, 64, 64), "tc": torch.randn(2, 1, 64, 64)})
        ex = model.embed_xray(x)
    assert set(out) == {"fc", "tc"}
    # different radiograph encoders for fc and tc -> different embeddings of the same radiograph
    assert not torch.allclose(ex["fc"], ex["tc"])
    torch.testing.assert_close(out["fc"][0], ex["fc"])
    assert set(model.encoders()) == {"fc.xray", "fc.map", "tc.xray", "tc.map"}
    with pytest.raises(KeyError, match="tc"):
        model(x, {"fc": torch.randn(2, 1, 64, 64)})


def _three_channel_checkpoint(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """A torchvision-like state dict: 3-channel conv1, an fc head, no ImageEncoder 'net.' prefix."""
    sd = {
        k: torch.randn_like(v) if v.is_floating_point() else v.clone()
        for k, v in encoder.net.state_dict().items()
    }
    sd["conv1.weight"] = torch.randn(sd["conv1.weight"].shape[0], 3, 7, 7)
    sd["fc.weight"] = torch.randn(1000, encoder.out_dim)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_load_weights_sums_rgb_stem_and_ignores_fc(tmp_path):
    torch.manual_seed(0)
    enc = ImageEncoder(**NARROW)
    sd = _three_channel_checkpoint(enc)
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    report = load_encoder_weights(enc, path)
    assert report["converted"] == ["conv1.weight"] and report["missing"] == [] and report["unexpected"] == []
    torch.testing.assert_close(enc.net.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(enc.net.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])
    # the converted stem answers a gray image exactly like the RGB stem answers the repeated image
    gray = torch.randn(1, 1, 16, 16)
    rgb_out = nn.functional.conv2d(gray.repeat(1, 3, 1, 1), sd["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(enc.net.conv1(gray), rgb_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_weights_from_wrapped_and_prefixed_checkpoints(tmp_path, wrapper):
    torch.manual_seed(1)
    src = DualEncoder(**NARROW)
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = ImageEncoder(**NARROW)
    load_encoder_weights(dst, path, prefix="module.map.net.")
    for k, v in src.map.net.state_dict().items():
        torch.testing.assert_close(dst.net.state_dict()[k], v)


def test_load_weights_mismatch_raises_one_clear_error(tmp_path):
    torch.manual_seed(0)
    wide = ImageEncoder(widen_factor=0.25)
    path = tmp_path / "wide.pth"
    torch.save(wide.net.state_dict(), path)
    narrow = ImageEncoder(**NARROW)
    before = narrow.net.conv1.weight.detach().clone()
    with pytest.raises(WeightsMismatchError) as err:
        load_encoder_weights(narrow, path)
    msg = str(err.value)
    assert str(path) in msg and "layer1.0.conv1.weight" in msg and "shape" in msg
    torch.testing.assert_close(narrow.net.conv1.weight, before)  # nothing half-loaded

    partial = {k: v for k, v in narrow.net.state_dict().items() if not k.startswith("layer4")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(WeightsMismatchError, match="missing keys.*layer4"):
        load_encoder_weights(narrow, path, strict=True)
    report = load_encoder_weights(narrow, path, strict=False)
    assert any(k.startswith("layer4") for k in report["missing"]) and report["unexpected"] == ["extra.weight"]

    torch.save({"foo": torch.zeros(2)}, path)
    with pytest.raises(WeightsMismatchError, match="no key"):
        load_encoder_weights(narrow, path, strict=False)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_encoder_weights(narrow, tmp_path / "nope.pth")

"""Direct-synthesis baselines: masked L1, generators / discriminator shapes, the pix2pix GanTrainer step,
the validation metric, outputs -> atlas maps (mm, NaN outside), the data chain, and the bundle end to end
(pix2pix training + evaluation) on the tiny cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.baselines import MaskedL1Loss, check_method, make_discriminator, make_generator, masked_l1
from pipeline.metrics import per_map_errors

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "direct_synthesis" / "configs"
TINY_NET = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
SPLIT = {"database": 0.67, "downstream": 0.0, "test": 0.33}  # 3 subjects -> 2 database, 1 test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_masked_l1_against_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.random((2, 2, 4, 5)), rng.random((2, 2, 4, 5))
    m = rng.random((2, 2, 4, 5)) > 0.4
    expected = np.abs(p - t)[m].mean()
    got = masked_l1(torch.tensor(p), torch.tensor(t), torch.tensor(m.astype(float)))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(MaskedL1Loss()(torch.tensor(p), torch.tensor(t), torch.ones(1, 1, 4, 5))) == pytest.approx(
        np.abs(p - t).mean())
    with pytest.raises(ValueError, match="empty"):
        masked_l1(torch.tensor(p), torch.tensor(t), torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        masked_l1(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("method", ["unet", "pix2pix", "transformer"])
def test_generators_map_radiograph_to_two_maps(method):
    g = make_generator(method, 32, **TINY_NET)
    y = g(torch.rand(3, 1, 32, 32))
    assert y.shape == (3, 2, 32, 32) and torch.isfinite(y).all()


def test_generator_arguments_checked():
    assert check_method("TransUNet") == "transformer" and check_method("U-Net") == "unet"
    with pytest.raises(ValueError, match="method"):
        check_method("gan")
    with pytest.raises(ValueError, match="divisible by 16"):
        make_generator("unet", 40)
    d_out = make_discriminator(8, 2)(torch.rand(2, 3, 32, 32))
    assert isinstance(d_out, list) and d_out[-1].shape[:2] == (2, 1)


def _loader(n: int = 4, s: int = 32):
    from monai.data import DataLoader

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, s, s, generator=g), "maps": torch.rand(2, s, s, generator=g),
             "mask": (torch.rand(2, s, s, generator=g) > 0.3).float()} for _ in range(n)]
    return DataLoader(data, batch_size=2)


def test_pix2pix_gan_step_updates_both_networks():
    from pipeline.baselines.engine import make_trainer

    torch.manual_seed(0)
    g, d = make_generator("pix2pix", 32, **TINY_NET), make_discriminator(8, 2)
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    trainer = make_trainer("pix2pix", "cpu", 1, _loader(), g, torch.optim.Adam(g.parameters(), 1e-3),
                           MaskedL1Loss(), discriminator=d, d_optimizer=torch.optim.Adam(d.parameters(), 1e-3),
                           l1_weight=100.0)
    assert type(trainer).__name__ == "GanTrainer"
    trainer.run()
    out = trainer.state.output
    assert float(out["loss"]) == pytest.approx(float(out["g_adv"]) + 100.0 * float(out["l1"]), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    with pytest.raises(ValueError, match="discriminator"):
        make_trainer("pix2pix", "cpu", 1, _loader(), g, torch.optim.Adam(g.parameters()), MaskedL1Loss())


def test_unet_trainer_reduces_masked_l1():
    from ignite.engine import Events

    from pipeline.baselines.engine import make_trainer

    torch.manual_seed(0)
    g = make_generator("unet", 32, **TINY_NET)
    loader = _loader(2)
    losses = []
    trainer = make_trainer("unet", "cpu", 15, loader, g, torch.optim.Adam(g.parameters(), 1e-2), MaskedL1Loss())
    assert type(trainer).__name__ == "SupervisedTrainer"
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert losses[-1] < 0.7 * losses[0]


def test_map_median_error_is_the_mris_metric():
    from pipeline.baselines.engine import MapMedianError

    rng = np.random.default_rng(1)
    pred, label = rng.random((3, 2, 8, 8)).astype(np.float32), rng.random((3, 2, 8, 8)).astype(np.float32)
    mask = (rng.random((3, 2, 8, 8)) > 0.3).astype(np.float32)
    metric = MapMedianError()
    metric.reset()
    metric.update((torch.tensor(pred[:2]), torch.tensor(label[:2]), torch.tensor(mask[:2])))
    metric.update((torch.tensor(pred[2:]), torch.tensor(label[2:]), torch.tensor(mask[2:])))
    meds = [per_map_errors(3 * pred[:, c], 3 * label[:, c], mask[:, c] > 0)["median_mm"] for c in range(2)]
    assert metric.compute() == pytest.approx(float(np.concatenate(meds).mean()), rel=1e-6)


def test_outputs_to_atlas_mm_nan_outside_and_clamped():
    from pipeline.baselines.synthesize import network_masks, outputs_to_atlas

    yy, xx = np.mgrid[:20, :24]
    masks = {"fc": (np.abs(xx - 12) < 8) & (np.abs(yy - 10) < 7), "tc": ((xx - 12) ** 2 + (yy - 10) ** 2) < 50}
    pred = torch.full((2, 2, 16, 16), 0.5)
    pred[1, 1] = -1.0  # negative thickness -> clamped to 0 mm
    out = outputs_to_atlas(pred, masks)
    for k in ("fc", "tc"):
        assert out[k].shape == (2, 20, 24) and out[k].dtype == np.float32
        assert np.isnan(out[k][:, ~masks[k]]).all() and np.isfinite(out[k][:, masks[k]]).all()
    np.testing.assert_allclose(out["fc"][:, masks["fc"]], 1.5, rtol=1e-6)  # 0.5 network units = 1.5 mm
    assert (out["tc"][1][masks["tc"]] == 0).all()
    nm = network_masks(masks, 16)
    assert nm.shape == (2, 16, 16) and nm.dtype == torch.bool and 0 < int(nm[0].sum()) < 256
    with pytest.raises(ValueError, match="generator outputs"):
        outputs_to_atlas(torch.zeros(1, 3, 16, 16), masks)


def test_synthesis_transforms_on_a_cohort_item(tiny_cohort):
    from pipeline.baselines.data import synthesis_transforms
    from pipeline.mris.data import manifest_items

    root, _ = tiny_cohort
    item = manifest_items(Path(root) / "manifest.csv", SPLIT, 0)[0]
    out = synthesis_transforms(32)(item)
    assert out["image"].shape == (1, 32, 32) and 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1
    assert out["maps"].shape == (2, 32, 32) and out["mask"].shape == (2, 32, 32)
    assert torch.all(out["maps"][out["mask"] == 0] == 0)
    fc = np.load(item["fc"])
    assert float(out["maps"][0][out["mask"][0] > 0].max()) <= np.nanmax(fc) / 3 + 1e-5
    assert set(out) >= {"subject_id", "knee_id", "klg"}


def test_bundle_pix2pix_train_and_evaluate(tiny_cohort, tmp_path):
    from monai.bundle import run

    root, _ = tiny_cohort
    manifest = str(Path(root) / "manifest.csv")
    common = {"manifest": manifest, "method": "pix2pix", "image_size": 32, "split_fractions": SPLIT, **TINY_NET}
    run("training", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "train_demo.json")],
        bundle_root=str(tmp_path), epochs=1, draws_per_epoch=1, batch_size=2, val_fraction=0.0, d_channels=8,
        logging_file=str(CONFIGS / "logging.conf"), **common)
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert {"model", "discriminator", "optimizer", "d_optimizer", "trainer"} <= set(final)
    assert (tmp_path / "models" / "model.pt").is_file()
    run("evaluating", config_file=str(CONFIGS / "evaluate.json"), bundle_root=str(tmp_path), **common)
    tab = pd.read_csv(tmp_path / "eval" / "synthesis_errors.csv")
    assert set(tab["method"]) == {"pix2pix", "mean database map"}
    alls = tab[tab["group"] == "all"]
    assert len(alls) == 4 and np.isfinite(alls[["median_mm", "mad_mm"]].to_numpy()).all()
    assert (tmp_path / "eval" / "examples.png").stat().st_size > 1000

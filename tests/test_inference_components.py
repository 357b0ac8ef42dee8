"""Inference configs declare their preprocessing and writer as MONAI components (model-zoo style), and the
declared chain is the training chain: a user overrides a transform or the writer with ``--key value``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_helpers import synthetic_knee_image, write_radiograph_dicom
from monai.bundle import ConfigParser
from monai.transforms import Compose

from pipeline.knee_inference import KneeMapWriter
from pipeline.mris.data import radiograph_transforms

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CONFIGS = [BUNDLES / b / "configs" / "inference.json" for b in ("mris", "direct_synthesis")]


def _parser(config: Path = CONFIGS[0], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config)
    parser.update(overrides)
    return parser


def _tiny_checkpoint(config: Path, tmp_path: Path) -> Path:
    """A random-init checkpoint at 64 px: the inference configs read the image size from it."""
    if config.parent.parent.name == "mris":
        from pipeline.mris.engine import make_network

        net = make_network("combined", widen_factor=0.125, image_size=64)
    else:
        from pipeline.baselines.nets import make_generator

        net = make_generator("unet", image_size=64, base_channels=4)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.parent.name)
def test_declared_preprocessing_equals_the_training_chain(tmp_path, config):
    path = tmp_path / "knee.dcm"
    write_radiograph_dicom(path, synthetic_knee_image(600, 500, [(130, 300), (370, 300)]), imager_spacing=(0.3, 0.3))
    item = {"image": str(path), "centre": (130.0, 300.0), "side": "R"}
    ckpt = str(_tiny_checkpoint(config, tmp_path))
    declared = _parser(config, checkpoint=ckpt).get_parsed_content("preprocessing")
    ours = Compose(radiograph_transforms(64))
    assert [type(t) for t in declared.transforms] == [type(t) for t in ours.transforms]
    a, b = declared(dict(item))["image"], ours(dict(item))["image"]
    assert a.shape == (1, 64, 64) and torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # an override reaches the component, as with `--preprocessing#transforms#3#mode bilinear`
    changed = _parser(config, **{"checkpoint": ckpt, "preprocessing#transforms#3#mode": "bilinear"}).get_parsed_content(
        "preprocessing")
    assert not torch.equal(torch.as_tensor(changed(dict(item))["image"]), torch.as_tensor(a))


def test_writer_component_and_png_switch(tmp_path):
    writer = _parser(png=False).get_parsed_content("writer")
    assert isinstance(writer, KneeMapWriter) and writer.png is False
    maps = {"fc": np.full((4, 4), 2.0, np.float32), "tc": np.full((4, 4), np.nan, np.float32)}
    kdir = writer(tmp_path, "knee_R", maps, pd.DataFrame([{"rank": 1, "weight": 1.0}]))
    assert sorted(p.name for p in kdir.iterdir()) == ["fc.npy", "neighbours.csv", "tc.npy"]
    assert np.load(kdir / "fc.npy").dtype == np.float32 and np.isnan(np.load(kdir / "tc.npy")).all()

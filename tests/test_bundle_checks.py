"""MONAI's own bundle checks on every bundle with a network: ``verify_net_in_out`` and ``ckpt_export``.

For each bundle (tiny networks through config overrides, small inputs through ``_meta_`` overrides):

1. a random-init checkpoint is written from the TRAINING config's ``network_def`` (so the check also proves
   that a training checkpoint loads strictly into the inference network: MRIS radiograph-only network,
   KNEEL stage networks with their self-describing extra state);
2. ``monai.bundle.verify_net_in_out`` (input / output channels and dtype from ``configs/metadata.json``);
3. ``monai.bundle.ckpt_export`` (TorchScript, ``torch.jit.script``) of the inference ``network_def``;
4. the exported file is loaded with ``torch.jit.load``: it carries ``metadata.json`` and its output equals
   the eager network's on a random batch.

``test_ckpt_export_cli`` runs the real ``python -m monai.bundle ckpt_export`` command once (the in-process
calls take the same arguments as the command line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SHAPE = "_meta_#network_data_format#inputs#image#spatial_shape"
CHANNELS = "_meta_#network_data_format#outputs#pred#num_channels"

# bundle, config of the inference network, training config (checkpoint source), net_id, overrides shared
# by both configs, overrides of the training config only
CASES = {
    "dess_seg": ("dess_seg", "inference.json", "train.json", "network_def",
                 {"network_def#channels": [4, 8, 16, 32, 64], "network_def#num_res_units": 1,
                  SHAPE: [32, 32, 16]}, {}),
    "mris_combined": ("mris", "inference.json", "train.json", "network_def",
                      {"widen_factor": 0.125, SHAPE: [64, 64], CHANNELS: 64}, {}),
    "mris_separate": ("mris", "inference.json", "train.json", "network_def",
                      {"variant": "separate", "widen_factor": 0.125, SHAPE: [64, 64], CHANNELS: 128}, {}),
    "kneel_local": ("kneel", "inference.json", "train.json", "network_def",
                    {"width": 2, "depth": 2, "stages#local#canvas_size": 32, SHAPE: [32, 32]}, {"stage": "local"}),
    "kneel_global": ("kneel", "inference.json", "train.json", "global_network_def",
                     {"width": 2, "depth": 2, "stages#global#canvas_size": 32, SHAPE: [32, 32], CHANNELS: 1},
                     {"stage": "global"}),
    # the generator of inference.json (pix2pix's generator is the U-Net)
    "direct_synthesis_unet": ("direct_synthesis", "inference.json", "train.json", "network_def",
                              {"method": "unet", "image_size": 32, "base_channels": 4, SHAPE: [32, 32]}, {}),
    "direct_synthesis_transformer": ("direct_synthesis", "inference.json", "train.json", "network_def",
                                     {"method": "transformer", "image_size": 32, "base_channels": 4,
                                      "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32,
                                      SHAPE: [32, 32]}, {}),
}


def _parse_network(config: Path, meta: Path, net_id: str, overrides: dict) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=str(config))
    parser.read_meta(f=str(meta))
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content(net_id)


@pytest.mark.parametrize("case", list(CASES))
def test_verify_net_in_out_and_ckpt_export(case, tmp_path, one_torch_thread):
    from monai.bundle import ckpt_export, verify_net_in_out

    bundle, config_name, train_name, net_id, overrides, train_overrides = CASES[case]
    configs = BUNDLES / bundle / "configs"
    config, meta = configs / config_name, configs / "metadata.json"
    metadata = json.loads(meta.read_text())
    assert "schema" in metadata
    # the spec's optional_packages_version is a deprecated alias in MONAI 1.6 (monai.bundle.utils
    # DEPRECATED_ID_MAPPING): reading the metadata REPLACES required_packages_version with it and warns on every
    # run, so the metadata carries required_packages_version only
    assert "optional_packages_version" not in metadata and metadata["required_packages_version"]
    assert metadata["eval_metrics"] and all(isinstance(v, (int, float)) for v in metadata["eval_metrics"].values())
    io_format = metadata["network_data_format"]
    assert set(io_format["outputs"]) == {"pred"} and set(io_format["inputs"]) == {"image"}
    assert all(isinstance(n, int) for n in io_format["inputs"]["image"]["spatial_shape"])

    # random-init checkpoint written from the TRAINING network (bare state dict, as CheckpointSaver writes)
    torch.manual_seed(0)
    train_net = _parse_network(configs / train_name, meta, "network_def", {**overrides, **train_overrides})
    models = tmp_path / "models"
    models.mkdir()
    ckpt, exported = models / "model.pt", models / "model.ts"
    torch.save(train_net.state_dict(), ckpt)

    common = {"net_id": net_id, "meta_file": str(meta), "config_file": str(config), **overrides}
    verify_net_in_out(device="cpu", **common)
    ckpt_export(filepath=str(exported), ckpt_file=str(ckpt), **common)

    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra).eval()
    exported_meta = json.loads(extra["metadata.json"])
    assert exported_meta["version"] == metadata["version"] and set(exported_meta["network_data_format"]["outputs"]) == {"pred"}
    assert exported_meta["required_packages_version"] == metadata["required_packages_version"]

    net = _parse_network(config, meta, net_id, overrides)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    x = torch.rand(2, 1, *overrides[SHAPE])
    with torch.no_grad():
        expected, got = net(x), scripted(x)
    n_out = overrides.get(CHANNELS, io_format["outputs"]["pred"]["num_channels"])
    assert got.shape == expected.shape and got.shape[:2] == (2, n_out)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    if bundle == "mris":  # forward = the radiograph encoder(s); embed_xray (used by inference) unchanged
        with torch.no_grad():
            emb = net.embed_xray(x)
        parts = [emb] if isinstance(emb, torch.Tensor) else [emb[k] for k in net.keys]
        torch.testing.assert_close(expected, torch.cat(parts, dim=1))
        assert net.state_dict().keys() == train_net.state_dict().keys()
    if bundle == "kneel":  # (B, points, 2) normalised (x, y) in the unit square
        assert expected.shape[-1] == 2 and bool(((expected >= 0) & (expected <= 1)).all())


def test_ckpt_export_cli(tmp_path):
    """The real command line, as documented: ``python -m monai.bundle ckpt_export`` (MRIS-C, tiny)."""
    from pipeline.mris.engine import make_network

    configs = BUNDLES / "mris" / "configs"
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    train_net = make_network("combined", widen_factor=0.125)
    torch.save(train_net.state_dict(), models / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", str(models / "model.ts"), "--ckpt_file", str(models / "model.pt"),
           "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"),
           "--widen_factor", "0.125"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    scripted = torch.jit.load(str(models / "model.ts"), map_location="cpu").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), train_net.eval().embed_xray(x), rtol=1e-4, atol=1e-5)

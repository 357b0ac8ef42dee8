"""Self-describing checkpoints and the one loader (pipeline.io.checkpoints, pipeline.nets.describe).

Every network family rebuilds from its checkpoint alone; old checkpoints without the record load when the
settings are given; contradicting settings, unreadable files and a database built for another image size are
refused with one-line errors; the MRIS bundle evaluates and infers with nothing but the checkpoint after a tiny
training at a non-default image size and width."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import user_errors as ue
from pipeline.io.checkpoints import EXTRA_STATE, load_network, load_weights, read_state_dict

REPO = Path(__file__).resolve().parents[1]
MRIS_CONFIGS = REPO / "bundles" / "mris" / "configs"
TINY_GEN = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mris(variant="combined"):
    from pipeline.mris.engine import make_network

    return make_network(variant, widen_factor=0.125, image_size=32)


def _kneel():
    from pipeline.landmarks.engine import make_network

    return make_network("local", 32, 2.0, width=2, depth=2)


def _dess_seg():
    from pipeline.segmentation import build_network

    return build_network(channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def _generator(method):
    from pipeline.baselines import make_generator

    return lambda: make_generator(method, 32, **TINY_GEN)


FAMILIES = {  # name: (builder, input shape, forward)
    "mris_combined": (_mris, (2, 1, 32, 32), lambda net, x: net.embed_xray(x)),
    "mris_separate": (lambda: _mris("separate"), (2, 1, 32, 32), lambda net, x: torch.cat(list(net.embed_xray(x).values()), 1)),
    "kneel": (_kneel, (2, 1, 32, 32), lambda net, x: net(x)),
    "dess_seg": (_dess_seg, (1, 1, 16, 16, 16), lambda net, x: net(x)),
    "unet": (_generator("unet"), (2, 1, 32, 32), lambda net, x: net(x)),
    "transformer": (_generator("transformer"), (2, 1, 32, 32), lambda net, x: net(x)),
}


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg.strip(), msg
    return msg


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_rebuilds_the_network_from_the_checkpoint_alone(family, tmp_path):
    build, shape, forward = FAMILIES[family]
    torch.manual_seed(0)
    net = build().eval()
    desc = net.description
    assert set(desc) == {"factory", "settings", "preprocessing"} and desc["factory"].startswith("pipeline.")
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    assert read_state_dict(path)[EXTRA_STATE] == desc  # plain data, read back with weights_only=True

    back = load_network(path).eval()
    assert type(back) is type(net) and back.description == desc
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(forward(back, x), forward(net, x))
    # a training checkpoint (nested, DDP prefixes) rebuilds the same network
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 3}, tmp_path / "final.pt")
    assert load_network(tmp_path / "final.pt").description == desc


def test_mris_inference_network_and_settings_from_the_checkpoint(tmp_path):
    from pipeline.mris.engine import load_mris_network, make_network, run_settings
    from pipeline.mris.network import RadiographMRISSeparate

    net = _mris("separate")
    torch.save(net.state_dict(), tmp_path / "m.pt")
    inf = load_mris_network(tmp_path / "m.pt", radiograph_only=True)  # extra factory option, not a setting
    assert isinstance(inf, RadiographMRISSeparate) and run_settings(inf) == ("separate", 32)
    assert inf.description["preprocessing"]["roi_mm"] == 140.0 and "percentile" in inf.description["preprocessing"][
        "normalisation"]
    # an inference network built before the checkpoint is read takes the checkpoint's image size ...
    blank = make_network("separate", widen_factor=0.125, radiograph_only=True)
    assert blank.description["preprocessing"]["image_size"] is None
    load_weights(blank, tmp_path / "m.pt")
    assert run_settings(blank) == ("separate", 32)
    # ... and one built for another network is refused before any weight is copied, naming both values
    other = make_network("separate", widen_factor=0.25)
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ue.SettingsMismatchError) as err:
        load_weights(other, tmp_path / "m.pt")
    msg = _one_line(err.value)
    assert str(tmp_path / "m.pt") in msg and "widen_factor=0.125" in msg and "widen_factor=0.25" in msg
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ue.SettingsMismatchError, match="image_size=32.*image_size=64"):  # torch's own loading too
        make_network("separate", widen_factor=0.125, image_size=64).load_state_dict(torch.load(tmp_path / "m.pt"))


def test_contradicting_settings_one_line_error_naming_both_values(tmp_path):
    from pipeline.baselines.synthesize import load_generator
    from pipeline.mris.engine import load_mris_network

    torch.save(_mris().state_dict(), tmp_path / "m.pt")
    assert load_mris_network(tmp_path / "m.pt", widen_factor=0.125, image_size=32, variant="MRIS-C") is not None
    for given, wrong in (({"widen_factor": 0.5}, "widen_factor=0.5"), ({"image_size": 64}, "image_size=64"),
                         ({"variant": "separate"}, "variant='separate'")):
        with pytest.raises(ue.SettingsMismatchError) as err:
            load_mris_network(tmp_path / "m.pt", **given)
        msg = _one_line(err.value)
        assert str(tmp_path / "m.pt") in msg and wrong in msg and "read from the checkpoint" in msg
    torch.save(_generator("unet")().state_dict(), tmp_path / "g.pt")
    with pytest.raises(ue.SettingsMismatchError, match="method='unet'.*method='transformer'"):
        load_generator("transformer", tmp_path / "g.pt")
    assert load_generator(None, tmp_path / "g.pt", 32, hidden_size=99).description["settings"]["method"] == "unet"


# ------------------------------------------------------------------------------------------- old checkpoints
def test_old_checkpoint_without_description_loads_with_settings(tmp_path):
    from pipeline.mris.engine import load_mris_network, run_settings

    torch.manual_seed(0)
    net = _mris("separate").eval()
    old = {k: v for k, v in net.state_dict().items() if not k.endswith(EXTRA_STATE)}
    torch.save(old, tmp_path / "old.pt")
    back = load_mris_network(tmp_path / "old.pt", variant="separate", widen_factor=0.125, image_size=32).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.embed_xray(x)["tc"], net.embed_xray(x)["tc"])
    assert run_settings(back) == ("separate", 32)
    # without the settings: the defaults do not fit -> which keys, and which settings to check
    with pytest.raises(ue.WeightsMismatchError) as err:
        load_mris_network(tmp_path / "old.pt")
    msg = _one_line(err.value)
    assert "old.pt" in msg and "missing keys" in msg and "widen_factor=1.0" in msg and "variant='combined'" in msg
    with pytest.raises(ue.NoDescriptionError, match="no network description"):
        load_network(tmp_path / "old.pt")
    # the image size of an old checkpoint is not known until given
    inf = load_mris_network(tmp_path / "old.pt", variant="separate", widen_factor=0.125)
    with pytest.raises(ue.NoDescriptionError, match="image_size"):
        run_settings(inf)
    # a plain MONAI UNet checkpoint (dess_seg before descriptions) loads into the described network
    from monai.networks.nets import UNet

    plain = UNet(3, 1, 5, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm="instance")
    torch.save(plain.state_dict(), tmp_path / "seg.pt")
    assert load_network(tmp_path / "seg.pt", fallback=_dess_seg()).description["settings"]["channels"] == [4, 8, 16]


def test_kneel_legacy_description_still_loads(tmp_path):
    from pipeline.landmarks.engine import LandmarkCheckpointError, load_landmark_model

    net = _kneel().eval()
    state = net.state_dict()
    state[EXTRA_STATE] = {"format": "kneel-hourglass-v1", "arch": dict(net.arch), "spec": net.spec.to_dict()}
    torch.save(state, tmp_path / "legacy.pt")
    back = load_landmark_model(tmp_path / "legacy.pt")
    assert back.description == net.description and back.spec == net.spec
    torch.save(_mris().state_dict(), tmp_path / "mris.pt")
    with pytest.raises(LandmarkCheckpointError, match="not a KNEEL landmark network"):
        load_landmark_model(tmp_path / "mris.pt")


def test_moved_factory_alias_keeps_old_checkpoints_loadable(tmp_path, monkeypatch):
    """A checkpoint naming a factory's old dotted path loads through ``FACTORY_ALIASES`` (old -> new path)."""
    from pipeline.nets import describe

    net = _mris().eval()
    state = net.state_dict()
    old = "pipeline.mris.old_module.make_network"  # where the factory used to live
    state[EXTRA_STATE] = {**state[EXTRA_STATE], "factory": old}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ue.CheckpointError, match="not a known network factory"):
        load_network(tmp_path / "old.pt")
    monkeypatch.setitem(describe.FACTORY_ALIASES, old, net.description["factory"])
    back = load_network(tmp_path / "old.pt")
    assert back.description == net.description
    fresh = _mris()
    fresh.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))  # same factory after the alias
    assert fresh.description == net.description


# ------------------------------------------------------------------------------------------- bad files
def test_unreadable_files_raise_named_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_kneel().state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    cases = [("missing.pt", ue.CheckpointNotFoundError), ("truncated.pt", ue.CheckpointReadError),
             ("notes.txt", ue.CheckpointReadError), ("nostate.pt", ue.NoStateDictError)]
    for name, kind in cases:
        for call in (read_state_dict, load_network, lambda p: load_weights(_kneel(), p)):
            with pytest.raises(kind) as err:
                call(tmp_path / name)
            assert name in _one_line(err.value)
    with pytest.raises(FileNotFoundError, match="Train one with `python -m monai"):
        load_weights(_kneel(), tmp_path / "missing.pt", train="python -m monai.bundle run training ...")
    # only marked factories of this package can be named by a checkpoint
    state = torch.load(good, weights_only=True)
    state[EXTRA_STATE] = {"factory": "os.system", "settings": {"command": "echo hi"}, "preprocessing": {}}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ue.CheckpointError, match="not a known network factory"):
        load_network(tmp_path / "evil.pt")


def test_weights_that_do_not_fit_name_keys_and_shapes(tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "lin.pt")
    with pytest.raises(ue.WeightsMismatchError) as err:
        load_weights(torch.nn.Linear(4, 2), tmp_path / "lin.pt")
    msg = _one_line(err.value)
    assert "lin.pt" in msg and "weight: checkpoint [2, 3] vs network [2, 4]" in msg and "check the" in msg


# ------------------------------------------------------------------------------------------- MRIS bundle
def _bundle_run(run_id: str, config: str, **overrides):
    from monai.bundle import run

    return run(run_id, config_file=str(MRIS_CONFIGS / config), **overrides)


def test_mris_bundle_evaluate_and_infer_with_only_the_checkpoint(tiny_cohort, tmp_path):
    """A tiny training at 32 px and widen_factor 0.125 (both not the configs' defaults), then evaluate.json and
    inference.json with nothing but the checkpoint, manifest and input: the architecture and image size come from
    the checkpoint. A contradicting flag and a database built for another image size are refused in one line."""
    from pipeline.mris.database import CheckpointMismatchError
    from pipeline.mris.engine import load_mris_network
    from pipeline.mris.evaluate import build_mris_database

    manifest = Path(tiny_cohort[0]) / "manifest.csv"
    root = tmp_path / "mris"
    _bundle_run("training", "train.json", bundle_root=str(root), manifest=str(manifest), epochs=1, batch_size=4,
                num_workers=0, val_fraction=0.0, image_size=32, widen_factor=0.125, progress_bar=False,
                split_fractions={"database": 0.67, "downstream": 0.0, "test": 0.33})
    ckpt = root / "models" / "model.pt"
    assert read_state_dict(ckpt)[EXTRA_STATE]["preprocessing"]["image_size"] == 32

    _bundle_run("evaluating", "evaluate.json", bundle_root=str(root), manifest=str(manifest), checkpoint=str(ckpt))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["image_size"] == 32 and metrics["variant"] == "combined"
    info = json.loads((root / "database" / "database.json").read_text())["info"]
    assert info["image_size"] == 32 and info["variant"] == "combined"

    m = pd.read_csv(manifest, dtype={"subject_id": str})
    row = m.iloc[0]
    folder = tmp_path / "xrays"
    folder.mkdir()
    shutil.copy(manifest.parent / row["xray_dicom"], folder / "knee.dcm")
    pd.DataFrame([{"file": "knee.dcm", "side": row["side"], "x": row["joint_centre_x"],
                   "y": row["joint_centre_y"]}]).to_csv(tmp_path / "landmarks.csv", index=False)
    lm = str(tmp_path / "landmarks.csv")
    _bundle_run("inference", "inference.json", bundle_root=str(root), checkpoint=str(ckpt), input=str(folder),
                landmarks=lm)
    summary = json.loads((root / "inference" / "summary.json").read_text())
    assert summary["n_knees_ok"] == 1 and summary["image_size"] == 32
    assert np.isfinite(np.load(Path(summary["knees"][0]["folder"]) / "fc.npy")).any()

    # an explicit flag that contradicts the checkpoint: one line naming both values
    with pytest.raises(Exception) as err:
        _bundle_run("inference", "inference.json", bundle_root=str(root), input=str(folder), landmarks=lm,
                    widen_factor=0.5, output_dir=str(tmp_path / "wrong"))
    user = ue.find_user_error(err.value)
    assert isinstance(user, ue.SettingsMismatchError) and "widen_factor=0.125" in _one_line(user) and "0.5" in str(user)

    # a database built at another image size (an old checkpoint without the record, given 64 px) is refused
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in read_state_dict(ckpt).items() if k != EXTRA_STATE}, old)
    net = load_mris_network(old, widen_factor=0.125, image_size=64)
    build_mris_database(net, old, manifest, tmp_path / "db64", progress=False)
    with pytest.raises(Exception) as err:
        _bundle_run("inference", "inference.json", bundle_root=str(root), checkpoint=str(old), input=str(folder),
                    landmarks=lm, database_dir=str(tmp_path / "db64"), widen_factor=0.125, image_size=32,
                    output_dir=str(tmp_path / "refused"))
    user = ue.find_user_error(err.value)
    assert isinstance(user, CheckpointMismatchError)
    assert "image_size 64" in _one_line(user) and "image_size 32" in str(user) and "rebuild the database" in str(user)

"""Every bundle stops early on a user error: one line naming the missing file and the command that makes it,
a non-zero exit, nothing created; every config answers to MONAI's default run id ``run``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.user_errors import MissingInputError, UserInputError, find_user_error, friendly_errors

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

# (run id, config files relative to bundles/, text the message must contain)
NO_DATA = [
    ("training", ["mris/configs/train.json"], "manifest not found"),
    ("training", ["kneel/configs/train.json"], "manifest not found"),
    ("training", ["dess_seg/configs/train.json"], "manifest not found"),
    ("training", ["direct_synthesis/configs/train.json"], "manifest not found"),
    ("training", ["mris/configs/train.json", "mris/configs/multi_gpu_train.json"], "manifest not found"),
    ("training", ["kneel/configs/train.json", "kneel/configs/multi_gpu_train.json"], "manifest not found"),
    ("training", ["dess_seg/configs/train.json", "dess_seg/configs/multi_gpu_train.json"], "manifest not found"),
    ("evaluating", ["mris/configs/evaluate.json"], "checkpoint not found"),
    ("evaluating", ["kneel/configs/evaluate.json"], "global-stage checkpoint not found"),
    ("evaluating", ["dess_seg/configs/train.json", "dess_seg/configs/evaluate.json"], "checkpoint not found"),
    ("evaluating", ["direct_synthesis/configs/evaluate.json"], "checkpoint not found"),
    ("inference", ["mris/configs/inference.json"], "checkpoint not found"),
    ("inference", ["kneel/configs/inference.json"], "global-stage checkpoint not found"),
    ("inference", ["dess_seg/configs/inference.json"], "checkpoint not found"),
    ("inference", ["direct_synthesis/configs/inference.json"], "checkpoint not found"),
    ("inference", ["thickness/configs/inference.json"], "input not found"),
    ("inference", ["dess_seg/configs/inference.json", "thickness/configs/from_dess.json"], "checkpoint not found"),
]


@pytest.fixture
def restore_excepthook():
    hook = sys.excepthook
    yield
    sys.excepthook = hook


@pytest.mark.parametrize("run_id,files,expected", NO_DATA, ids=[f"{r}:{'+'.join(f)}" for r, f, _ in NO_DATA])
def test_missing_data_or_checkpoint_stops_before_creating_anything(tmp_path, monkeypatch, restore_excepthook,
                                                                   run_id, files, expected):
    from monai.bundle import run

    monkeypatch.chdir(tmp_path)  # relative defaults (demo_output/..., radiographs) do not exist here
    root = tmp_path / "bundle_root"
    overrides = {"bundle_root": str(root)}
    if "dess_seg/configs/inference.json" in files[0]:
        overrides["checkpoint"] = str(root / "models" / "model.pt")  # its default is the repository's bundle
    with pytest.raises(Exception) as info:
        run(run_id, config_file=[str(BUNDLES / f) for f in files], **overrides)
    err = find_user_error(info.value)
    assert isinstance(err, MissingInputError), info.value
    msg = str(err)
    assert expected in msg and "\n" not in msg
    assert "python -m " in msg and "--" in msg  # says what to run or pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, not even bundle_root


def test_users_training_command_prints_one_line_and_exits_nonzero(tmp_path):
    """The README's command as a user types it, from an empty folder: one `error:` line, exit 1, no traceback,
    no folder created (neither in the CWD nor in the bundle)."""
    before = sorted(p.name for p in (BUNDLES / "mris").iterdir())
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                        str(BUNDLES / "mris" / "configs" / "train.json")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "demo_output/mris_cohort/manifest.csv" in errors[0] and "python -m pipeline cohort" in errors[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in (BUNDLES / "mris").iterdir()) == before


def test_debug_keeps_the_traceback(restore_excepthook, capsys):
    assert friendly_errors(debug=True) is False  # uninstalls a hook an earlier in-process bundle run left
    original = sys.excepthook
    assert friendly_errors(debug=False) and sys.excepthook is not original
    try:
        raise RuntimeError("wrapped") from MissingInputError("checkpoint not found: m.pt. Train one with `x`.")
    except RuntimeError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found: m.pt. Train one with `x`.") and err.count("\n") == 1
    assert friendly_errors(debug=True) is False and sys.excepthook is original


def test_user_error_is_found_through_monai_wrappers():
    try:
        try:
            raise MissingInputError("manifest not found: x.csv")
        except UserInputError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as wrapped:
        assert str(find_user_error(wrapped)) == "manifest not found: x.csv"
    assert find_user_error(RuntimeError("other")) is None


def _configs():
    return sorted(p for p in BUNDLES.glob("*/configs/*.json") if p.name != "metadata.json")


@pytest.mark.parametrize("path", _configs(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_runnable_config_has_the_default_run_id(path):
    """``python -m monai.bundle run`` without an id runs ``run``: every config that defines one of the named
    workflow ids defines ``run`` as the same list (override files inherit it from their base config)."""
    cfg = json.loads(path.read_text())
    named = [k for k in ("training", "evaluating", "inference") if k in cfg]
    if not named:
        assert path.name.endswith("_demo.json"), f"{path}: no workflow id"
        return
    assert "run" in cfg, f"{path}: no 'run' id (MONAI's default)"
    assert cfg["run"] == cfg[named[0]]


@pytest.mark.parametrize("bundle", ["dess_seg", "kneel", "mris", "direct_synthesis", "segreg", "progression_mr"])
def test_default_manifests_are_the_documented_ones(bundle):
    from pipeline.bundle_paths import DEFAULT_MANIFESTS

    for name in ("train.json", "train_registration.json", "train_segmenter.json", "train_cyclegan.json",
                 "evaluate.json"):
        if not (BUNDLES / bundle / "configs" / name).is_file():
            continue
        cfg = json.loads((BUNDLES / bundle / "configs" / name).read_text())
        if "manifest" in cfg:
            assert cfg["manifest"] == DEFAULT_MANIFESTS[bundle], (bundle, name)

"""Re-runs, concurrency and interruption of the MRIS, direct-synthesis, KNEEL and dess_seg inference bundles
(issue 12, item 2; :mod:`pipeline.io.run_state`), each on two tiny items made from the tiny cohort with untrained
tiny networks: the same settings resume (finished items untouched, a damaged one redone), other settings are
refused unless ``overwrite`` (the bundle configs pass ``overwrite`` through), a lock held by another live process
refuses, and an interrupt after the first item leaves a manifest of exactly that item; the re-run completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
#: Bookkeeping files of a run (not outputs of an item).
BOOKKEEPING = {"outputs.csv", "summary.json", "landmarks.csv", "predictions.csv", "failures.csv",
               "run_settings.json", "run_items.jsonl"}
DS_NET = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
SEG_TINY = {"patch_size": [32, 32, 32], "network_def#channels": [4, 8, 16], "network_def#strides": [2, 2],
            "network_def#num_res_units": 0}
SPLIT = {"database": 0.67, "downstream": 0.0, "test": 0.33}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def radiographs(tiny_cohort, tmp_path_factory):
    """Two radiographs (a.dcm, b.dcm; two subjects) and a landmarks CSV with one knee of each."""
    root = Path(tiny_cohort[0])
    m = pd.read_csv(root / "manifest.csv", dtype={"subject_id": str})
    first = m[m["visit_month"] == 0].drop_duplicates("subject_id").iloc[:2]
    base = tmp_path_factory.mktemp("resume_xrays")
    folder = base / "xrays"
    folder.mkdir()
    rows = []
    for name, (_, r) in zip(("a.dcm", "b.dcm"), first.iterrows()):
        shutil.copy(root / r["xray_dicom"], folder / name)
        rows.append({"file": name, "side": r["side"], "x": r["joint_centre_x"], "y": r["joint_centre_y"]})
    pd.DataFrame(rows).to_csv(base / "landmarks.csv", index=False)
    return folder, base / "landmarks.csv", root / "manifest.csv"


@pytest.fixture(scope="module")
def bundles(radiographs, tiny_cohort, tmp_path_factory):
    """``{bundle: Runner}`` (see :class:`Runner`)."""
    folder, landmarks, manifest = radiographs
    tmp = tmp_path_factory.mktemp("resume_models")
    torch.manual_seed(0)
    # MRIS: tiny untrained network + its embedding database
    from pipeline.mris.engine import make_network
    from pipeline.mris.evaluate import build_mris_database

    mris_net = make_network("combined", widen_factor=0.125, image_size=32)
    torch.save(mris_net.state_dict(), tmp / "mris.pt")
    build_mris_database(mris_net, tmp / "mris.pt", manifest, tmp / "db", split_fractions=SPLIT, progress=False)
    # direct synthesis: tiny U-Net generator
    from pipeline.baselines import make_generator

    torch.save(make_generator("unet", 32, **DS_NET).state_dict(), tmp / "ds.pt")
    # KNEEL: tiny untrained global + local stages
    from pipeline.landmarks.engine import make_network as make_kneel

    for stage, spacing in (("global", 8.0), ("local", 4.0)):
        torch.save(make_kneel(stage, 32, spacing, width=2).state_dict(), tmp / f"kneel_{stage}.pt")
    # dess_seg: tiny untrained U-Net, two DESS volumes in two sub-folders
    from pipeline.segmentation import build_network

    torch.save(build_network(channels=[4, 8, 16], strides=[2, 2], num_res_units=0).state_dict(), tmp / "seg.pt")
    root = Path(tiny_cohort[0])
    dess = sorted(root.glob("subjects/*/00_MONTH/MR_SAG_3D_DESS/RIGHT_KNEE/dess.nii.gz"))[:2]
    src = tmp / "dess"
    for name, p in zip(("a", "b"), dess):
        (src / name).mkdir(parents=True)
        shutil.copy(p, src / name / "dess.nii.gz")
    return {"mris": Runner("mris", tmp, folder, landmarks, mris_net), "direct_synthesis": Runner(
        "direct_synthesis", tmp, folder, landmarks), "kneel": Runner("kneel", tmp, folder, landmarks),
        "dess_seg": Runner("dess_seg", tmp, src, landmarks)}


class Runner:
    """One bundle's inference on the two items: ``run(out, other=False, overwrite=False, config=False)``;
    ``other``: other settings; ``config``: through the bundle's ``configs/inference.json``."""

    def __init__(self, bundle: str, models: Path, input: Path, landmarks: Path, net=None) -> None:
        self.bundle, self.models, self.input, self.landmarks, self.net = bundle, models, input, landmarks, net

    def run(self, out: Path, other: bool = False, overwrite: bool = False, config: bool = False):
        m, b = self.models, self.bundle
        cfg = str(BUNDLES / b / "configs" / "inference.json")
        if b == "mris":
            if config:
                from monai.bundle import run

                return run("inference", config_file=cfg, bundle_root=str(m), checkpoint=str(m / "mris.pt"),
                           database_dir=str(m / "db"), input=str(self.input), landmarks=str(self.landmarks),
                           output_dir=str(out), image_size=32, widen_factor=0.125, png=False, device="cpu",
                           overwrite=overwrite)
            from pipeline.mris.infer import run_inference

            return run_inference(self.net, m / "mris.pt", self.input, m / "db", out, landmarks=self.landmarks,
                                 k=5 if other else 20, png=False, progress=False, overwrite=overwrite)
        if b == "direct_synthesis":
            if config:
                from monai.bundle import run

                return run("inference", config_file=cfg, input=str(self.input), landmarks=str(self.landmarks),
                           checkpoint=str(m / "ds.pt"), output_dir=str(out), method="unet", image_size=32,
                           map_size=[32, 32], png=False, device="cpu", overwrite=overwrite, **DS_NET)
            from pipeline.baselines.infer import run_inference

            return run_inference(None, m / "ds.pt", self.input, out, landmarks=self.landmarks, method="unet",
                                 image_size=32, net_kwargs=DS_NET, map_size=32, png=other, progress=False,
                                 overwrite=overwrite)
        if b == "kneel":
            if config:
                from monai.bundle import run

                return run("inference", config_file=cfg, bundle_root=str(m), input=str(self.input),
                           output_dir=str(out), global_ckpt=str(m / "kneel_global.pt"),
                           local_ckpt=str(m / "kneel_local.pt"), device="cpu", overwrite=overwrite)
            from pipeline.landmarks.infer import run_folder

            return run_folder(self.input, out, m / "kneel_global.pt", m / "kneel_local.pt", progress=False,
                              overwrite=overwrite, min_confidence=0.3 if other else 0.5)
        from monai.bundle import ConfigParser  # dess_seg: always the bundle's own config

        parser = ConfigParser()
        parser.read_config(cfg)
        parser.update({"input": str(self.input), "output_dir": str(out), "checkpoint": str(m / "seg.pt"),
                       "progress": False, "device": "cpu", "overwrite": overwrite, **SEG_TINY,
                       "inferer#overlap": 0.5 if other else 0.25})
        return parser.get_parsed_content("runner").run()

    # what the runs write
    def item_files(self, out: Path, item: int) -> list[Path]:
        """The output files of item 0 / 1 as the manifest lists them."""
        df = _manifest(out)
        key = ("a" if item == 0 else "b")
        rows = df[df["item"].map(lambda s: _item_of(self.bundle, s) == key)]
        return sorted(out / p for v in rows["outputs"] for p in str(v).split(";") if p)

    def interrupt_at_second_item(self, monkeypatch, how: str = "KeyboardInterrupt") -> None:
        """Make the per-item function raise ``KeyboardInterrupt`` (or send this process SIGTERM) on the 2nd item."""
        calls = []
        if self.bundle in ("mris", "direct_synthesis"):
            from pipeline.knee_inference import KneeMapWriter as cls
            name = "__call__"
        elif self.bundle == "kneel":
            from pipeline.landmarks.infer import KneeLocaliser as cls
            name = "locate"
        else:
            from pipeline.segmentation.inference import SafeInferenceRunner as cls
            name = "_one"
        original = getattr(cls, name)

        def wrapped(self_, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                if how == "SIGTERM":  # the run's handler turns it into KeyboardInterrupt
                    os.kill(os.getpid(), signal.SIGTERM)
                raise KeyboardInterrupt
            return original(self_, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)


def _item_of(bundle: str, item: str) -> str:
    """``a`` / ``b``: which input an outputs-manifest item belongs to."""
    return Path(item).parent.name if bundle == "dess_seg" else item[0]


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "outputs.csv", dtype=str, keep_default_na=False)


def _listed(out: Path) -> set[Path]:
    return {out / p for v in _manifest(out)["outputs"] for p in str(v).split(";") if p}


def _present(out: Path) -> set[Path]:
    return {p for p in out.rglob("*") if p.is_file() and p.name not in BOOKKEEPING and p.name != "run.lock"
            and not p.name.startswith("run_progress.")}  # (an interrupted run's progress, marked stopped)


def _mtimes(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


NAMES = ["mris", "direct_synthesis", "kneel", "dess_seg"]


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bundle", NAMES)
def test_rerun_resumes_refuses_other_settings_and_overwrites(bundles, bundle, tmp_path):
    from pipeline.io.run_state import RunSettingsError

    r = bundles[bundle]
    out = tmp_path / "out"
    r.run(out)
    a, b = r.item_files(out, 0), r.item_files(out, 1)
    assert a and b and _listed(out) == _present(out) == set(a) | set(b)
    before = _mtimes(a + b)
    # same settings: both items are skipped (their files untouched)
    r.run(out)
    assert _mtimes(a + b) == before and _listed(out) == set(a) | set(b)
    # a damaged item (one file deleted) is redone, the other one is not touched
    a[0].unlink()
    r.run(out)
    assert all(p.is_file() for p in a) and _mtimes(b) == {p: before[p] for p in b}
    assert _mtimes(a)[a[0]] != before[a[0]] and _listed(out) == _present(out)
    before = _mtimes(a + b)
    # other settings: refused with a message naming --overwrite, nothing touched
    with pytest.raises(RunSettingsError, match="--overwrite True"):
        r.run(out, other=True)
    assert _mtimes(a + b) == before
    # --overwrite True (through the bundle's config): every item redone, the manifest lists exactly the files
    r.run(out, overwrite=True, config=True)
    a2, b2 = r.item_files(out, 0), r.item_files(out, 1)
    assert a2 and b2 and _listed(out) == _present(out) == set(a2) | set(b2)
    assert all(p.stat().st_mtime_ns != before[p] for p in a2 + b2 if p in before)
    assert json.loads((out / "run_settings.json").read_text())["digest"]


@pytest.mark.parametrize("bundle", NAMES)
def test_lock_of_another_live_process_refuses(bundles, bundle, tmp_path):
    from pipeline.io.paths import OutputLockedError

    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (out / "run.lock").write_text(json.dumps(holder))
    with pytest.raises(OutputLockedError, match=f"in use by another .*process {os.getppid()}"):
        bundles[bundle].run(out)
    assert not (out / "outputs.csv").exists() and json.loads((out / "run.lock").read_text()) == holder


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERM"])
@pytest.mark.parametrize("bundle", NAMES)
def test_interrupt_leaves_manifest_of_finished_items_and_rerun_completes(bundles, bundle, how, tmp_path,
                                                                         monkeypatch):
    r = bundles[bundle]
    out = tmp_path / "out"
    before_handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp:
        r.interrupt_at_second_item(mp, how)
        with pytest.raises(KeyboardInterrupt) as err:
            r.run(out)
    assert ("SIGTERM" in str(err.value)) == (how == "SIGTERM")  # raised by the run's handler, not by the test
    assert signal.getsignal(signal.SIGTERM) == before_handler
    df = _manifest(out)
    assert {_item_of(bundle, s) for s in df["item"]} == {"a"} and set(df["status"]) <= {"ok", "low_confidence"}
    a = r.item_files(out, 0)
    assert a and _listed(out) == _present(out) == set(a) and not (out / "run.lock").exists()
    before = _mtimes(a)
    r.run(out)  # the same command resumes: the first item kept, the second one done
    b = r.item_files(out, 1)
    assert b and _mtimes(a) == before and _listed(out) == _present(out) == set(a) | set(b)


def test_sigterm_is_a_clean_stop_and_the_handler_is_restored(tmp_path):
    """While a RunState is held SIGTERM raises KeyboardInterrupt (the bundles' clean stop); afterwards the
    previous handler is back."""
    from pipeline.io.run_state import RunState

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with RunState(tmp_path / "out", {"x": 1}, "test run"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before and not (tmp_path / "out" / "run.lock").exists()


def test_output_names_shared_by_two_inputs_are_failed_rows(bundles, radiographs, tmp_path):
    """Radiograph bundles name outputs through pipeline.io.paths: two files whose names differ only in case
    (one output name on macOS / Windows) are both failed rows with the reason, nothing written for them; a
    third file is processed."""
    from pipeline.io.paths import name_problems
    from pipeline.landmarks.infer import run_folder

    folder, _, _ = radiographs
    src = tmp_path / "in"
    src.mkdir()
    for name in ("K.dcm", "k.dcm"):
        shutil.copy(folder / "a.dcm", src / name)
    shutil.copy(folder / "b.dcm", src / "other.dcm")
    m = bundles["kneel"].models
    out = tmp_path / "out"
    df = run_folder(src, out, m / "kneel_global.pt", m / "kneel_local.pt", progress=False)
    by = {Path(f).name: g for f, g in df.groupby("file")}
    for name in ("K.dcm", "k.dcm"):
        assert (by[name]["status"] == "error").all() and by[name]["message"].str.contains("shared by 2 inputs").all()
    assert (by["other.dcm"]["status"] != "error").all()
    assert {p.name for p in (out / "overlays").iterdir()} == {"other.dcm.png"} and _listed(out) == _present(out)
    # direct synthesis (MRIS shares run_knees): the same two files with landmarks are failed rows, no knee folders
    from pipeline.baselines.infer import run_inference

    lm = pd.read_csv(radiographs[1]).iloc[:1]
    pd.DataFrame([{**lm.iloc[0].to_dict(), "file": n} for n in ("K.dcm", "k.dcm", "other.dcm")]).to_csv(
        tmp_path / "lm.csv", index=False)
    ds = tmp_path / "ds"
    summary = run_inference(None, bundles["direct_synthesis"].models / "ds.pt", src, ds, landmarks=tmp_path / "lm.csv",
                            method="unet", image_size=32, net_kwargs=DS_NET, map_size=32, png=False, progress=False)
    assert sorted(Path(f["file"]).name for f in summary["failures"]) == ["K.dcm", "k.dcm"]
    assert all("shared by 2 inputs" in f["error"] for f in summary["failures"])
    assert [k["knee"] for k in summary["knees"]] == [f"other.dcm_{lm['side'].iloc[0]}"]
    assert {p.name for p in ds.iterdir() if p.is_dir()} == {f"other.dcm_{lm['side'].iloc[0]}"}
    problems = name_problems(["k.dcm", "K.dcm", "../x", "ok.dcm"], ["x/k.dcm", "y/K.dcm", "z", "ok"])
    assert set(problems) == {0, 1, 2} and "shared by 2 inputs" in problems[0] and "unsafe" in problems[2]

"""Issue 12, thickness bundle and manifests: output containment, re-runs, locking, interruption, plausibility
checks and manifest errors. Tiny label volumes are made in each test; the map computation itself is replaced by
a fast stand-in where only the bookkeeping is under test (``fast_maps``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import pipeline.thickness.maps_io as maps_io
from pipeline.io.manifest import ManifestError, load_manifest
from pipeline.io.paths import (
    OutputLockedError,
    OutsideOutputError,
    UnsafeNameError,
    contained_path,
    find_collisions,
    name_from_path,
    output_lock,
    safe_name,
)
from pipeline.thickness.atlas import FlattenResult
from pipeline.thickness.checks import ImplausibleLabelsError, check_map_result, validate_label_volume
from pipeline.thickness.maps_io import (
    MAPS_MANIFEST,
    RunSettingsError,
    batch_maps,
    items_from_folder,
    items_from_manifest,
    items_from_segmentation,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16)
BOOKKEEPING = {MAPS_MANIFEST, maps_io.SETTINGS_FILE}


def _labels(path: Path, spacing=(0.7, 0.7, 0.7), dtype=np.uint8, nan_slab: bool = False) -> Path:
    """A small label volume with every DESS label (0-4), written as NIfTI."""
    lab = np.zeros((12, 12, 12), dtype=np.float32)
    lab[2:10, 2:5, 2:10], lab[2:10, 5:6, 2:10], lab[2:10, 6:7, 2:10], lab[2:10, 7:10, 2:10] = 1, 2, 4, 3
    if nan_slab:
        lab[:, :, 5:7] = np.nan
    else:
        lab = lab.astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(lab, np.diag([*spacing, 1.0])), path)
    return path


def _files(folder: Path) -> set[str]:
    """Files below ``folder``, less an interrupted run's progress file (``run_progress.rank0.json``, marked
    stopped: bookkeeping, not an output)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            and not p.name.startswith("run_progress.")}


def _listed(df: pd.DataFrame) -> set[str]:
    return {f for v in df.outputs.fillna("") for f in str(v).split(";") if f}


def _manifest_matches_folder(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / MAPS_MANIFEST, dtype=str, keep_default_na=False)
    assert _listed(df) == _files(out) - BOOKKEEPING, "the manifest must list exactly the output files present"
    return df


# ----------------------------------------------------------------------------------------- containment
@pytest.mark.parametrize("bad", ["", "  ", "..", ".", "../../escaped", "/abs/path", "a/b", "a\\b", "C:evil",
                                 "x\x00y", "x\ny", ".hidden", "a" * 300])
def test_safe_name_refuses_unsafe_identifiers(bad):
    with pytest.raises(UnsafeNameError):
        safe_name(bad)


def test_safe_name_keeps_ordinary_names_and_names_come_from_the_full_path(tmp_path):
    assert safe_name("9001_L_00") == "9001_L_00" and safe_name("knee.v3") == "knee.v3"
    assert name_from_path(tmp_path / "knee_L.nii.gz", tmp_path) == "knee_L"
    assert name_from_path(tmp_path / "knee_L.v3.nii.gz", tmp_path) == "knee_L.v3"
    assert name_from_path(tmp_path / "a" / "b" / "seg.nii", tmp_path) == "a_b_seg"
    assert find_collisions(["a", "b", "A"]) == {"a": [0, 2]}


def test_contained_path_refuses_escapes_and_symlinks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert contained_path(out, "x_fc.npy") == out.resolve() / "x_fc.npy"
    for name in ("../x.npy", "/tmp/x.npy"):
        with pytest.raises(OutsideOutputError):
            contained_path(out, name)
    (out / "link_fc.npy").symlink_to(tmp_path / "elsewhere.npy")
    with pytest.raises(OutsideOutputError):
        contained_path(out, "link_fc.npy")


def test_manifest_subject_id_cannot_write_outside_output_dir(tmp_path, fast_maps):
    lab = _labels(tmp_path / "in" / "knee.nii.gz")
    m = pd.DataFrame({"subject_id": ["../../escaped", str(tmp_path / "abs"), "9001"], "side": ["L", "L", "L"],
                      "visit_month": [0, 0, 0], "labels_nifti": [str(lab)] * 3})
    m.to_csv(tmp_path / "in" / "manifest.csv", index=False)
    out = tmp_path / "a" / "b" / "out"
    before = _files(tmp_path)
    df = batch_maps(items_from_manifest(tmp_path / "in" / "manifest.csv"), out, size=SIZE, progress=False)
    assert list(df.status) == ["failed", "failed", "ok"]
    assert "path separator" in df.reason[0] and "unsafe output name" in df.reason[1]
    new = {f for f in _files(tmp_path) - before if not f.startswith("a/b/out/")}
    assert new == set(), f"files written outside the output folder: {new}"
    assert _files(out) - BOOKKEEPING == {"9001_L_00_fc.npy", "9001_L_00_tc.npy", "9001_L_00_grid.json",
                                          "9001_L_00.png"}
    _manifest_matches_folder(out)


def test_folder_mode_names_do_not_collide_on_dots(tmp_path, fast_maps):
    _labels(tmp_path / "in" / "knee_L.nii.gz")
    _labels(tmp_path / "in" / "knee_L.v3.nii.gz")
    items = items_from_folder(tmp_path / "in")
    assert [it["stem"] for it in items] == ["knee_L", "knee_L.v3"]
    df = batch_maps(items, tmp_path / "out", size=SIZE, png=False, progress=False)
    assert list(df.status) == ["ok", "ok"]
    assert df.fc_map.tolist() == ["knee_L_fc.npy", "knee_L.v3_fc.npy"]
    for src, grid in zip(df.labels, df.outputs):
        assert maps_io.json.loads((tmp_path / "out" / grid.split(";")[-1]).read_text())["source"] == src
    _manifest_matches_folder(tmp_path / "out")


def test_colliding_names_are_failed_rows_and_write_nothing(tmp_path, fast_maps):
    a, b = _labels(tmp_path / "x" / "Knee_L.nii.gz"), _labels(tmp_path / "y" / "knee_l.nii.gz")
    c = _labels(tmp_path / "z" / "other_L.nii.gz")
    items = [{"labels": str(a), "side": "L", "stem": "Knee_L"}, {"labels": str(b), "side": "L", "stem": "knee_l"},
             {"labels": str(c), "side": "L", "stem": "other_L"}]
    df = batch_maps(items, tmp_path / "out", size=SIZE, png=False, progress=False)
    assert list(df.status) == ["failed", "failed", "ok"]
    assert "shared by 2 inputs" in df.reason[0] and str(b) in df.reason[0]
    assert _files(tmp_path / "out") - BOOKKEEPING == {"other_L_fc.npy", "other_L_tc.npy", "other_L_grid.json"}


def test_segmentation_items_keep_the_full_name(tmp_path):
    out = tmp_path / "seg"
    result = {"predictions": [{"image": "a.nii.gz", "side": "L", "output": str(out / "k_L.nii.gz")},
                              {"image": "b.nii.gz", "side": "L", "output": str(out / "k_L.v3.nii.gz")}]}
    assert [it["stem"] for it in items_from_segmentation(result, out)] == ["k_L", "k_L.v3"]


# ---------------------------------------------------------------------------------------------- re-runs
def test_rerun_same_settings_resumes_and_redoes_failed(tmp_path, fast_maps):
    good, bad = _labels(tmp_path / "good_L.nii.gz"), tmp_path / "bad_L.nii.gz"
    bad.write_bytes(b"not a nifti")
    items = [{"labels": str(good), "side": "L", "stem": "good"}, {"labels": str(bad), "side": "L", "stem": "bad"}]
    out = tmp_path / "out"
    df = batch_maps(items, out, size=SIZE, progress=False)
    assert list(df.status) == ["ok", "failed"] and len(fast_maps) == 1
    _labels(bad)  # the user fixes the bad file
    df = batch_maps(items, out, size=SIZE, progress=False)
    assert list(df.status) == ["ok", "ok"] and len(fast_maps) == 2  # only the failed item was redone
    (out / "good_tc.npy").unlink()  # a missing output: redone
    df = batch_maps(items, out, size=SIZE, progress=False)
    assert list(df.status) == ["ok", "ok"] and len(fast_maps) == 3
    st = good.stat()
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # labels changed in place: redone
    df = batch_maps(items, out, size=SIZE, progress=False)
    assert list(df.status) == ["ok", "ok"] and len(fast_maps) == 4
    assert isinstance(df.coverage_fc[1], float)  # kept rows keep their numeric columns
    _manifest_matches_folder(out)


def test_rerun_other_settings_refuses_unless_overwrite(tmp_path, fast_maps):
    items = [{"labels": str(_labels(tmp_path / "k_L.nii.gz")), "side": "L", "stem": "k"}]
    out = tmp_path / "out"
    batch_maps(items, out, size=SIZE, png=True, progress=False)
    with pytest.raises(RunSettingsError, match="png: True -> False.*--overwrite True"):
        batch_maps(items, out, size=SIZE, png=False, progress=False)
    assert (out / "k.png").exists() and len(fast_maps) == 1  # nothing touched
    df = batch_maps(items, out, size=SIZE, png=False, progress=False, overwrite=True)
    assert list(df.status) == ["ok"] and not (out / "k.png").exists()  # the old run's PNG is gone with it
    _manifest_matches_folder(out)


def test_folder_with_an_unknown_earlier_manifest_refuses(tmp_path, fast_maps):
    out = tmp_path / "out"
    out.mkdir()
    (out / MAPS_MANIFEST).write_text("item,status,reason,outputs,dicom\nold,ok,,old_fc.npy,\n")
    (out / "old_fc.npy").write_bytes(b"x")
    items = [{"labels": str(_labels(tmp_path / "k_L.nii.gz")), "side": "L", "stem": "k"}]
    with pytest.raises(RunSettingsError, match="earlier run"):
        batch_maps(items, out, size=SIZE, progress=False)
    assert (out / "old_fc.npy").exists()


def test_second_concurrent_run_is_refused_and_stale_lock_is_taken_over(tmp_path, fast_maps):
    items = [{"labels": str(_labels(tmp_path / "k_L.nii.gz")), "side": "L", "stem": "k"}]
    out = tmp_path / "out"
    with output_lock(out, maps_io.LOCK_FILE):  # a run in progress (this process)
        with pytest.raises(OutputLockedError, match="in use by another thickness run.*process"):
            batch_maps(items, out, size=SIZE, progress=False)
    assert not (out / MAPS_MANIFEST).exists() and not fast_maps
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / maps_io.LOCK_FILE).write_text(maps_io.json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    df = batch_maps(items, out, size=SIZE, progress=False)  # the stale lock of a finished process
    assert list(df.status) == ["ok"] and not (out / maps_io.LOCK_FILE).exists()


def test_interrupt_leaves_a_manifest_of_the_complete_items(tmp_path, fast_maps, monkeypatch):
    items = [{"labels": str(_labels(tmp_path / f"k{i}_L.nii.gz")), "side": "L", "stem": f"k{i}"} for i in range(3)]
    out = tmp_path / "out"
    real = maps_io.knee_maps

    def interrupted(labels, *a, **k):
        if "k1" in str(labels):
            real(labels, *a, **k)  # the second knee's files are written, then Ctrl-C arrives
            raise KeyboardInterrupt
        return real(labels, *a, **k)

    monkeypatch.setattr(maps_io, "knee_maps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batch_maps(items, out, size=SIZE, progress=False)
    df = _manifest_matches_folder(out)
    assert list(df.item) == ["k0"] and list(df.status) == ["ok"]
    assert not (out / maps_io.LOCK_FILE).exists()
    monkeypatch.setattr(maps_io, "knee_maps", real)
    n = len(fast_maps)
    df = batch_maps(items, out, size=SIZE, progress=False)
    assert list(df.item) == ["k0", "k1", "k2"] and (df.status == "ok").all()
    assert len(fast_maps) == n + 2  # k0 was kept, k1 and k2 computed
    _manifest_matches_folder(out)


# ----------------------------------------------------------------------------------------- plausibility
def test_100_mm_voxels_are_failed_not_ok(tmp_path, fast_maps):
    lab = _labels(tmp_path / "huge_L.nii.gz", spacing=(100.0, 100.0, 100.0))
    df = batch_maps([{"labels": str(lab), "side": "L", "stem": "huge"}], tmp_path / "out", size=SIZE,
                    progress=False)
    assert list(df.status) == ["failed"] and "voxel size (100.0, 100.0, 100.0) mm" in df.reason[0]
    assert "0.1-2.0 mm" in df.reason[0] and not fast_maps
    assert _files(tmp_path / "out") == BOOKKEEPING


def test_nan_slab_in_labels_is_failed(tmp_path, fast_maps):
    lab = _labels(tmp_path / "nan_L.nii.gz", nan_slab=True)
    df = batch_maps([{"labels": str(lab), "side": "L", "stem": "nan"}], tmp_path / "out", size=SIZE,
                    progress=False)
    assert list(df.status) == ["failed"] and "NaN or infinite" in df.reason[0] and not fast_maps


@pytest.mark.parametrize("case, match", [("labels7", "not in the DESS table"), ("probability", "non-integer"),
                                         ("2d", "expected a 3D"), ("singular", "voxel size")])
def test_label_volume_validator(case, match):
    lab = np.zeros((6, 6, 6), np.float32)
    aff = np.diag([0.7, 0.7, 0.7, 1.0])
    if case == "labels7":
        lab[1, 1, 1] = 7
    elif case == "probability":
        lab[1, 1, 1] = 0.4
    elif case == "2d":
        lab = lab[:, :, 0]
    else:
        aff[2, 2] = 0.0
    with pytest.raises(ImplausibleLabelsError, match=match):
        validate_label_volume(lab, aff, "x.nii.gz")
    ok = validate_label_volume(np.ones((6, 6, 6, 1), np.float64), np.diag([0.3, 0.3, 1.5, 1.0]))
    assert ok.shape == (6, 6, 6) and ok.dtype == np.int16


def test_implausible_maps_are_flagged_not_ok(tmp_path, monkeypatch):
    def thick(labels, affine, side, size=SIZE, method="volume"):
        return FlattenResult(np.full(size, 26.2, np.float32), np.full(size, 1.0, np.float32),
                             {"fc": 1.0, "tc": 0.2}, {})

    monkeypatch.setattr(maps_io, "labels_to_maps", thick)
    lab = _labels(tmp_path / "k_L.nii.gz")
    df = batch_maps([{"labels": str(lab), "side": "L", "stem": "k"}], tmp_path / "out", size=SIZE, progress=False)
    assert list(df.status) == ["low_confidence"]
    assert "FC thickness 26.20-26.20 mm is outside the plausible 0-8 mm" in df.reason[0]
    assert "TC coverage 0.20 is below 0.5" in df.reason[0] and "check the segmentation" in df.reason[0]
    _manifest_matches_folder(tmp_path / "out")  # written (for inspection) and listed
    assert check_map_result({"fc": np.full((4, 4), 2.0)}, {"fc": 0.9}) == []


# ----------------------------------------------------------------------------------------- manifests
def test_manifest_without_labels_nifti_column(tmp_path):
    p = tmp_path / "m.csv"
    pd.DataFrame({"subject_id": ["1"], "side": ["L"], "visit_month": [0]}).to_csv(p, index=False)
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['labels_nifti'\]"):
        items_from_manifest(p)


def test_empty_and_header_only_manifests(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ManifestError, match="the file is empty"):
        load_manifest(empty)
    header = tmp_path / "header.csv"
    header.write_text("subject_id,side,visit_month,labels_nifti\n")
    with pytest.raises(ManifestError, match="no rows"):
        items_from_manifest(header)
    assert len(load_manifest(header, allow_empty=True)) == 0


def test_header_only_manifest_stops_the_bundle_with_rc_1(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text("subject_id,side,visit_month,labels_nifti\n")
    out = tmp_path / "maps"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
           str(ROOT / "bundles/thickness/configs/inference.json"), "--input", str(header), "--output_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "no rows" in r.stderr and not (out / MAPS_MANIFEST).exists()


SIGINT_SCRIPT = """
import signal, sys, time
# a process started in the background by a non-interactive shell inherits SIGINT as ignored (POSIX), and then
# Python installs no KeyboardInterrupt handler: restore it, as in a terminal where a user presses Ctrl-C
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import pipeline.thickness.maps_io as maps_io
from pipeline.thickness.atlas import FlattenResult

calls = []

def slow(labels, affine, side, size=(16, 16), method="volume"):
    calls.append(1)
    # two quick knees, then slow ones: the parent has seconds to see k1 and interrupt, even on a loaded machine
    time.sleep(0.3 if len(calls) <= 2 else 5.0)
    return FlattenResult(np.full(size, 2.0, np.float32), np.full(size, 1.5, np.float32), {"fc": 1.0, "tc": 1.0}, {})

maps_io.labels_to_maps = slow
items = [{"labels": p, "side": "L", "stem": p.rsplit("/", 1)[1].split("_")[0]} for p in sys.argv[2:]]
maps_io.batch_maps(items, sys.argv[1], size=(16, 16), png=False, progress=False)
"""


def test_sigint_in_a_real_process_leaves_a_manifest(tmp_path, fast_maps):
    import signal
    import time

    labels = [str(_labels(tmp_path / "in" / f"k{i}_L.nii.gz")) for i in range(8)]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(out), *labels], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "k1_grid.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    df = _manifest_matches_folder(out)
    assert 2 <= len(df) < 8 and (df.status == "ok").all() and not (out / maps_io.LOCK_FILE).exists()
    done = len(df)
    df = batch_maps([{"labels": p, "side": "L", "stem": f"k{i}"} for i, p in enumerate(labels)], out, size=SIZE,
                    png=False, progress=False)
    assert len(df) == 8 and (df.status == "ok").all() and len(fast_maps) == 8 - done  # resumed
    _manifest_matches_folder(out)

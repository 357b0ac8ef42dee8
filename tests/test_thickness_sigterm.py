"""Issue 12, thickness bundle: SIGTERM (what schedulers and ``kill`` send) is a clean stop like Ctrl-C: the
manifest lists the complete knees, the knee being written leaves nothing, the lock is released and the same
command resumes. The map computation is replaced by a fast stand-in (only the bookkeeping is under test)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import pipeline.thickness.maps_io as maps_io
from pipeline.thickness.maps_io import MAPS_MANIFEST, batch_maps

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16)
N_KNEES = 6
#: The child process sends itself SIGTERM while the map of knee number ``sys.argv[2]`` (1-based) is computed.
SIGTERM_SCRIPT = """
import os, signal, sys
import numpy as np
import pipeline.thickness.maps_io as maps_io
from pipeline.thickness.atlas import FlattenResult

calls = []

def fake(labels, affine, side, size=(16, 16), method="volume"):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGTERM)
    return FlattenResult(np.full(size, 2.0, np.float32), np.full(size, 1.5, np.float32), {"fc": 1.0, "tc": 1.0}, {})

maps_io.labels_to_maps = fake
items = [{"labels": p, "side": "L", "stem": p.rsplit("/", 1)[1].split("_")[0]} for p in sys.argv[3:]]
maps_io.batch_maps(items, sys.argv[1], size=(16, 16), png=False, progress=False)
"""


def _labels(path: Path) -> Path:
    """A small label volume with every DESS label (0-4), 0.7 mm voxels, written as NIfTI."""
    lab = np.zeros((12, 12, 12), dtype=np.uint8)
    lab[2:10, 2:5, 2:10], lab[2:10, 5:6, 2:10], lab[2:10, 6:7, 2:10], lab[2:10, 7:10, 2:10] = 1, 2, 4, 3
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 0.7, 1.0])), path)
    return path


def _files(folder: Path) -> set[str]:
    """Files below ``folder``, less an interrupted run's progress file (``run_progress.rank0.json``, marked
    stopped: bookkeeping, not an output)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            and not p.name.startswith("run_progress.")}


def _manifest_matches_folder(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / MAPS_MANIFEST, dtype=str, keep_default_na=False)
    listed = {f for v in df.outputs for f in str(v).split(";") if f}
    assert listed == _files(out) - {MAPS_MANIFEST, maps_io.SETTINGS_FILE}, "manifest != files present"
    return df


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_in_a_real_process_leaves_a_manifest_and_the_rerun_resumes(tmp_path, fast_maps):
    labels = [str(_labels(tmp_path / "in" / f"k{i}_L.nii.gz")) for i in range(N_KNEES)]
    out = tmp_path / "out"
    stop_at = 3  # SIGTERM arrives while the third knee is computed: knees k0, k1 are complete
    r = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out), str(stop_at), *labels], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    # a clean stop: KeyboardInterrupt raised by the handler (Python then exits as if by SIGINT, or with 1), not
    # death by the signal itself (returncode -15, nothing written after the kill)
    assert r.returncode in (1, -signal.SIGINT) and "KeyboardInterrupt: signal" in r.stderr and "SIGTERM" in r.stderr, r.stderr[-2000:]
    assert "interrupted:" in r.stderr  # the bundle's warning naming the manifest
    df = _manifest_matches_folder(out)
    assert list(df["item"]) == ["k0", "k1"] and (df.status == "ok").all()
    assert not any(f.startswith("k2") for f in _files(out))  # the knee being written left nothing
    assert not (out / maps_io.LOCK_FILE).exists()
    before = {f: (out / f).stat().st_mtime_ns for f in _files(out) if f.startswith(("k0", "k1"))}
    df = batch_maps([{"labels": p, "side": "L", "stem": f"k{i}"} for i, p in enumerate(labels)], out, size=SIZE,
                    png=False, progress=False)
    assert list(df["item"]) == [f"k{i}" for i in range(N_KNEES)] and (df.status == "ok").all()
    assert len(fast_maps) == N_KNEES - 2  # resumed: the two complete knees were not recomputed
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before
    _manifest_matches_folder(out)


def test_batch_restores_the_previous_sigterm_handler(tmp_path, fast_maps, monkeypatch):
    """Outside a batch SIGTERM is handled as before (the batch's handler is only active while it runs)."""

    def mine(signum, frame):  # noqa: ARG001
        pass

    handlers = []
    original = maps_io.labels_to_maps  # fast_maps' stand-in

    def spy(*a, **k):
        handlers.append(signal.getsignal(signal.SIGTERM))
        return original(*a, **k)

    monkeypatch.setattr(maps_io, "labels_to_maps", spy)
    old = signal.signal(signal.SIGTERM, mine)
    try:
        batch_maps([{"labels": str(_labels(tmp_path / "k_L.nii.gz")), "side": "L", "stem": "k"}], tmp_path / "o",
                   size=SIZE, png=False, progress=False)
        assert handlers and handlers[0] is not mine  # during the batch: the clean-stop handler
        assert signal.getsignal(signal.SIGTERM) is mine  # afterwards: the previous one again
    finally:
        signal.signal(signal.SIGTERM, old)

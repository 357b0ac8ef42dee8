"""bundles/thickness sharded under torchrun (issue 16): 2 CPU processes (gloo) write the same files and the same
merged ``maps_manifest.csv`` as one process; a folder locked by another run stops every rank before any write."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io.paths import output_lock
from pipeline.thickness.maps_io import LOCK_FILE, MAPS_MANIFEST, batch_maps

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "thickness" / "configs"
N_ITEMS = 5  # odd: rank 0 gets 3 items, rank 1 gets 2


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + ["--standalone",
                                                                                  "--nproc_per_node=2"]


def _bundle_args(manifest: Path, out: Path, *configs: str) -> list[str]:
    files = ",".join(f"'{CONFIGS / c}'" for c in configs)
    return ["-m", "monai.bundle", "run", "inference", "--config_file", f"[{files}]", "--input", str(manifest),
            "--output_dir", str(out), "--map_size", "[32, 32]"]


@pytest.fixture(scope="module")
def small_manifest(tiny_cohort, tmp_path_factory):
    """The first N_ITEMS knee-visits of the tiny cohort, with absolute paths (a manifest in its own folder)."""
    root, m = tiny_cohort
    m = pd.read_csv(Path(root) / "manifest.csv", dtype=str, keep_default_na=False).head(N_ITEMS).copy()
    for c in ("labels_nifti", "dess_dicom_dir"):
        m[c] = [str(Path(root) / v) if v else "" for v in m[c]]
    path = tmp_path_factory.mktemp("small") / "manifest.csv"
    m.to_csv(path, index=False)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_ranks_write_the_same_outputs_as_one_process(small_manifest, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, *_bundle_args(small_manifest, one, "inference.json")], cwd=ROOT,
                        capture_output=True, text=True, timeout=180)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(_torchrun() + _bundle_args(small_manifest, two, "inference.json",
                                                   "multi_gpu_inference.json"),
                        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks computed maps (per-rank progress)
    df = pd.read_csv(two / MAPS_MANIFEST, dtype=str, keep_default_na=False)
    assert len(df) == N_ITEMS and df["item"].is_unique and (df.status == "ok").all()
    assert list(df["item"]) == list(pd.read_csv(one / MAPS_MANIFEST, dtype=str).item)  # same order
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)  # no part manifests or lock left behind, no extra or missing file
    assert sum(k.endswith(".npy") for k in a) == 2 * N_ITEMS
    for k in a:
        assert a[k] == b[k], k  # maps, grids, PNGs, settings and the manifest, byte for byte


def test_a_locked_folder_stops_every_rank_before_writing(small_manifest, tmp_path):
    out = tmp_path / "maps"
    with output_lock(out, LOCK_FILE, what="thickness run"):  # another run (this live process) holds the folder
        r = subprocess.run(_torchrun() + _bundle_args(small_manifest, out, "inference.json",
                                                      "multi_gpu_inference.json"),
                           cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert set(p.name for p in out.iterdir()) == {LOCK_FILE}  # nothing written by either rank
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert log.count("is in use by another thickness run") >= 2, log[-3000:]  # rank 0 and rank 1 say why


def test_parts_of_an_interrupted_sharded_run_are_resumed(tmp_path, monkeypatch):
    """A part manifest left by an interrupted sharded run counts as complete work: its items are not redone."""
    import nibabel as nib
    import numpy as np

    import pipeline.thickness.maps_io as maps_io
    from pipeline.thickness.atlas import FlattenResult

    calls = []

    def fake(labels, affine, side, size=(16, 16), method="volume"):
        calls.append(labels.shape)
        return FlattenResult(np.full(size, 2.0, np.float32), np.full(size, 1.5, np.float32), {"fc": 1.0, "tc": 1.0},
                             {})

    monkeypatch.setattr(maps_io, "labels_to_maps", fake)
    lab = np.zeros((12, 12, 12), dtype=np.uint8)
    lab[2:10, 2:5, 2:10], lab[2:10, 5:6, 2:10], lab[2:10, 6:7, 2:10], lab[2:10, 7:10, 2:10] = 1, 2, 4, 3
    items = []
    for k in range(3):
        nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 0.7, 1.0])), tmp_path / f"k{k}.nii.gz")
        items.append({"labels": str(tmp_path / f"k{k}.nii.gz"), "side": "L", "stem": f"k{k}"})
    out = tmp_path / "maps"
    first = batch_maps(items, out, size=(16, 16), png=False, progress=False)
    manifest = (out / MAPS_MANIFEST).read_bytes()
    (out / MAPS_MANIFEST).rename(out / maps_io.part_manifest_name(1))  # as left by rank 1 of a killed run
    calls.clear()
    again = batch_maps(items, out, size=(16, 16), png=False, progress=False)
    assert calls == []  # every item was complete in the part: nothing recomputed
    assert (out / MAPS_MANIFEST).read_bytes() == manifest and list(again["item"]) == list(first["item"])
    assert not list(out.glob("maps_manifest.rank*.csv"))  # merged, then removed


def test_sharding_needs_torch_distributed(tmp_path):
    with pytest.raises(ValueError, match="torch.distributed"):
        batch_maps([], tmp_path, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank must be"):
        batch_maps([], tmp_path, rank=2, world_size=2)

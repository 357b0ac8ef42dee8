"""bundles/progression_mr inference re-runs (issue 16): a re-run resumes (only a knee whose input changed, or that an
interrupted run did not reach, is predicted again) and writes the tables of an uninterrupted run byte for byte;
other checkpoints are refused unless ``overwrite``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.io.run_state import RunSettingsError
from pipeline.progression.infer import ProgressionPredictor, run_inference
from pipeline.progression.network import make_progression_network

S, SIZE = 8, 32
TINY_TRF = {"num_slices": S, "widen_factor": 1 / 16, "token_dim": 32, "heads": 4, "layers": 2, "mlp_dim": 64}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("prog_shard_ckpt")
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(folder / f"model{seed}.pt")
        torch.save(make_progression_network("trf", image_size=SIZE, **TINY_TRF).state_dict(), paths[-1])
    return paths


@pytest.fixture(scope="module")
def knees(tiny_cohort, tmp_path_factory) -> Path:
    """Three baseline DESS volumes of the tiny cohort (side in the name) and a broken file (a failed row)."""
    from pipeline.io.manifest import load_manifest, resolve

    df = load_manifest(tiny_cohort[0] / "manifest.csv")
    df = df[(df["visit_month"].astype(int) == 0) & (df["dess_nifti"].astype(str) != "")]
    folder = tmp_path_factory.mktemp("prog_shard_knees")
    for k, (_, row) in enumerate(df.head(3).iterrows()):
        shutil.copy(resolve(df, row["dess_nifti"]), folder / f"knee{k}_{'LEFT' if row['side'] == 'L' else 'RIGHT'}.nii.gz")
    (folder / "broken_LEFT.nii.gz").write_bytes(b"not a NIfTI" * 10)
    return folder


class CountingPredictor(ProgressionPredictor):
    """Counts its predictions; raises ``KeyboardInterrupt`` (Ctrl-C) at prediction ``stop_at`` if set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.stop_at = 0, None

    def probabilities(self, volume):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().probabilities(volume)


def _tables(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("predictions.csv", "outputs.csv")}


def test_rerun_predicts_only_changed_or_unreached_knees(knees, checkpoints, tmp_path, one_torch_thread):
    model = CountingPredictor(checkpoints[0])
    full = tmp_path / "full"
    df = run_inference(knees, full, None, predictor=model, progress=False)
    assert model.calls == 3 and (df["status"] == "failed").sum() == 1  # the broken file: failed, not predicted
    assert df["item"].tolist()[0] == "broken_LEFT" and len(df) == 4  # item order: the input paths
    first = _tables(full)

    # a re-run keeps every predicted knee; a knee whose input changed is predicted again
    model.calls = 0
    run_inference(knees, full, None, predictor=model, progress=False)
    assert model.calls == 0 and _tables(full) == first
    changed = sorted(knees.glob("knee1_*"))[0]
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    run_inference(knees, full, None, predictor=model, progress=False)
    assert model.calls == 1 and _tables(full) == first

    # Ctrl-C at the second knee: the tables list the knees done, the re-run predicts the others only
    out = tmp_path / "interrupted"
    model.calls, model.stop_at = 0, 2
    with pytest.raises(KeyboardInterrupt):
        run_inference(knees, out, None, predictor=model, progress=False)
    done = pd.read_csv(out / "predictions.csv")
    assert len(done) == 2 and (done["status"] == "failed").sum() == 1 and not (out / "run.lock").exists()
    model.calls, model.stop_at = 0, None
    run_inference(knees, out, None, predictor=model, progress=False)
    assert model.calls == 2 and _tables(out) == first  # the tables of the uninterrupted run


def test_other_checkpoints_are_refused_unless_overwrite(knees, checkpoints, tmp_path, one_torch_thread):
    out = tmp_path / "out"
    run_inference(knees, out, checkpoints[0], progress=False)
    first = pd.read_csv(out / "predictions.csv")
    with pytest.raises(RunSettingsError, match="--overwrite True"):
        run_inference(knees, out, checkpoints[1], progress=False)
    df = run_inference(knees, out, checkpoints[1], progress=False, overwrite=True)
    assert (df["checkpoints"].dropna() == str(checkpoints[1])).all() and len(df) == len(first)
    assert not df["p_any"].equals(first["p_any"])  # predicted again by the other network


def test_two_ranks_under_torchrun_write_what_one_process_writes(knees, checkpoints, tmp_path):
    """multi_gpu_inference.json: 2 CPU processes (gloo) share the knees (knee k -> rank k % 2), rank 0 writes both
    tables in knee order: every file byte for byte as one process, each knee listed once."""
    from dist_helpers import ROOT, assert_same_files, run_one_and_two

    configs = ROOT / "bundles" / "progression_mr" / "configs"
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("inference", [configs / "inference.json"], configs / "multi_gpu_inference.json", one,
                            two, input=str(knees), checkpoint=[str(p) for p in checkpoints])
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks predicted (per-rank progress bars)
    files = assert_same_files(one, two)
    assert {"predictions.csv", "outputs.csv", "run_items.jsonl"} <= set(files)
    df = pd.read_csv(two / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(df) == 4 and df["item"].is_unique and (df["status"] == "failed").sum() == 1

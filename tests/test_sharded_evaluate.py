"""Sharded evaluation under torchrun (issue 16): the progression_mr evaluate bundle with its
multi_gpu_evaluate.json on 2 CPU processes (gloo) writes what one process writes. (The dess_seg and segreg
torchrun tests sit in their bundle test files, next to the trained models they reuse.)"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRESSION = ROOT / "bundles" / "progression_mr" / "configs"
#: A tiny transformer for 4 slices of 16 x 16 pixels.
TINY_TRF = {"widen_factor": 0.125, "token_dim": 16, "mlp_dim": 16, "heads": 2, "layers": 1}


def test_progression_two_ranks_under_torchrun_write_what_one_process_writes(tmp_path):
    """The (fold, batch of validation knees) items go to rank k % 2 and rank 0 writes the report: predictions CSV,
    metrics.json and the ROC / PR figure byte for byte as one process (3 folds of untrained tiny networks)."""
    pytest.importorskip("pipeline.progression.data")
    import torch
    from dist_helpers import folder_files, run_one_and_two
    from test_progression_engine import _tiny_cohort

    from pipeline.progression.train import build_network

    manifest = _tiny_cohort(tmp_path)
    root = tmp_path / "bundle"
    for k in range(3):
        torch.manual_seed(k)
        path = root / "models" / f"fold{k}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save(build_network("trf", num_slices=4, size=16, settings=TINY_TRF).state_dict(), path)
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_and_two("evaluating", [PROGRESSION / "evaluate.json"], PROGRESSION / "multi_gpu_evaluate.json", one, two,
                    bundle_root=str(root), manifest=str(manifest), n_folds=3, batch_size=2, n_resamples=200)
    a, b = folder_files(one), folder_files(two)
    assert sorted(a) == sorted(b) == ["metrics.json", "oof_predictions.csv", "roc_pr.png"]
    a["metrics.json"] = a["metrics.json"].replace(str(one).encode(), str(two).encode())  # the files' paths
    for name in a:
        assert a[name] == b[name], name

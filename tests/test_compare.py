"""The comparison report (``python -m pipeline compare``): config resolution, tables and winners on fixed
data, FLOP counting, and an end-to-end smoke run on a 6-subject tiny cohort with 1-epoch budgets (MRIS-C and
U-Net trained through their bundles, downstream classifiers for 3 sources), re-run from its saved config
through the CLI with the MRIS-C root reused: same seed -> same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.compare import tables
from pipeline.compare.config import CompareConfig, read_bundle_config

SPLIT = {"database": 0.34, "downstream": 0.33, "test": 0.33}  # 6 subjects -> 2 / 2 / 2
SHARED = {"image_size": 32, "epochs": 1, "draws_per_epoch": 2, "batch_size": 4, "split_fractions": SPLIT,
          "split_seed": 1, "val_fraction": 0.0}
SMALL_MRIS = {"widen_factor": 0.125, "num_workers": 0}
SMALL_DS = {"base_channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "d_channels": 8}
SMALL_CLS = {"image_size": 32, "klg": {"epochs": 2, "widen_factor": 0.125, "batch_size": 8},
             "progression": {"epochs": 2, "widen_factor": 0.125, "batch_size": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_read_bundle_config_merges_like_monai(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1, "d": {"p": 1, "q": 2}, "s": {"a": 1}}))
    (tmp_path / "b.json").write_text(json.dumps({"x": 2, "d#q": 3, "s": {"b": 2}}))
    cfg = read_bundle_config(["a.json", "b.json"], tmp_path)
    assert cfg == {"x": 2, "d": {"p": 1, "q": 3}, "s": {"b": 2}}
    with pytest.raises(FileNotFoundError):
        read_bundle_config(["missing.json"], tmp_path)


def test_config_reads_the_mris_demo_budget_and_validates():
    mris = read_bundle_config(["train.json", "train_demo.json"],
                              Path(__file__).resolve().parents[1] / "bundles" / "mris" / "configs")
    res = CompareConfig(manifest="m.csv", out="o", shared={"epochs": 3}).resolve()
    assert res["shared"]["image_size"] == mris["image_size"] and res["shared"]["epochs"] == 3
    assert res["shared"]["split_fractions"] == {k: float(v) for k, v in mris["split_fractions"].items()}
    assert res["downstream"]["klg"]["seed"] == 0 and res["downstream"]["image_size"] == 64
    with pytest.raises(ValueError, match="unknown methods"):
        CompareConfig(manifest="m", out="o", methods=["gan"])
    with pytest.raises(ValueError, match="MRIS method"):
        CompareConfig(manifest="m", out="o", methods=["unet"])
    with pytest.raises(ValueError, match="shared keys"):
        CompareConfig(manifest="m", out="o", shared={"lr": 1})


def test_winners_and_tables_on_fixed_data():
    df = pd.DataFrame({"m": ["A", "B", "C", "chance"], "x": [0.20, 0.25, np.nan, 0.1], "y": [1.0, 1.0, 0.5, 0.0]})
    w = {r["column"]: r for r in tables.winners(df, "m", ["x", "y"], False, exclude=("chance",))}
    assert w["x"]["winner"] == "A" and w["x"]["runner_up"] == "B" and w["x"]["margin"] == pytest.approx(0.05)
    assert w["x"]["relative_margin"] == pytest.approx(0.2)
    assert w["y"]["winner"] == "C"
    hi = {r["column"]: r for r in tables.winners(df, "m", ["y"], True, exclude=("chance",))}
    assert hi["y"]["note"].startswith("tie") and "A" in hi["y"]["note"] and "B" in hi["y"]["note"]
    lines = tables.winner_lines(tables.winners(df, "m", ["x"], False, exclude=("chance",)), unit=" mm")
    assert lines == ["- x: **A** 0.200 mm, ahead of B (0.250 mm) by 0.050 mm, 20 %"]
    long = pd.DataFrame({"method": ["A", "A"], "map": ["fc", "fc"], "group": ["all", "0-1"], "n_maps": [3, 2],
                         "median_mm": [0.2, 0.3], "mad_mm": [0.1, 0.15]})
    wide = tables.synthesis_wide(long, "fc")
    assert wide.loc[0, "all (n=3)"] == "0.200 ± 0.100" and wide.loc[0, "KLG 4 (n=0)"] == "n/a"
    assert "| A |" in tables.markdown_table(wide)


def test_count_flops_of_known_layers():
    from pipeline.compare.model_size import count_flops, model_size_row

    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
    assert count_flops(conv, torch.zeros(1, 2, 8, 8)) == 2 * (2 * 3 * 9) * 64  # 2 FLOPs per MAC
    row = model_size_row("c", [conv], [(conv, (torch.zeros(1, 2, 8, 8),))])
    assert row["params_M"] == pytest.approx(54e-6) and row["inference_GMACs"] == pytest.approx(3456e-9)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort

    root = tmp_path_factory.mktemp("cmp_cohort")
    generate_cohort(root, CohortConfig(n_subjects=6, seed=3, workers=2, write_mr=False, write_dxa=False, **TINY),
                    progress=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory):
    from pipeline.compare import run_compare

    out = tmp_path_factory.mktemp("cmp") / "run1"
    cfg = CompareConfig(manifest=str(cohort), out=str(out), methods=["mris-c", "unet"], seed=0, shared=SHARED,
                        mris_overrides=SMALL_MRIS, baseline_overrides=SMALL_DS, downstream=SMALL_CLS, threads=1)
    return out, run_compare(cfg)


def test_compare_writes_three_tables_figures_and_config(first_run):
    out, report = first_run
    text = report.read_text()
    for section in ("## 1. Retrieval recall", "## 2. Synthesis error", "## 3. Downstream classifiers",
                    "## Who wins each column", "## Model size", "## Training budget"):
        assert section in text
    ret = pd.read_csv(out / "retrieval.csv")
    assert list(ret["method"]) == ["MRIS-C", "chance"] and ret.loc[0, "queries"] == 4
    syn = pd.read_csv(out / "synthesis.csv")
    assert set(syn["method"]) == {"MRIS-C", "U-Net", "mean database map"}
    alls = syn[syn["group"] == "all"]
    assert len(alls) == 6 and np.isfinite(alls[["median_mm", "mad_mm"]].to_numpy()).all()
    # the MRIS rows come from the same evaluation code as the MRIS bundle's report
    mris_eval = pd.read_csv(out / "mris-c" / "eval" / "synthesis_errors.csv")
    a = syn[(syn["method"] == "MRIS-C") & (syn["group"] == "all")].set_index("map")["median_mm"]
    b = mris_eval[mris_eval["method"].str.startswith("MRIS-C") & (mris_eval["group"] == "all")].set_index("map")
    np.testing.assert_allclose(a.sort_index().to_numpy(), b["median_mm"].sort_index().to_numpy(), rtol=1e-6)
    down = pd.read_csv(out / "downstream.csv")
    assert list(down["source"]) == ["MR-extracted", "MRIS-C", "U-Net"]
    assert down[["acc overall", "progression AP", "progression ROC AUC"]].notna().all().all()
    assert ((down["progression ROC AUC"] >= 0) & (down["progression ROC AUC"] <= 1)).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["resolved"]["shared"]["split_fractions"] == SPLIT
    sizes = pd.read_csv(out / "model_size.csv")
    assert (sizes["params_M"] > 0).all() and (sizes["inference_GFLOPs"] > 0).all()
    win = pd.read_csv(out / "winners.csv")
    assert {"retrieval (%)", "synthesis FC (mm, lower is better)", "downstream (higher is better)"} <= set(win["table"])
    for fig in ("examples.png", "roc_pr.png"):
        assert (out / fig).stat().st_size > 5000


def test_rerun_from_saved_config_via_cli_reproduces_numbers(first_run, tmp_path, capsys):
    from pipeline.__main__ import main

    out, _ = first_run
    out2 = tmp_path / "run2"
    rc = main(["compare", "--config", str(out / "config.json"), "--out", str(out2),
               "--mris-c-root", str(out / "mris-c")])
    assert rc == 0 and "## 3. Downstream classifiers" in capsys.readouterr().out
    assert "Reused MRIS roots" in (out2 / "report.md").read_text()
    for name in ("synthesis.csv", "downstream.csv", "retrieval.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(out2 / name))
    assert not (out2 / "mris-c" / "models").exists()  # reused, not retrained


def test_short_report_flags_unequal_budget(first_run, cohort, tmp_path):
    from pipeline.compare import run_short_report

    out, _ = first_run
    report = run_short_report(tmp_path / "short", cohort, mris_c_root=out / "mris-c", baseline_epochs=2,
                              classifier_epochs=1, shared=SHARED, mris_overrides=SMALL_MRIS,
                              baseline_overrides=SMALL_DS, downstream=SMALL_CLS, threads=1)
    text = report.read_text()
    assert "Short comparison" in text and "UNEQUAL BUDGET" in text
    budget = pd.read_csv(tmp_path / "short" / "budget.csv").set_index("method")
    assert budget.loc["U-Net", "epochs"] == 2 and budget.loc["MRIS-C", "epochs"] == 1


def test_resume_reuses_only_models_trained_with_the_same_settings(tmp_path):
    from pipeline.compare.run import _resumable

    cfg = CompareConfig(manifest=str(tmp_path / "m.csv"), out=str(tmp_path), methods=["mris-c", "unet"],
                        shared={"epochs": 1})
    res = cfg.resolve()
    for m in ("mris-c", "unet"):
        (tmp_path / m / "models").mkdir(parents=True)
        (tmp_path / m / "models" / "model.pt").write_bytes(b"x")
    (tmp_path / "unet" / "train_seconds.txt").write_text("3.0\n")
    (tmp_path / "config.json").write_text(json.dumps({"resolved": {**res, "threads": 4}}))
    assert _resumable(tmp_path, res) == {"unet"}  # mris-c has no record of its training time
    other = CompareConfig(manifest=str(tmp_path / "m.csv"), out=str(tmp_path), methods=["mris-c", "unet"],
                          shared={"epochs": 2}).resolve()
    assert _resumable(tmp_path, other) == set()

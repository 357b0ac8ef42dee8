"""MRIS bundle (bundles/mris) end to end on the tiny cohort: CLI training, evaluation tables with the
mean-map baseline, database/checkpoint hash check, resume, inference with a corrupt DICOM, MRIS-S step."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "mris" / "configs"
SPLIT = {"database": 0.67, "downstream": 0.0, "test": 0.33}  # 3 subjects -> 2 database, 1 test
SMALL = {"image_size": 32, "widen_factor": 0.125, "split_fractions": SPLIT}


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    """Two epochs of MRIS-C through ``python -m monai.bundle run training`` (real CLI). Returns
    (bundle_root, manifest path, CLI output)."""
    root, _ = tiny_cohort
    manifest = Path(root) / "manifest.csv"
    out = tmp_path_factory.mktemp("mris_bundle")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", str(CONFIGS / "train.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--bundle_root", str(out), "--manifest", str(manifest), "--epochs", "2", "--batch_size", "4",
           "--num_workers", "0", "--val_fraction", "0.0", "--image_size", "32", "--widen_factor", "0.125",
           "--split_fractions", repr(SPLIT)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, manifest, proc.stdout + proc.stderr


def _bundle_run(run_id: str, config: str, **overrides):
    from monai.bundle import run

    return run(run_id, config_file=str(CONFIGS / config), **overrides)


def test_training_cli_writes_checkpoints_and_finite_metric(trained):
    out, _, log = trained
    assert (out / "models" / "model.pt").is_file()
    final = torch.load(out / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(final)
    vals = [float(v) for v in re.findall(r"val_recall_sum: ([0-9.naif]+)", log)]
    assert len(vals) >= 2 and all(math.isfinite(v) and 0.0 <= v <= 300.0 for v in vals), log[-2000:]
    assert re.search(r"train_loss: [0-9.]+", log)
    assert list((out / "runs").glob("events.out.tfevents*"))


def test_resume_continues_from_final_checkpoint(trained, tmp_path):
    out, manifest, _ = trained
    _bundle_run("training", "train.json", bundle_root=str(tmp_path), manifest=str(manifest), epochs=3,
                batch_size=4, num_workers=0, val_fraction=0.0, **SMALL,
                resume_ckpt=str(out / "models" / "checkpoint_final.pt"))
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 3 and final["trainer"]["max_epochs"] == 3  # resumed after 2 epochs


def test_evaluate_tables_recall_and_mean_map_baseline(trained):
    from pipeline.mris.database import CheckpointMismatchError, EmbeddingDatabase, checkpoint_hash

    out, manifest, _ = trained
    _bundle_run("evaluating", "evaluate.json", bundle_root=str(out), manifest=str(manifest), k=20, **SMALL)
    ev = out / "eval"
    rec = json.loads((ev / "retrieval.json").read_text())
    assert set(rec["recall_percent"]) == {"R@1", "R@5", "R@10", "R@20"}
    assert rec["n_queries"] == 2 and rec["chance_percent"]["R@1"] == 50.0
    tab = pd.read_csv(ev / "synthesis_errors.csv")
    assert set(tab["method"]) == {"MRIS-C (k=12)", "mean database map"}  # k capped at the 12 database maps
    alls = tab[tab["group"] == "all"]
    assert len(alls) == 4 and np.isfinite(alls[["median_mm", "mad_mm"]].to_numpy()).all()
    assert (alls["median_mm"] < 2.0).all()
    md = (ev / "report.md").read_text()
    assert "R@1" in md and "mean database map" in md and "chance" in md
    assert (ev / "examples.png").stat().st_size > 1000
    # the database is stamped with the checkpoint file's hash; another checkpoint must fail loudly
    db = EmbeddingDatabase.load(out / "database", expected_checkpoint_hash=checkpoint_hash(out / "models" / "model.pt"))
    assert len(db) == 12
    with pytest.raises(CheckpointMismatchError, match="rebuild the database"):
        EmbeddingDatabase.load(out / "database",
                               expected_checkpoint_hash=checkpoint_hash(out / "models" / "checkpoint_final.pt"))


def test_query_with_other_checkpoint_fails(trained, tmp_path):
    from pipeline.mris.database import CheckpointMismatchError
    from pipeline.mris.engine import make_network
    from pipeline.mris.evaluate import evaluate_test

    out, manifest, _ = trained
    if not (out / "database").is_dir():
        pytest.skip("needs the database from test_evaluate_tables_recall_and_mean_map_baseline")
    net = make_network("combined", widen_factor=0.125)
    other = tmp_path / "other.pt"
    torch.save(net.state_dict(), other)  # a different (untrained) checkpoint
    with pytest.raises(CheckpointMismatchError):
        evaluate_test(net, other, manifest, out / "database", tmp_path / "eval", image_size=32,
                      split_fractions=SPLIT, figure=False)


def test_inference_folder_with_corrupt_dicom(trained, tmp_path):
    import shutil

    out, manifest, _ = trained
    if not (out / "database").is_dir():
        pytest.skip("needs the database from test_evaluate_tables_recall_and_mean_map_baseline")
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    row = m.iloc[0]
    folder = tmp_path / "xrays"
    folder.mkdir()
    shutil.copy(manifest.parent / row["xray_dicom"], folder / "good.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    lm = pd.DataFrame([
        {"file": "good.dcm", "side": row["side"], "x": row["joint_centre_x"], "y": row["joint_centre_y"]},
        {"file": "broken.dcm", "side": "L", "x": 100.0, "y": 100.0},
    ])
    lm.to_csv(tmp_path / "landmarks.csv", index=False)
    res = tmp_path / "inference"
    _bundle_run("inference", "inference.json", bundle_root=str(out), input=str(folder),
                landmarks=str(tmp_path / "landmarks.csv"), output_dir=str(res), image_size=32, widen_factor=0.125)
    summary = json.loads((res / "summary.json").read_text())
    assert summary["n_knees_ok"] == 1 and summary["n_failed"] == 1
    assert summary["failures"][0]["file"].endswith("broken.dcm") and summary["failures"][0]["error"]
    assert "left-knee" in summary["convention"].lower()
    knee = Path(summary["knees"][0]["folder"])
    fc = np.load(knee / "fc.npy")
    assert fc.ndim == 2 and np.isfinite(fc).any() and np.nanmax(fc) < 10.0
    assert (knee / "tc.png").is_file() and len(pd.read_csv(knee / "neighbours.csv")) == 12


def test_inference_without_landmarks_raises_clear_error(tmp_path):
    from pipeline.mris.infer import LandmarksRequiredError, read_landmarks, run_inference

    with pytest.raises(LandmarksRequiredError, match="landmark model"):
        read_landmarks(None, tmp_path)
    # neither a landmarks table nor a landmark-model checkpoint: the same clear error from run_inference
    with pytest.raises(LandmarksRequiredError, match="kneel_global_ckpt"):
        run_inference(None, tmp_path / "none.pt", tmp_path, tmp_path / "db", tmp_path / "out", landmarks=None,
                      kneel_global_ckpt=None, kneel_local_ckpt=None)


def _tiny_kneel_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Untrained tiny KNEEL global + local checkpoints (self-describing state dicts, as the kneel bundle saves)."""
    from pipeline.landmarks.engine import make_network

    torch.manual_seed(0)
    paths = []
    for stage, size, spacing in (("global", 32, 8.0), ("local", 32, 4.0)):
        p = folder / f"kneel_{stage}.pt"
        torch.save(make_network(stage, size, spacing, width=2).state_dict(), p)
        paths.append(p)
    return paths[0], paths[1]


def test_inference_on_bare_dicom_folder_finds_knees_with_landmark_model(trained, tmp_path):
    """No landmarks CSV: bundles/mris inference finds both knees with a (tiny) KNEEL checkpoint, end to end."""
    import shutil

    out, manifest, _ = trained
    if not (out / "database").is_dir():  # built by the evaluate test; build it here when run alone
        _bundle_run("evaluating", "evaluate.json", bundle_root=str(out), manifest=str(manifest), k=20, **SMALL)
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(manifest.parent / m["xray_dicom"].iloc[0], folder / "knees.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    g, loc = _tiny_kneel_checkpoints(tmp_path)
    res = tmp_path / "inference"
    _bundle_run("inference", "inference.json", bundle_root=str(out), input=str(folder), output_dir=str(res),
                image_size=32, widen_factor=0.125, kneel_global_ckpt=str(g), kneel_local_ckpt=str(loc))
    summary = json.loads((res / "summary.json").read_text())
    assert summary["landmarks_source"] == {"kneel_global_ckpt": str(g), "kneel_local_ckpt": str(loc)}
    # both knees mapped; an untrained landmark model's low-confidence knees are flagged, not counted as ok
    assert summary["n_knees_ok"] + summary["n_knees_flagged"] == 2 and summary["n_failed"] == 1
    assert summary["n_knees_ok"] == sum(k.get("landmark_status") == "ok" and not k.get("flagged")
                                        for k in summary["knees"])
    assert "landmark model" in summary["failures"][0]["error"] and "broken.dcm" in summary["failures"][0]["file"]
    from pipeline.io.dicom import read_radiograph

    h, w = read_radiograph(folder / "knees.dcm")[0].shape
    knees = {k["side"]: k for k in summary["knees"]}
    assert set(knees) == {"R", "L"}
    for side, k in knees.items():
        x, y = k["centre_xy"]
        assert 0 <= y < h and (0 <= x < w / 2 if side == "R" else w / 2 <= x < w)  # right knee = image left half
        assert k["landmark_status"] in ("ok", "low_confidence") and 0.0 <= k["landmark_confidence"] <= 1.0
        assert np.isfinite(np.load(Path(k["folder"]) / "fc.npy")).any()


def test_separate_variant_train_step_and_recall_metric():
    """MRIS-S: one MONAI SupervisedTrainer iteration on a synthetic batch; per-encoder clipping; metric."""
    from monai.engines import SupervisedTrainer

    from pipeline.mris.engine import MRISEvalStep, MRISTrainStep, RetrievalRecall, make_network
    from pipeline.mris.losses import LongitudinalTripletLoss

    torch.manual_seed(0)
    net = make_network("separate", widen_factor=0.125)
    batch = {"image": torch.rand(4, 1, 32, 32), "fc": torch.rand(4, 1, 32, 32), "tc": torch.rand(4, 1, 32, 32),
             "subject_id": ["a", "b", "c", "a"]}
    opt = torch.optim.AdamW(net.parameter_groups(), weight_decay=1e-3)
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}  # not the description
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net, optimizer=opt,
                                loss_function=LongitudinalTripletLoss(0.1),
                                iteration_update=MRISTrainStep("separate", max_grad_norm=1.0), decollate=False)
    trainer.run()
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and set(out["xray_emb"]) == {"fc", "tc"}
    changed = [k for k, v in net.state_dict().items() if "weight" in k and not torch.equal(v, before[k])]
    assert any(k.startswith("pairs.fc.xray") for k in changed) and any(k.startswith("pairs.tc.map") for k in changed)
    for enc in net.encoders().values():  # clip 1.0 per encoder
        norm = torch.norm(torch.stack([p.grad.norm() for p in enc.parameters() if p.grad is not None]))
        assert norm <= 1.0 + 1e-4
    step = MRISEvalStep("separate")

    class _E:  # minimal engine stand-in
        state = type("S", (), {"device": "cpu"})()
        network = net

    res = step(_E(), batch)
    metric = RetrievalRecall(k=None)
    metric.update((res["xray_emb"], res["map_emb"]))
    assert 0.0 <= metric.compute() <= 300.0


def test_two_ranks_under_torchrun_write_what_one_process_writes(trained, tmp_path):
    """multi_gpu_inference.json (issue 16): 2 CPU processes (gloo) share the radiographs (file k -> rank k % 2),
    rank 0 merges: maps, PNGs, neighbours, summary, manifest and journal byte for byte as one process."""
    import shutil

    from dist_helpers import assert_same_files, run_one_and_two

    out, manifest, _ = trained
    if not (out / "database").is_dir():
        pytest.skip("needs the database from test_evaluate_tables_recall_and_mean_map_baseline")
    m = pd.read_csv(manifest, dtype={"subject_id": str})
    folder = tmp_path / "xrays"
    folder.mkdir()
    rows = []
    for k, (_, r) in enumerate(m.drop_duplicates("xray_dicom").head(3).iterrows()):
        shutil.copy(manifest.parent / r["xray_dicom"], folder / f"x{k}.dcm")
        rows.append({"file": f"x{k}.dcm", "side": r["side"], "x": r["joint_centre_x"], "y": r["joint_centre_y"]})
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    rows.append({"file": "broken.dcm", "side": "L", "x": 100.0, "y": 100.0})
    pd.DataFrame(rows).to_csv(tmp_path / "landmarks.csv", index=False)
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("inference", [CONFIGS / "inference.json"], CONFIGS / "multi_gpu_inference.json", one, two,
                            bundle_root=str(out), input=str(folder), landmarks=str(tmp_path / "landmarks.csv"),
                            image_size=32, widen_factor=0.125)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks worked (per-rank progress bars)
    files = assert_same_files(one, two)
    assert sum(k.endswith("fc.npy") for k in files) == 3 and not [f for f in files if ".rank" in f]
    df = pd.read_csv(two / "outputs.csv", dtype=str, keep_default_na=False)
    assert df["item"].is_unique and len(df) == 4 and (df["status"] == "failed").sum() == 1


def test_two_ranks_evaluate_under_torchrun_write_what_one_process_writes(trained, tmp_path):
    """multi_gpu_evaluate.json (issue 16): 2 CPU processes (gloo) share the batches of database maps and of test
    radiographs (batch b -> rank b % 2), rank 0 writes the database, synthesizes and reports: the database
    (embeddings, maps, rows), retrieval.json, metrics.json, both CSVs, report.md and examples.png byte for byte as
    one process, but for the timing and the database's creation time."""
    from dist_helpers import assert_same_files_masked, run_one_and_two

    out, manifest, _ = trained
    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("evaluating", [CONFIGS / "evaluate.json"], CONFIGS / "multi_gpu_evaluate.json", one, two,
                            bundle_root=str(out), manifest=str(manifest), k=20,
                            database_dir="$@output_dir + '/database'", batch_size=2, database_batch_size=4, **SMALL)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks embedded database maps
    files = assert_same_files_masked(one, two, [r'"seconds": [0-9.]+', r'"created_utc": "[^"]*"'])
    assert {"retrieval.json", "metrics.json", "synthesis_errors.csv", "test_synthesis.csv", "report.md",
            "examples.png", "database/embeddings.npy", "database/rows.csv"} <= set(files)
    assert json.loads(files["metrics.json"])["database_size"] == 12

"""Progression training pieces (pipeline.progression.engine / train) and the bundle configs: every validation
sample counted, the warm-up schedule, class-balanced resampling, cross-validation outputs (out-of-fold
probabilities cover every knee once), the report's intervals. Tiny tensors and networks; no accuracy claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, Dataset

from pipeline.progression.engine import (
    ClassBalancedSampler,
    ProgressionMetric,
    class_balanced_weights,
    make_engines,
    warmup_lr,
    warmup_scheduler,
)
from pipeline.progression.metrics import average_precision
from pipeline.progression.network import make_progression_network
from pipeline.progression.train import cross_validate, cv_report, metrics_with_ci

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "progression_mr" / "configs"
TINY = {"widen_factor": 0.125, "encoder_depth": 18, "token_dim": 16, "heads": 2, "layers": 1, "mlp_dim": 16,
        "dropout": 0.0, "emb_dropout": 0.0}
S, H = 4, 16  # slices, pixels


def _items(n: int, seed: int = 0, knees_per_subject: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = np.resize([0, 0, 1, 2, 0, 1], n)  # all three classes in any 6 consecutive knees
    return [{"image": rng.random((1, S, H, H), dtype=np.float32), "label": int(labels[i]),
             "subject_id": f"S{i // knees_per_subject:03d}", "side": "RL"[i % 2],
             "knee": f"S{i // knees_per_subject:03d}_{'RL'[i % 2]}"} for i in range(n)]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_progression_network("trf", num_slices=S, **TINY)


# ------------------------------------------------------------------------------------------- metric
@pytest.mark.parametrize("n,batch", [(10, 4), (7, 3)])
def test_validation_metric_counts_every_sample(tmp_path, n, batch):
    items = _items(n)
    net = _net()
    val = DataLoader(Dataset(items), batch_size=batch, shuffle=False)
    _, evaluator = make_engines(net, DataLoader(Dataset(items), batch_size=batch), val, tmp_path, epochs=1,
                                stats=False)
    evaluator.run()
    ap = evaluator.state.metrics["val_ap"]
    # recompute from the network directly over ALL samples: the evaluator's AP must equal it
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(torch.as_tensor(np.stack([it["image"] for it in items]))), 1).numpy()
    y = (np.array([it["label"] for it in items]) > 0).astype(int)
    assert ap == pytest.approx(average_precision(y, p[:, 1] + p[:, 2]), abs=1e-6)


def test_progression_metric_n_samples_and_dropped_batch():
    """The metric counts every sample of a drop_last=False loader; a drop_last=True loader (the reference
    defect) loses the tail, which the count exposes."""
    from monai.engines import SupervisedEvaluator

    items = _items(10)
    for drop_last, expected in ((False, 10), (True, 8)):
        m = ProgressionMetric("ap")
        ev = SupervisedEvaluator(device="cpu", network=_net(), decollate=False,
                                 val_data_loader=DataLoader(Dataset(items), batch_size=4, drop_last=drop_last),
                                 key_val_metric={"val_ap": m})
        ev.run()
        assert m.n_samples == expected and m.probabilities.shape == (expected, 3)
        assert torch.allclose(m.probabilities.sum(1), torch.ones(expected), atol=1e-5)


def test_progression_metric_values_and_one_class():
    m = ProgressionMetric("auc")
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.5, 0.0]])
    m.update((logits, torch.tensor([0, 1, 2, 0])))
    assert m.compute() == pytest.approx(1.0)
    m.reset()
    m.update((logits, torch.tensor([0, 0, 0, 0])))
    assert m.compute() == -1.0  # undefined with one class


# ------------------------------------------------------------------------------------------- warm-up
def test_warmup_lr_values():
    assert warmup_lr(0) == pytest.approx(1e-5)
    assert warmup_lr(1) == pytest.approx(1e-5 + 0.2 * 9e-5)
    assert warmup_lr(2.5) == pytest.approx(5.5e-5)
    assert warmup_lr(5) == pytest.approx(1e-4) and warmup_lr(50) == pytest.approx(1e-4)
    assert warmup_lr(3, warmup_epochs=0) == pytest.approx(1e-4)


def test_warmup_scheduler_in_trainer_epochs(tmp_path):
    """The LR each epoch trains at (read at EPOCH_STARTED): 1e-5, 2.8e-5, ... 8.2e-5, then 1e-4."""
    from ignite.engine import Events

    items = _items(6)
    net = _net()
    loader = DataLoader(Dataset(items), batch_size=6)
    trainer, _ = make_engines(net, loader, loader, tmp_path, epochs=7, val_interval=100, stats=False)
    seen = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert seen == pytest.approx([1e-5 + k * 1.8e-5 for k in range(5)] + [1e-4, 1e-4])
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-4)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="end_lr"):
        warmup_scheduler(opt)


# ------------------------------------------------------------------------------------------- sampler
def test_class_balanced_weights():
    w = class_balanced_weights([0, 0, 0, 0, 1, 2, 2, 0])
    assert w.tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2, 1.0, 0.5, 0.5, 0.2])
    with pytest.raises(ValueError):
        class_balanced_weights([0, -1])


def test_class_balanced_sampler_draws_classes_equally():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    s = ClassBalancedSampler(labels, seed=3)
    assert len(s) == 100
    counts = np.zeros(3)
    for epoch in range(30):
        s.set_epoch(epoch)
        counts += np.bincount(labels[list(s)], minlength=3)
    frac = counts / counts.sum()
    # 3000 draws, expected 1/3 each: the SD of a fraction is ~0.009; 0.05 is > 5 SD (the unbalanced 0.8 / 0.15
    # / 0.05 would fail)
    assert np.abs(frac - 1 / 3).max() < 0.05
    s.set_epoch(4)
    a = list(s)
    s.set_epoch(5)
    assert a != list(s)
    s2 = ClassBalancedSampler(labels, seed=3)
    s2.set_epoch(4)
    assert list(s2) == a


def test_class_balanced_sampler_distributed_split():
    labels = np.array([0] * 7 + [1] * 3)
    ranks = [ClassBalancedSampler(labels, seed=1, num_replicas=3, rank=r) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    whole = ranks[0].epoch_indices()
    assert len(whole) == 12
    assert [list(r) for r in ranks] == [whole[r::3] for r in range(3)]


# ------------------------------------------------------------------------------------------- CV
def _subject_folds(items, k):
    subjects = sorted({it["subject_id"] for it in items})
    fold_of_subject = {s: i % k for i, s in enumerate(subjects)}
    f = np.array([fold_of_subject[it["subject_id"]] for it in items])
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def test_cross_validate_writes_folds_and_oof(tmp_path):
    items = _items(18)
    test_items = _items(7, seed=5)
    folds = _subject_folds(items, 3)
    rep = cross_validate(items, "trf", tmp_path, folds=folds, epochs=1, batch_size=4, num_slices=S, size=H,
                         network_settings=TINY, transforms=lambda train: None, cache_rate=0, n_resamples=50,
                         figure=False, test=test_items)
    for k in range(3):
        assert (tmp_path / f"fold{k}" / "model.pt").is_file()
    df = pd.read_csv(tmp_path / "oof_predictions.csv")
    assert len(df) == 18 and sorted(df["knee"]) == sorted(it["knee"] for it in items)
    assert df["knee"].is_unique
    for k, (_, va) in enumerate(folds):
        assert sorted(df.index[df["fold"] == k]) == sorted(va.tolist())
    p = df[["p_none", "p_fast", "p_slow"]].to_numpy()
    assert np.allclose(p.sum(1), 1.0, atol=1e-6)
    assert rep["n_knees"] == 18 and rep["n_subjects"] == 9 and len(rep["folds"]) == 3
    for m in ("ap", "auc", "ba"):
        v = rep["metrics"][m]
        assert v["low"] <= v["value"] <= v["high"] or np.isnan(v["value"])
    assert json.loads((tmp_path / "metrics.json").read_text())["folds"][0]["n_val"] == len(folds[0][1])
    # the fold-0 checkpoint rebuilds its network and reproduces the OOF probabilities of fold 0's knees
    from pipeline.progression.network import load_progression_network

    net = load_progression_network(tmp_path / "fold0" / "model.pt").eval()
    va = folds[0][1]
    with torch.no_grad():
        q = torch.softmax(net(torch.as_tensor(np.stack([items[i]["image"] for i in va]))), 1).numpy()
    assert np.allclose(q, p[va], atol=1e-5)
    # fold ensemble on the test knees: the mean of the three folds' softmax probabilities, taken once
    x = torch.as_tensor(np.stack([it["image"] for it in test_items]))
    per_fold = []
    for k in range(3):
        with torch.no_grad():
            per_fold.append(torch.softmax(load_progression_network(tmp_path / f"fold{k}" / "model.pt").eval()(x), 1))
    expected = torch.stack(per_fold).mean(0).numpy()
    tdf = pd.read_csv(tmp_path / "test_predictions.csv")
    assert len(tdf) == 7 and np.allclose(tdf[["p_none", "p_fast", "p_slow"]].to_numpy(), expected, atol=1e-5)
    assert rep["test"]["n_knees"] == 7


def test_cross_validate_rejects_incomplete_folds(tmp_path):
    items = _items(6)
    with pytest.raises(ValueError, match="exactly once"):
        cross_validate(items, "trf", tmp_path, folds=[([0, 1, 2], [3, 4])], transforms=lambda t: None, cache_rate=0)


def test_report_intervals_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    items = _items(60)
    labels = np.array([it["label"] for it in items])
    logits = rng.normal(size=(60, 3)) + np.eye(3)[labels] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rep = cv_report(items, probs, tmp_path, name="toy", n_resamples=1000)
    ci = metrics_with_ci(labels, probs, [it["subject_id"] for it in items], n_resamples=1000)
    for m in ("ap", "auc", "ba"):
        got = rep["metrics"][m]
        assert got["low"] < got["value"] < got["high"]
        assert (got["value"], got["low"], got["high"]) == pytest.approx(tuple(ci[m]))
        assert got["n_used"] + got["n_skipped"] == 1000
    assert rep["prevalence"] == pytest.approx((labels > 0).mean())
    assert (tmp_path / "roc_pr.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="missing rows"):
        cv_report(items, np.where(np.arange(60)[:, None] == 3, np.nan, probs), tmp_path)


# ------------------------------------------------------------------------------------------- bundle
def _load(name):
    return json.loads((CONFIGS / name).read_text())


def test_bundle_configs_parse():
    from monai.bundle import ConfigParser

    for name in ("train.json", "train_demo.json", "evaluate.json", "multi_gpu_train.json", "metadata.json"):
        assert isinstance(_load(name), dict)
    train = _load("train.json")
    assert train["run"] == train["training"]
    assert train["n_folds"] == 5 and train["epochs"] == 100 and train["arch"] == "trf"
    assert (train["num_slices"], train["image_size"]) == (64, 160)
    ev = _load("evaluate.json")
    assert ev["run"] == ev["evaluating"]
    meta = _load("metadata.json")
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 160, 160]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    multi = _load("multi_gpu_train.json")
    handlers = train["train"]["handlers"]
    for key in multi:  # the DDP overrides point at existing handlers: rank > 0 skips validation, logs, saving
        if key.startswith("train#handlers#"):
            target = handlers[int(key.split("#")[2])]["_target_"]
            assert target in ("ValidationHandler", "StatsHandler", "TensorBoardStatsHandler",
                              "pipeline.handlers.EngineCheckpointSaver", "pipeline.handlers.ProgressBar"), key
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_demo.json")])
    assert parser.get_parsed_content("bundle_root").endswith("progression_mr")
    net = parser.get_parsed_content("network_def")
    assert net(torch.zeros(1, 1, parser["num_slices"], parser["image_size"], parser["image_size"])).shape == (1, 3)


def _tiny_cohort(root: Path, n_subjects: int = 9) -> Path:
    """A manifest of tiny baseline DESS-like NIfTI volumes (20 x 20 x 10 voxels) with 3-class labels."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    rows = []
    pts = json.dumps([[float(10 + i), 50.0] for i in range(16)])
    for s in range(n_subjects):
        for j, side in enumerate("RL"):
            label = [0, 0, 1, 2, 0, -1][(2 * s + j) % 6]
            arr = rng.random((10, 20, 20)).astype(np.float32)  # z, y, x
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.6, 0.6, 1.5))
            path = root / f"s{s}_{side}.nii.gz"
            sitk.WriteImage(img, str(path))
            rows.append({"subject_id": f"{9100 + s}", "side": side, "visit_month": 0, "xray_dicom": "none.dcm",
                         "dess_dicom_dir": "", "dess_nifti": path.name, "landmarks": pts, "klg": 2,
                         "progression_3class": label})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_bundle_train_demo_one_epoch_then_evaluate(tmp_path):
    """train.json + train_demo.json trains fold 0 and fold 1 for one epoch on a tiny cohort (best snapshot written);
    evaluate.json then reports the folds' out-of-fold predictions (3 folds here) with intervals."""
    pytest.importorskip("pipeline.progression.data")
    from monai.bundle import run

    manifest = _tiny_cohort(tmp_path)
    root = tmp_path / "bundle"
    tiny = {"num_slices": 4, "image_size": 16, "epochs": 1, "n_folds": 3, "batch_size": 4, "val_batch_size": 3,
            "network_settings#widen_factor": 0.125, "network_settings#token_dim": 16, "network_settings#mlp_dim": 16,
            "network_settings#heads": 2, "network_settings#layers": 1, "cache_rate": 0.0}
    cfg = [str(CONFIGS / "train.json"), str(CONFIGS / "train_demo.json")]
    for fold in range(3):
        run("training", config_file=cfg, bundle_root=str(root), manifest=str(manifest), fold=fold, **tiny)
        assert (root / "models" / f"fold{fold}" / "model.pt").is_file()
        assert (root / "models" / f"fold{fold}" / "checkpoint_final.pt").is_file()
    run("evaluating", config_file=str(CONFIGS / "evaluate.json"), bundle_root=str(root), manifest=str(manifest),
        n_folds=3, n_resamples=1000, batch_size=5)
    rep = json.loads((root / "eval" / "metrics.json").read_text())
    assert rep["n_knees"] == 15  # 18 knees, 3 with label -1 (KLG 4 at baseline) excluded
    df = pd.read_csv(root / "eval" / "oof_predictions.csv")
    assert df["knee"].is_unique and len(df) == 15 and set(df["fold"]) == {0, 1, 2}
    for m in ("ap", "auc", "ba"):
        assert set(rep["metrics"][m]) >= {"value", "low", "high"}


def test_training_chain_is_validation_chain_plus_augmentation():
    """cached_datasets applies the training chain from its first random transform to the CACHED validation
    output: that is right only while the training chain's deterministic prefix is the validation chain (bar the
    final type conversion)."""
    pytest.importorskip("pipeline.progression.data")
    from monai.transforms.traits import RandomizableTrait

    from pipeline.progression.train import make_transforms

    for arch in ("trf", "xray"):
        tr = make_transforms(arch, 4, 16, train=True).transforms
        va = make_transforms(arch, 4, 16, train=False).transforms
        first = next(i for i, t in enumerate(tr) if isinstance(t, RandomizableTrait))
        assert [type(t) for t in tr[:first]] == [type(t) for t in va[:first]]
        assert [type(t).__name__ for t in va[first:]] == ["EnsureTyped", "SelectItemsd"]


def test_paired_ap_difference():
    from pipeline.progression.demo import paired_ap_difference

    items = _items(40)
    labels = np.array([it["label"] for it in items])
    groups = [it["subject_id"] for it in items]
    rng = np.random.default_rng(1)
    noise = rng.dirichlet(np.ones(3), size=40)
    good = 0.5 * noise + 0.5 * np.eye(3)[labels]
    assert paired_ap_difference(labels, noise, noise, groups, n_resamples=200) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_ap_difference(labels, good, noise, groups, n_resamples=200)
    y = (labels > 0).astype(int)
    assert d == pytest.approx(average_precision(y, good[:, 1] + good[:, 2]) - average_precision(y, noise[:, 1] + noise[:, 2]))
    assert 0 < lo <= d <= hi


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is required")
def test_multi_gpu_train_torchrun_two_cpu_processes(tmp_path):
    """multi_gpu_train.json under torchrun (2 CPU processes, gloo): both ranks train on their half of the
    class-balanced draw, rank 0 alone validates and writes the best snapshot."""
    import re
    import shutil
    import subprocess
    import sys

    pytest.importorskip("pipeline.progression.data")
    manifest = _tiny_cohort(tmp_path)
    root = tmp_path / "bundle"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'train_demo.json'}',"
                         f"'{CONFIGS / 'multi_gpu_train.json'}']",
        "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(root), "--manifest", str(manifest),
        "--epochs", "2", "--n_folds", "3", "--batch_size", "4", "--num_slices", "4", "--image_size", "16",
        "--network_settings#widen_factor", "0.125", "--network_settings#token_dim", "16",
        "--network_settings#mlp_dim", "16", "--network_settings#heads", "2", "--network_settings#layers", "1",
        "--cache_rate", "0.0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert len(re.findall(r"SupervisedTrainer - INFO - Engine run resuming from iteration 0", log)) == 2, log[-3000:]
    assert len(re.findall(r"Epoch\[\d\] Metrics -- ", log)) == 2, log[-3000:]  # 2 epochs x rank 0 only
    final = torch.load(root / "models" / "fold0" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    # fold 0 of 3 trains on 10 knees: 10 draws split over 2 ranks -> 5 per rank -> 2 batches of 4 per epoch
    assert final["trainer"]["max_epochs"] == 2 and final["trainer"]["iteration"] == 4
    assert (root / "models" / "fold0" / "model.pt").is_file()


def test_best_snapshot_is_the_best_validation_ap(tmp_path):
    from ignite.engine import Events

    from pipeline.io.checkpoints import load_weights

    items = _items(12)
    net = _net(1)
    val = DataLoader(Dataset(items[:7]), batch_size=3)
    trainer, evaluator = make_engines(net, DataLoader(Dataset(items), batch_size=4, shuffle=True), val, tmp_path,
                                      epochs=4, start_lr=1e-3, end_lr=1e-2, warmup_epochs=1, stats=False)
    aps = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: aps.append(e.state.metrics["val_ap"]))
    trainer.run()
    assert len(aps) == 4
    best = _net(2)
    load_weights(best, tmp_path / "model.pt")
    best.eval()
    with torch.no_grad():
        p = torch.softmax(best(torch.as_tensor(np.stack([it["image"] for it in items[:7]]))), 1).numpy()
    y = (np.array([it["label"] for it in items[:7]]) > 0).astype(int)
    assert average_precision(y, p[:, 1] + p[:, 2]) == pytest.approx(max(aps), abs=1e-6)

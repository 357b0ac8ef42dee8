"""Progression library (issue 15): label rule, focal loss, metrics vs scikit-learn, subject bootstrap, fold
ensemble, networks (shapes, one training step, slice axis, paper size) and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.progression import ensemble, labels, losses, metrics, network

sk = pytest.importorskip("sklearn.metrics")

# ----------------------------------------------------------------------------------------------- labels


def _klg(base: int, changes: dict[int, int]) -> dict[int, int]:
    """KLG at every protocol month: ``base`` until the first month of ``changes``, then the changed values."""
    out, k = {}, base
    for m in (0, 12, 24, 36, 48, 72, 96):
        k = changes.get(m, k)
        out[m] = k
    return out


@pytest.mark.parametrize("base,changes,expected", [
    (2, {}, labels.NO_PROGRESSION),
    (2, {12: 3}, labels.FAST),
    (1, {36: 2}, labels.FAST),  # 36 months is still fast
    (1, {48: 2}, labels.SLOW),  # first seen after 36
    (3, {96: 4}, labels.SLOW),
    (0, {12: 1}, labels.NO_PROGRESSION),  # KL0 -> KL1 is not progression
    (0, {12: 1, 72: 2}, labels.SLOW),  # ... but 0 -> 2 later is, at the month it is seen
    (0, {24: 2}, labels.FAST),  # 0 -> 2 counts
    (4, {}, labels.EXCLUDED),  # KLG 4 at baseline
])
def test_progression_class(base, changes, expected):
    assert labels.progression_class(_klg(base, changes)) == expected


def test_label_rule_has_one_home_and_masks():
    from pipeline.cohort.disease import progression_labels

    assert labels.progression_labels is progression_labels
    with pytest.raises(ValueError, match="baseline"):
        labels.progression_class({12: 2, 24: 3})
    y = np.array([0, 1, 2, -1, 0])
    assert labels.included(y).tolist() == [True, True, True, False, True]
    assert labels.any_progression(y[labels.included(y)]).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="excluded"):
        labels.any_progression(y)
    with pytest.raises(ValueError):
        labels.included([0, 3])


# ----------------------------------------------------------------------------------------------- focal loss


def _focal_numpy(logits: np.ndarray, target: np.ndarray, gamma: float, alpha=None) -> np.ndarray:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pt = p[np.arange(len(target)), target]
    a = np.ones(len(target)) if alpha is None else np.asarray(alpha, dtype=np.float64)[target]
    return -a * (1 - pt) ** gamma * np.log(pt)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_loss_matches_formula(gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 3, generator=g, dtype=torch.float64) * 3  # float64: tiny terms compared exactly
    target = torch.randint(0, 3, (11,), generator=g)
    alpha = [0.2, 0.5, 0.3]
    ref = _focal_numpy(logits.numpy(), target.numpy(), gamma)
    ref_a = _focal_numpy(logits.numpy(), target.numpy(), gamma, alpha)
    np.testing.assert_allclose(losses.focal_loss(logits, target, gamma, reduction="none").numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(losses.focal_loss(logits, target, gamma).item(), ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.focal_loss(logits, target, gamma, reduction="sum").item(), ref.sum(),
                               rtol=1e-5)
    w = np.asarray(alpha)[target.numpy()]
    np.testing.assert_allclose(losses.focal_loss(logits, target, gamma, alpha).item(), ref_a.sum() / w.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.FocalLoss(gamma, alpha, "sum")(logits, target).item(), ref_a.sum(), rtol=1e-5)
    np.testing.assert_allclose(losses.focal_loss(logits.float(), target, gamma, reduction="none").numpy(), ref,
                               rtol=1e-4, atol=1e-6)  # float32: the same up to rounding


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_down_weights_easy_samples():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 3, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (9,), generator=g)
    w = torch.tensor([1.0, 2.0, 0.5])
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(losses.focal_loss(logits, target, 0.0, reduction=red),
                                   F.cross_entropy(logits, target, reduction=red))
        torch.testing.assert_close(losses.focal_loss(logits, target, 0.0, alpha=w, reduction=red),
                                   F.cross_entropy(logits, target, weight=w, reduction=red))
    easy = torch.tensor([[8.0, 0.0, 0.0]])
    ratio = losses.focal_loss(easy, torch.tensor([0]), 2.0) / F.cross_entropy(easy, torch.tensor([0]))
    assert ratio < 1e-6  # (1 - p_t)^2 with p_t ~ 0.9993
    losses.focal_loss(logits * 100, target).backward()  # saturated logits: finite loss and gradients
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------------------------- metrics


def _tied_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(np.clip(0.35 * y + rng.random(n) * 0.7, 0, 1), 1)  # rounded: many ties across classes
    return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_with_ties(seed):
    y, s = _tied_scores(np.random.default_rng(seed), 60)
    assert len(np.unique(s)) < 15
    assert metrics.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    for thr in (0.5, 0.3):
        assert metrics.balanced_accuracy(y, s, thr) == pytest.approx(
            sk.balanced_accuracy_score(y, (s >= thr).astype(int)), abs=1e-12)
    assert np.isnan(metrics.average_precision(np.zeros(5, int), s[:5]))
    assert np.isnan(metrics.roc_auc(np.ones(5, int), s[:5]))


def test_any_progression_score_and_decisions():
    p = np.array([[0.6, 0.3, 0.1], [0.45, 0.05, 0.5], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(metrics.any_progression_score(p), [0.4, 0.55, 0.6])
    assert metrics.predict_any(p).tolist() == [0, 1, 1]
    assert metrics.predict_any(p, rule="argmax").tolist() == [0, 1, 0]  # row 3: P(none) is the largest
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.any_progression_score(np.array([[2.0, 1.0, -1.0]]))


def _bootstrap_reference(y, s, metric, n_resamples, seed, groups):
    """Plain loop: the same draws as documented in bootstrap_ci."""
    subjects = np.unique(groups)
    rng = np.random.default_rng(seed)
    vals, skipped = [], 0
    for _ in range(n_resamples):
        pick = rng.integers(0, len(subjects), size=len(subjects))
        idx = []
        for k in pick:
            idx += [i for i in range(len(y)) if groups[i] == subjects[k]]
        if len(set(y[idx])) < 2:
            skipped += 1
            continue
        vals.append(metric(y[idx], s[idx]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return lo, hi, skipped


def test_bootstrap_ci_matches_a_numpy_reference_loop():
    rng = np.random.default_rng(3)
    n_subj = 12
    groups = np.array([f"s{i:02d}" for i in rng.permutation(np.repeat(np.arange(n_subj), 2))])  # 2 knees each
    y = np.zeros(2 * n_subj, int)
    y[np.flatnonzero(groups == "s03")] = 1  # few positive subjects: some resamples hold one class only
    y[np.flatnonzero(groups == "s07")[0]] = 1
    s = rng.random(y.size) + 0.3 * y
    ref_metric = sk.roc_auc_score
    lo, hi, skipped = _bootstrap_reference(y, s, ref_metric, 300, 5, groups)
    ci = metrics.bootstrap_ci(y, s, metrics.roc_auc, n_resamples=300, seed=5, groups=groups)
    assert skipped > 0 and ci.n_skipped == skipped and ci.n_used == 300 - skipped
    assert ci.low == pytest.approx(lo, abs=1e-12) and ci.high == pytest.approx(hi, abs=1e-12)
    point, low, high = ci
    assert point == pytest.approx(sk.roc_auc_score(y, s)) and low <= high
    # by knee (groups=None) the draws differ: a different interval from the same seed
    by_knee = metrics.bootstrap_ci(y, s, metrics.roc_auc, n_resamples=300, seed=5)
    lo_k, hi_k, _ = _bootstrap_reference(y, s, ref_metric, 300, 5, np.arange(y.size))
    assert (by_knee.low, by_knee.high) == pytest.approx((lo_k, hi_k), abs=1e-12)
    assert (by_knee.low, by_knee.high) != pytest.approx((ci.low, ci.high))


def test_bootstrap_ci_passes_metric_arguments_and_rejects_one_class():
    rng = np.random.default_rng(0)
    y = (rng.random(40) < 0.5).astype(int)
    s = rng.random(40)
    a = metrics.bootstrap_ci(y, s, metrics.balanced_accuracy, n_resamples=50, threshold=0.2)
    assert a.point == pytest.approx(sk.balanced_accuracy_score(y, (s >= 0.2).astype(int)))
    with pytest.raises(ValueError, match="one class"):
        metrics.bootstrap_ci(np.zeros(5, int), s[:5], metrics.roc_auc, n_resamples=10)


# ----------------------------------------------------------------------------------------------- ensemble


def test_fold_ensemble_averages_probabilities_once():
    p1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p2 = np.array([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    out = ensemble.ensemble_probabilities([p1, p2], kind="probabilities")
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], rtol=1e-6)
    logits = [np.log(p1) + 5.0, np.log(p2) - 1.0]  # softmax(log p + c) = p
    np.testing.assert_allclose(ensemble.ensemble_probabilities(logits).numpy(), out.numpy(), rtol=1e-5)
    defect = torch.softmax(out, dim=-1)  # the reference's extra softmax
    assert not torch.allclose(defect, out, atol=0.05)
    with pytest.raises(ValueError, match="sum to 1"):
        ensemble.ensemble_probabilities([p1 * 2], kind="probabilities")


# ----------------------------------------------------------------------------------------------- networks

TINY = {
    "trf": {"num_slices": 8, "widen_factor": 1 / 16, "token_dim": 32, "heads": 4, "layers": 2, "mlp_dim": 64},
    "fc": {"num_slices": 8, "widen_factor": 1 / 16, "fc_hidden": 16},
    "lstm": {"num_slices": 8, "widen_factor": 1 / 16, "lstm_hidden": 16},
    "cnn3d": {"num_slices": 8, "widen_factor": 1 / 16, "cnn3d_depth": 18},
    "xray": {"widen_factor": 1 / 16},
}


def _input(arch: str, b: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (b, 1, 32, 32) if arch == "xray" else (b, 1, 8, 32, 32)
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("arch", network.ARCHS)
def test_every_arch_gives_logits_and_trains_one_step(arch, one_torch_thread):
    torch.manual_seed(0)
    net = network.make_progression_network(arch, **TINY[arch])
    x = _input(arch, 3)
    logits = net(x)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    losses.focal_loss(logits, torch.tensor([0, 1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    opt.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert changed == len(before)  # every parameter received a gradient
    if arch != "xray":
        with pytest.raises(ValueError, match="B x 1 x S x H x W"):
            net(x[:, :, 0])


def test_slice_encoder_runs_once_over_slices_in_volume_order(one_torch_thread):
    enc = network.SliceEncoder(depth=50, widen_factor=1 / 16).eval()
    x = _input("trf")
    with torch.no_grad():
        feats = enc(x)
        loop = torch.stack([enc.encode_images(x[:, :, s]) for s in range(x.shape[2])], dim=1)
    assert feats.shape == (2, 8, enc.out_dim) == (2, 8, 128)
    torch.testing.assert_close(feats, loop, rtol=1e-4, atol=1e-5)


def test_transformer_checks_its_slice_count_and_uses_the_class_token(one_torch_thread):
    net = network.make_progression_network("trf", **TINY["trf"]).eval()
    with pytest.raises(ValueError, match="built for 8 slices"):
        net(torch.rand(1, 1, 6, 32, 32))
    assert net.pos_embedding.shape == (1, 9, 32)
    feats = torch.randn(2, 8, net.encoder.out_dim)
    with torch.no_grad():
        tokens = net.tokens(feats)
        torch.testing.assert_close(net.aggregate(feats), net.head(tokens[:, 0]))
    with pytest.raises(ValueError, match="settings"):
        network.make_progression_network("xray", token_dim=8)


def test_paper_size_transformer_has_about_133m_parameters():
    with torch.device("meta"):  # counted, never run
        net = network.make_progression_network("trf")
    n = network.count_parameters(net)
    assert abs(n - network.PAPER_PARAMETERS) / network.PAPER_PARAMETERS < 0.01, n
    assert net.encoder.out_dim == 2048 and len(net.transformer.layers) == 4
    layer = net.transformer.layers[0]
    assert layer.self_attn.num_heads == 8 and layer.linear1.out_features == 2048 and layer.norm_first


@pytest.mark.parametrize("arch", ["trf", "xray"])
def test_checkpoint_round_trip(arch, tmp_path, one_torch_thread):
    from pipeline.io.checkpoints import load_network
    from pipeline.user_errors import SettingsMismatchError

    torch.manual_seed(1)
    net = network.make_progression_network(arch, image_size=32, **TINY[arch]).eval()
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    back = load_network(path).eval()
    assert type(back) is type(net) and back.description == net.description
    x = _input(arch)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    again = network.load_progression_network(path, arch=arch, widen_factor=1 / 16)
    assert again.description["preprocessing"]["image_size"] == 32
    with pytest.raises(SettingsMismatchError):
        network.load_progression_network(path, widen_factor=0.5)

"""Recall@k (pessimistic ties) and synthesis error (median / MAD per map) against references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from pipeline.metrics import (
    median_abs_deviation,
    per_map_errors,
    synthesis_error_report,
    synthesis_error_table,
)
from pipeline.mris.metrics import recall_at_k, target_ranks


def _naive_recall(sim: np.ndarray, targets: np.ndarray, k: int) -> float:
    hits = 0
    for i, t in enumerate(targets):
        better_or_equal = sum(1 for j in range(sim.shape[1]) if j != t and sim[i, j] >= sim[i, t])
        hits += better_or_equal < k
    return 100.0 * hits / len(targets)


def test_recall_hand_computed():
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # own (0) is best -> rank 1
            [0.8, 0.5, 0.9, 0.1],  # own (1) third -> rank 3
            [0.1, 0.2, 0.3, 0.4],  # own (2) second -> rank 2
        ]
    )
    assert target_ranks(sim).tolist() == [1, 3, 2]
    r = recall_at_k(sim, ks=(1, 2, 3))
    assert r == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: pytest.approx(100.0)}
    # explicit targets (query i's own item elsewhere in the database)
    assert target_ranks(sim, targets=[3, 0, 1]).tolist() == [2, 2, 3]


def test_recall_ties_are_pessimistic():
    sim = np.array([[0.5, 0.5, 0.5, 0.1], [0.2, 0.7, 0.7, 0.7]])
    # query 0: own item tied with two others -> rank 3; query 1: tied with 2 others -> rank 3
    assert target_ranks(sim).tolist() == [3, 3]
    assert recall_at_k(sim, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 100.0}
    constant = np.ones((5, 5))
    assert recall_at_k(constant, ks=(1, 4, 5)) == {1: 0.0, 4: 0.0, 5: 100.0}


def test_recall_matches_naive_on_random_data():
    rng = np.random.default_rng(0)
    sim = np.round(rng.normal(size=(40, 60)), 1)  # rounding creates many ties
    targets = rng.integers(0, 60, 40)
    got = recall_at_k(torch.from_numpy(sim), targets)
    for k in (1, 5, 10, 20):
        assert got[k] == pytest.approx(_naive_recall(sim, targets, k))
    with pytest.raises(ValueError, match="targets"):
        recall_at_k(sim, targets=[0] * 39)
    with pytest.raises(ValueError, match="N >= Q"):
        recall_at_k(sim.T)


def test_mad_matches_scipy():
    rng = np.random.default_rng(1)
    for shape in [(7,), (8,), (5, 13), (4, 1)]:
        x = rng.gamma(2.0, 0.3, size=shape)
        np.testing.assert_allclose(
            median_abs_deviation(x, axis=-1),
            scipy.stats.median_abs_deviation(x, axis=-1, scale=1.0),
            rtol=1e-12,
        )
    assert median_abs_deviation(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == 1.0


def _maps(seed=2, n=6):
    rng = np.random.default_rng(seed)
    mask = np.zeros((9, 8), dtype=bool)
    mask[1:8, 2:7] = True
    truth = rng.uniform(0, 3, size=(n, 9, 8))
    truth[:, 3, 3] = 0.0  # zero thickness inside the mask counts
    truth[:, ~mask] = np.nan
    synth = truth + rng.normal(0, 0.3, size=truth.shape)
    return synth, truth, mask


def test_per_map_errors_against_scipy():
    synth, truth, mask = _maps()
    per = per_map_errors(synth, truth, mask)
    assert list(per.columns) == ["median_mm", "mad_mm", "n_pixels"] and len(per) == 6
    for i in range(6):
        e = np.abs(synth[i][mask] - truth[i][mask])
        assert per["median_mm"][i] == pytest.approx(np.median(e), rel=1e-12)
        assert per["mad_mm"][i] == pytest.approx(scipy.stats.median_abs_deviation(e, scale=1.0), rel=1e-12)
        assert per["n_pixels"][i] == mask.sum()
    # mask None -> finite truth pixels: same result; per-map masks also accepted
    np.testing.assert_allclose(per_map_errors(synth, truth).to_numpy(), per.to_numpy())
    np.testing.assert_allclose(
        per_map_errors(synth, truth, np.broadcast_to(mask, truth.shape).copy()).to_numpy(), per.to_numpy()
    )


def test_table_mean_over_maps_and_klg_buckets():
    synth, truth, mask = _maps()
    klg = [0, 1, 2, 4, 4, None]
    tab = synthesis_error_table(torch.from_numpy(synth), truth, mask, klg=klg)
    assert tab["group"].tolist() == ["all", "0-1", "2", "3", "4"]
    assert tab["n_maps"].tolist() == [6, 2, 1, 0, 2]
    per = per_map_errors(synth, truth, mask)
    row = tab.set_index("group")
    assert row.loc["all", "median_mm"] == pytest.approx(per["median_mm"].mean())
    assert row.loc["0-1", "mad_mm"] == pytest.approx(per["mad_mm"][[0, 1]].mean())
    assert row.loc["4", "median_mm"] == pytest.approx(per["median_mm"][[3, 4]].mean())
    assert np.isnan(row.loc["3", "median_mm"])
    rep = synthesis_error_report(
        {"fc": synth, "tc": synth[:, :, ::-1]},
        {"fc": truth, "tc": truth[:, :, ::-1]},
        {"fc": mask, "tc": mask[:, ::-1]},
        klg=klg,
    )
    assert rep.columns.tolist() == ["map", "group", "n_maps", "median_mm", "mad_mm"] and len(rep) == 10
    np.testing.assert_allclose(rep[rep["map"] == "tc"]["median_mm"], tab["median_mm"])


def test_synthesis_error_rejects_nan_inside_mask():
    synth, truth, mask = _maps()
    synth[2, 4, 4] = np.nan
    with pytest.raises(ValueError, match=r"maps \[2\]"):
        per_map_errors(synth, truth, mask)
    with pytest.raises(ValueError, match="KLG"):
        synthesis_error_table(truth, truth, mask, klg=[7] * 6)

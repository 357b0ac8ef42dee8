"""MRIS longitudinal triplet loss against a naive double loop."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.mris.losses import LongitudinalTripletLoss, longitudinal_triplet_loss


def _cos_dist(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().tolist(), v.double().tolist()
    dot = sum(a * b for a, b in zip(u, v))
    return 1.0 - dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _naive(x, y, subjects, margin=0.1, reduction="mean", symmetric=False) -> float:
    terms = []
    b = len(subjects)
    for a in range(b):
        for n in range(b):
            if subjects[a] == subjects[n]:  # diagonal and same subject
                continue
            terms.append(max(0.0, _cos_dist(x[a], y[a]) - _cos_dist(x[a], y[n]) + margin))
            if symmetric:
                terms.append(max(0.0, _cos_dist(x[a], y[a]) - _cos_dist(x[n], y[a]) + margin))
    if not terms:
        return 0.0
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


SUBJECTS = ["p1", "p2", "p1", "p3", "p4", "p2", "p5", "p6"]  # p1 and p2 appear twice


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_naive_loop(reduction, symmetric):
    torch.manual_seed(0)
    # not normalised on purpose (the loss uses cosine distance) and margin large enough for active terms
    x, y = torch.randn(8, 5) * 3, torch.randn(8, 5)
    got = longitudinal_triplet_loss(x, y, SUBJECTS, margin=0.3, reduction=reduction, symmetric=symmetric)
    want = _naive(x, y, SUBJECTS, margin=0.3, reduction=reduction, symmetric=symmetric)
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_same_subject_pairs_are_masked_and_diagonal_not_counted():
    torch.manual_seed(1)
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    per_pair = longitudinal_triplet_loss(x, y, SUBJECTS, reduction="none")
    assert per_pair.shape == (8, 8)
    assert torch.all(torch.diagonal(per_pair) == 0)
    assert per_pair[0, 2] == 0 and per_pair[2, 0] == 0 and per_pair[1, 5] == 0
    # integer tensor ids give the same result as strings
    ids = torch.tensor([1, 2, 1, 3, 4, 2, 5, 6])
    torch.testing.assert_close(
        longitudinal_triplet_loss(x, y, ids), longitudinal_triplet_loss(x, y, SUBJECTS)
    )
    # without ids, only the diagonal is masked: differs, and equals the naive loop with unique subjects
    no_ids = longitudinal_triplet_loss(x, y, None)
    assert no_ids.item() == pytest.approx(_naive(x, y, list(range(8))), rel=1e-5)
    # perfect embeddings (y == x, orthogonal rows) give zero loss with margin < 1
    eye = torch.eye(4)
    assert longitudinal_triplet_loss(eye, eye.clone()).item() == 0.0


def test_module_wrapper_and_gradients():
    torch.manual_seed(2)
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(6, 4, requires_grad=True)
    loss_fn = LongitudinalTripletLoss(margin=0.5)
    loss = loss_fn(x, y, ["a", "b", "c", "a", "d", "e"])
    loss.backward()
    assert loss.item() > 0
    assert x.grad is not None and y.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    # gradient check in double precision
    xd = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    yd = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: longitudinal_triplet_loss(a, b, [0, 1, 0, 2, 3], margin=0.7, symmetric=True), (xd, yd)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_pairs_masked_returns_zero_with_grad(reduction):
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 3, requires_grad=True)
    loss = longitudinal_triplet_loss(x, y, ["s"] * 4, reduction=reduction)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))
    single = longitudinal_triplet_loss(x[:1], y[:1])
    assert single.item() == 0.0 and single.requires_grad


def test_invalid_arguments():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="reduction"):
        longitudinal_triplet_loss(x, x, reduction="max")
    with pytest.raises(ValueError, match="subject ids"):
        longitudinal_triplet_loss(x, x, ["a", "b"])
    with pytest.raises(ValueError, match="equal shape"):
        longitudinal_triplet_loss(x, torch.randn(3, 4))

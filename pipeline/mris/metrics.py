"""Retrieval recall@k for MRIS (radiograph query -> thickness-map database).

``R@k`` = percentage of queries whose own database item is among the ``k`` most similar items.

Ties are counted PESSIMISTICALLY: the rank of query ``i``'s target ``t`` is
``1 + #{j != t : sim[i, j] >= sim[i, t]}``, so a target tied with other items is ranked behind all of
them, and it counts as retrieved at ``k`` only if fewer than ``k`` OTHER items are at least as similar.
(Constant embeddings therefore score R@k = 0 instead of a lucky 100 %.)
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["DEFAULT_KS", "target_ranks", "recall_at_k"]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
ArrayLike = Union[np.ndarray, torch.Tensor]


def target_ranks(similarity: ArrayLike, targets: ArrayLike | Sequence[int] | None = None) -> np.ndarray:
    """Pessimistic 1-based rank of each query's target.

    Args:
        similarity: ``Q x N`` similarities (larger = more similar), queries x database.
        targets: ``Q`` database index of each query's own item; default ``arange(Q)`` (requires N >= Q).

    Returns:
        ``Q`` int64 ranks in ``1..N``.
    """
    sim = torch.as_tensor(
        similarity.detach().cpu() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    )
    if sim.ndim != 2:
        raise ValueError(f"similarity must be Q x N, got shape {tuple(sim.shape)}")
    n_q, n = sim.shape
    if targets is None:
        if n < n_q:
            raise ValueError(f"default targets arange(Q) need N >= Q, got Q={n_q}, N={n}")
        t = torch.arange(n_q)
    else:
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        if t.numel() != n_q:
            raise ValueError(f"{t.numel()} targets for {n_q} queries")
        if n_q and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"targets must be in 0..{n - 1}")
    if bool(torch.isnan(sim).any()):
        raise ValueError("similarity contains NaN")
    own = sim[torch.arange(n_q), t]
    # items at least as similar as the target, the target itself included -> rank (pessimistic)
    return (sim >= own[:, None]).sum(dim=1).numpy().astype(np.int64)


def recall_at_k(
    similarity: ArrayLike,
    targets: ArrayLike | Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[int, float]:
    """``{k: R@k in percent}`` for a ``Q x N`` similarity matrix (see :func:`target_ranks`)."""
    ranks = target_ranks(similarity, targets)
    if ranks.size == 0:
        raise ValueError("no queries")
    return {int(k): float(100.0 * np.mean(ranks <= int(k))) for k in ks}

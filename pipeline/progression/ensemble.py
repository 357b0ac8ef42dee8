"""Fold ensembles: the mean of the folds' class PROBABILITIES, computed once.

``P_ens(c | x) = (1 / F) sum_f softmax(z_f(x))_c`` for the logits ``z_f`` of the F fold models. The average
of probabilities is already a distribution (rows sum to 1); it is never passed through a softmax again (the
reference code's defect: ``softmax(mean of probabilities)`` squeezes every ensemble towards the uniform
distribution, e.g. ``(0.9, 0.05, 0.05) -> (0.54, 0.23, 0.23)``: P(any) is no longer a probability, so a
threshold of 0.5 and the balanced accuracy built on it mean something else).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

__all__ = ["ensemble_probabilities"]

FoldOutputs = Union[Sequence[Union[np.ndarray, torch.Tensor]], np.ndarray, torch.Tensor]


def ensemble_probabilities(fold_outputs: FoldOutputs, kind: str = "logits") -> torch.Tensor:
    """Mean over folds of the per-fold class probabilities, ``N x C`` float32.

    Args:
        fold_outputs: ``F`` arrays ``N x C`` (or one ``F x N x C`` array), same samples in the same order.
        kind: ``"logits"`` (softmax is applied to each fold's output, then the mean is taken) or
            ``"probabilities"`` (each row must already sum to 1; only the mean is taken).
    """
    if kind not in ("logits", "probabilities"):
        raise ValueError(f"kind must be 'logits' or 'probabilities', got {kind!r}")
    folds = [torch.as_tensor(np.asarray(f) if not isinstance(f, torch.Tensor) else f).detach().float().cpu()
             for f in fold_outputs]
    if not folds:
        raise ValueError("ensemble_probabilities: no fold outputs")
    if any(f.ndim != 2 or f.shape != folds[0].shape for f in folds):
        raise ValueError(f"every fold output must be N x C of one shape, got {[list(f.shape) for f in folds]}")
    stacked = torch.stack(folds)
    if kind == "logits":
        stacked = torch.softmax(stacked, dim=-1)
    elif (stacked < 0).any() or not torch.allclose(stacked.sum(-1), torch.ones(()), atol=1e-4):
        raise ValueError("kind='probabilities' needs rows >= 0 that sum to 1 (softmax outputs); pass "
                         "kind='logits' for raw network outputs")
    return stacked.mean(dim=0)

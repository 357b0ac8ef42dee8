"""Evaluation of the progression models on the binary "any progression" score (one home for each formula).

* :func:`any_progression_score`: ``P(any) = P(fast) + P(slow) = P1 + P2`` from ``N x 3`` class probabilities.
The formulas below live in :mod:`pipeline.metrics.classification` (shared with the downstream classifiers
and the comparison report) and are re-exported here:

* :func:`average_precision`: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in descending
  order (no interpolation; tied scores form one threshold), as ``sklearn.metrics.average_precision_score``.
* :func:`roc_auc`: trapezoidal area under the ROC curve through one point per distinct threshold (a tie
  between a positive and a negative counts one half), as ``sklearn.metrics.roc_auc_score``.
* :func:`balanced_accuracy`: ``(TPR + TNR) / 2`` of the decision ``score >= threshold`` (default 0.5 on
  P(any)); :func:`predict_any` also offers the argmax rule (progression iff the most probable class is not 0).
* :func:`bootstrap_ci`: point value and percentile interval (2.5 / 97.5 % by default) of any of these
  metrics, resampling SUBJECTS with replacement (all knees of a drawn subject enter, once per draw).

AP, AUC and balanced accuracy are implemented here with numpy (vectorised, so 1,000 bootstrap resamples
take well under a second) and are tested against scikit-learn, which is only a development dependency.
Each returns ``NaN`` when the labels hold one class only. Labels are 0/1 (int), scores float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from pipeline.metrics.classification import (
    BootstrapCI,
    average_precision,
    balanced_accuracy,
    bootstrap_ci,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)

__all__ = ["BootstrapCI", "any_progression_score", "average_precision", "balanced_accuracy", "bootstrap_ci",
           "precision_recall_curve", "predict_any", "roc_auc", "roc_curve"]

ArrayLike = Union[Sequence, np.ndarray, torch.Tensor]


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def any_progression_score(probs: ArrayLike) -> np.ndarray:
    """``P1 + P2`` (float64, ``N``) from ``N x 3`` class probabilities (0 none, 1 fast, 2 slow) whose rows
    sum to 1 (softmax outputs, or a fold ensemble from :mod:`pipeline.progression.ensemble`)."""
    p = _np(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"expected N x 3 class probabilities, got shape {list(p.shape)}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("class probabilities must be finite, >= 0 and sum to 1 per row (pass softmax outputs, "
                         "not logits)")
    return p[:, 1] + p[:, 2]


def predict_any(probs: ArrayLike, rule: str = "threshold", threshold: float = 0.5) -> np.ndarray:
    """Binary any-progression decision (int64, ``N``) from ``N x 3`` probabilities: ``"threshold"``
    ``P1 + P2 >= threshold``, or ``"argmax"``: the most probable class is 1 or 2."""
    if rule == "threshold":
        return (any_progression_score(probs) >= threshold).astype(np.int64)
    if rule == "argmax":
        any_progression_score(probs)  # validates
        return (_np(probs).argmax(axis=1) > 0).astype(np.int64)
    raise ValueError(f"rule must be 'threshold' or 'argmax', got {rule!r}")

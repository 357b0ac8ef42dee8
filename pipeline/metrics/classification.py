"""Binary classification metrics shared by every classifier (one home for each formula): the downstream
progression classifiers on thickness maps, the MR progression models and the comparison report.

* :func:`average_precision`: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in descending
  order (no interpolation; tied scores form one threshold), as ``sklearn.metrics.average_precision_score``.
* :func:`roc_auc`: trapezoidal area under the ROC curve through one point per distinct threshold (a tie
  between a positive and a negative counts one half), as ``sklearn.metrics.roc_auc_score``.
* :func:`balanced_accuracy`: ``(TPR + TNR) / 2`` of the decision ``score >= threshold``.
* :func:`roc_curve`, :func:`precision_recall_curve`: the curve points for figures.
* :func:`bootstrap_ci`: point value and percentile interval (2.5 / 97.5 % by default) of any of these
  metrics, resampling SUBJECTS with replacement (all samples of a drawn subject enter, once per draw).

Implemented with numpy (vectorised, so 1,000 bootstrap resamples take well under a second) and tested against
scikit-learn, which is only a development dependency. AP, AUC and balanced accuracy return ``NaN`` when the
labels hold one class only. Labels are 0/1 (int), scores float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

__all__ = ["BootstrapCI", "average_precision", "balanced_accuracy", "bootstrap_ci", "precision_recall_curve",
           "roc_auc", "roc_curve"]

ArrayLike = Union[Sequence, np.ndarray, torch.Tensor]


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _np(y_true).reshape(-1)
    s = _np(scores).astype(np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"binary labels must be 0/1, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int64), s


def _thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score threshold, descending (ties grouped), and
    the thresholds."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    return tps, (last + 1).astype(np.float64) - tps, s[last]


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (module docstring); ``NaN`` when there is no positive or no negative."""
    y, s = _binary(y_true, scores)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    tps, fps, _ = _thresholds(y, s)
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_steps * precision))


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (module docstring); ``NaN`` when there is no positive or no negative."""
    y, s = _binary(y_true, scores)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    tps, fps, _ = _thresholds(y, s)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def balanced_accuracy(y_true: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> float:
    """``(sensitivity + specificity) / 2`` of the decision ``scores >= threshold`` (scores = P(any) by
    default, threshold 0.5; pass 0/1 decisions, e.g. :func:`predict_any` with ``rule="argmax"``, with any
    threshold in (0, 1]); ``NaN`` when there is no positive or no negative."""
    y, s = _binary(y_true, scores)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    pred = s >= threshold
    return float((pred[y == 1].mean() + (~pred[y == 0]).mean()) / 2.0)


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr, thresholds)`` starting at (0, 0) (threshold +inf), one point per
    distinct score, descending thresholds; needs both classes."""
    y, s = _binary(y_true, scores)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("roc_curve needs positive and negative samples")
    tps, fps, thr = _thresholds(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thr]


def precision_recall_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points ``(precision, recall, thresholds)`` with descending thresholds, starting at
    recall 0 with precision 1 (plot convention); needs a positive sample."""
    y, s = _binary(y_true, scores)
    if y.size == 0 or y.max() == 0:
        raise ValueError("precision_recall_curve needs a positive sample")
    tps, fps, thr = _thresholds(y, s)
    return np.r_[1.0, tps / (tps + fps)], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thr]


class BootstrapCI(tuple):
    """``(point, low, high)`` of :func:`bootstrap_ci`, with ``n_used`` (resamples in the interval) and
    ``n_skipped`` (resamples with one class only, left out) as attributes."""

    def __new__(cls, point: float, low: float, high: float, n_used: int, n_skipped: int) -> BootstrapCI:
        self = super().__new__(cls, (float(point), float(low), float(high)))
        self.n_used, self.n_skipped = int(n_used), int(n_skipped)
        return self

    point = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])

    def __repr__(self) -> str:
        return (f"BootstrapCI(point={self[0]:.4f}, low={self[1]:.4f}, high={self[2]:.4f}, "
                f"n_used={self.n_used}, n_skipped={self.n_skipped})")


def bootstrap_ci(y_true: ArrayLike, scores: ArrayLike, metric: Callable[..., float], n_resamples: int = 1000,
                 seed: int = 0, groups: Optional[ArrayLike] = None, level: float = 0.95,
                 **metric_kwargs: Any) -> BootstrapCI:
    """Percentile bootstrap interval of ``metric(y_true, scores, **metric_kwargs)``, resampled by subject.

    Algorithm (a reference loop reproduces it draw for draw): the distinct ``groups`` (subject ids; ``None``
    = every sample its own group) are sorted (``np.unique``); ``rng = np.random.default_rng(seed)``; for each
    of ``n_resamples`` resamples ``rng.integers(0, G, size=G)`` draws G subjects with replacement and the
    resample holds all samples of each drawn subject (in sample order, subject after subject). Resamples whose
    labels hold one class only are skipped and counted (``n_skipped``); the interval is
    ``np.percentile(values, [50 - 50 level, 50 + 50 level])`` (2.5 / 97.5 % at ``level = 0.95``, numpy's
    linear interpolation) of the others. ``point`` is the metric on all samples.
    """
    y, s = _binary(y_true, scores)
    if n_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    g = np.arange(y.size) if groups is None else _np(groups).reshape(-1)
    if g.size != y.size:
        raise ValueError(f"{g.size} subject ids for {y.size} samples")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    if n_groups == 0:
        raise ValueError("bootstrap_ci: no samples")
    order = np.argsort(inverse, kind="mergesort")  # sample indices grouped by subject, in sample order
    starts = np.r_[0, np.cumsum(np.bincount(inverse, minlength=n_groups))]
    members = [order[starts[k]:starts[k + 1]] for k in range(n_groups)]
    rng = np.random.default_rng(seed)
    values, skipped = [], 0
    for _ in range(n_resamples):
        idx = np.concatenate([members[k] for k in rng.integers(0, n_groups, size=n_groups)])
        yy = y[idx]
        if yy.min() == yy.max():
            skipped += 1
            continue
        values.append(metric(yy, s[idx], **metric_kwargs))
    if not values:
        raise ValueError(f"all {n_resamples} bootstrap resamples hold one class only; the interval is undefined")
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [50.0 - 50.0 * level, 50.0 + 50.0 * level])
    return BootstrapCI(metric(y, s, **metric_kwargs), low, high, len(values), skipped)

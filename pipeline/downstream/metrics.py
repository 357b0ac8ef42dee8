"""Metrics of the downstream classifiers (one home each): KLG accuracy per bucket, progression AP / ROC AUC
(MONAI's implementations) and the ROC / precision-recall curve points for figures.

Conventions: ``y_true`` are integer labels; KLG labels are bucket indices ``0..3`` = buckets ``0-1``, ``2``,
``3``, ``4`` (:func:`klg_class`); progression labels are 0/1 with scores = predicted probability of class 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_precision, compute_roc_auc

from pipeline.conventions import KLG_BUCKETS, klg_bucket

__all__ = ["BUCKET_NAMES", "accuracy_per_bucket", "average_precision", "class_weights", "klg_class",
           "precision_recall_curve", "roc_auc", "roc_curve"]

#: Names of the KLG classes, index = class label.
BUCKET_NAMES: tuple[str, ...] = tuple(klg_bucket(b[0]) for b in KLG_BUCKETS)


def klg_class(klg: int) -> int:
    """KLG 0..4 -> class index 0..3 (0-1 merged, 2, 3, 4); raises ``ValueError`` outside 0..4."""
    return BUCKET_NAMES.index(klg_bucket(klg))


def _labels(y: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return a.astype(np.int64).reshape(-1)


def _binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true)
    s = (scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)).astype(np.float64)
    s = s.reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"binary labels must be 0/1, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (C_present * n_c)`` (sklearn's "balanced"; mean over the
    present classes' samples = 1); classes without samples get 0. ``C`` float32."""
    y = _labels(labels)
    if y.size == 0:
        raise ValueError("class_weights: no labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = y.size / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def accuracy_per_bucket(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                        names: Sequence[str] = BUCKET_NAMES) -> dict[str, float]:
    """Accuracy (fraction correct) within each true class, overall, and balanced (mean over classes with
    samples); ``NaN`` for a class without samples. Keys: the class names, ``"overall"``, ``"balanced"``."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true labels for {p.size} predictions")
    if t.size == 0:
        raise ValueError("accuracy_per_bucket: no samples")
    out: dict[str, float] = {}
    for c, name in enumerate(names):
        sel = t == c
        out[name] = float((p[sel] == c).mean()) if sel.any() else float("nan")
    out["overall"] = float((t == p).mean())
    vals = [out[n] for n in names if not np.isnan(out[n])]
    out["balanced"] = float(np.mean(vals))
    return out


def average_precision(y_true, scores) -> float:
    """Average precision of binary ``scores`` (MONAI ``compute_average_precision``: the step-wise sum
    ``sum_n (R_n - R_{n-1}) P_n``, no interpolation); ``NaN`` when there is no positive or no negative."""
    y, s = _binary(y_true, scores)
    if y.min() == y.max():
        return float("nan")
    return float(compute_average_precision(torch.from_numpy(s), torch.from_numpy(y)))


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve of binary ``scores`` (MONAI ``compute_roc_auc``; ties count one half);
    ``NaN`` when there is no positive or no negative."""
    y, s = _binary(y_true, scores)
    if y.min() == y.max():
        return float("nan")
    return float(compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y)))


def _thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true / false positives at each distinct score threshold (descending)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return tps, fps, s[last]


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr, thresholds)`` starting at (0, 0) (threshold +inf), one point per
    distinct score, descending thresholds; needs both classes."""
    y, s = _binary(y_true, scores)
    if y.min() == y.max():
        raise ValueError("roc_curve needs positive and negative samples")
    tps, fps, thr = _thresholds(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thr]


def precision_recall_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points ``(precision, recall, thresholds)`` with descending thresholds, starting at
    recall 0 with precision 1 (plot convention); needs a positive sample."""
    y, s = _binary(y_true, scores)
    if y.max() == 0:
        raise ValueError("precision_recall_curve needs a positive sample")
    tps, fps, thr = _thresholds(y, s)
    return np.r_[1.0, tps / (tps + fps)], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thr]

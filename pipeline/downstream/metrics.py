"""Metrics of the downstream classifiers: KLG accuracy per bucket and class weights here; progression AP / ROC
AUC and the ROC / precision-recall curve points from :mod:`pipeline.metrics.classification` (the one home of
the binary metrics, shared with the MR progression models), re-exported.

Conventions: ``y_true`` are integer labels; KLG labels are bucket indices ``0..3`` = buckets ``0-1``, ``2``,
``3``, ``4`` (:func:`klg_class`); progression labels are 0/1 with scores = predicted probability of class 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.conventions import KLG_BUCKETS, klg_bucket
from pipeline.metrics.classification import average_precision, precision_recall_curve, roc_auc, roc_curve

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

"""Train and test the KLG and progression classifiers on the maps of ONE source (MR-extracted, MRIS, a baseline).

The classifiers are trained on the downstream-set maps of the source and tested on its test-set maps; the
same seed is used for every source, so the sources differ only in their maps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.downstream.data import TASKS, classifier_inputs, task_rows
from pipeline.downstream.engine import ClassifierConfig, predict_logits, train_classifier
from pipeline.downstream.metrics import BUCKET_NAMES, accuracy_per_bucket, average_precision, roc_auc

__all__ = ["DownstreamSettings", "evaluate_source"]

logger = logging.getLogger(__name__)


@dataclass
class DownstreamSettings:
    """Settings of both tasks. ``image_size``: classifier input side ``S`` (px); ``progression_visits``:
    ``"first"`` (default, one baseline map per knee) or ``"all"``."""

    image_size: int = 256
    klg: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(lr=1e-5))
    progression: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(lr=1e-4))
    progression_visits: str = "first"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DownstreamSettings:
        d = dict(d)
        return cls(image_size=int(d.get("image_size", 256)),
                   klg=ClassifierConfig(**d.get("klg", {"lr": 1e-5})),
                   progression=ClassifierConfig(**d.get("progression", {"lr": 1e-4})),
                   progression_visits=str(d.get("progression_visits", "first")))


def evaluate_source(name: str, train_items: Sequence[dict], train_maps: Mapping[str, np.ndarray],
                    test_items: Sequence[dict], test_maps: Mapping[str, np.ndarray],
                    settings: DownstreamSettings) -> dict[str, Any]:
    """KLG and progression classifiers for one source.

    Args:
        name: source name (for logs).
        train_items, test_items: MRIS item dicts of the downstream and test sets with ``progression``
            (:func:`pipeline.downstream.data.attach_progression`).
        train_maps, test_maps: ``{fc, tc}: N x H x W`` maps (mm, NaN outside) of those items, same order.

    Returns:
        ``{"klg": {...}, "progression": {...}}``: KLG accuracy per bucket / overall / balanced, counts,
        confusion matrix (rows = truth); progression AP, ROC AUC, accuracy, counts, test labels and scores.
        A task without training or test samples of two classes holds ``{"skipped": reason}``.
    """
    out: dict[str, Any] = {"source": name}
    for task, n_classes in TASKS.items():
        cfg = settings.klg if task == "klg" else settings.progression
        tr_idx, tr_y = task_rows(train_items, task, settings.progression_visits)
        te_idx, te_y = task_rows(test_items, task, settings.progression_visits)
        if len(np.unique(tr_y)) < 2 or len(te_y) == 0:
            out[task] = {"skipped": f"{len(tr_y)} training samples in {len(np.unique(tr_y))} classes, "
                                    f"{len(te_y)} test samples"}
            logger.warning("%s/%s skipped: %s", name, task, out[task]["skipped"])
            continue
        t0 = time.time()
        x_tr = classifier_inputs(train_maps, settings.image_size, tr_idx)
        x_te = classifier_inputs(test_maps, settings.image_size, te_idx)
        net, history = train_classifier(x_tr, tr_y, n_classes, cfg, name=f"{name}/{task}")
        logits = predict_logits(net, x_te, cfg.batch_size, cfg.device)
        prob = torch.softmax(logits, dim=1).numpy()  # probabilities for the metrics only
        pred = prob.argmax(1)
        res: dict[str, Any] = {"n_train": int(len(tr_y)), "n_test": int(len(te_y)),
                               "train_loss": history, "seconds": round(time.time() - t0, 1)}
        if task == "klg":
            res.update(accuracy_per_bucket(te_y, pred))
            res["n_test_per_bucket"] = {b: int((te_y == i).sum()) for i, b in enumerate(BUCKET_NAMES)}
            res["n_train_per_bucket"] = {b: int((tr_y == i).sum()) for i, b in enumerate(BUCKET_NAMES)}
            res["n_pred_per_bucket"] = {b: int((pred == i).sum()) for i, b in enumerate(BUCKET_NAMES)}
            conf = np.zeros((n_classes, n_classes), dtype=int)
            np.add.at(conf, (te_y, pred), 1)
            res["confusion"] = conf.tolist()
        else:
            score = prob[:, 1]
            res.update({"ap": average_precision(te_y, score), "roc_auc": roc_auc(te_y, score),
                        "accuracy": float((pred == te_y).mean()), "n_pos_train": int(tr_y.sum()),
                        "n_pos_test": int(te_y.sum()), "prevalence_test": float(te_y.mean()),
                        "labels": te_y.tolist(), "scores": score.tolist()})
        out[task] = res
    return out

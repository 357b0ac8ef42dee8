"""Downstream tasks on thickness maps (MRIS paper): KLG (4 classes: 0-1, 2, 3, 4) and 72-month progression.

* :mod:`.data`: labels (KLG bucket, ``progression_72m``), task rows, classifier inputs (FC + TC, 2 channels).
* :mod:`.engine`: MONAI ResNet-18, training with ``SupervisedTrainer`` (class-weighted cross-entropy on raw
  logits), prediction with ``SupervisedEvaluator``.
* :mod:`.metrics`: accuracy per KLG bucket, average precision, ROC AUC (MONAI), ROC / PR curve points.
* :mod:`.run`: both classifiers for one source of maps.
"""

from pipeline.downstream.data import TASKS, attach_progression, classifier_inputs, task_rows
from pipeline.downstream.engine import ClassifierConfig, make_classifier, predict_logits, train_classifier
from pipeline.downstream.metrics import (
    BUCKET_NAMES,
    accuracy_per_bucket,
    average_precision,
    class_weights,
    klg_class,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)
from pipeline.downstream.run import DownstreamSettings, evaluate_source

__all__ = [
    "BUCKET_NAMES",
    "TASKS",
    "ClassifierConfig",
    "DownstreamSettings",
    "accuracy_per_bucket",
    "attach_progression",
    "average_precision",
    "class_weights",
    "classifier_inputs",
    "evaluate_source",
    "klg_class",
    "make_classifier",
    "precision_recall_curve",
    "predict_logits",
    "roc_auc",
    "roc_curve",
    "task_rows",
    "train_classifier",
]

"""Figures of the comparison report: example maps per method per KLG bucket and ROC / precision-recall curves
of the progression classifiers per source (both from :mod:`pipeline.metrics.figures`)."""

from __future__ import annotations

from pipeline.metrics.figures import example_maps_figure, pick_examples, roc_pr_figure

__all__ = ["example_maps_figure", "pick_examples", "roc_pr_figure"]

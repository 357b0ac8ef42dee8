"""Figures of the comparison report: example maps per method per KLG bucket (from
:mod:`pipeline.metrics.figures`); ROC and precision-recall curves of the progression classifiers per
source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.downstream.metrics import precision_recall_curve, roc_curve
from pipeline.metrics.figures import _plt, example_maps_figure, pick_examples

__all__ = ["example_maps_figure", "pick_examples", "roc_pr_figure"]


def roc_pr_figure(path: str | Path, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                  title: str = "Progression (72 months), test set") -> Path | None:
    """ROC (left) and precision-recall (right) curves; ``curves[source] = (labels 0/1, scores)``. Sources
    without both classes are skipped. The PR panel shows the prevalence (a random classifier's AP)."""
    plt = _plt()
    usable = {k: (np.asarray(y), np.asarray(s)) for k, (y, s) in curves.items()
              if len(y) and 0 < int(np.sum(y)) < len(y)}
    if not usable:
        return None
    from pipeline.downstream.metrics import average_precision, roc_auc

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
    for name, (y, s) in usable.items():
        fpr, tpr, _ = roc_curve(y, s)
        a1.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, s):.3f})")
        prec, rec, _ = precision_recall_curve(y, s)
        a2.step(rec, prec, where="post", label=f"{name} (AP {average_precision(y, s):.3f})")
    a1.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    prev = float(np.mean(next(iter(usable.values()))[0]))
    a2.axhline(prev, color="k", ls="--", lw=0.8, label=f"prevalence {prev:.2f}")
    a1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    a2.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    a1.legend(fontsize=7, loc="lower right")
    a2.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)

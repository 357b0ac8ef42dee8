"""The 3-class progression target of Panfilov et al. (ISBI 2022) from a knee's KLG at each protocol month.

The rule has ONE home, :func:`pipeline.cohort.disease.progression_labels` (the synthetic cohort writes its
``progression_3class`` column with it); this module re-exports it and adds the class names and the masks the
training and evaluation code needs, so nothing here restates the rule:

* ``0`` (:data:`NO_PROGRESSION`): no KLG increase within 96 months;
* ``1`` (:data:`FAST`): the first KLG increase is seen by 36 months;
* ``2`` (:data:`SLOW`): the first KLG increase is seen at 48-96 months (after 36);
* ``-1`` (:data:`EXCLUDED`): KLG 4 at baseline (cannot progress; excluded from training and metrics).

An increase from KLG 0 to KLG 1 is not progression (KLG 1 is "doubtful"); 0 -> 2 is. Months are integers
(0, 12, 24, 36, 48, 72, 96); every protocol month with a known KLG may be given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

from pipeline.cohort.disease import progression_labels

__all__ = ["CLASS_NAMES", "EXCLUDED", "FAST", "NO_PROGRESSION", "NUM_CLASSES", "SLOW", "any_progression",
           "included", "progression_class", "progression_labels"]

NO_PROGRESSION, FAST, SLOW, EXCLUDED = 0, 1, 2, -1
#: Class names, index = class label.
CLASS_NAMES: tuple[str, ...] = ("no progression", "fast (<= 36 m)", "slow (48-96 m)")
NUM_CLASSES = len(CLASS_NAMES)

LabelsLike = Union[Sequence[int], np.ndarray]


def progression_class(klg_by_month: Mapping[int, int]) -> int:
    """The 3-class label (0 none, 1 fast, 2 slow, -1 excluded) of one knee from ``{month: KLG}``; month 0
    (baseline) must be present. The rule: :func:`pipeline.cohort.disease.progression_labels`."""
    if 0 not in klg_by_month:
        raise ValueError(f"progression_class needs the baseline KLG (month 0), got months {sorted(klg_by_month)}")
    return int(progression_labels(dict(klg_by_month))[1])


def _labels(labels: LabelsLike) -> np.ndarray:
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    bad = sorted(set(np.unique(y).tolist()) - {EXCLUDED, NO_PROGRESSION, FAST, SLOW})
    if bad:
        raise ValueError(f"progression labels must be -1, 0, 1 or 2, got {bad}")
    return y


def included(labels: LabelsLike) -> np.ndarray:
    """Boolean mask of the knees that take part (label 0, 1 or 2; not KLG 4 at baseline)."""
    return _labels(labels) != EXCLUDED


def any_progression(labels: LabelsLike) -> np.ndarray:
    """Binary target of the metrics: 1 for fast or slow, 0 for none (int64). Excluded knees (-1) raise
    ``ValueError``: select them out with :func:`included` first."""
    y = _labels(labels)
    if (y == EXCLUDED).any():
        raise ValueError(f"{int((y == EXCLUDED).sum())} excluded knees (label -1, KLG 4 at baseline) have no "
                         "progression target; drop them with included(labels) first")
    return (y > NO_PROGRESSION).astype(np.int64)

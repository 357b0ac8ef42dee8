"""Labels and network inputs of the downstream classifiers.

* KLG task: every knee-visit with a known KLG; label = bucket index 0..3 (0-1 merged, 2, 3, 4).
* Progression task: manifest column ``progression_72m`` (KLG increase within 72 months of the first visit,
  binary); rows with -1 / NaN are excluded. The label describes the knee, not the visit, so by default
  only the FIRST visit of each knee is used (``visits="first"``): a later visit's map could already show
  the progression the label counts. ``visits="all"`` uses every visit.
* Input: the FC and TC maps of one source (``{fc, tc}: N x H x W`` mm, NaN outside) -> ``N x 2 x S x S``
  float32 (channel 0 FC, 1 TC; NaN-aware resize to ``S``, NaN -> 0, / 3 mm: the MRIS network convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.conventions import MAP_KEYS
from pipeline.downstream.metrics import klg_class
from pipeline.io.manifest import load_manifest
from transforms import FillNaN, ScaleThickness, nan_aware_resize

__all__ = ["PROGRESSION_COLUMN", "TASKS", "attach_progression", "classifier_inputs", "task_rows"]

PROGRESSION_COLUMN = "progression_72m"
#: Task name -> number of classes.
TASKS: dict[str, int] = {"klg": 4, "progression": 2}


def attach_progression(items: Sequence[dict], manifest: str | Path | pd.DataFrame) -> list[dict]:
    """Copies of ``items`` with ``progression`` = the manifest's ``progression_72m`` (0/1; -1 when missing,
    negative or NaN), joined on (subject_id, side, visit_month)."""
    df = manifest if isinstance(manifest, pd.DataFrame) else load_manifest(manifest)
    if PROGRESSION_COLUMN not in df.columns:
        raise ValueError(f"manifest has no {PROGRESSION_COLUMN!r} column (needed for the progression task)")
    lookup: dict[tuple[str, str, int], int] = {}
    for sid, side, month, val in zip(df["subject_id"].astype(str), df["side"].astype(str),
                                     df["visit_month"].astype(int), df[PROGRESSION_COLUMN]):
        v = pd.to_numeric(val, errors="coerce")
        lookup[(sid, side, int(month))] = int(v) if pd.notna(v) and v >= 0 else -1
    out = []
    for it in items:
        key = (str(it["subject_id"]), str(it["side"]), int(it["visit_month"]))
        if key not in lookup:
            raise KeyError(f"item {it['knee_id']} month {it['visit_month']} is not in the manifest")
        out.append({**it, "progression": lookup[key]})
    return out


def task_rows(items: Sequence[dict], task: str, visits: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """``(row indices into items, labels)`` of the samples of ``task`` (``"klg"`` or ``"progression"``).

    KLG: every item with ``klg`` in 0..4. Progression: items with ``progression`` 0/1 (see
    :func:`attach_progression`), the first visit of each knee unless ``visits="all"``.
    """
    if task == "klg":
        idx = [i for i, it in enumerate(items) if 0 <= int(it["klg"]) <= 4]
        return np.asarray(idx, dtype=np.int64), np.asarray([klg_class(items[i]["klg"]) for i in idx], dtype=np.int64)
    if task != "progression":
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if visits not in ("first", "all"):
        raise ValueError(f"visits must be 'first' or 'all', got {visits!r}")
    if any("progression" not in it for it in items):
        raise KeyError("items have no 'progression' label: call attach_progression first")
    idx = [i for i, it in enumerate(items) if it["progression"] in (0, 1)]
    if visits == "first":
        first: dict[str, int] = {}
        for i in idx:
            k = items[i]["knee_id"]
            if k not in first or items[i]["visit_month"] < items[first[k]]["visit_month"]:
                first[k] = i
        idx = sorted(first.values())
    return np.asarray(idx, dtype=np.int64), np.asarray([items[i]["progression"] for i in idx], dtype=np.int64)


_FILL = FillNaN(0.0)
_SCALE = ScaleThickness()


def classifier_inputs(maps: Mapping[str, np.ndarray], image_size: int,
                      rows: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """``{fc, tc}: N x H x W`` (mm, NaN outside) -> ``n x 2 x S x S`` float32 network inputs (NaN-aware
    resize to ``S``, NaN -> 0, / 3 mm) for ``rows`` (default all)."""
    n = len(maps[MAP_KEYS[0]])
    sel = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    out = torch.empty((len(sel), len(MAP_KEYS), int(image_size), int(image_size)), dtype=torch.float32)
    for j, i in enumerate(sel):
        for c, k in enumerate(MAP_KEYS):
            m = torch.as_tensor(np.asarray(maps[k][i], dtype=np.float32))[None]
            out[j, c] = torch.as_tensor(_SCALE(_FILL(nan_aware_resize(m, int(image_size)))))[0]
    return out

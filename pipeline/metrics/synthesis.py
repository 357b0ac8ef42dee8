"""Synthesis error of thickness maps, as MRIS reports it.

For each map: the absolute error ``|synth - truth|`` in mm on the pixels inside the footprint mask (zero
thickness inside the mask counts), summarised by its median and its MAD (median absolute deviation from
the median, scale 1, as ``scipy.stats.median_abs_deviation(scale=1)``). A table reports the MEAN over
maps of the per-map medians and MADs, over all maps and per KLG bucket ``0-1``, ``2``, ``3``, ``4``.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch

from pipeline.conventions import KLG_BUCKETS, klg_bucket

__all__ = ["median_abs_deviation", "per_map_errors", "synthesis_error_table", "synthesis_error_report"]

ArrayLike = Union[np.ndarray, torch.Tensor]
BUCKET_NAMES: tuple[str, ...] = tuple(klg_bucket(b[0]) for b in KLG_BUCKETS)


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def median_abs_deviation(x: ArrayLike, axis: int = -1) -> np.ndarray:
    """``median(|x - median(x)|)`` along ``axis`` (scale 1, float64); NaN propagates."""
    a = _np(x).astype(np.float64)
    med = np.median(a, axis=axis, keepdims=True)
    return np.median(np.abs(a - med), axis=axis)


def per_map_errors(synth: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> pd.DataFrame:
    """Median and MAD of ``|synth - truth|`` (mm) inside the mask, one row per map.

    Args:
        synth, truth: ``N x H x W`` maps in mm (``H x W`` for one map).
        mask: ``H x W`` (shared atlas footprint) or ``N x H x W`` bool; ``None``: the finite pixels of
            ``truth``, per map.

    Returns:
        DataFrame with columns ``median_mm``, ``mad_mm``, ``n_pixels`` (index = map number).

    Raises:
        ValueError: shape mismatches, an empty mask, or NaN inside the mask in ``synth`` or ``truth``.
    """
    s, t = _np(synth).astype(np.float64), _np(truth).astype(np.float64)
    if s.ndim == 2:
        s, t = s[None], t[None]
    if s.shape != t.shape or s.ndim != 3:
        raise ValueError(f"synth and truth must both be N x H x W, got {s.shape} and {t.shape}")
    m = np.isfinite(t) if mask is None else _np(mask).astype(bool)
    if m.ndim == 2:
        m = np.broadcast_to(m, t.shape)
    if m.shape != t.shape:
        raise ValueError(f"mask shape {m.shape} does not match maps {t.shape}")
    err = np.abs(s - t)
    bad = np.flatnonzero((m & ~np.isfinite(err)).any(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"NaN/inf inside the mask in maps {bad[:10].tolist()} (synth or truth)")
    counts = m.sum(axis=(1, 2))
    if (counts == 0).any():
        raise ValueError(f"empty mask for maps {np.flatnonzero(counts == 0)[:10].tolist()}")
    if bool((m == m[:1]).all()):  # shared footprint: vectorised
        vals = err[:, m[0]]
        med = np.median(vals, axis=1)
        mad = median_abs_deviation(vals, axis=1)
    else:
        med = np.array([np.median(e[mm]) for e, mm in zip(err, m)])
        mad = np.array([median_abs_deviation(e[mm]) for e, mm in zip(err, m)])
    return pd.DataFrame({"median_mm": med, "mad_mm": mad, "n_pixels": counts.astype(np.int64)})


def synthesis_error_table(
    synth: ArrayLike,
    truth: ArrayLike,
    mask: ArrayLike | None = None,
    klg: Sequence | np.ndarray | None = None,
) -> pd.DataFrame:
    """Mean over maps of the per-map median and MAD errors (mm), overall and per KLG bucket.

    Args:
        synth, truth, mask: see :func:`per_map_errors`.
        klg: ``N`` Kellgren-Lawrence grades (0..4; NaN/None = unknown: counted in ``all`` only).

    Returns:
        DataFrame with one row per group ``all``, ``0-1``, ``2``, ``3``, ``4`` and columns ``group``,
        ``n_maps``, ``median_mm``, ``mad_mm`` (NaN for an empty group).
    """
    per = per_map_errors(synth, truth, mask)
    groups = [("all", np.ones(len(per), dtype=bool))]
    if klg is not None:
        k = list(klg.tolist() if hasattr(klg, "tolist") else klg)
        if len(k) != len(per):
            raise ValueError(f"{len(k)} KLG values for {len(per)} maps")
        names = np.array(
            [None if v is None or (isinstance(v, float) and np.isnan(v)) else klg_bucket(v) for v in k]
        )
        groups += [(b, names == b) for b in BUCKET_NAMES]
    rows = []
    for name, sel in groups:
        n = int(sel.sum())
        rows.append(
            {
                "group": name,
                "n_maps": n,
                "median_mm": float(per["median_mm"][sel].mean()) if n else float("nan"),
                "mad_mm": float(per["mad_mm"][sel].mean()) if n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def synthesis_error_report(
    synth: Mapping[str, ArrayLike],
    truth: Mapping[str, ArrayLike],
    masks: Mapping[str, ArrayLike] | None = None,
    klg: Sequence | np.ndarray | None = None,
) -> pd.DataFrame:
    """:func:`synthesis_error_table` for several map keys (e.g. ``fc``, ``tc``), stacked with a ``map`` column."""
    missing = [key for key in synth if key not in truth]
    if missing:
        raise KeyError(f"no ground truth for map keys {missing}")
    tables = []
    for key in synth:
        tab = synthesis_error_table(synth[key], truth[key], None if masks is None else masks.get(key), klg)
        tab.insert(0, "map", key)
        tables.append(tab)
    return pd.concat(tables, ignore_index=True)

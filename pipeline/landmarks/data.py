"""Training data for the KNEEL stages: manifest -> knee items, subject-level folds, MONAI transforms.

Item dict (one knee at one visit; paths absolute): ``image`` (bilateral radiograph DICOM), ``side``
(``"R"``/``"L"``; the patient's right knee is the image's left half), ``layout`` (``"bilateral"``),
``landmarks`` (16 x 2 list, ``(x, y)`` ORIGINAL pixels, KNEEL order: tibial 0-8, femoral 9-15, each left
-> right in the image; 4 = joint centre), ``subject_id``, ``knee_id``, ``visit_month``.

Transform chain (:func:`stage_transforms`):

1. :class:`LoadKneeViewd` (deterministic, cached by ``CacheDataset``): DICOM -> a square VIEW at the stage's
   canvas spacing around the knee's field centre (global) or the true joint centre (local), NaN outside the
   image / the knee's half (:func:`pipeline.landmarks.geometry.make_view`).
2. :class:`RandKneeCanvasd`: the stage canvas from the view with random shift (global: field search;
   local: simulated global-stage error), rotation, zoom and horizontal flip composed into ONE sampling
   matrix; targets = the true landmarks mapped through the exact inverse of that matrix, permuted by
   ``FLIP_PERMUTATION`` whenever the canvas is mirrored (right knees, and the random flip) so index ``i``
   is always the ``i``-th landmark from the canvas' left in its group. Then percentile normalisation
   (min -> 0, p99 -> 0.99, clip [0, 1], no-image -> 0). With ``augment=False`` it is deterministic.
3. (training) MONAI ``RandAdjustContrastd`` (gamma) and ``RandGaussianNoised``.

Outputs: ``image`` ``(1, S, S)`` float32, ``label`` ``(n_points, 2)`` normalised canvas ``(x, y)``.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandomizableTransform,
    SelectItemsd,
)

from pipeline.conventions import N_LANDMARKS
from pipeline.geometry import apply_matrix, invert, permute_if_flipped
from pipeline.io.dicom import read_radiograph
from pipeline.io.manifest import load_manifest, resolve, split_subjects
from pipeline.landmarks.geometry import StageSpec, field_centre, knee_field, make_view, sample_canvas
from transforms import PercentileNormalize

__all__ = [
    "DEFAULT_SPLIT",
    "StageSpec",
    "manifest_items",
    "fold_subjects",
    "train_val_items",
    "split_items",
    "view_size_mm",
    "normalise_canvas",
    "LoadKneeViewd",
    "RandKneeCanvasd",
    "stage_transforms",
]

#: Default subject split: training subjects (cut into folds) and held-out test subjects.
DEFAULT_SPLIT: dict[str, float] = {"train": 0.8, "test": 0.2}


def manifest_items(manifest: str | Path | pd.DataFrame) -> list[dict[str, Any]]:
    """Knee items (module docstring) from a knee-visit manifest with ``landmarks`` (cohort manifests have it).

    Rows without landmarks are skipped. Items are sorted by image so the two knees of a radiograph follow
    each other (the DICOM is read once for both).
    """
    df = manifest if isinstance(manifest, pd.DataFrame) else load_manifest(manifest)
    if "landmarks" not in df.columns:
        raise ValueError(f"manifest {df.attrs.get('root', '')}: no 'landmarks' column (16 [x, y] pairs per knee, "
                         "KNEEL order); the synthetic cohort writes it")
    items = []
    for _, row in df.iterrows():
        lm = row.get("landmarks")
        if not isinstance(lm, str) or not lm:
            continue
        pts = np.asarray(json.loads(lm), dtype=float)
        if pts.shape != (N_LANDMARKS, 2) or not np.isfinite(pts).all():
            raise ValueError(f"subject {row['subject_id']} side {row['side']} month {row['visit_month']}: landmarks "
                             f"must be {N_LANDMARKS} finite [x, y] pairs, got shape {pts.shape}")
        sid = str(row["subject_id"])
        items.append({"image": str(resolve(df, row["xray_dicom"])), "side": str(row["side"]), "layout": "bilateral",
                      "landmarks": pts.tolist(), "subject_id": sid, "knee_id": f"{sid}_{row['side']}",
                      "visit_month": int(row["visit_month"])})
    items.sort(key=lambda it: (it["image"], it["side"]))
    return items


def split_items(items: Sequence[dict], fractions: Mapping[str, float] | None = None, seed: int = 0
                ) -> dict[str, list[dict]]:
    """``{set name: items}`` with a seeded SUBJECT-level split (:func:`pipeline.io.manifest.split_subjects`)."""
    fractions = dict(DEFAULT_SPLIT if fractions is None else fractions)
    assign = split_subjects([it["subject_id"] for it in items], fractions, seed=seed)
    out: dict[str, list[dict]] = {k: [] for k in fractions}
    for it in items:
        out[assign[it["subject_id"]]].append(it)
    return out


def fold_subjects(subjects: Sequence[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """Subjects cut into ``n_folds`` folds (seeded, order independent, sizes differ by at most 1)."""
    subs = sorted(set(map(str, subjects)))
    if n_folds < 1 or n_folds > max(1, len(subs)):
        raise ValueError(f"n_folds must be in 1..{len(subs)} (number of subjects), got {n_folds}")
    order = np.random.default_rng(seed + 12345).permutation(len(subs))
    return [sorted(subs[j] for j in order[f::n_folds]) for f in range(n_folds)]


def train_val_items(manifest: str | Path, split_fractions: Mapping[str, float] | None = None, split_seed: int = 0,
                    train_split: str = "train", n_folds: int = 5, fold: int = 0
                    ) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of the ``train_split`` subjects, cross-validation fold ``fold``
    of ``n_folds`` held out for validation (by subject). ``n_folds <= 1``: validate on the training items."""
    sets = split_items(manifest_items(manifest), split_fractions, split_seed)
    if train_split not in sets or not sets[train_split]:
        raise ValueError(f"no items in split {train_split!r} (splits: { {k: len(v) for k, v in sets.items()} })")
    items = sets[train_split]
    if n_folds <= 1:
        return items, items
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    val_subjects = set(fold_subjects([it["subject_id"] for it in items], n_folds, split_seed)[fold])
    return ([it for it in items if it["subject_id"] not in val_subjects],
            [it for it in items if it["subject_id"] in val_subjects])


def view_size_mm(spec: StageSpec, shift_mm: float, zoom_min: float = 1.0) -> float:
    """Side (mm) of a view that holds every canvas up to ``shift_mm`` off-centre, any rotation, zoom >= zoom_min."""
    return spec.canvas_mm / max(zoom_min, 1e-3) * math.sqrt(2.0) + 2.0 * math.sqrt(2.0) * shift_mm + 4 * spec.canvas_spacing_mm


_NORMALISE = PercentileNormalize(percentile=99.0, target=0.99, clip=True, nan_fill=0.0)


def normalise_canvas(canvas: np.ndarray) -> np.ndarray:
    """Canvas intensities: min -> 0, 99th percentile -> 0.99, clipped to [0, 1], over the pixels that show
    the image; pixels without image (NaN) -> 0 (:class:`transforms.PercentileNormalize`)."""
    return _NORMALISE(torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32))).numpy()


class _ImageCache:
    """A tiny thread-safe LRU of decoded radiographs (the two knees of an image are loaded back to back)."""

    def __init__(self, size: int = 2) -> None:
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, path: str) -> tuple[np.ndarray, dict]:
        with self._lock:
            if path in self._d:
                self._d.move_to_end(path)
                return self._d[path]
        val = read_radiograph(path)
        with self._lock:
            self._d[path] = val
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return val


class LoadKneeViewd(MapTransform):
    """Deterministic: radiograph path -> the stage's view of one knee (module docstring, step 1).

    Reads ``data["image"]`` (path), ``side``, ``layout`` and (local stage) ``landmarks``; writes ``view``
    (float32 ``(n, n)``, NaN outside), ``view_matrix`` (3 x 3, view px -> original px), ``view_centre``
    (original ``(x, y)``: global = the knee field's centre, local = the true joint centre) and ``spacing_rc``
    (original ``(row, col)`` mm). ``image`` is removed (the view replaces it).

    Args:
        spec: the stage.
        shift_mm, zoom_min: the largest random shift and smallest zoom the canvases will use (view size).
    """

    def __init__(self, spec: StageSpec, shift_mm: float = 0.0, zoom_min: float = 1.0, cache_images: int = 2) -> None:
        super().__init__(["image"])
        self.spec = spec
        self.view_mm = view_size_mm(spec, shift_mm, zoom_min)
        self._cache = _ImageCache(cache_images)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img, meta = self._cache.get(str(d["image"]))
        spacing = tuple(float(s) for s in meta["spacing_mm"])
        box = knee_field(img.shape, d["side"], d.get("layout", "bilateral"))
        if self.spec.stage == "global":
            centre = field_centre(box)
        else:
            centre = tuple(np.asarray(d["landmarks"], dtype=float)[4])
        view, m = make_view(img, spacing, centre, self.view_mm, self.spec.canvas_spacing_mm, valid_box=box)
        d.pop("image")
        d.update({"view": view, "view_matrix": m, "view_centre": np.asarray(centre, dtype=np.float64),
                  "spacing_rc": np.asarray(spacing, dtype=np.float64)})
        return d


class RandKneeCanvasd(RandomizableTransform, MapTransform):
    """View -> stage canvas ``image`` ``(1, S, S)`` and targets ``label`` ``(n_points, 2)`` (module docstring).

    Args:
        spec: the stage.
        augment: False = deterministic canvas centred on ``view_centre`` (validation / inference path).
        shift_mm: canvas centre offset, uniform in ``[-shift_mm, shift_mm]`` per axis (mm).
        rotate_deg: rotation uniform in ``[-rotate_deg, rotate_deg]``.
        zoom_range: zoom factor range (``> 1`` magnifies).
        prob_flip: probability of an extra horizontal flip (landmark indices permuted accordingly).
        flip_side: side whose canvases are mirrored to show a left knee (``"R"``); None = never.
    """

    def __init__(self, spec: StageSpec, augment: bool = True, shift_mm: float = 0.0, rotate_deg: float = 0.0,
                 zoom_range: Sequence[float] = (1.0, 1.0), prob_flip: float = 0.0, flip_side: str | None = "R") -> None:
        MapTransform.__init__(self, ["view"])
        RandomizableTransform.__init__(self, prob=1.0)
        self.spec, self.augment = spec, bool(augment)
        self.shift_mm, self.rotate_deg = float(shift_mm), float(rotate_deg)
        self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))
        self.prob_flip, self.flip_side = float(prob_flip), flip_side
        self._shift, self._angle, self._zoom, self._flip = np.zeros(2), 0.0, 1.0, False

    def randomize(self, data: Any = None) -> None:
        if not self.augment:
            self._shift, self._angle, self._zoom, self._flip = np.zeros(2), 0.0, 1.0, False
            return
        self._shift = self.R.uniform(-self.shift_mm, self.shift_mm, size=2)
        self._angle = math.radians(self.R.uniform(-self.rotate_deg, self.rotate_deg))
        self._zoom = float(self.R.uniform(*self.zoom_range))
        self._flip = bool(self.R.rand() < self.prob_flip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        sr, sc = (float(s) for s in d["spacing_rc"])
        centre = np.asarray(d["view_centre"], dtype=np.float64) + self._shift / np.array([sc, sr])
        flipped = (self.flip_side is not None and d["side"] == self.flip_side) != self._flip
        canvas, m = sample_canvas(d["view"], d["view_matrix"], self.spec.canvas_spacing_mm, centre, self.spec,
                                  angle_rad=self._angle, zoom=self._zoom, flip=flipped)
        d["image"] = normalise_canvas(canvas)[None]
        d["canvas_matrix"] = m
        d["flipped"] = flipped
        if "landmarks" in d and d["landmarks"] is not None:
            pts = np.asarray(d["landmarks"], dtype=np.float64)
            target = permute_if_flipped(apply_matrix(invert(m), pts), flipped)
            target = target[list(self.spec.point_indices)] if self.spec.stage == "global" else target
            d["label"] = ((target + 0.5) / self.spec.canvas_size).astype(np.float32)
        return d


def stage_transforms(spec: StageSpec, train: bool, aug: Mapping[str, Any] | None = None) -> Compose:
    """The full chain (module docstring). ``aug`` keys: ``shift_mm``, ``rotate_deg``, ``zoom_range``,
    ``prob_flip``, ``prob_gamma``, ``gamma_range``, ``prob_noise``, ``noise_std`` (training only)."""
    a = dict(aug or {})
    zoom = tuple(a.get("zoom_range", (1.0, 1.0)))
    chain: list = [LoadKneeViewd(spec, shift_mm=float(a.get("shift_mm", 0.0)), zoom_min=min(zoom) if train else 1.0)]
    chain.append(RandKneeCanvasd(spec, augment=train, shift_mm=a.get("shift_mm", 0.0), rotate_deg=a.get("rotate_deg", 0.0),
                                 zoom_range=zoom, prob_flip=a.get("prob_flip", 0.0)))
    if train:
        chain.append(RandAdjustContrastd("image", prob=float(a.get("prob_gamma", 0.0)),
                                         gamma=tuple(a.get("gamma_range", (0.7, 1.5)))))
        chain.append(RandGaussianNoised("image", prob=float(a.get("prob_noise", 0.0)), std=float(a.get("noise_std", 0.0))))
    chain.append(SelectItemsd(["image", "label"]))
    chain.append(EnsureTyped(["image", "label"], dtype=torch.float32, track_meta=False))
    return Compose(chain)

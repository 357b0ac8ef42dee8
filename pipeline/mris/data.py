"""Manifest -> MRIS item dicts, subject-level splits and MONAI transform chains.

Item dict (one knee at one visit), all paths absolute:

``image`` radiograph DICOM path, ``centre`` joint centre ``(x, y)`` in ORIGINAL radiograph pixels
(column, row; KNEEL landmark 4), ``side`` ``"R"``/``"L"``, ``fc``/``tc`` thickness-map ``.npy`` paths (mm,
NaN outside the footprint, left-knee atlas convention), ``subject_id`` (str), ``knee_id``
(``"<subject>_<side>"``), ``visit_month`` (int), ``klg`` (int, -1 if unknown), ``split`` (set name).

Transform outputs: ``image`` ``1 x S x S`` float32 in [0, 1] (right knees flipped to left orientation);
MRIS-C ``maps`` ``1 x 2S x S`` (FC rows ``[0, S)`` over TC rows ``[S, 2S)``, mm / 3, NaN -> 0);
MRIS-S ``fc`` and ``tc`` ``1 x S x S`` each (mm / 3, NaN -> 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Resized,
    SelectItemsd,
)

from pipeline.conventions import JOINT_CENTRE_IDX, MAP_KEYS, ROI_MM
from pipeline.io.manifest import load_manifest, resolve, split_subjects
from transforms import (
    FillNaNd,
    KneeROICropd,
    LoadKneeRadiographd,
    NaNAwareResized,
    PercentileNormalized,
    RandKneeAugmentd,
    ScaleThicknessd,
    StackThicknessMapsd,
)

#: Default split: the paper's metric-learning/database, downstream-training and test sets (by subject).
DEFAULT_FRACTIONS: dict[str, float] = {"database": 0.45, "downstream": 0.35, "test": 0.2}
VARIANTS = ("combined", "separate")
#: Keys kept in network batches (strings are collated into lists).
BATCH_META_KEYS = ("subject_id", "knee_id", "side", "visit_month", "klg")


def check_variant(variant: str) -> str:
    """Return ``variant`` (``"combined"`` = MRIS-C, ``"separate"`` = MRIS-S) or raise ``ValueError``."""
    v = str(variant).lower()
    aliases = {"c": "combined", "mris-c": "combined", "s": "separate", "mris-s": "separate"}
    v = aliases.get(v, v)
    if v not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} (or MRIS-C / MRIS-S), got {variant!r}")
    return v


def _centre_of(row: pd.Series) -> tuple[float, float]:
    if "joint_centre_x" in row and pd.notna(row.get("joint_centre_x")) and pd.notna(row.get("joint_centre_y")):
        return float(row["joint_centre_x"]), float(row["joint_centre_y"])
    if "landmarks" in row and isinstance(row.get("landmarks"), str):
        pts = np.asarray(json.loads(row["landmarks"]), dtype=float)
        return float(pts[JOINT_CENTRE_IDX, 0]), float(pts[JOINT_CENTRE_IDX, 1])
    raise ValueError(
        f"subject {row.get('subject_id')} side {row.get('side')} month {row.get('visit_month')}: no joint "
        "centre (needs joint_centre_x/joint_centre_y or landmarks)"
    )


def manifest_items(
    manifest: str | Path | pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    require_maps: bool = True,
) -> list[dict[str, Any]]:
    """Read a knee-visit manifest into item dicts with a seeded SUBJECT-level split (key ``split``).

    Args:
        manifest: CSV path (validated by :func:`pipeline.io.manifest.load_manifest`) or a loaded frame.
        fractions: ``{set name: fraction}`` (default :data:`DEFAULT_FRACTIONS`); a fraction of 0 gives an
            empty set.
        seed: split seed (the split is independent of row order).
        require_maps: drop rows without ``fc_map``/``tc_map`` (False keeps them with ``None`` paths).
    """
    df = manifest if isinstance(manifest, pd.DataFrame) else load_manifest(manifest)
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    assign = split_subjects(df["subject_id"].astype(str), fractions, seed=seed)
    items: list[dict[str, Any]] = []
    for _, row in df.iterrows():
        has_maps = all(isinstance(row.get(f"{k}_map"), str) and row.get(f"{k}_map") for k in MAP_KEYS)
        if require_maps and not has_maps:
            continue
        sid = str(row["subject_id"])
        klg = row.get("klg")
        items.append(
            {
                "image": str(resolve(df, row["xray_dicom"])),
                "centre": _centre_of(row),
                "side": str(row["side"]),
                **{k: (str(resolve(df, row[f"{k}_map"])) if has_maps else None) for k in MAP_KEYS},
                "subject_id": sid,
                "knee_id": f"{sid}_{row['side']}",
                "visit_month": int(row["visit_month"]),
                "klg": int(klg) if klg is not None and pd.notna(klg) else -1,
                "split": assign[sid],
            }
        )
    return items


def select(items: Sequence[dict], split: str | Sequence[str] | None = None, first_visit: bool = False,
           exclude_subjects: Sequence[str] | None = None, only_subjects: Sequence[str] | None = None) -> list[dict]:
    """Filter items by split name(s); ``first_visit`` keeps the earliest visit of each knee."""
    names = None if split is None else ({split} if isinstance(split, str) else set(split))
    out = [it for it in items if names is None or it["split"] in names]
    if exclude_subjects is not None:
        ex = set(map(str, exclude_subjects))
        out = [it for it in out if it["subject_id"] not in ex]
    if only_subjects is not None:
        keep = set(map(str, only_subjects))
        out = [it for it in out if it["subject_id"] in keep]
    if first_visit:
        best: dict[str, dict] = {}
        for it in out:
            if it["knee_id"] not in best or it["visit_month"] < best[it["knee_id"]]["visit_month"]:
                best[it["knee_id"]] = it
        out = sorted(best.values(), key=lambda it: it["knee_id"])
    return out


def train_val_subjects(items: Sequence[dict], split: str = "database", val_fraction: float = 0.2,
                       seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the subjects of ``split`` into metric-learning training and validation subjects (seeded).

    ``val_fraction`` = 0 returns no validation subjects (then validate on the training subjects).
    """
    subjects = sorted({it["subject_id"] for it in items if it["split"] == split})
    if not subjects:
        raise ValueError(f"no subjects in split {split!r}")
    if val_fraction <= 0 or len(subjects) < 2:
        return subjects, []
    assign = split_subjects(subjects, {"train": 1.0 - val_fraction, "val": val_fraction}, seed=seed + 1)
    return [s for s in subjects if assign[s] == "train"], [s for s in subjects if assign[s] == "val"]


def train_items(manifest: str | Path, fractions: Mapping[str, float] | None = None, seed: int = 0,
                split: str = "database", val_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(training items: every visit of the training subjects, validation items: FIRST visit per knee)."""
    items = manifest_items(manifest, fractions, seed)
    tr, va = train_val_subjects(items, split, val_fraction, seed)
    train = select(items, split, only_subjects=tr)
    val = select(items, split, first_visit=True, only_subjects=va or tr)
    return train, val


def subject_ids(items: Sequence[dict]) -> list[str]:
    """``subject_id`` of every item (for :class:`pipeline.sampling.SubjectVisitSampler`)."""
    return [it["subject_id"] for it in items]


# --------------------------------------------------------------------------------------------- transforms
def radiograph_transforms(image_size: int = 256, roi_mm: float = ROI_MM, clip: bool = True) -> list:
    """Deterministic radiograph chain: DICOM -> 140 mm ROI (right flipped to left) -> [0, 1] -> S x S."""
    return [
        LoadKneeRadiographd("image"),
        KneeROICropd("image", centre_key="centre", side_key="side", roi_mm=roi_mm),
        PercentileNormalized("image", clip=clip),
        Resized("image", (image_size, image_size), mode="area"),
    ]


def radiograph_preprocessing(image_size: int | None, roi_mm: float = ROI_MM) -> dict[str, Any]:
    """What :func:`radiograph_transforms` feeds a network, as its checkpoint records it
    (:mod:`pipeline.nets.describe`): ``image_size`` (``None``: not known yet), ROI side and pixel spacing in mm,
    normalisation and orientation."""
    size = None if image_size is None else int(image_size)
    return {"image_size": size, "roi_mm": float(roi_mm), "spacing_mm": None if size is None else float(roi_mm) / size,
            "normalisation": "percentile: min -> 0, 99th percentile -> 0.99, clipped to [0, 1]",
            "orientation": "left knee (right knees mirrored)"}


def map_transforms(variant: str = "combined", image_size: int = 256) -> list:
    """Deterministic thickness-map chain: ``.npy`` (mm, NaN outside) -> NaN-aware resize -> NaN -> 0 ->
    / 3 mm -> MRIS-C: stacked ``maps`` (1 x 2S x S) | MRIS-S: ``fc``, ``tc`` (1 x S x S)."""
    keys = list(MAP_KEYS)
    return [
        LoadImaged(keys, reader="NumpyReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        *map_preprocess_transforms(variant, image_size),
    ]


def map_preprocess_transforms(variant: str = "combined", image_size: int = 256) -> list:
    """Network preprocessing of loaded maps ``{fc, tc}: 1 x H x W`` (mm, NaN outside) -> network input."""
    keys = list(MAP_KEYS)
    chain = [
        NaNAwareResized(keys, image_size),
        FillNaNd(keys, mask_key_postfix=None),
        ScaleThicknessd(keys),
    ]
    if check_variant(variant) == "combined":
        chain.append(StackThicknessMapsd(keys, output_key="maps", spatial_size=image_size, delete_keys=True))
    return chain


def network_keys(variant: str) -> list[str]:
    """Keys of the map inputs: ``["maps"]`` (MRIS-C) or ``["fc", "tc"]`` (MRIS-S)."""
    return ["maps"] if check_variant(variant) == "combined" else list(MAP_KEYS)


def mris_transforms(variant: str = "combined", image_size: int = 256, train: bool = False,
                    augment: bool = True, with_maps: bool = True, keep_meta: bool = False) -> Compose:
    """Full chain for a dataset. The deterministic part comes first (cached by ``CacheDataset``); with
    ``train`` and ``augment`` the per-sample :class:`transforms.RandKneeAugmentd` follows. Outputs are
    plain float32 tensors (metadata dropped unless ``keep_meta``) plus the :data:`BATCH_META_KEYS`."""
    chain = radiograph_transforms(image_size)
    tensor_keys = ["image"]
    if with_maps:
        chain += map_transforms(variant, image_size)
        tensor_keys += network_keys(variant)
    if not keep_meta:
        chain.append(SelectItemsd(tensor_keys + list(BATCH_META_KEYS)))
    if train and augment:
        chain.append(RandKneeAugmentd("image"))
    chain.append(EnsureTyped(tensor_keys, dtype=torch.float32, track_meta=keep_meta))
    return Compose(chain)

"""Manifest -> progression items, subject-level cross-validation folds, and the MR / radiograph transform chains.

Item (one knee at the baseline visit, label != -1), paths absolute:
``{"image": DESS NIfTI file or DICOM series folder, "xray": radiograph DICOM, "landmarks": 16 [x, y] px of the
original radiograph (KNEEL order), "side": "R"|"L", "subject_id": str, "label": 0 none | 1 fast | 2 slow,
"knee": "<subject_id>_<side>"}``. MR marker columns of the cohort (``bml_mm3``, ...) are ground truth and never
enter an item.

MR chain (:func:`mr_transforms`), output ``image`` float32 ``1 x S x H x W``:

1. load (MONAI ``LoadImaged`` with the ITK reader: a NIfTI file or a DICOM series folder, same geometry);
2. orient to :data:`AXCODES` ``"RPI"`` (``Orientationd``): spatial axis 0 = medial-lateral (sagittal slices,
   pointing to the patient's right before the flip), axis 1 = anterior -> posterior, axis 2 = superior ->
   inferior; each slice ``[s]`` is an AP x SI sagittal image (the in-plane layout of the DESS segmentation
   chain's ``PIR``, with the medial-lateral axis moved first);
3. right knees mirrored along axis 0 (:class:`transforms.knee_side.FlipToLeftKneed`; left-knee convention, DESIGN.md "Sides");
4. resampled to ``num_slices x size x size`` voxels (trilinear with anti-aliasing; the paper: 64 x 160 x 160);
5. per-volume min-max to [0, 1] (``ScaleIntensityd``).

With ``train=True`` the paper's augmentation follows (Randomizable MONAI dict transforms, after the
deterministic part so that ``CacheDataset`` caches it): a random in-plane crop (``crop_fraction`` of AP and SI,
every slice) resized back to ``size x size``, an in-plane rotation of +-``rotate_deg`` degrees (about the
medial-lateral axis), and a gamma in [0.5, 2] (``RandAdjustContrastd``, which keeps the [0, 1] range).

Radiograph chain (:func:`xray_transforms`), output ``image`` float32 ``1 x size x size``: the knee ROI of the
baseline radiograph around KNEEL landmark 4 (140 mm, right knees flipped to left), percentile-normalised to
[0, 1] and resized (``area``): the same transforms from ``transforms/`` as the MRIS radiograph chain.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandRotated,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
)

from pipeline.conventions import JOINT_CENTRE_IDX, N_LANDMARKS, ROI_MM
from pipeline.io.manifest import ManifestError, load_manifest, resolve
from transforms import KneeROICropd, LoadKneeRadiographd, PercentileNormalized
from transforms.knee_side import FLIP_META_KEY, FlipToLeftKneed

__all__ = ["AXCODES", "EXCLUDED_LABEL", "FLIP_META_KEY", "ML_AXIS", "REQUIRED_COLUMNS",
           "DESS_COLUMNS", "RadiographInputd", "folds_by_subject", "mr_transforms", "progression_items", "xray_transforms"]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Orientation of every volume (MONAI axis codes: the direction each axis points TO): medial-lateral, AP, SI.
AXCODES = "RPI"
#: RAS labels passed to ``Orientationd`` explicitly (no dependence on a MetaTensor "space" default).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Spatial axis (channel excluded) of the medial-lateral direction after :data:`AXCODES`.
ML_AXIS = 0
#: Meta-data key recording whether a volume was mirrored to the left-knee convention.
#: ``progression_3class`` of knees left out (KLG 4 at baseline).
EXCLUDED_LABEL = -1
#: Manifest columns an item needs (and at least one of :data:`DESS_COLUMNS`).
REQUIRED_COLUMNS = ("subject_id", "side", "visit_month", "xray_dicom", "landmarks", "progression_3class")
#: Columns holding the DESS input: a DICOM series folder, a NIfTI file.
DESS_COLUMNS = ("dess_dicom_dir", "dess_nifti")


# ------------------------------------------------------------------------------------------------ items
def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def progression_items(manifest: PathLike | pd.DataFrame, visit: int = 0, prefer: str = "nifti",
                      return_excluded: bool = False) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], int]:
    """One item per knee at ``visit`` (months; baseline 0) whose ``progression_3class`` is not -1.

    Args:
        manifest: a knee-visit CSV (validated by :func:`pipeline.io.manifest.load_manifest`; relative paths are
            resolved against its folder) or a frame loaded by it.
        visit: the visit month whose DESS volume is the input.
        prefer: ``"nifti"`` (``dess_nifti`` when the row has one, else the series folder ``dess_dicom_dir``; one
            file to read, the same input: tests compare them) or ``"dicom"`` (the other way round).
        return_excluded: also return how many knees were left out for label -1 (KLG 4 at baseline).

    Rows without any DESS path at ``visit`` are skipped (logged); a missing required column
    (:data:`REQUIRED_COLUMNS`) raises :class:`~pipeline.io.manifest.ManifestError` naming it. The number of
    knees excluded for label -1 is logged (INFO) and, with ``return_excluded``, returned. A manifest needs
    :data:`REQUIRED_COLUMNS` and at least one of :data:`DESS_COLUMNS`.
    """
    if prefer not in ("dicom", "nifti"):
        raise ValueError(f"prefer must be 'dicom' or 'nifti', got {prefer!r}")
    where = str(manifest) if not isinstance(manifest, pd.DataFrame) else "manifest"
    if isinstance(manifest, pd.DataFrame):
        df = manifest
        absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if absent:
            raise ManifestError(f"{where}: missing column(s) {absent} needed for progression items; "
                                f"present: {list(df.columns)}")
    else:
        df = load_manifest(manifest, require_columns=REQUIRED_COLUMNS)
    if not any(c in df.columns for c in DESS_COLUMNS):
        raise ManifestError(f"{where}: no DESS column (one of {list(DESS_COLUMNS)} is needed: a DICOM series folder "
                            f"or a NIfTI file per knee); present: {list(df.columns)}")
    rows = df[df["visit_month"].astype(int) == int(visit)]
    items: list[dict[str, Any]] = []
    excluded = no_image = 0
    for _, row in rows.iterrows():
        label = int(row["progression_3class"])
        if label == EXCLUDED_LABEL:
            excluded += 1
            continue
        if label not in (0, 1, 2):
            raise ManifestError(f"{where}: subject {row['subject_id']} side {row['side']}: progression_3class "
                                f"{label} is not -1, 0, 1 or 2")
        paths = [_text(row.get("dess_dicom_dir")), _text(row.get("dess_nifti"))]
        if prefer == "nifti":
            paths.reverse()
        image = next((p for p in paths if p), "")
        if not image:
            no_image += 1  # e.g. a visit without MR
            continue
        landmarks = row["landmarks"]
        pts = json.loads(landmarks) if isinstance(landmarks, str) else landmarks
        if np.asarray(pts, dtype=float).shape != (N_LANDMARKS, 2):
            raise ManifestError(f"{where}: subject {row['subject_id']} side {row['side']}: landmarks must be "
                                f"{N_LANDMARKS} [x, y] pairs")
        sid, side = str(row["subject_id"]), str(row["side"])
        items.append({"image": str(resolve(df, image)), "xray": str(resolve(df, row["xray_dicom"])),
                      "landmarks": [[float(x), float(y)] for x, y in pts], "side": side, "subject_id": sid,
                      "label": label, "knee": f"{sid}_{side}"})
    if excluded:
        logger.info("progression items: %d knee(s) excluded at month %d (progression_3class -1: KLG 4 at "
                    "baseline)", excluded, visit)
    if no_image:
        logger.warning("progression items: %d knee(s) at month %d have no DESS volume (dess_dicom_dir and "
                       "dess_nifti empty) and were skipped", no_image, visit)
    return (items, excluded) if return_excluded else items


def folds_by_subject(items: Sequence[Mapping[str, Any]], n_folds: int = 5, seed: int = 0
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` ``(train indices, validation indices)`` of ``items``: every subject's knees in one fold, every
    item validated exactly once, labels stratified where the subjects allow (scikit-learn
    ``StratifiedGroupKFold``, shuffled with ``seed``). Indices are sorted int arrays."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_folds = int(n_folds)
    groups = np.array([str(it["subject_id"]) for it in items])
    labels = np.array([int(it["label"]) for it in items])
    n_subjects = len(set(groups.tolist()))
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_subjects < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} subjects, got {n_subjects}")
    import warnings

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():  # "the least populated class has only k members": stratified where possible
        warnings.simplefilter("ignore", UserWarning)
        folds = [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(len(items)), labels, groups)]
    return folds


# ------------------------------------------------------------------------------------------- transforms
def mr_transforms(num_slices: int = 64, size: int = 160, train: bool = False, reader: str = "ITKReader",
                  crop_fraction: float = 0.875, rotate_deg: float = 15.0, gamma: tuple[float, float] = (0.5, 2.0),
                  prob: float = 0.5, keep_meta: bool = True) -> Compose:
    """The MR chain of the module docstring over dict items with ``image`` (path) and ``side``.

    Args:
        num_slices: S, sagittal slices (medial-lateral voxels) of the output.
        size: H = W, in-plane voxels (AP, SI) of the output.
        train: add the augmentation (random in-plane crop of ``crop_fraction`` resized back, rotation of
            +-``rotate_deg`` degrees in the sagittal plane, gamma in ``gamma``; each with probability ``prob``,
            the crop always).
        reader: MONAI image reader for NIfTI files and DICOM series folders alike.
        keep_meta: output a MetaTensor (affine, ``knee_flipped``) or, False, a plain tensor.
    """
    spatial = (int(num_slices), int(size), int(size))
    chain: list = [
        LoadImaged("image", reader=reader, image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes=AXCODES, labels=RAS_LABELS),
        FlipToLeftKneed("image", spatial_axis=ML_AXIS, default_side="L"),
        EnsureTyped("image", dtype=torch.float32),
        Resized("image", spatial_size=spatial, mode="trilinear", anti_aliasing=True),
        ScaleIntensityd("image", minv=0.0, maxv=1.0),
    ]
    if train:
        crop = max(1, int(round(float(crop_fraction) * int(size))))
        chain += [
            RandSpatialCropd("image", roi_size=(spatial[0], crop, crop), random_size=False),
            Resized("image", spatial_size=spatial, mode="trilinear"),
            RandRotated("image", range_x=math.radians(float(rotate_deg)), prob=float(prob), keep_size=True,
                        mode="bilinear", padding_mode="zeros"),
            RandAdjustContrastd("image", gamma=tuple(float(g) for g in gamma), prob=float(prob)),
        ]
    chain.append(EnsureTyped("image", dtype=torch.float32, track_meta=bool(keep_meta)))
    return Compose(chain)


class RadiographInputd(MapTransform):
    """Point ``image`` at the item's radiograph (``xray_key``) and set ``centre`` = KNEEL landmark 4 ``(x, y)``
    (original radiograph pixels) from ``landmarks``, for :func:`xray_transforms`."""

    def __init__(self, xray_key: str = "xray", landmarks_key: str = "landmarks", image_key: str = "image",
                 centre_key: str = "centre") -> None:
        super().__init__([xray_key])
        self.xray_key, self.landmarks_key = xray_key, landmarks_key
        self.image_key, self.centre_key = image_key, centre_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.image_key] = d[self.xray_key]
        pts = np.asarray(d[self.landmarks_key], dtype=float)
        d[self.centre_key] = (float(pts[JOINT_CENTRE_IDX, 0]), float(pts[JOINT_CENTRE_IDX, 1]))
        return d


def xray_transforms(size: int = 128, train: bool = False, roi_mm: float = ROI_MM, keep_meta: bool = False
                    ) -> Compose:
    """Radiograph chain (module docstring): item ``xray`` + ``landmarks`` + ``side`` -> ``image`` ``1 x size x
    size`` in [0, 1], left-knee convention. ``train`` adds a random in-plane rotation of +-15 degrees and a
    gamma in [0.5, 2] (each with probability 0.5), the MR augmentation's 2D counterpart."""
    chain: list = [
        RadiographInputd(),
        LoadKneeRadiographd("image"),
        KneeROICropd("image", centre_key="centre", side_key="side", roi_mm=roi_mm),
        PercentileNormalized("image", clip=True),
        Resized("image", (int(size), int(size)), mode="area"),
    ]
    if train:
        chain += [RandRotated("image", range_x=math.radians(15.0), prob=0.5, keep_size=True, padding_mode="zeros"),
                  RandAdjustContrastd("image", gamma=(0.5, 2.0), prob=0.5)]
    chain.append(EnsureTyped("image", dtype=torch.float32, track_meta=bool(keep_meta)))
    return Compose(chain)

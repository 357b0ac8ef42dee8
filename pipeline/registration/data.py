"""Data of segmentation-guided registration: pair-ready crops, the few-label split, and pair datasets.

A knee contributes one DXA crop and one radiograph crop, both ``H x W`` (256 x 256 in the cohort),
similarity-pre-aligned to the same canonical frame and in the left-knee convention (manifest columns
``dxa_crop``, ``dxa_crop_labels``, ``xray_crop``, ``xray_crop_labels``; schema in
``data_manifests/knee_visit.schema.json``). Arrays here are ``N x 1 x H x W``: images float32 in [0, 1],
bone labels int64 (0 background, 1 femur, 2 tibia, 3 fibula); rows = image rows (towards the feet),
columns = image columns.

Roles (:func:`split_roles`), by SUBJECT: ``train`` subjects give the DXA images (``n_labelled`` of them with
their manual labels, the rest unlabelled) and the radiographs (never their labels); ``test`` subjects give
the held-out DXA -> radiograph pairs whose labels only score results. The radiograph labels of training
subjects are never loaded (:func:`load_role_arrays` refuses them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from pipeline.io.manifest import load_manifest, resolve, split_subjects

NUM_CLASSES = 4
BONES = {1: "femur", 2: "tibia", 3: "fibula"}
CROP_COLUMNS = {"dxa": ("dxa_crop", "dxa_crop_labels"), "xray": ("xray_crop", "xray_crop_labels")}
#: The cohort command that writes the crops (quoted when a manifest lacks them).
COHORT_COMMAND = "python -m pipeline cohort --out demo_output/segreg_cohort -n 60 --no-mr --visits 0"


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as a float ``H x W`` array (rows, columns): NIfTI (stored (column, row), transposed
    here), PNG/TIFF/JPEG, MHA/NRRD (SimpleITK), ``.npy`` (rows first), or a single-frame DICOM (any other
    name; :func:`pipeline.io.dicom.read_radiograph`). A singleton axis is dropped. Raises ``ValueError`` naming
    the file for anything unreadable, not 2D or not finite."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    low = p.name.lower()
    try:
        if low.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asarray(nib.load(str(p)).dataobj, dtype=np.float64)
            arr = np.squeeze(arr)
            arr = arr.T if arr.ndim == 2 else arr
        elif low.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
        elif low.endswith((".png", ".tif", ".tiff", ".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im.convert("F") if im.mode not in ("I", "I;16", "F") else im)
        elif low.endswith((".mha", ".mhd", ".nrrd")):
            import SimpleITK as sitk

            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        else:
            from pipeline.io.dicom import read_radiograph

            arr, _ = read_radiograph(p, allow_missing_spacing=True)
    except Exception as e:  # noqa: BLE001 - reported with the file name
        from pipeline.io.validate import describe_exception

        msg = describe_exception(e)
        raise ValueError(msg if str(p) in msg else f"{p}: not a readable image ({msg})") from None
    arr = np.squeeze(np.asarray(arr, dtype=np.float64))
    if arr.ndim != 2:
        raise ValueError(f"{p}: expected a 2D image, got shape {tuple(np.shape(arr))}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{p}: the image holds NaN or infinite values")
    return arr


def resize_2d(arr: np.ndarray, size: int | None, labels: bool = False) -> np.ndarray:
    """Resample a 2D array to ``size x size`` (None: unchanged): linear for images, nearest for labels."""
    if size is None or arr.shape == (size, size):
        return arr
    zoom = (size / arr.shape[0], size / arr.shape[1])
    if labels:
        return ndimage.zoom(arr, zoom, order=0, grid_mode=True, mode="nearest")
    return ndimage.zoom(arr, zoom, order=1, grid_mode=True, mode="nearest")


def normalise_image(arr: np.ndarray) -> np.ndarray:
    """Min -> 0, 99.5th percentile -> 1, clipped to [0, 1] (images of either modality)."""
    lo, hi = float(arr.min()), float(np.percentile(arr, 99.5))
    if hi - lo <= 1e-8:
        raise ValueError("the image is constant (nothing to register)")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def check_labels(arr: np.ndarray, where: str) -> np.ndarray:
    """Integer bone labels from {0, 1, 2, 3} with at least one bone; ``ValueError`` naming ``where``."""
    if not np.allclose(arr, np.round(arr)):
        raise ValueError(f"{where}: label map holds non-integer values")
    lab = np.round(arr).astype(np.int64)
    bad = sorted(set(np.unique(lab).tolist()) - set(range(NUM_CLASSES)))
    if bad:
        raise ValueError(f"{where}: label values {bad[:5]} outside the bone table 0 background, 1 femur, "
                         "2 tibia, 3 fibula")
    if not (lab > 0).any():
        raise ValueError(f"{where}: the label map is empty (no bone labelled)")
    return lab


def load_crop(path: str | os.PathLike, size: int | None = None, labels: bool = False) -> np.ndarray:
    """One crop as ``1 x size x size``: image normalised to [0, 1] float32, or labels int64."""
    arr = read_image_2d(path)
    if labels:
        return resize_2d(check_labels(arr, str(path)), size, labels=True)[None].astype(np.int64)
    try:
        img = normalise_image(arr)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return resize_2d(img, size)[None].astype(np.float32)


def crop_table(manifest: str | os.PathLike) -> pd.DataFrame:
    """The knees with both crops: one row per (subject, side) at the DXA visit, absolute paths.

    Raises :class:`pipeline.io.manifest.ManifestError` when the crop columns are missing or empty."""
    from pipeline.io.manifest import ManifestError

    cols = [c for pair in CROP_COLUMNS.values() for c in pair]
    df = load_manifest(manifest, require_columns=cols)
    has = np.ones(len(df), bool)
    for c in cols:
        has &= df[c].fillna("").astype(str).str.len().gt(0).to_numpy()
    df = df[has]
    if df.empty:
        raise ManifestError(f"{manifest}: no row has all of {cols}; make a cohort with DXA crops: "
                            f"`{COHORT_COMMAND}`")
    out = df[["subject_id", "side", "visit_month"]].copy()
    for c in cols:
        out[c] = [str(resolve(df, v)) for v in df[c]]
    out = out.sort_values(["subject_id", "side", "visit_month"]).drop_duplicates(["subject_id", "side"])
    return out.reset_index(drop=True)


@dataclass
class Roles:
    """Which knee (row of :func:`crop_table`) plays which part; lists of row indices."""

    labelled_dxa: list[int]
    unlabelled_dxa: list[int]
    train_xray: list[int]
    test: list[int]
    subjects: dict[str, str] = field(default_factory=dict)  #: subject -> "train" / "test"

    def summary(self) -> dict:
        return {"labelled_dxa": len(self.labelled_dxa), "unlabelled_dxa": len(self.unlabelled_dxa),
                "train_xray": len(self.train_xray), "test_pairs": len(self.test)}


def split_roles(table: pd.DataFrame, n_labelled: int = 5, test_fraction: float = 0.25, seed: int = 0) -> Roles:
    """Split knees by subject into training and held-out test knees; ``n_labelled`` training DXA images
    (drawn with ``seed``) keep their manual labels. Raises ``ValueError`` when too few knees remain."""
    subjects = split_subjects(table["subject_id"], {"train": 1.0 - test_fraction, "test": test_fraction}, seed)
    role = table["subject_id"].map(subjects).to_numpy()
    train = [int(i) for i in np.nonzero(role == "train")[0]]
    test = [int(i) for i in np.nonzero(role == "test")[0]]
    if len(train) < n_labelled + 2 or not test:
        raise ValueError(f"{len(table)} knees are too few for {n_labelled} labelled DXA images, unlabelled ones and "
                         f"test pairs: generate more subjects (`{COHORT_COMMAND}`)")
    rng = np.random.default_rng(seed)
    labelled = sorted(int(i) for i in rng.choice(train, size=n_labelled, replace=False))
    unlabelled = [i for i in train if i not in labelled]
    return Roles(labelled, unlabelled, train, test, subjects)


def load_roles(manifest: str | os.PathLike, n_labelled: int = 5, test_fraction: float = 0.25,
               seed: int = 0) -> tuple[pd.DataFrame, Roles]:
    """:func:`crop_table` of ``manifest`` and its :func:`split_roles` (what every stage and the evaluation start
    from)."""
    table = crop_table(manifest)
    return table, split_roles(table, n_labelled=n_labelled, test_fraction=test_fraction, seed=seed)


def load_role_arrays(table: pd.DataFrame, rows: Sequence[int], column: str, size: int | None = None,
                     allow_xray_labels: bool = False) -> np.ndarray:
    """Stack the crops of ``rows`` from ``column`` as ``N x 1 x size x size``.

    ``xray_crop_labels`` exist only to score results: loading them needs ``allow_xray_labels=True``, which
    only the evaluation passes."""
    if column == CROP_COLUMNS["xray"][1] and not allow_xray_labels:
        raise PermissionError("radiograph labels are for scoring only; training must not read them")
    labels = column.endswith("_labels")
    arrs = [load_crop(table[column].iloc[i], size, labels=labels) for i in rows]
    return np.stack(arrs) if arrs else np.zeros((0, 1, size or 0, size or 0), np.int64 if labels else np.float32)


def onehot(labels: torch.Tensor | np.ndarray, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """``N x 1 x H x W`` integer labels -> ``N x C x H x W`` float one-hot."""
    lab = torch.as_tensor(labels).long()
    return torch.nn.functional.one_hot(lab[:, 0], num_classes).permute(0, 3, 1, 2).float()


def all_pairs(n_moving: int, n_fixed: int, same_pool: bool, max_pairs: int | None = None,
              seed: int = 0) -> list[tuple[int, int]]:
    """Every ordered (moving, fixed) index pair (``same_pool``: pairs of one pool without (i, i)), shuffled
    with ``seed`` and cut to ``max_pairs``."""
    pairs = [(i, j) for i in range(n_moving) for j in range(n_fixed) if not (same_pool and i == j)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[k] for k in order]
    return pairs[:max_pairs] if max_pairs else pairs


class PairDataset(torch.utils.data.Dataset):
    """(moving, fixed) pairs from two pools of ``N x C x H x W`` arrays: item = ``{"moving": C x H x W,
    "fixed": C x H x W, "pair": (i, j)}`` (float32)."""

    def __init__(self, moving: np.ndarray, fixed: np.ndarray, pairs: Sequence[tuple[int, int]]):
        self.moving = torch.as_tensor(np.asarray(moving, dtype=np.float32))
        self.fixed = torch.as_tensor(np.asarray(fixed, dtype=np.float32))
        self.pairs = list(pairs)
        if not self.pairs:
            raise ValueError("no registration pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        i, j = self.pairs[k]
        return {"moving": self.moving[i], "fixed": self.fixed[j], "pair": torch.tensor([i, j])}

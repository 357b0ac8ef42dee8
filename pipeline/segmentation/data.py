"""Data lists for the DESS segmentation bundle: from a knee-visit manifest (subject-level splits) or
from a plain folder of DESS volumes (NIfTI files and/or DICOM series folders) for inference.

Every entry is a dict ``{"image": abs path, "label": abs path (manifest only), "side": "R"|"L",
"subject_id": str, ...}`` ready for ``LoadImaged(keys=["image", "label"])``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from pipeline.conventions import side_from_name
from pipeline.io.dicom import is_dicom_file, series_laterality
from pipeline.io.manifest import load_manifest, resolve, split_subjects

PathLike = Union[str, Path]

#: Default subject-level split fractions (train / val / test).
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def datalist_from_manifest(manifest_path: PathLike, split: Optional[str] = "train", seed: int = 0,
                           fractions: Optional[dict[str, float]] = None, image_column: str = "dess_nifti",
                           label_column: Optional[str] = "labels_nifti",
                           visits: Optional[Sequence[int]] = None) -> list[dict]:
    """Entries of one subject-level split of a knee-visit manifest.

    Args:
        manifest_path: CSV with columns ``subject_id, side, visit_month`` and the image / label columns
            (paths relative to the manifest's folder, or absolute).
        split: a key of ``fractions`` (``"train"``, ``"val"``, ``"test"``) or ``None`` / ``"all"`` for
            every row. Subjects (never knees or visits) are assigned with
            :func:`pipeline.io.manifest.split_subjects`, deterministic for ``seed``.
        seed: split seed.
        fractions: split fractions, default :data:`DEFAULT_FRACTIONS`.
        image_column: ``"dess_nifti"`` or ``"dess_dicom_dir"`` (a DICOM series folder).
        label_column: label-map column, or ``None`` for inference lists (no ``"label"`` key).
        visits: keep only these visit months (default: all).

    Rows whose image path is empty are skipped (e.g. ``dess_dicom_dir`` of a ``--no-mr-dicom`` cohort).
    """
    df = load_manifest(manifest_path)
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    if split not in (None, "all") and split not in fractions:
        raise ValueError(f"split must be one of {list(fractions)} or 'all', got {split!r}")
    for col in (image_column, label_column):
        if col is not None and col not in df.columns:
            raise ValueError(f"{manifest_path}: no column {col!r}; present: {list(df.columns)}")
    assignment = split_subjects(df["subject_id"].astype(str), fractions, seed=seed)
    out: list[dict] = []
    for row in df.itertuples(index=False):
        sid = str(row.subject_id)
        if split not in (None, "all") and assignment[sid] != split:
            continue
        if visits is not None and int(row.visit_month) not in set(map(int, visits)):
            continue
        img = getattr(row, image_column)
        if not isinstance(img, str) or not img:
            continue
        item = {"image": str(resolve(df, img)), "side": str(row.side), "subject_id": sid,
                "visit_month": int(row.visit_month), "split": assignment[sid]}
        if label_column is not None:
            item["label"] = str(resolve(df, getattr(row, label_column)))
        out.append(item)
    return out


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def side_from_path(path: PathLike) -> Optional[str]:
    """``"R"`` / ``"L"`` from a ``RIGHT`` / ``LEFT`` token in the path (last match wins), else ``None``."""
    return side_from_name(str(path))


def side_from_dicom(folder: PathLike) -> Optional[str]:
    """Laterality (0020,0060) or ImageLaterality (0020,0062) of the first readable DICOM file of a series folder
    (:func:`pipeline.io.dicom.series_laterality`)."""
    return series_laterality(folder)
    return None


def datalist_from_folder(folder: PathLike, default_side: str = "L", recursive: bool = True,
                         exclude: Sequence[str] = ("labels", "_seg")) -> list[dict]:
    """Inference entries for every NIfTI file and every DICOM series folder under ``folder``.

    A DICOM series is a folder holding at least one DICOM file (``.dcm`` or the ``DICM`` preamble).
    The side comes from the series' Laterality tag, else from a ``RIGHT`` / ``LEFT`` token in the
    path, else ``default_side`` (``side_source`` says which). Files whose name contains one of
    ``exclude`` (e.g. label maps, earlier predictions) are skipped. Unreadable files are NOT filtered
    here: they are listed so that inference records why they failed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    paths = sorted(root.rglob("*") if recursive else root.iterdir())
    items: list[dict] = []
    series_dirs: set[Path] = set()
    for p in paths:
        if not p.is_file() or any(x in p.name for x in exclude):
            continue
        if _is_nifti(p):
            side = side_from_path(p.relative_to(root))
            items.append({"image": str(p.resolve()), "side": side or default_side,
                          "side_source": "path" if side else "default", "subject_id": p.name.split(".")[0]})
        elif p.parent not in series_dirs and is_dicom_file(p):
            series_dirs.add(p.parent)
    for d in sorted(series_dirs):
        side, src = side_from_dicom(d), "dicom"
        if side is None:
            side = side_from_path(d.relative_to(root) if d != root else d.name)
            src = "path" if side else "default"
        items.append({"image": str(d.resolve()), "side": side or default_side, "side_source": src,
                      "subject_id": d.name})
    return sorted(items, key=lambda x: x["image"])


def build_datalist(source: PathLike, split: Optional[str] = "all", seed: int = 0,
                   with_labels: bool = False, default_side: str = "L", **kwargs) -> list[dict]:
    """Dispatch: a ``.csv`` manifest -> :func:`datalist_from_manifest`; a folder -> :func:`datalist_from_folder`.

    ``with_labels`` keeps the manifest's label column (evaluation); inference lists have no labels.
    """
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".csv":
        if not with_labels:
            kwargs.setdefault("label_column", None)
        return datalist_from_manifest(p, split=split, seed=seed, **kwargs)
    if p.is_dir():
        return datalist_from_folder(p, default_side=default_side, **kwargs)
    raise FileNotFoundError(f"input must be a manifest .csv or a folder of DESS volumes, got {source}")


def input_root(source: PathLike) -> str:
    """Folder that output paths are made relative to: the manifest's folder or the input folder."""
    p = Path(source).resolve()
    return str(p.parent if p.is_file() else p)

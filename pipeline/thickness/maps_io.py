"""Thickness maps from DESS label files: one knee, or a whole manifest / folder with failures recorded.

Inputs are label volumes (NIfTI, or a DICOM series folder readable by ITK) with the DESS label table;
outputs per knee (written through :mod:`pipeline.io.results`): ``<stem>_fc.npy`` / ``<stem>_tc.npy`` (float32
mm, NaN outside the fixed footprint, left-knee convention), ``<stem>_grid.json`` (atlas grid description +
coverage), a PNG with a colour bar (``<stem>.png``), and with ``dicom=True`` one DICOM Parametric Map per map
(``<stem>_fc.dcm`` / ``<stem>_tc.dcm``: values in mm, the patient / study of the item's DESS DICOM series, or a
generated study for NIfTI-only inputs; :mod:`pipeline.io.dicom_out`); for a batch also ``maps_manifest.csv``
(the bundle's outputs manifest: ``item, status, reason, outputs, dicom`` then the item's columns; ``status``
ok/failed, ``error`` = ``reason``, kept for older readers).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.conventions import side_from_name
from pipeline.io.atomic import write_text_atomic
from pipeline.io.results import FAILED, OK, MapResultWriter, manifest_row, write_manifest

from .atlas import labels_to_maps
from .grid import grid_description

#: File name of the thickness bundle's outputs manifest.
MAPS_MANIFEST = "maps_manifest.csv"


def read_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Label volume and its RAS affine from a NIfTI file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file not found: {path}")
    if path.is_dir():
        import itk

        img = itk.imread(str(path))
        arr = itk.array_view_from_image(img).T  # ITK arrays are (k, j, i)
        direction = np.asarray(img.GetDirection())
        sp = np.asarray(img.GetSpacing())
        origin = np.asarray(img.GetOrigin())
        lps = np.eye(4)
        lps[:3, :3] = direction * sp[None, :]
        lps[:3, 3] = origin
        return np.asarray(arr), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for non-images
        raise ValueError(f"cannot read {path} as NIfTI: {e}") from None
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label volume, got shape {data.shape}")
    return np.rint(data).astype(np.int16), img.affine


def knee_maps(labels_path: str | Path, side: str, out_dir: str | Path, stem: str, size=(310, 310),
              method: str = "volume", png: bool = True, dicom: bool = False, dicom_source: Any = None,
              study: dict | None = None) -> dict:
    """Compute and save the maps of one knee; returns a manifest row (paths relative to ``out_dir``; ``files``:
    every file written; ``note``: says when the DICOM maps got a generated study). ``dicom_source``: the DICOM whose identifiers the DICOM maps carry (default: the
    labels when they are a DICOM series folder); ``study``: names the generated study otherwise."""
    out_dir = Path(out_dir)
    labels, affine = read_labels(labels_path)
    res = labels_to_maps(labels, affine, side, size=tuple(size), method=method)
    if dicom_source is None and Path(labels_path).is_dir():
        dicom_source = labels_path
    writer = MapResultWriter(png=png, dicom=dicom, label="from DESS labels", model="thickness")
    files = writer.write_maps(out_dir, stem, {"fc": res.fc, "tc": res.tc}, prefix=f"{stem}_", png_layout="combined",
                              png_name=f"{stem}.png", title=f"{stem} ({side} knee, left-knee convention)",
                              source=dicom_source, study=study)
    desc = {k: grid_description(k, size) for k in ("fc", "tc")}
    desc["coverage"] = res.coverage
    desc["side_input"] = side
    desc["method"] = method
    desc["source"] = str(labels_path)
    write_text_atomic(out_dir / f"{stem}_grid.json", json.dumps(desc, indent=1))
    note = writer.notes.get(stem, "")
    return {"fc_map": f"{stem}_fc.npy", "tc_map": f"{stem}_tc.npy", "png": f"{stem}.png" if png else "",
            "coverage_fc": round(res.coverage["fc"], 4), "coverage_tc": round(res.coverage["tc"], 4),
            "files": [*files, out_dir / f"{stem}_grid.json"], "note": note}


def batch_maps(items: Iterable[dict], out_dir: str | Path, size=(310, 310), method: str = "volume",
               png: bool = True, progress: bool = True, dicom: bool = False) -> pd.DataFrame:
    """Maps for many knees. ``items``: dicts with ``labels`` (path), ``side`` and ``stem`` (+ optional
    ``dicom_source``, the DESS DICOM series of the knee, and any metadata columns to carry over; an item with
    a non-empty ``error`` failed upstream and is only recorded). A knee that fails is recorded
    (``status="failed"``, ``error``) and the batch goes on. Writes ``maps_manifest.csv`` in ``out_dir`` (the
    outputs manifest of :mod:`pipeline.io.results`); ``dicom``: DICOM Parametric Maps too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    items = list(items)
    for it in tqdm(items, desc="thickness maps", unit="knee", disable=not progress):
        row = {k: v for k, v in it.items()}
        files: list = []
        note = ""
        if row.get("error"):  # failed upstream (e.g. segmentation): recorded, not processed
            row["status"] = FAILED
        else:
            try:
                study = {"patient_id": it.get("subject_id") or it["stem"], "study_key": it.get("visit_month", "")}
                res = knee_maps(it["labels"], it["side"], out_dir, it["stem"], size=size, method=method, png=png,
                                dicom=dicom, dicom_source=it.get("dicom_source") or None, study=study)
                files, note = res.pop("files"), res.pop("note")
                row.update(res)
                row["status"], row["error"] = OK, ""
            except Exception as e:  # one knee must not stop the batch; the reason is recorded
                row["status"] = FAILED
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                row["traceback"] = traceback.format_exc(limit=3)
        rows.append(manifest_row(row.get("stem", ""), row["status"], row.get("error") or note, files, out_dir, row))
    return write_manifest(out_dir / MAPS_MANIFEST, rows)


def items_from_manifest(manifest: str | Path) -> list[dict]:
    """Batch items from a knee-visit manifest (uses ``labels_nifti``; ``dess_dicom_dir``, when present, names
    the DICOM series whose identifiers DICOM outputs carry)."""
    from pipeline.io.manifest import load_manifest, resolve

    m = load_manifest(manifest)
    has_dicom = "dess_dicom_dir" in m.columns
    return [{"labels": str(resolve(m, r.labels_nifti)), "side": r.side,
             "stem": f"{r.subject_id}_{r.side}_{int(r.visit_month):02d}", "subject_id": r.subject_id,
             "visit_month": int(r.visit_month),
             "dicom_source": str(resolve(m, r.dess_dicom_dir)) if has_dicom and isinstance(r.dess_dicom_dir, str)
             and r.dess_dicom_dir else ""}
            for r in m.itertuples() if isinstance(r.labels_nifti, str)]


def items_from_folder(folder: str | Path, side: str | None = None) -> list[dict]:
    """Batch items from a folder of label NIfTIs / DICOM series. The side comes from ``side`` or from the
    file name (:func:`pipeline.conventions.side_from_name`: ``RIGHT`` / ``LEFT`` tokens, else ``R`` / ``L``
    tokens such as ``*_R_*``); an item without a known side fails with a clear reason when processed."""
    folder = Path(folder)
    items = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        s = side or side_from_name(p.name, short_tokens=True)
        stem = p.name.split(".")[0]
        items.append({"labels": str(p), "side": s if s else "unknown", "stem": stem})
    return items


def items_from_segmentation(result: dict, output_dir: str | Path) -> list[dict]:
    """Batch items from a ``bundles/dess_seg`` inference result (``SafeInferenceRunner.run()``): one item per
    predicted label file (stem = its path below ``output_dir``), plus the segmentation failures as items
    that carry their ``error``."""
    out = Path(output_dir)
    items = []
    for p in result.get("predictions", []):
        path = Path(p["output"])
        try:
            rel = path.relative_to(out)
        except ValueError:
            rel = Path(path.name)
        stem = "_".join(rel.with_name(rel.name.split(".")[0]).parts)
        items.append({"labels": str(path), "side": p["side"], "stem": stem, "dess": p["image"],
                      "dicom_source": p["image"] if Path(p["image"]).is_dir() else "", "error": ""})
    for f in result.get("failures", []):
        items.append({"labels": "", "side": "", "stem": Path(str(f["image"])).name, "dess": f["image"],
                      "error": f"segmentation ({f.get('stage', '')}): {f.get('error', '')}"})
    return items

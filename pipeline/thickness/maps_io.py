"""Thickness maps from DESS label files: one knee, or a whole manifest / folder with failures recorded.

Inputs are label volumes (NIfTI, or a DICOM series folder readable by ITK) with the DESS label table;
outputs per knee: ``<stem>_fc.npy`` / ``<stem>_tc.npy`` (float32 mm, NaN outside the fixed footprint,
left-knee convention), ``<stem>_grid.json`` (atlas grid description + coverage), and a PNG with a colour
bar; for a batch also ``maps_manifest.csv`` (one row per knee, ``status`` ok/failed with the reason).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.conventions import side_from_name  # noqa: E402
from pipeline.io.atomic import atomic_path, write_text_atomic  # noqa: E402

from .atlas import labels_to_maps  # noqa: E402
from .grid import grid_description  # noqa: E402


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


def save_map_png(path: str | Path, fc: np.ndarray, tc: np.ndarray, title: str = "", vmax: float = 4.0) -> None:
    """FC and TC maps side by side with a shared colour bar (mm)."""
    fig, ax = plt.subplots(1, 2, figsize=(7.2, 3.4))
    for a, m, name in zip(ax, (fc, tc), ("femoral (FC)", "tibial (TC)")):
        im = a.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        a.set_title(name, fontsize=9)
        a.set_xlabel("medial  ->  lateral", fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
    ax[0].set_ylabel("anterior -> posterior", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.02, label="thickness (mm)")
    fig.suptitle(title, fontsize=9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def knee_maps(labels_path: str | Path, side: str, out_dir: str | Path, stem: str, size=(310, 310),
              method: str = "volume", png: bool = True) -> dict:
    """Compute and save the maps of one knee; returns a manifest row (paths relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    labels, affine = read_labels(labels_path)
    res = labels_to_maps(labels, affine, side, size=tuple(size), method=method)
    for kind in ("fc", "tc"):
        with atomic_path(out_dir / f"{stem}_{kind}.npy", suffix=".npy") as tmp:
            np.save(tmp, getattr(res, kind))
    desc = {k: grid_description(k, size) for k in ("fc", "tc")}
    desc["coverage"] = res.coverage
    desc["side_input"] = side
    desc["method"] = method
    desc["source"] = str(labels_path)
    write_text_atomic(out_dir / f"{stem}_grid.json", json.dumps(desc, indent=1))
    if png:
        save_map_png(out_dir / f"{stem}.png", res.fc, res.tc, title=f"{stem} ({side} knee, left-knee convention)")
    return {"fc_map": f"{stem}_fc.npy", "tc_map": f"{stem}_tc.npy", "png": f"{stem}.png" if png else "",
            "coverage_fc": round(res.coverage["fc"], 4), "coverage_tc": round(res.coverage["tc"], 4)}


def batch_maps(items: Iterable[dict], out_dir: str | Path, size=(310, 310), method: str = "volume",
               png: bool = True, progress: bool = True) -> pd.DataFrame:
    """Maps for many knees. ``items``: dicts with ``labels`` (path), ``side`` and ``stem`` (+ any metadata
    columns to carry over; an item with a non-empty ``error`` failed upstream and is only recorded). A knee
    that fails is recorded (``status="failed"``, ``error``) and the batch goes on. Writes
    ``maps_manifest.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    items = list(items)
    for it in tqdm(items, desc="thickness maps", unit="knee", disable=not progress):
        row = {k: v for k, v in it.items()}
        if row.get("error"):  # failed upstream (e.g. segmentation): recorded, not processed
            row["status"] = "failed"
            rows.append(row)
            continue
        try:
            row.update(knee_maps(it["labels"], it["side"], out_dir, it["stem"], size=size, method=method, png=png))
            row["status"], row["error"] = "ok", ""
        except Exception as e:  # one knee must not stop the batch; the reason is recorded
            row["status"] = "failed"
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            row["traceback"] = traceback.format_exc(limit=3)
        rows.append(row)
    df = pd.DataFrame(rows)
    write_text_atomic(out_dir / "maps_manifest.csv", df.to_csv(index=False))
    return df


def items_from_manifest(manifest: str | Path) -> list[dict]:
    """Batch items from a knee-visit manifest (uses ``labels_nifti``)."""
    from pipeline.io.manifest import load_manifest, resolve

    m = load_manifest(manifest)
    return [{"labels": str(resolve(m, r.labels_nifti)), "side": r.side,
             "stem": f"{r.subject_id}_{r.side}_{int(r.visit_month):02d}", "subject_id": r.subject_id,
             "visit_month": int(r.visit_month)} for r in m.itertuples() if isinstance(r.labels_nifti, str)]


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
        items.append({"labels": str(path), "side": p["side"], "stem": stem, "dess": p["image"], "error": ""})
    for f in result.get("failures", []):
        items.append({"labels": "", "side": "", "stem": Path(str(f["image"])).name, "dess": f["image"],
                      "error": f"segmentation ({f.get('stage', '')}): {f.get('error', '')}"})
    return items

"""MRIS inference: radiograph DICOM(s) + joint-centre landmarks -> synthesized FC/TC thickness maps.

Inputs
------
* ``input``: one DICOM file or a folder of DICOMs (not recursive; :func:`pipeline.io.dicom.list_radiographs`).
* ``landmarks``: a CSV with one row per knee, columns ``file`` (path relative to the input folder, or
  absolute, or just the file name), ``side`` (``R``/``L``; the patient's right knee is on the image's
  left) and ``x``, ``y`` = joint centre (KNEEL landmark 4) in ORIGINAL radiograph pixels (column, row).
  A cohort manifest (``xray_dicom``, ``side``, ``joint_centre_x``/``joint_centre_y`` or ``landmarks``) is
  accepted too, and so is the ``landmarks.csv`` written by the KNEEL bundle (``bundles/kneel``).
* ``kneel_global_ckpt`` / ``kneel_local_ckpt``: without a landmarks table, the knees are found by the KNEEL
  landmark model (:func:`pipeline.landmarks.infer.predict_knees`; the local checkpoint is optional); its
  per-knee status / confidence / flags are copied into the summary. With neither landmarks nor a global
  checkpoint :class:`LandmarksRequiredError` is raised.
* ``database_dir``: an embedding database built by ``evaluate.json`` with the SAME checkpoint
  (its hash is checked; another checkpoint raises ``CheckpointMismatchError``).

Outputs (``output_dir``)
------------------------
``<knee>/fc.npy``, ``<knee>/tc.npy`` (float32 ``H x W`` mm on the atlas grid, NaN outside the footprint,
LEFT-knee atlas convention: right knees are mirrored like the training data), ``<knee>/fc.png``,
``<knee>/tc.png`` (with colour bar), ``<knee>/neighbours.csv`` (rank, database row, subject, side, visit,
cosine similarity, weight), and ``summary.json`` (every knee: ok or the error; unreadable files named
with the reason; they do not stop the others).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose
from tqdm import tqdm

from pipeline.conventions import JOINT_CENTRE_IDX, MAP_KEYS
from pipeline.io.dicom import list_radiographs
from pipeline.mris.data import check_variant, radiograph_transforms
from pipeline.mris.engine import load_network_weights, unwrap
from pipeline.retrieval import EmbeddingDatabase, checkpoint_hash

logger = logging.getLogger(__name__)


class LandmarksRequiredError(ValueError):
    """No joint-centre landmarks were given for MRIS inference."""


def read_landmarks(path: str | Path | None, input_root: Path) -> pd.DataFrame:
    """Landmarks table -> DataFrame[file (absolute str), side, x, y]. See the module docstring."""
    if not _given(path):
        raise LandmarksRequiredError(
            "MRIS inference needs the knee-joint centre of every knee: pass a landmarks CSV with columns "
            "file, side, x, y (joint centre in original radiograph pixels) or a cohort manifest "
            "(xray_dicom, side, joint_centre_x, joint_centre_y), or let the KNEEL landmark model find the knees: "
            "pass kneel_global_ckpt (and optionally kneel_local_ckpt), trained with bundles/kneel."
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmarks file not found: {path}")
    df = pd.read_csv(path, dtype={"subject_id": str})
    rows = []
    if "xray_dicom" in df.columns:  # a cohort manifest
        base = path.parent
        for r in df.itertuples(index=False):
            r = r._asdict()
            if "joint_centre_x" in r and pd.notna(r.get("joint_centre_x")):
                x, y = float(r["joint_centre_x"]), float(r["joint_centre_y"])
            else:
                pts = np.asarray(json.loads(r["landmarks"]), dtype=float)
                x, y = pts[JOINT_CENTRE_IDX]
            f = Path(r["xray_dicom"])
            rows.append({"file": str(f if f.is_absolute() else (base / f).resolve()), "side": str(r["side"]),
                         "x": float(x), "y": float(y)})
        return pd.DataFrame(rows).drop_duplicates(["file", "side"])
    missing = [c for c in ("file", "side", "x", "y") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing landmark column(s) {missing}; expected file, side, x, y")
    for r in df.itertuples(index=False):
        side = str(r.side).strip().upper()[:1] if isinstance(r.side, str) else ""
        if side not in ("R", "L") or pd.isna(r.x) or pd.isna(r.y):
            continue  # e.g. an error row of a KNEEL landmarks.csv: reported as "no landmarks" below
        f = Path(str(r.file))
        if not f.is_absolute():
            f = (input_root / f) if (input_root / f).exists() else f
        rows.append({"file": str(f.resolve()) if f.exists() else str(r.file), "side": side,
                     "x": float(r.x), "y": float(r.y)})
    return pd.DataFrame(rows)


def _given(value: Any) -> bool:
    """False for None / "" / "none" (config values that mean "not given")."""
    return not (value is None or str(value).strip() == "" or str(value).strip().lower() == "none")


def detect_landmarks(files: list[Path], global_ckpt: Any, local_ckpt: Any = None, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[pd.DataFrame, dict[str, str]]:
    """Joint centres of every knee in ``files`` from the KNEEL model -> (landmarks table [file, side, x, y,
    landmark_status, landmark_confidence, landmark_message], {resolved file: reason} for files without a
    usable knee). Knees of unknown side (a single-knee image without laterality) are reported, not used."""
    from pipeline.landmarks.infer import predict_knees

    pred = predict_knees(files, global_ckpt, local_ckpt if _given(local_ckpt) else None, device=device,
                         progress=progress)
    rows, problems = [], {}
    for r in pred.to_dict(orient="records"):
        key = str(Path(r["file"]).resolve())
        if r["status"] == "error" or not np.isfinite([r["x"], r["y"]]).all():
            problems[key] = f"landmark model: {r['message']}"
            continue
        if r["side"] not in ("R", "L"):
            problems[key] = f"landmark model: knee side unknown ({r['message']})"
            continue
        rows.append({"file": key, "side": r["side"], "x": float(r["x"]), "y": float(r["y"]),
                     "landmark_status": r["status"], "landmark_confidence": float(r["confidence"]),
                     "landmark_message": r["message"]})
    cols = ["file", "side", "x", "y", "landmark_status", "landmark_confidence", "landmark_message"]
    return pd.DataFrame(rows, columns=cols), problems


def _match(files: list[Path], lm: pd.DataFrame) -> list[tuple[Path, list[dict]]]:
    by_path: dict[str, list[dict]] = {}
    by_name: dict[str, list[dict]] = {}
    for r in lm.to_dict(orient="records"):
        by_path.setdefault(str(Path(r["file"]).resolve()) if Path(r["file"]).exists() else r["file"], []).append(r)
        by_name.setdefault(Path(r["file"]).name, []).append(r)
    out = []
    for f in files:
        rows = by_path.get(str(f.resolve())) or by_name.get(f.name, []) if len(files) > 1 else (
            by_path.get(str(f.resolve())) or by_name.get(f.name) or lm.to_dict(orient="records"))
        out.append((f, rows or []))
    return out


def save_map_png(path: Path, m: np.ndarray, title: str, vmax: float | None = None) -> None:
    """PNG of one thickness map (mm) with a colour bar; NaN (outside the footprint) left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.4))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax if vmax is not None else float(np.nanmax(m)))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, label="thickness (mm)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_inference(network: torch.nn.Module, checkpoint: str | Path, input: str | Path,
                  database_dir: str | Path, output_dir: str | Path, landmarks: str | Path | None = None,
                  variant: str = "combined", image_size: int = 256, k: int = 20,
                  device: torch.device | str = "cpu", png: bool = True, progress: bool = True,
                  kneel_global_ckpt: Any = None, kneel_local_ckpt: Any = None) -> dict[str, Any]:
    """Synthesize FC/TC maps for every knee with landmarks; returns (and writes) the summary dict.

    Knees come from ``landmarks`` if given, else from the KNEEL model (``kneel_global_ckpt`` [+
    ``kneel_local_ckpt``]); with neither, :class:`LandmarksRequiredError` is raised."""
    variant = check_variant(variant)
    input = Path(input)
    if not input.exists():
        raise FileNotFoundError(f"input not found: {input}")
    root = input if input.is_dir() else input.parent
    files = list_radiographs(input) if input.is_dir() else [input]
    lm_problems: dict[str, str] = {}
    if _given(landmarks) or not _given(kneel_global_ckpt):
        lm = read_landmarks(landmarks, root)  # raises LandmarksRequiredError when neither is given
        source = "table"
    else:
        lm, lm_problems = detect_landmarks(files, kneel_global_ckpt, kneel_local_ckpt, device, progress)
        source = "kneel"
    load_network_weights(network, checkpoint)
    model = unwrap(network).to(device).eval()
    db = EmbeddingDatabase.load(database_dir, expected_checkpoint_hash=checkpoint_hash(checkpoint))
    k_used = min(int(k), len(db))
    chain = Compose(radiograph_transforms(image_size))
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    knees: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    jobs = _match(files, lm)
    for f, rows in tqdm(jobs, desc="MRIS inference", unit="file", disable=not progress):
        if not rows:
            failures.append({"file": str(f), "error": lm_problems.get(
                str(f.resolve()), "no landmarks for this file in the landmarks table")})
            continue
        for r in rows:
            name = f"{f.relative_to(root).as_posix().replace('/', '_') if f.is_relative_to(root) else f.name}_{r['side']}"
            try:
                x = chain({"image": str(f), "centre": (r["x"], r["y"]), "side": r["side"]})["image"]
                with torch.no_grad():
                    emb = model.embed_xray(torch.as_tensor(x)[None].float().to(device))
                if isinstance(emb, Mapping):
                    res = db.synthesize({kk: v.cpu() for kk, v in emb.items()}, k=k_used)
                    maps = {kk: res[kk].maps[0].numpy() for kk in MAP_KEYS}
                    nb = {kk: res[kk] for kk in MAP_KEYS}
                else:
                    res = db.synthesize(emb.cpu(), k=k_used)
                    maps = {kk: res.maps[kk][0].numpy() for kk in MAP_KEYS}
                    nb = {kk: res for kk in MAP_KEYS}
            except Exception as e:  # one bad file must not stop the others
                failures.append({"file": str(f), "side": r["side"], "error": f"{type(e).__name__}: {e}"})
                logger.warning("MRIS inference failed for %s (%s): %s", f, r["side"], e)
                continue
            kdir = out_dir / name
            kdir.mkdir(parents=True, exist_ok=True)
            nb_rows = []
            for kk in (MAP_KEYS if variant == "separate" else MAP_KEYS[:1]):
                res_k = nb[kk]
                for rank, (j, s, w) in enumerate(zip(res_k.indices[0].tolist(), res_k.similarities[0].tolist(),
                                                     res_k.weights[0].tolist()), start=1):
                    row = db.rows.iloc[j]
                    nb_rows.append({"space": kk if variant == "separate" else "combined", "rank": rank,
                                    "database_row": j, "subject_id": row.get("subject_id"), "side": row.get("side"),
                                    "visit_month": row.get("visit_month"), "similarity": s, "weight": w})
            pd.DataFrame(nb_rows).to_csv(kdir / "neighbours.csv", index=False)
            for kk in MAP_KEYS:
                np.save(kdir / f"{kk}.npy", maps[kk].astype(np.float32))
                if png:
                    save_map_png(kdir / f"{kk}.png", maps[kk], f"{name} synthesized {kk.upper()} (mm)")
            lm_info = {k: r[k] for k in ("landmark_status", "landmark_confidence", "landmark_message") if k in r}
            knees.append({"knee": name, "file": str(f), "side": r["side"], "centre_xy": [r["x"], r["y"]], **lm_info,
                          "folder": str(kdir), "mean_thickness_mm": {kk: float(np.nanmean(maps[kk])) for kk in MAP_KEYS},
                          "top1_similarity": float(nb[MAP_KEYS[0]].similarities[0, 0])})
    summary = {
        "convention": "maps are in the LEFT-knee atlas convention (right knees mirrored), mm, NaN outside the "
                      "cartilage footprint",
        "variant": variant, "checkpoint": str(checkpoint), "checkpoint_hash": db.checkpoint_hash,
        "database": str(database_dir), "database_size": len(db), "k": k_used,
        "landmarks_source": source if source == "table" else {
            "kneel_global_ckpt": str(kneel_global_ckpt), "kneel_local_ckpt": str(kneel_local_ckpt)},
        "n_files": len(files), "n_knees_ok": len(knees), "n_failed": len(failures),
        "knees": knees, "failures": failures,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

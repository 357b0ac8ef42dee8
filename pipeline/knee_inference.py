"""Per-knee inference over radiograph DICOMs, shared by every bundle that maps a knee ROI to thickness maps
(``bundles/mris``, ``bundles/direct_synthesis``).

* Knees: a landmarks table (:func:`read_landmarks`: ``file, side, x, y`` joint centres in ORIGINAL pixels, a
  cohort manifest, or the KNEEL bundle's ``landmarks.csv``) or the KNEEL model (:func:`detect_landmarks`);
  neither -> :class:`LandmarksRequiredError`.
* :func:`run_knees`: the fault-tolerant loop. For every knee: the ``preprocessing`` chain on
  ``{"image": path, "centre": (x, y), "side": "R"|"L"}``, the method's ``predict(x)`` on the ``1 x 1 x S x S``
  input, the ``writer`` (default :class:`KneeMapWriter`); one bad file or knee becomes a failure row with its
  reason and never stops the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.conventions import JOINT_CENTRE_IDX, MAP_KEYS
from pipeline.io.atomic import write_text_atomic
from pipeline.io.dicom import list_radiographs
from pipeline.user_errors import UserInputError

__all__ = ["KneeMapWriter", "KneeRun", "LandmarksRequiredError", "detect_landmarks", "find_knees",
           "read_landmarks", "run_knees", "save_map_png"]

logger = logging.getLogger(__name__)


class LandmarksRequiredError(UserInputError):
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


class KneeMapWriter:
    """Writes one knee's result into ``out_dir / name``: ``fc.npy`` / ``tc.npy`` (float32 mm, NaN outside the
    footprint), ``neighbours.csv`` when the method gives neighbours (MRIS) and, with ``png``, ``fc.png`` /
    ``tc.png`` (colour bar in mm, 0 to ``vmax`` or each map's maximum). The ``writer`` component of the
    inference configs; replace it there (``_target_``) to write another format. Returns the knee's folder."""

    def __init__(self, png: bool = True, vmax: float | None = None, label: str = "synthesized") -> None:
        self.png = bool(png)
        self.vmax = vmax
        self.label = label

    def __call__(self, out_dir: Path, name: str, maps: Mapping[str, np.ndarray],
                 neighbours: pd.DataFrame | None = None) -> Path:
        kdir = Path(out_dir) / name
        kdir.mkdir(parents=True, exist_ok=True)
        if neighbours is not None:
            neighbours.to_csv(kdir / "neighbours.csv", index=False)
        for kk in MAP_KEYS:
            np.save(kdir / f"{kk}.npy", np.asarray(maps[kk], dtype=np.float32))
            if self.png:
                save_map_png(kdir / f"{kk}.png", maps[kk], f"{name} {self.label} {kk.upper()} (mm)", vmax=self.vmax)
        return kdir


@dataclass
class KneeRun:
    """What :func:`find_knees` found: the files, their root, the knees per file, and the landmark source."""

    input: Path
    root: Path
    files: list[Path]
    jobs: list[tuple[Path, list[dict]]]
    source: Any
    problems: dict[str, str] = field(default_factory=dict)


def find_knees(input: str | Path, landmarks: Any = None, kneel_global_ckpt: Any = None, kneel_local_ckpt: Any = None,
               device: torch.device | str = "cpu", progress: bool = True) -> KneeRun:
    """The knees of ``input`` (a DICOM file or folder) from ``landmarks`` if given, else from the KNEEL model
    (``kneel_global_ckpt`` [+ ``kneel_local_ckpt``]); with neither, :class:`LandmarksRequiredError`."""
    input = Path(input)
    if not input.exists():
        raise FileNotFoundError(f"input not found: {input}")
    root = input if input.is_dir() else input.parent
    files = list_radiographs(input) if input.is_dir() else [input]
    if _given(landmarks) or not _given(kneel_global_ckpt):
        lm = read_landmarks(landmarks, root)  # raises LandmarksRequiredError when neither is given
        return KneeRun(input, root, files, _match(files, lm), "table")
    lm, problems = detect_landmarks(files, kneel_global_ckpt, kneel_local_ckpt, device, progress)
    source = {"kneel_global_ckpt": str(kneel_global_ckpt), "kneel_local_ckpt": str(kneel_local_ckpt)}
    return KneeRun(input, root, files, _match(files, lm), source, problems)


def knee_name(f: Path, root: Path, side: str) -> str:
    """Output folder name of one knee: the file's path under ``root`` with ``/`` -> ``_``, then ``_<side>``."""
    return f"{f.relative_to(root).as_posix().replace('/', '_') if f.is_relative_to(root) else f.name}_{side}"


def run_knees(run: KneeRun, preprocessing: Callable[[dict], dict],
              predict: Callable[[torch.Tensor], tuple[Mapping[str, np.ndarray], dict]],
              writer: Callable[..., Path], output_dir: str | Path, summary: Mapping[str, Any],
              desc: str = "inference", progress: bool = True) -> dict[str, Any]:
    """Every knee of ``run``: ``preprocessing`` -> ``predict(x)`` (``x``: ``1 x 1 x S x S`` float32 on the CPU)
    returning ``(maps {fc, tc} in mm, extras)`` -> ``writer(output_dir, name, maps, **writer_args)`` where
    ``extras["writer_args"]`` are passed on and the other extras go into the knee's summary record. Writes
    and returns ``summary.json`` = ``summary`` + landmark source, counts, knees and failures."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    knees: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for f, rows in tqdm(run.jobs, desc=desc, unit="file", disable=not progress):
        if not rows:
            failures.append({"file": str(f), "error": run.problems.get(
                str(f.resolve()), "no landmarks for this file in the landmarks table")})
            continue
        for r in rows:
            name = knee_name(f, run.root, r["side"])
            try:
                x = preprocessing({"image": str(f), "centre": (r["x"], r["y"]), "side": r["side"]})["image"]
                x = torch.as_tensor(x).as_subclass(torch.Tensor).float()[None]
                maps, extras = predict(x)
            except Exception as e:  # one bad file must not stop the others
                failures.append({"file": str(f), "side": r["side"], "error": f"{type(e).__name__}: {e}"})
                logger.warning("%s failed for %s (%s): %s", desc, f, r["side"], e)
                continue
            extras = dict(extras)
            kdir = writer(out_dir, name, maps, **extras.pop("writer_args", {}))
            lm_info = {k: r[k] for k in ("landmark_status", "landmark_confidence", "landmark_message") if k in r}
            knees.append({"knee": name, "file": str(f), "side": r["side"], "centre_xy": [r["x"], r["y"]], **lm_info,
                          "folder": str(kdir), "mean_thickness_mm": {kk: float(np.nanmean(maps[kk])) for kk in MAP_KEYS},
                          **extras})
    result = {**summary, "landmarks_source": run.source, "n_files": len(run.files), "n_knees_ok": len(knees),
              "n_failed": len(failures), "knees": knees, "failures": failures}
    write_text_atomic(out_dir / "summary.json", json.dumps(result, indent=2, default=str))
    return result

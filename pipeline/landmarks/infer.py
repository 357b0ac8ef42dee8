"""KNEEL inference: radiograph DICOM(s) -> joint centre + 16 landmarks per knee in ORIGINAL pixels.

:func:`predict_knees` is the library entry point (used by MRIS inference when no landmark CSV is given);
:func:`run_folder` is what ``bundles/kneel/configs/inference.json`` runs (CSV + overlay PNG per image).

Per image
---------
1. Read with :func:`pipeline.io.dicom.read_radiograph` (spacing from ImagerPixelSpacing/PixelSpacing,
   MONOCHROME1 inverted, rescale applied), once: :meth:`KneeLocaliser.locate` also takes an image the caller
   has decoded already and returns the pixels it used, so MRIS / direct-synthesis inference and the overlays
   go on with them. A file that cannot be read gives ONE row with ``status="error"`` and the reason; it never
   stops the other files.
2. Layout: ``bilateral`` (patient's right knee = image LEFT half, split at the middle column) or ``single``
   (one knee fills the image). ``layout="auto"``: ``ImageLaterality``/``Laterality`` ``R``/``L`` -> single
   knee of that side; otherwise bilateral if the image is at least ``min_bilateral_width_mm`` wide, else a
   single knee (side from the file name, else unknown ``""``).
3. Global stage on each knee's field -> joint centre; local stage on a canvas around it -> 16 landmarks
   (optionally again around the new centre, ``refine``). Right-knee canvases are mirrored (every canvas
   shows a left knee); the test-time flip (``tta``) runs every canvas mirrored too and averages. Several
   checkpoints per stage (cross-validation folds) are averaged. Canvas predictions are mapped back with the
   exact canvas matrices (:mod:`pipeline.landmarks.geometry`).
4. Quality flags (``low_confidence`` = True, reasons in ``message``): modality not a projection radiograph,
   a knee field smaller than ``min_field_mm``, a single-knee image where a bilateral one was asked for,
   spacing assumed, heat-map confidence below ``min_confidence``, the two stages or the test-time flip
   disagreeing by more than ``max_disagreement_mm``.

Output rows (one per knee): ``file``, ``side`` (``R``/``L``, ``""`` unknown), ``layout``, ``status`` (``ok`` |
``low_confidence`` | ``error``), ``x``, ``y`` (joint centre = landmark 4, or the global stage's centre without
a local model; ORIGINAL pixels, x = column, y = row), ``confidence`` (0-1, below), ``low_confidence``, ``message``,
``global_x``, ``global_y``, ``global_confidence``, ``local_confidence``, ``stage_disagreement_mm``,
``tta_disagreement_mm``, ``spacing_row_mm``, ``spacing_col_mm``, ``landmarks`` (JSON list of 16 ``[x, y]``,
KNEEL order: tibial 0-8, femoral 9-15, each left -> right in the image; ``""`` without a local model).

Confidence
----------
``confidence`` = ``global_confidence``: the probability mass of the global stage's heat map within 6 heat-map
pixels (24 canvas pixels; 48 mm on the 2 mm/px demo canvas) of its soft-argmax point. A soft-argmax network
trained with a coordinate loss only constrains the MEAN of its heat map, so the maps stay wide and this is a
RELATIVE signal: on the demo model, test knees give 0.65-0.74, a blanked-out half 0.33, noise 0.16, a shifted
field 0.20-0.24 (``bundles/kneel/docs/README.md``); ``min_confidence`` = 0.5 separates them there. Recalibrate it
for another model. ``local_confidence`` (mean over the 16 local maps, radius 4 heat-map pixels) is reported,
not thresholded. ``tta_disagreement_mm`` (largest landmark change when the canvases are mirrored) and
``stage_disagreement_mm`` are thresholded by ``max_disagreement_mm``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.conventions import JOINT_CENTRE_IDX, SIDES, side_from_name
from pipeline.geometry import apply_matrix, permute_if_flipped
from pipeline.io.atomic import write_text_atomic
from pipeline.io.dicom import RadiographReadError, list_radiographs, read_radiograph
from pipeline.io.dicom_out import write_secondary_capture
from pipeline.io.paths import contained_path, name_problems
from pipeline.io.results import (
    OUTPUTS_MANIFEST,
    item_name,
    manifest_row,
    save_csv,
    save_figure,
    write_manifest,
)
from pipeline.io.run_state import RunState, file_stamp, weights_digest
from pipeline.io.sharding import flatten
from pipeline.io.validate import radiograph_problems
from pipeline.landmarks.data import normalise_canvas
from pipeline.landmarks.engine import LandmarkCheckpointError, load_landmark_model
from pipeline.landmarks.geometry import LAYOUTS, StageSpec, field_centre, knee_field, make_view, sample_canvas
from pipeline.landmarks.network import KneelHourglass

logger = logging.getLogger(__name__)

__all__ = ["KneeLocaliser", "predict_knees", "run_folder", "save_overlay", "landmarks_array", "OUTPUT_COLUMNS",
           "RADIOGRAPH_MODALITIES"]

PathLike = Union[str, Path]
Checkpoints = Union[PathLike, Sequence[PathLike]]

#: DICOM modalities accepted without a flag (projection radiography, or unknown / other).
RADIOGRAPH_MODALITIES = ("DX", "CR", "RG", "DR", "OT", "")
OUTPUT_COLUMNS = ["file", "side", "layout", "status", "x", "y", "confidence", "low_confidence", "message",
                  "global_x", "global_y", "global_confidence", "local_confidence", "stage_disagreement_mm",
                  "tta_disagreement_mm", "spacing_row_mm", "spacing_col_mm", "landmarks"]


def _as_list(ckpt: Checkpoints | None) -> list[PathLike]:
    if ckpt is None or (isinstance(ckpt, str) and ckpt.strip().lower() in ("", "none")):
        return []
    if isinstance(ckpt, (str, Path)):
        return [ckpt]
    return list(ckpt)


def heatmap_confidence(probs: torch.Tensor, coords: torch.Tensor, radius_mm: float, canvas_mm: float) -> torch.Tensor:
    """Probability mass of each heat map within ``radius_mm`` of its soft-argmax point, ``(B, N)`` in [0, 1].

    ``probs`` ``(B, N, h, w)`` (each sums to 1), ``coords`` ``(B, N, 2)`` normalised; distances in mm are
    ``|delta normalised| * canvas_mm`` (a canvas is physically square).
    """
    _, _, h, w = probs.shape
    xs = (torch.arange(w, dtype=probs.dtype, device=probs.device) + 0.5) / w
    ys = (torch.arange(h, dtype=probs.dtype, device=probs.device) + 0.5) / h
    dx = (xs[None, None, None, :] - coords[..., 0, None, None]) * canvas_mm
    dy = (ys[None, None, :, None] - coords[..., 1, None, None]) * canvas_mm
    inside = (dx**2 + dy**2) <= radius_mm**2
    return (probs * inside).sum(dim=(-2, -1))


class _Stage:
    """The models of one stage (fold checkpoints averaged) and its canvas geometry."""

    def __init__(self, checkpoints: list[PathLike], stage: str, device: torch.device | str) -> None:
        self.models: list[KneelHourglass] = [load_landmark_model(p, device) for p in checkpoints]
        specs = {m.spec for m in self.models}
        if len(specs) != 1:
            raise LandmarkCheckpointError(f"{stage} checkpoints {[str(p) for p in checkpoints]} were trained for "
                                          f"different canvases: {sorted(s.to_dict().__repr__() for s in specs)}")
        self.spec: StageSpec = specs.pop()
        if self.spec.stage != stage:
            raise LandmarkCheckpointError(f"{checkpoints[0]} is a {self.spec.stage}-stage model; a {stage}-stage "
                                          "checkpoint was expected here")
        self.device = device

    @torch.no_grad()
    def predict(self, canvases: np.ndarray, tta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``canvases`` ``(B, S, S)`` normalised -> (mean normalised coords ``(B, N, 2)``, heat-map confidence
        ``(B, N)``, test-time-flip disagreement ``(B, N)`` in normalised units (0 without ``tta``))."""
        x = torch.from_numpy(np.ascontiguousarray(canvases, dtype=np.float32))[:, None].to(self.device)
        coords, confs, flipped = [], [], []
        for m in self.models:
            c, p = m.forward_heatmaps(x)
            coords.append(c)
            confs.append(heatmap_confidence(p, c, self.radius_mm, self.spec.canvas_mm))
            if tta:
                cf, pf = m.forward_heatmaps(torch.flip(x, dims=(-1,)))
                confs.append(heatmap_confidence(pf, cf, self.radius_mm, self.spec.canvas_mm))
                cf = cf.clone()
                cf[..., 0] = 1.0 - cf[..., 0]
                cf = torch.from_numpy(permute_if_flipped(cf.cpu().numpy(), True)).to(c.device)
                flipped.append(cf)
        c_main = torch.stack(coords).mean(0)
        if flipped:
            c_flip = torch.stack(flipped).mean(0)
            dis = (c_main - c_flip).norm(dim=-1)
            c_all = 0.5 * (c_main + c_flip)
        else:
            dis = torch.zeros(c_main.shape[:2])
            c_all = c_main
        conf = torch.stack(confs).mean(0)
        return c_all.cpu().numpy().astype(np.float64), conf.cpu().numpy(), dis.cpu().numpy()

    @property
    def radius_mm(self) -> float:
        """Confidence radius: 6 heat-map pixels (global) / 4 (local); a heat-map pixel is 4 canvas pixels."""
        return (6.0 if self.spec.stage == "global" else 4.0) * 4.0 * self.spec.canvas_spacing_mm


class KneeLocaliser:
    """Two-stage knee landmark localiser holding its loaded models (module docstring).

    Args:
        global_ckpt: global-stage checkpoint path, or several (fold models, averaged).
        local_ckpt: local-stage checkpoint(s), or None (then only the joint centre is predicted).
        device: torch device.
        layout: ``"auto"`` | ``"bilateral"`` | ``"single"`` (module docstring, step 2).
        tta: test-time horizontal flip (averaged; its disagreement is a quality signal).
        refine: run the local stage a second time around its own joint centre.
        min_confidence: knees whose confidence is below this are flagged ``low_confidence``.
        max_disagreement_mm: flag when the global and local centres, or the test-time flip, differ more.
        missing_spacing_mm: process files without pixel spacing at this spacing (flagged); None = error row.
        min_bilateral_width_mm: narrower images are not split in two (``auto``) or are flagged (``bilateral``).
        min_field_mm: knee fields smaller than this (either side, mm) are flagged.
    """

    def __init__(self, global_ckpt: Checkpoints, local_ckpt: Checkpoints | None = None,
                 device: torch.device | str = "cpu", layout: str = "auto", tta: bool = True, refine: bool = False,
                 min_confidence: float = 0.5, max_disagreement_mm: float = 10.0,
                 missing_spacing_mm: float | None = None, min_bilateral_width_mm: float = 200.0,
                 min_field_mm: float = 100.0) -> None:
        g = _as_list(global_ckpt)
        if not g:
            raise LandmarkCheckpointError("a global-stage landmark checkpoint is required (kneel_global_ckpt / "
                                          "global_ckpt; train one with bundles/kneel/configs/train.json --stage global)")
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be 'auto', 'bilateral' or 'single', got {layout!r}")
        self.device = torch.device(device) if isinstance(device, str) else device
        self.glob = _Stage(g, "global", self.device)
        loc = _as_list(local_ckpt)
        self.loc = _Stage(loc, "local", self.device) if loc else None
        self.layout, self.tta, self.refine = layout, bool(tta), bool(refine)
        self.min_confidence, self.max_disagreement_mm = float(min_confidence), float(max_disagreement_mm)
        self.missing_spacing_mm = None if missing_spacing_mm is None else float(missing_spacing_mm)
        self.min_bilateral_width_mm, self.min_field_mm = float(min_bilateral_width_mm), float(min_field_mm)

    # ------------------------------------------------------------------------------------------ helpers
    def _knees(self, path: Path, shape_hw: tuple[int, int], spacing_rc: tuple[float, float], meta: dict
               ) -> tuple[str, list[str], list[str]]:
        """(layout, sides, flags) for one image."""
        flags: list[str] = []
        width_mm = shape_hw[1] * spacing_rc[1]
        lat = str(meta.get("laterality", "")).strip().upper()
        lat = {"RIGHT": "R", "LEFT": "L", "BOTH": "B"}.get(lat, lat)
        name_side = side_from_name(path.name, short_tokens=True) or side_from_name(str(path))
        if self.layout == "bilateral" or (self.layout == "auto" and lat not in ("R", "L")
                                          and width_mm >= self.min_bilateral_width_mm):
            if lat in ("R", "L"):
                flags.append(f"ImageLaterality '{lat}' says one knee, but a bilateral image was expected")
            if width_mm < self.min_bilateral_width_mm:
                flags.append(f"image is {width_mm:.0f} mm wide; a bilateral knee radiograph is at least "
                             f"{self.min_bilateral_width_mm:.0f} mm wide (one knee may be missing)")
            return "bilateral", list(SIDES), flags
        if lat == "B" and self.layout == "auto":
            flags.append(f"ImageLaterality 'B' (both knees) but the image is only {width_mm:.0f} mm wide: processed "
                         "as a single knee (one knee may be missing)")
        side = lat if lat in ("R", "L") else (name_side or "")
        if not side:
            flags.append("single-knee image of unknown side (no ImageLaterality R/L, no side in the file name)")
        return "single", [side], flags

    def _stage_canvases(self, stage: _Stage, img: np.ndarray, spacing: tuple[float, float],
                        centres: list[tuple[float, float]], boxes: list[Any], flips: list[bool]
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
        spec = stage.spec
        canv, mats = [], []
        for centre, box, flip in zip(centres, boxes, flips):
            view, mv = make_view(img, spacing, centre, spec.canvas_mm + 4 * spec.canvas_spacing_mm,
                                 spec.canvas_spacing_mm, valid_box=box)
            c, m = sample_canvas(view, mv, spec.canvas_spacing_mm, centre, spec, flip=flip)
            canv.append(normalise_canvas(c))
            mats.append(m)
        return np.stack(canv), mats

    def _run_stage(self, stage: _Stage, img, spacing, centres, boxes, flips):
        """-> (points ORIGINAL px (B, N, 2) in image order, confidence (B,), tta disagreement mm (B,))."""
        canv, mats = self._stage_canvases(stage, img, spacing, centres, boxes, flips)
        coords, conf, dis = stage.predict(canv, self.tta)
        s = stage.spec.canvas_size
        pts = []
        for k, m in enumerate(mats):
            p = apply_matrix(m, coords[k] * s - 0.5)
            pts.append(permute_if_flipped(p, flips[k]))
        return np.stack(pts), conf.mean(axis=1), dis.max(axis=1) * stage.spec.canvas_mm

    # ------------------------------------------------------------------------------------------ public
    def predict_image(self, path: PathLike, image: Any = None, meta: dict | None = None) -> list[dict[str, Any]]:
        """Rows (module docstring) for one radiograph file; an unreadable file gives one ``error`` row.
        ``image`` / ``meta``: the file already decoded (:meth:`locate`)."""
        return self.locate(path, image, meta)[0]

    def locate(self, path: PathLike, image: Any = None, meta: dict | None = None
               ) -> tuple[list[dict[str, Any]], np.ndarray | None, dict | None]:
        """Rows for one radiograph and the radiograph itself, decoded once: ``(rows, image, meta)``.

        ``image`` / ``meta``: the file already decoded by :func:`pipeline.io.dicom.read_radiograph` -- ``image``
        ``(H, W)`` (or ``(1, H, W)``; numpy or torch; a MetaTensor brings its ``meta``) and ``meta`` its header
        record with ``spacing_mm`` = ``[row, col]`` mm (``spacing_known``, ``laterality``, ``Modality`` are read
        when present); without them the file is read here. They are returned (``image`` as float32 ``(H, W)``)
        so the caller can go on with the same pixels; ``(error rows, None, None)`` for a file that cannot be read.
        """
        path = Path(path)
        if image is None:
            try:
                image, meta = read_radiograph(path, allow_missing_spacing=self.missing_spacing_mm is not None)
            except RadiographReadError as e:
                return [_read_error_row(path, e)], None, None
            except Exception as e:  # noqa: BLE001 - never stop the folder
                return [_error_row(path, f"cannot read radiograph '{path}': {type(e).__name__}: {e}")], None, None
        else:
            image, meta = _decoded(path, image, meta)
            if not meta.get("spacing_known", True) and self.missing_spacing_mm is None:
                return [_read_error_row(path, RadiographReadError(path, "no pixel spacing"))], None, None
        try:
            return self._predict_array(path, image, meta), image, meta
        except Exception as e:  # noqa: BLE001 - never stop the folder
            logger.warning("landmark prediction failed for %s: %s", path, e)
            return [_error_row(path, f"landmark prediction failed for '{path}': {type(e).__name__}: {e}")], image, meta

    def _predict_array(self, path: Path, img: np.ndarray, meta: dict) -> list[dict[str, Any]]:
        errors, _ = radiograph_problems(img, meta)  # implausible spacing, blank image: no landmarks to trust
        if errors:
            return [_error_row(path, f"implausible radiograph '{path}': " + "; ".join(errors))]
        flags_img: list[str] = []
        spacing = tuple(float(s) for s in meta["spacing_mm"])
        if not meta.get("spacing_known", True):
            spacing = (self.missing_spacing_mm, self.missing_spacing_mm)
            flags_img.append(f"no pixel spacing in the file; assumed {self.missing_spacing_mm} mm")
        modality = str(meta.get("Modality", "")).strip().upper()
        if modality not in RADIOGRAPH_MODALITIES:
            flags_img.append(f"Modality '{modality}' is not a projection radiograph")
        layout, sides, flags_layout = self._knees(path, img.shape, spacing, meta)
        flags_img += flags_layout
        boxes = [knee_field(img.shape, s if layout == "bilateral" else "R", layout) for s in sides]
        flips = [s == "R" for s in sides]
        centres = [field_centre(b) for b in boxes]
        g_pts, g_conf, g_dis = self._run_stage(self.glob, img, spacing, centres, boxes, flips)
        g_centre = g_pts[:, 0, :]
        rows = []
        l_pts = l_conf = l_dis = None
        if self.loc is not None:
            centres2 = [tuple(c) for c in g_centre]
            for _ in range(2 if self.refine else 1):
                l_pts, l_conf, l_dis = self._run_stage(self.loc, img, spacing, centres2, [None] * len(sides), flips)
                centres2 = [tuple(p[JOINT_CENTRE_IDX]) for p in l_pts]
        for k, side in enumerate(sides):
            flags = list(flags_img)
            box = boxes[k]
            fw, fh = (box[1] - box[0]) * spacing[1], (box[3] - box[2]) * spacing[0]
            if min(fw, fh) < self.min_field_mm:
                flags.append(f"knee field is {fw:.0f} x {fh:.0f} mm; a knee radiograph needs at least "
                             f"{self.min_field_mm:.0f} mm (too small to hold a knee)")
            conf = float(g_conf[k])  # "is there a knee": the global heat map's concentration
            tta_dis = float(g_dis[k])
            row: dict[str, Any] = {"file": str(path), "side": side, "layout": layout,
                                   "global_x": float(g_centre[k, 0]), "global_y": float(g_centre[k, 1]),
                                   "global_confidence": float(g_conf[k]), "local_confidence": float("nan"),
                                   "stage_disagreement_mm": float("nan"), "spacing_row_mm": spacing[0],
                                   "spacing_col_mm": spacing[1], "landmarks": ""}
            x, y = g_centre[k]
            if l_pts is not None:
                x, y = l_pts[k, JOINT_CENTRE_IDX]
                tta_dis = max(tta_dis, float(l_dis[k]))
                d = (g_centre[k] - l_pts[k, JOINT_CENTRE_IDX]) * np.array([spacing[1], spacing[0]])
                row["stage_disagreement_mm"] = float(math.hypot(*d))
                row["local_confidence"] = float(l_conf[k])
                row["landmarks"] = json.dumps(np.round(l_pts[k], 3).tolist())
                if row["stage_disagreement_mm"] > self.max_disagreement_mm:
                    flags.append(f"global and local joint centres differ by {row['stage_disagreement_mm']:.1f} mm")
            if not (0.0 <= x <= img.shape[1] - 1 and 0.0 <= y <= img.shape[0] - 1):
                flags.append("predicted joint centre lies outside the image")
            if tta_dis > self.max_disagreement_mm:
                flags.append(f"prediction changes by {tta_dis:.1f} mm when the image is mirrored")
            if conf < self.min_confidence:
                flags.append(f"low heat-map confidence {conf:.2f} (< {self.min_confidence:.2f}): no clear knee found")
            row.update({"x": float(x), "y": float(y), "confidence": conf, "tta_disagreement_mm": tta_dis,
                        "low_confidence": bool(flags), "status": "low_confidence" if flags else "ok",
                        "message": "; ".join(flags)})
            rows.append(row)
        return rows

    def predict(self, paths: PathLike | Sequence[PathLike], progress: bool = True) -> pd.DataFrame:
        """Rows for every file (a folder is listed with :func:`pipeline.io.dicom.list_radiographs`)."""
        files = _files(paths)
        rows: list[dict[str, Any]] = []
        for f in tqdm(files, desc="KNEEL landmarks", unit="image", disable=not progress):
            rows += self.predict_image(f)
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _decoded(path: Path, image: Any, meta: dict | None) -> tuple[np.ndarray, dict]:
    """An already decoded radiograph as (float32 ``(H, W)``, header record with ``spacing_mm``)."""
    if meta is None:
        meta = getattr(image, "meta", None)
    if meta is None or "spacing_mm" not in meta:
        raise ValueError(f"a decoded radiograph of '{path}' needs its header record with spacing_mm ([row, col] mm)")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"a decoded radiograph must be (H, W) or (1, H, W), got shape {arr.shape} for '{path}'")
    return np.asarray(arr, dtype=np.float32), dict(meta)


def _read_error_row(path: Path, e: RadiographReadError) -> dict[str, Any]:
    if "no pixel spacing" in e.reason:
        return _error_row(path, f"cannot place landmarks in '{path}': no pixel spacing (neither ImagerPixelSpacing "
                                "nor PixelSpacing), so the image cannot be resampled to mm; pass "
                                "missing_spacing_mm=<mm> to assume a spacing")
    return _error_row(path, str(e))


def _error_row(path: Path, message: str) -> dict[str, Any]:
    return {"file": str(path), "side": "", "layout": "", "status": "error", "x": float("nan"), "y": float("nan"),
            "confidence": 0.0, "low_confidence": True, "message": message, "global_x": float("nan"),
            "global_y": float("nan"), "global_confidence": float("nan"), "local_confidence": float("nan"),
            "stage_disagreement_mm": float("nan"), "tta_disagreement_mm": float("nan"),
            "spacing_row_mm": float("nan"), "spacing_col_mm": float("nan"), "landmarks": ""}


def _files(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for p in items:
        p = Path(p)
        if p.is_dir():
            found = list_radiographs(p)
            if not found:
                logger.warning("folder %s holds no DICOM file", p)
            out += found
        else:
            out.append(p)
    return out


def predict_knees(paths: PathLike | Sequence[PathLike], global_ckpt: Checkpoints, local_ckpt: Checkpoints | None = None,
                  device: torch.device | str = "cpu", layout: str = "auto", tta: bool = True, refine: bool = False,
                  progress: bool = True, **kwargs: Any) -> pd.DataFrame:
    """Knee landmarks for radiograph files / folders (module docstring for the columns).

    ``x``, ``y`` is the joint centre (landmark 4; the global stage's centre when ``local_ckpt`` is None) in
    ORIGINAL pixels (x = column, y = row). ``kwargs`` go to :class:`KneeLocaliser` (``min_confidence``,
    ``missing_spacing_mm``, ...). Unreadable files give ``status="error"`` rows; nothing raises for a bad
    image (a missing or unsuitable checkpoint raises :class:`LandmarkCheckpointError`).
    """
    loc = KneeLocaliser(global_ckpt, local_ckpt, device=device, layout=layout, tta=tta, refine=refine, **kwargs)
    return loc.predict(paths, progress=progress)


def landmarks_array(df: pd.DataFrame) -> np.ndarray:
    """``(K, 16, 2)`` landmarks of a :func:`predict_knees` frame (NaN rows where there are none)."""
    out = np.full((len(df), 16, 2), np.nan)
    for i, v in enumerate(df["landmarks"].tolist()):
        if isinstance(v, str) and v:
            out[i] = np.asarray(json.loads(v), dtype=float)
    return out


def save_overlay(path: PathLike, image: np.ndarray, rows: Sequence[dict[str, Any]], max_side: int = 900,
                 title: str | None = None, truth_points: Sequence[Any] | None = None) -> Path:
    """PNG of ``image`` (written atomically; returns ``path``) with each knee's landmarks (tibial red, femoral cyan, joint centre yellow +, global-stage
    centre orange o), side and confidence; a knee flagged ``low_confidence`` is labelled in red with its first
    reason. ``truth_points``: optional ``(16, 2)`` reference landmarks per knee, drawn as white x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape
    step = max(1, int(math.ceil(max(h, w) / max_side)))
    small = image[::step, ::step]
    lo, hi = np.percentile(small, [1, 99.5])
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.4))
    ax.imshow(small, cmap="gray", vmin=lo, vmax=hi, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    for t in truth_points or []:
        t = np.asarray(t, dtype=float)
        ax.plot(t[:, 0], t[:, 1], "x", color="white", ms=4, mew=0.8)
    for r in rows:
        if not np.isfinite(r.get("x", np.nan)):
            continue
        col = "red" if r.get("low_confidence") else "lime"
        if isinstance(r.get("landmarks"), str) and r["landmarks"]:
            p = np.asarray(json.loads(r["landmarks"]), dtype=float)
            ax.plot(p[:9, 0], p[:9, 1], ".-", color="red", ms=5, lw=0.8)
            ax.plot(p[9:, 0], p[9:, 1], ".-", color="cyan", ms=5, lw=0.8)
        ax.plot([r["global_x"]], [r["global_y"]], "o", mfc="none", mec="orange", ms=9)
        ax.plot([r["x"]], [r["y"]], "+", color="yellow", ms=14, mew=2)
        label = f"{r['side'] or '?'} conf {r['confidence']:.2f}"
        if r.get("low_confidence"):
            label += "\n" + str(r.get("message", "")).split(";")[0][:60]
        ax.text(r["x"], max(0, r["y"] - 0.2 * h), label, color=col, fontsize=8, ha="center",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 2})
    ax.set_title(title if title is not None else (Path(str(rows[0]["file"])).name if rows else ""), fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def run_folder(input: PathLike, output_dir: PathLike, global_ckpt: Checkpoints, local_ckpt: Checkpoints | None = None,
               device: torch.device | str = "cpu", layout: str = "auto", tta: bool = True, refine: bool = False,
               overlays: bool = True, progress: bool = True, localiser: KneeLocaliser | None = None,
               dicom: bool = False, overwrite: bool = False, **kwargs: Any) -> pd.DataFrame:
    """Inference bundle: every radiograph of ``input`` (file or folder) -> ``output_dir/landmarks.csv``
    (columns: module docstring), ``output_dir/overlays/<file>.png``, ``output_dir/summary.json`` and the outputs
    manifest ``output_dir/outputs.csv`` (:mod:`pipeline.io.results`: one row per knee, item ``<file>_<side>``,
    status ``ok`` / ``low_confidence`` / ``failed`` (= ``error`` in ``landmarks.csv``), reason = ``message``).
    ``dicom``: each overlay also as an RGB DICOM Secondary Capture ``overlays/<file>.dcm`` with the patient /
    study identifiers of its radiograph (:func:`pipeline.io.dicom_out.write_secondary_capture`).

    ``localiser``: a ready :class:`KneeLocaliser` (the ``localiser`` component of
    ``bundles/kneel/configs/inference.json``); default: built from the checkpoints and the other arguments.

    Output names (the file's path below the input folder) are checked (:func:`pipeline.io.paths.name_problems`:
    an unsafe name or one shared by two inputs is an ``error`` row, nothing written). Re-runs, lock and
    interruption (:class:`pipeline.io.run_state.RunState`; the settings are the localiser's -- checkpoint
    digests, layout, thresholds -- and ``overlays`` / ``dicom``): a run into a folder of a run with the same
    settings resumes (a file that is unchanged, had no error and whose overlays are all there is kept, the
    others are redone); other settings are refused unless ``overwrite``; Ctrl-C / SIGTERM write
    ``landmarks.csv``, ``summary.json`` (``"interrupted": true``) and the manifest of the complete files, then
    re-raise."""
    inp = Path(input)
    if not inp.exists():
        raise FileNotFoundError(f"input not found: {inp} (a DICOM file or a folder of DICOM files)")
    out = Path(output_dir)
    loc = localiser if localiser is not None else KneeLocaliser(global_ckpt, local_ckpt, device=device, layout=layout,
                                                                tta=tta, refine=refine, **kwargs)
    root = inp if inp.is_dir() else inp.parent
    files = _files(inp)
    names = [item_name(f, root) for f in files]
    bad = name_problems(names, files, "input file name")
    per_file: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}  # file index -> rows, manifest
    with RunState(out, _settings(loc, overlays, dicom), "KNEEL inference", overwrite) as state:
        current: list[Path] | None = None
        with state.progress(len(state.group.indices(len(files))), "KNEEL landmarks", unit="image",
                            enabled=progress) as bar:
            try:
                for i, f in state.mine(files):
                    name, stamp = names[i], file_stamp(f)
                    if i in bad:
                        r = [_error_row(f, bad[i])]
                        per_file[i] = (r, _manifest_rows(f, root, r, [], [], out))
                        bar.update("failed")
                        continue
                    prev = state.previous(name, stamp)
                    if prev is not None:  # resumed: the earlier run's rows and overlays stand
                        per_file[i] = (prev["record"]["rows"], prev["record"]["manifest"])
                        bar.update("kept")
                        continue
                    state.forget(name)
                    r, img, _ = loc.locate(f)  # the overlay shows the pixels the landmarks were found on (decoded once)
                    done, notes = [], []
                    current = [out / "overlays" / f"{name}.png", out / "overlays" / f"{name}.dcm"]
                    if overlays and img is not None and r and r[0]["status"] != "error":
                        try:
                            done.append(save_overlay(contained_path(out, "overlays", f"{name}.png"), img, r))
                            if dicom:
                                done.append(write_secondary_capture(contained_path(out, "overlays", f"{name}.dcm"),
                                                                    done[0], f, name, "KNEEL landmarks overlay",
                                                                    model="kneel"))
                        except Exception as e:  # noqa: BLE001 - an overlay must not stop the folder
                            logger.warning("overlay failed for %s: %s", f, e)
                            notes.append(f"overlay not written: {type(e).__name__}: {e}")
                    m = _manifest_rows(f, root, r, done, notes, out)
                    per_file[i] = (r, m)
                    complete = bool(r) and all(k["status"] != "error" for k in r)
                    if complete:
                        state.record(name, stamp, done, {"rows": r, "manifest": m})
                    current = None
                    bar.update("done" if complete else "failed")
            except KeyboardInterrupt:
                if current is not None:
                    state.remove(current)  # the overlay being written when the run stopped
                if not state.group.sharded:  # (a rank of a sharded run leaves its journal: the re-run resumes from it)
                    _write_outputs(out, *_joined(per_file), state, global_ckpt, local_ckpt, interrupted=True)
                logger.warning("KNEEL inference interrupted: %s lists the complete files; run the same command again "
                               "to resume", out / OUTPUTS_MANIFEST)
                raise
        merged = state.merge(per_file)  # every rank's files on rank 0, in file order
        if merged is None:  # another rank of a sharded run: rank 0 writes the summaries
            return pd.DataFrame(_joined(per_file)[0], columns=OUTPUT_COLUMNS)
        return _write_outputs(out, *_joined(merged), state, global_ckpt, local_ckpt)


def _joined(per_file: dict[int, tuple[list, list]]) -> tuple[list, list]:
    """The rows and manifest rows of ``per_file`` (file index -> both), in file order."""
    return (flatten({i: rows for i, (rows, _) in per_file.items()}),
            flatten({i: manifest for i, (_, manifest) in per_file.items()}))


def _settings(loc: KneeLocaliser, overlays: bool, dicom: bool) -> dict[str, Any]:
    """What decides the outputs of :func:`run_folder` (compared between runs into one folder)."""
    return {"global": [weights_digest(m) for m in loc.glob.models],
            "local": [weights_digest(m) for m in loc.loc.models] if loc.loc is not None else [],
            "layout": loc.layout, "tta": loc.tta, "refine": loc.refine, "min_confidence": loc.min_confidence,
            "max_disagreement_mm": loc.max_disagreement_mm, "missing_spacing_mm": loc.missing_spacing_mm,
            "min_bilateral_width_mm": loc.min_bilateral_width_mm, "min_field_mm": loc.min_field_mm,
            "overlays": bool(overlays), "dicom": bool(dicom)}


def _manifest_rows(f: Path, root: Path, rows: list[dict[str, Any]], files: list, notes: list[str], out: Path
                   ) -> list[dict[str, Any]]:
    manifest = []
    for k in rows:
        reason = "; ".join([k["message"], *notes] if k["message"] else notes)
        manifest.append(manifest_row(item_name(f, root, k["side"]), k["status"], reason, files, out,
                                     {"file": k["file"], "side": k["side"], "x": k["x"], "y": k["y"],
                                      "confidence": k["confidence"]}))
    return manifest


def _write_outputs(out: Path, rows: list[dict[str, Any]], manifest: list[dict[str, Any]], state: RunState,
                   global_ckpt: Checkpoints, local_ckpt: Checkpoints | None, interrupted: bool = False
                   ) -> pd.DataFrame:
    """``landmarks.csv``, ``summary.json`` and ``outputs.csv`` of :func:`run_folder` (the manifest also lists the
    complete files of an earlier run in the folder that this one did not reach: their overlays are there)."""
    for e in state.unreached():
        manifest = manifest + list(e["record"].get("manifest", []))
    df = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
    save_csv(out / "landmarks.csv", df)
    summary = {
        "convention": "x, y and landmarks are (column, row) pixels of the ORIGINAL radiograph; KNEEL order: tibial "
                      "0-8, femoral 9-15, each left -> right in the image; joint centre = landmark 4; the "
                      "patient's right knee (R) is on the image's left",
        "global_ckpt": [str(p) for p in _as_list(global_ckpt)], "local_ckpt": [str(p) for p in _as_list(local_ckpt)],
        "n_files": int(df["file"].nunique()) if len(df) else 0, "n_knees": int((df["status"] != "error").sum()),
        "n_ok": int((df["status"] == "ok").sum()), "n_low_confidence": int((df["status"] == "low_confidence").sum()),
        "n_errors": int((df["status"] == "error").sum()),
        "problems": [{"file": r["file"], "side": r["side"], "status": r["status"], "message": r["message"]}
                     for r in rows if r["status"] != "ok"],
    }
    if interrupted:
        summary["interrupted"] = True
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_manifest(out / OUTPUTS_MANIFEST, manifest)
    return df

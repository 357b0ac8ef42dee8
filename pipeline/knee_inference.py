"""Per-knee inference over radiograph DICOMs, shared by every bundle that maps a knee ROI to thickness maps
(``bundles/mris``, ``bundles/direct_synthesis``).

* Knees: a landmarks table (:func:`read_landmarks`: ``file, side, x, y`` joint centres in ORIGINAL pixels, a
  cohort manifest, or the KNEEL bundle's ``landmarks.csv``) or the KNEEL model (:func:`detect_landmarks`);
  neither -> :class:`LandmarksRequiredError`.
* :func:`run_knees`: the fault-tolerant loop. For every knee: the ``preprocessing`` chain on
  ``{"image": path, "centre": (x, y), "side": "R"|"L"}``, the method's ``predict(x)`` on the ``1 x 1 x S x S``
  input, the ``writer`` (default :class:`KneeMapWriter`); one bad file or knee becomes a failure row with its
  reason and never stops the others. Before a knee is used its radiograph is checked
  (:func:`pipeline.io.validate.radiograph_problems`): implausible pixel spacing, a blank image or a joint centre
  outside the image -> a failed row; a modality other than DX / CR -> written but flagged ``low_confidence``
  (``n_knees_flagged``, not ``n_knees_ok``; so are knees the landmark model marks low-confidence). Reasons are the root cause (no MONAI "applying transform" wrapper);
  landmark rows naming files that do not exist get a failed row.
* Each DICOM is decoded once: with the KNEEL model the knees are found file by file (:class:`KneelKnees`) and
  the chain gets the decoded MetaTensor (``{"image": MetaTensor, ...}``) instead of the path.
* Each knee's ROI record (:func:`transforms.roi.knee_roi_record`: file, side, flipped, joint centre, ROI size in
  ORIGINAL pixels and mm, spacing, the exact network-input -> ORIGINAL ``(x, y)`` matrix) goes into its
  ``summary.json`` entry (``roi``) and to the writer (``roi=``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.conventions import JOINT_CENTRE_IDX, MAP_KEYS
from pipeline.io.atomic import write_text_atomic
from pipeline.io.dicom import list_radiographs, read_radiograph
from pipeline.io.paths import contained_path, name_problems
from pipeline.io.results import (
    DEFAULT_VMAX_MM,
    FAILED,
    LOW_CONFIDENCE,
    OK,
    OUTPUTS_MANIFEST,
    MapResultWriter,
    item_name,
    manifest_row,
    save_csv,
    save_map_png,
    write_manifest,
)
from pipeline.io.run_state import RunState, file_stamp
from pipeline.io.validate import describe_exception, radiograph_problems
from pipeline.user_errors import MissingInputError, UserInputError
from transforms.roi import knee_roi_record

__all__ = ["KneeMapWriter", "KneeRun", "KneelKnees", "LandmarksRequiredError", "detect_landmarks", "find_knees",
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
        raise MissingInputError(f"landmarks file not found: {path}. Pass --landmarks a CSV with columns file, side, x, y "
                                "(joint centres in original pixels), or --kneel_global_ckpt to find the knees.")
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
        raise UserInputError(f"{path}: missing landmark column(s) {missing}; expected file, side, x, y")
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


class KneelKnees:
    """The knees of ``files`` found by the KNEEL landmark model, one file at a time as they are iterated: yields
    ``(file, knee rows)`` like :attr:`KneeRun.jobs` (rows: file, side, x, y, landmark_status, landmark_confidence,
    landmark_message). Each file is decoded ONCE (:meth:`pipeline.landmarks.infer.KneeLocaliser.locate`); with
    ``images`` its rows also carry those pixels (``"image"``: the ``(1, H, W)`` MetaTensor of
    :func:`transforms.radiograph_metatensor`) for the ROI chain, one file's at a time. Files without a usable
    knee (unreadable, or a knee of unknown side) get no rows and their reason in :attr:`problems`."""

    def __init__(self, files: list[Path], global_ckpt: Any, local_ckpt: Any = None,
                 device: torch.device | str = "cpu", images: bool = True) -> None:
        from pipeline.landmarks.infer import KneeLocaliser

        self.files = list(files)
        self.localiser = KneeLocaliser(global_ckpt, local_ckpt if _given(local_ckpt) else None, device=device)
        self.images = bool(images)
        self.problems: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        for f in self.files:
            yield f, self.knees(f)

    def knees(self, f: Path) -> list[dict[str, Any]]:
        """The knee rows of one file (see the class docstring)."""
        pred, image, meta = self.localiser.locate(f)
        key = str(Path(f).resolve())
        rows = []
        for r in pred:
            if r["status"] == "error" or not np.isfinite([r["x"], r["y"]]).all():
                self.problems[key] = f"landmark model: {r['message']}"
            elif r["side"] not in ("R", "L"):
                self.problems[key] = f"landmark model: knee side unknown ({r['message']})"
            else:
                rows.append({"file": key, "side": r["side"], "x": float(r["x"]), "y": float(r["y"]),
                             "landmark_status": r["status"], "landmark_confidence": float(r["confidence"]),
                             "landmark_message": r["message"]})
        if rows and self.images and image is not None:
            from transforms.radiograph_io import radiograph_metatensor

            decoded = radiograph_metatensor(image, meta)
            for r in rows:
                r["image"] = decoded
        return rows


def detect_landmarks(files: list[Path], global_ckpt: Any, local_ckpt: Any = None, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[pd.DataFrame, dict[str, str]]:
    """Joint centres of every knee in ``files`` from the KNEEL model -> (landmarks table [file, side, x, y,
    landmark_status, landmark_confidence, landmark_message], {resolved file: reason} for files without a
    usable knee). Knees of unknown side (a single-knee image without laterality) are reported, not used."""
    knees = KneelKnees(files, global_ckpt, local_ckpt, device, images=False)
    rows = [r for _, rs in tqdm(knees, desc="KNEEL landmarks", unit="image", disable=not progress) for r in rs]
    cols = ["file", "side", "x", "y", "landmark_status", "landmark_confidence", "landmark_message"]
    return pd.DataFrame(rows, columns=cols), knees.problems


def _match(files: list[Path], lm: pd.DataFrame) -> list[tuple[Path, list[dict]]]:
    """The landmark rows of each file: by resolved path; else, for table rows whose path does not exist here
    (e.g. written on another machine), by file name when exactly one such table file has that name (two
    folders may hold files of the same name: never give a knee another file's landmarks); a single input file
    also takes the rows of a table that names one file only. No match -> no rows (a failed row)."""
    by_path: dict[str, list[dict]] = {}
    by_name: dict[str, list[dict]] = {}
    names: dict[str, set[str]] = {}
    for r in lm.to_dict(orient="records"):
        exists = Path(r["file"]).exists()
        key = str(Path(r["file"]).resolve()) if exists else r["file"]
        by_path.setdefault(key, []).append(r)
        if not exists:  # a row naming an existing file belongs to that file only
            by_name.setdefault(Path(r["file"]).name, []).append(r)
            names.setdefault(Path(r["file"]).name, set()).add(key)
    single_table_file = len(by_path) == 1
    out = []
    for f in files:
        rows = by_path.get(str(f.resolve()))
        if not rows and len(names.get(f.name, ())) == 1:
            rows = by_name[f.name]
        if not rows and len(files) == 1 and single_table_file:
            rows = next(iter(by_path.values()))
        out.append((f, rows or []))
    return out


class KneeMapWriter(MapResultWriter):
    """Writes one knee's result into ``out_dir / name`` (:class:`pipeline.io.results.MapResultWriter`):
    ``fc.npy`` / ``tc.npy`` (float32 mm, NaN outside the footprint), ``neighbours.csv`` when the method gives
    neighbours (MRIS), ``roi.json`` when given the knee's ROI record, with ``png`` ``fc.png`` / ``tc.png`` (the
    one map style: colour bar in mm, 0 to ``vmax`` = 4 mm, or each map's maximum with ``vmax=None``) and with
    ``dicom`` ``fc.dcm`` / ``tc.dcm`` (DICOM Parametric Maps in mm carrying the patient / study identifiers of
    ``source``, the radiograph). The ``writer`` component of the inference configs; replace it there
    (``_target_``) to write another format. Returns the knee's folder; every file in it is listed in the
    run's outputs manifest."""

    def __init__(self, png: bool = True, vmax: float | None = DEFAULT_VMAX_MM, label: str = "synthesized",
                 dicom: bool = False, model: str = "kneeoa-pipeline") -> None:
        super().__init__(png=png, dicom=dicom, vmax=vmax, label=label, model=model)
        #: ``{knee name: [files this writer wrote]}`` for the outputs manifest (leftovers of earlier runs in
        #: the same folder are not this run's outputs).
        self.written: dict[str, list[Path]] = {}

    def settings(self) -> dict[str, Any]:
        """What decides this writer's files (compared between runs into one folder)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "png": self.png, "dicom": self.dicom,
                "vmax": self.vmax, "label": self.label, "model": self.model}

    def __call__(self, out_dir: Path, name: str, maps: Mapping[str, np.ndarray],
                 neighbours: pd.DataFrame | None = None, roi: Mapping[str, Any] | None = None,
                 source: Any = None, **record: Any) -> Path:
        kdir = Path(out_dir) / name
        kdir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        if neighbours is not None:
            files.append(save_csv(kdir / "neighbours.csv", neighbours))
        if roi is not None:
            write_text_atomic(kdir / "roi.json", json.dumps(roi, indent=1, default=_jsonable))
            files.append(kdir / "roi.json")
        files += self.write_maps(kdir, name, {kk: maps[kk] for kk in MAP_KEYS}, source=source)
        self.written[name] = files
        return kdir


def _jsonable(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_knee_manifest(out_dir: Path, root: Path, knees: list[dict[str, Any]], failures: list[dict[str, Any]],
                        notes: Mapping[str, str] | None = None,
                        written: Mapping[str, Sequence[Path]] | None = None) -> pd.DataFrame:
    """The outputs manifest of a :func:`run_knees` run (``outputs.csv``, :mod:`pipeline.io.results`): one row per
    knee (``ok``, or ``low_confidence`` when the landmark model flagged it; outputs = the files the writer
    reports in ``written``, else, for a writer that reports none, the files of the knee's folder;
    ``notes``: the writer's remarks per knee, e.g. why it wrote no DICOM) and per failed file / knee
    (``failed``, the error)."""
    rows = []
    notes = dict(notes or {})
    for k in knees:
        if written is not None and k["knee"] in written:
            files = sorted(Path(p) for p in written[k["knee"]])
        else:
            files = sorted(p for p in Path(k["folder"]).iterdir() if p.is_file() and not p.name.startswith("."))
        status = LOW_CONFIDENCE if k.get("landmark_status") == LOW_CONFIDENCE or k.get("flagged") else OK
        reason = [k.get("flagged", ""), k.get("landmark_message", "") if k.get("landmark_status") == LOW_CONFIDENCE
                  else "", notes.get(k["knee"], "")]
        rows.append(manifest_row(k["knee"], status, "; ".join(r for r in reason if r), files, out_dir,
                                 {"file": k["file"], "side": k["side"]}))
    for fl in failures:
        f, side = Path(fl["file"]), fl.get("side", "")
        item = item_name(f, root, side)
        rows.append(manifest_row(item, FAILED, fl["error"], (), out_dir, {"file": fl["file"], "side": side}))
    return write_manifest(out_dir / OUTPUTS_MANIFEST, rows)


@dataclass
class KneeRun:
    """What :func:`find_knees` found: the files, their root, the knees per file (``jobs``: ``(file, rows)``; a
    :class:`KneelKnees` finds them while it is iterated, and its rows carry the decoded image under ``"image"``),
    and the landmark source."""

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
        raise MissingInputError(f"input not found: {input}. Pass --input a DICOM file or a folder of DICOM files.")
    root = input if input.is_dir() else input.parent
    files = list_radiographs(input) if input.is_dir() else [input]
    if _given(landmarks) or not _given(kneel_global_ckpt):
        lm = read_landmarks(landmarks, root)  # raises LandmarksRequiredError when neither is given
        jobs = _match(files, lm)
        problems: dict[str, str] = {}
        if input.is_dir() and len(lm):  # rows naming files that do not exist: a failed row each, not ignored
            for name, group in lm.groupby("file", sort=True):
                f = Path(str(name))
                if not f.exists():
                    f = f if f.is_absolute() else root / f
                    jobs.append((f, []))
                    problems[str(f.resolve())] = (f"file not found: {name} (listed in the landmarks table "
                                                  f"{landmarks}, sides {', '.join(map(str, group['side']))})")
        return KneeRun(input, root, files, jobs, "table", problems)
    jobs = KneelKnees(files, kneel_global_ckpt, kneel_local_ckpt, device)  # each file decoded once, in run_knees
    source = {"kneel_global_ckpt": str(kneel_global_ckpt), "kneel_local_ckpt": str(kneel_local_ckpt)}
    return KneeRun(input, root, files, jobs, source, jobs.problems)


def _decode_once(f: Path, rows: list[dict]) -> tuple[Any, str]:
    """The radiograph of ``f`` as the ``(1, H, W)`` MetaTensor (decoded while its knees were found, else read here,
    spacing not required: the chain's loader decides) and "" -- or (None, the reason it cannot be read)."""
    from transforms.radiograph_io import radiograph_metatensor

    if rows and rows[0].get("image") is not None:
        return rows[0]["image"], ""
    try:
        image, meta = read_radiograph(f, allow_missing_spacing=True)
    except Exception as e:  # noqa: BLE001 - reported as the file's failure rows
        logger.warning("cannot read %s: %s", f, describe_exception(e))
        logger.debug("cannot read %s", f, exc_info=True)
        return None, describe_exception(e)
    return radiograph_metatensor(image, meta), ""


def _finite_or_none(m: np.ndarray) -> float | None:
    """Mean of the finite values in mm, or None (valid JSON) for a map without any."""
    m = np.asarray(m, dtype=np.float64)
    return float(m[np.isfinite(m)].mean()) if np.isfinite(m).any() else None


def knee_name(f: Path, root: Path, side: str) -> str:
    """Output folder name of one knee: the file's path under ``root`` with ``/`` -> ``_``, then ``_<side>``."""
    return item_name(f, root, side)


def _job_files(run: KneeRun) -> list[Path]:
    """The files whose knees will be written (a landmark row naming a missing file is a failed row only)."""
    return list(run.jobs.files) if isinstance(run.jobs, KneelKnees) else [f for f, rows in run.jobs if rows]


def _remove_knee_folder(out_dir: Path, name: str) -> None:
    """Delete what an unfinished knee left in its own folder (``out_dir / name``)."""
    with contextlib.suppress(UserInputError, OSError):
        kdir = contained_path(out_dir, name)
        if kdir.is_dir():
            shutil.rmtree(kdir)


def run_knees(run: KneeRun, preprocessing: Callable[[dict], dict],
              predict: Callable[[torch.Tensor], tuple[Mapping[str, np.ndarray], dict]],
              writer: Callable[..., Path], output_dir: str | Path, summary: Mapping[str, Any],
              desc: str = "inference", progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Every knee of ``run``: ``preprocessing`` -> ``predict(x)`` (``x``: ``1 x 1 x S x S`` float32 on the CPU)
    returning ``(maps {fc, tc} in mm, extras)`` -> ``writer(output_dir, name, maps, roi=roi, **writer_args)``
    where ``extras["writer_args"]`` are passed on and the other extras go into the knee's summary record;
    ``roi`` is the ROI record of the network input (:func:`transforms.roi.knee_roi_record`; None when the chain
    keeps no crop record), also in the knee's summary record; ``source`` is the radiograph's path (the
    identifiers of DICOM outputs). Writes and returns ``summary.json`` = ``summary`` + landmark source, counts,
    knees and failures, and writes the outputs manifest ``outputs.csv`` (:func:`write_knee_manifest`).

    Output names (``<file below the input folder>_<side>``) are checked (:func:`pipeline.io.paths.name_problems`:
    unsafe names and names shared by two inputs are failed rows, nothing written). Re-runs, lock and
    interruption (:class:`pipeline.io.run_state.RunState`; ``summary``, the landmark source, ``preprocessing``
    and ``writer`` are the settings): a run into a folder of a run with the same settings resumes (a knee whose
    radiograph and joint centre are unchanged and whose files are all there is kept, the others are redone);
    other settings are refused unless ``overwrite``; Ctrl-C / SIGTERM write the manifest and summary of the
    complete knees (``"interrupted": true``) and re-raise. With the KNEEL model as landmark source the knees of
    a kept file are still located (the model runs) before they are skipped."""
    out_dir = Path(output_dir)
    root = run.root
    source = run.source if isinstance(run.source, str) else {
        k: [v, file_stamp(v)] for k, v in dict(run.source).items()}
    settings = {"summary": dict(summary), "landmarks_source": source, "preprocessing": preprocessing,
                "writer": writer, "predict": desc}
    files = _job_files(run)
    bad_names = {str(Path(files[i]).resolve()): reason for i, reason in name_problems(
        [item_name(f, root) for f in files], files, "input file name").items()}
    per_file: dict[int, _FileResult] = {}  # job index -> its knees, failures, files and notes
    jobs = run.jobs
    with RunState(out_dir, settings, desc, overwrite) as state:
        current = None
        with state.progress(len(state.group.indices(len(jobs))), desc, unit="file", enabled=progress) as bar:
            try:
                for i, _ in state.mine(range(len(jobs))):
                    f, rows = (jobs.files[i], jobs.knees(jobs.files[i])) if isinstance(jobs, KneelKnees) else jobs[i]
                    res = per_file[i] = _FileResult()
                    if not rows:
                        res.failures.append({"file": str(f), "error": run.problems.get(
                            str(f.resolve()), "no landmarks for this file in the landmarks table")})
                        bar.update("failed")
                        continue
                    decoded, read_error = None, ""
                    for r in rows:
                        name = knee_name(f, root, r["side"])
                        bad = bad_names.get(str(f.resolve()))
                        if bad:
                            res.failures.append({"file": str(f), "side": r["side"], "error": bad})
                            continue
                        stamp = file_stamp(f, r["side"], r["x"], r["y"])
                        prev = state.previous(name, stamp)
                        if prev is not None:  # resumed: the earlier run's complete knee stands
                            res.add(name, prev["record"]["knee"], [state.path(p) for p in prev["outputs"]],
                                    prev["record"].get("note", ""), kept=True)
                            continue
                        state.forget(name)
                        if decoded is None and not read_error:
                            decoded, read_error = _decode_once(f, rows)
                        if read_error:
                            res.failures.append({"file": str(f), "side": r["side"], "error": read_error})
                            continue
                        errors, flags = radiograph_problems(decoded, decoded.meta, (r["x"], r["y"]))
                        if errors:  # garbage in: a failed row with the reason, never maps that look fine
                            res.failures.append({"file": str(f), "side": r["side"],
                                                 "error": "implausible input: " + "; ".join(errors)})
                            logger.warning("%s skipped %s (%s): %s", desc, f, r["side"], "; ".join(errors))
                            continue
                        current = name
                        try:
                            contained_path(out_dir, name)
                            x = preprocessing({"image": decoded, "centre": (r["x"], r["y"]),
                                               "side": r["side"]})["image"]
                            roi = knee_roi_record(x)
                            x = torch.as_tensor(x).as_subclass(torch.Tensor).float()[None]
                            maps, extras = predict(x)
                            extras = dict(extras)
                            kdir = writer(out_dir, name, maps, roi=roi,
                                          **{"source": str(f), **extras.pop("writer_args", {})})
                        except Exception as e:  # one bad file (or a failed write) must not stop the others
                            _remove_knee_folder(out_dir, name)
                            current = None
                            res.failures.append({"file": str(f), "side": r["side"], "error": describe_exception(e)})
                            logger.warning("%s failed for %s (%s): %s", desc, f, r["side"], describe_exception(e))
                            logger.debug("%s failed for %s (%s)", desc, f, r["side"], exc_info=True)
                            continue
                        lm_info = {k: r[k] for k in ("landmark_status", "landmark_confidence", "landmark_message")
                                   if k in r}
                        if flags:  # e.g. a CT / MR file: written, but flagged and not counted as ok
                            lm_info["flagged"] = "; ".join(flags)
                        knee = {"knee": name, "file": str(f), "side": r["side"], "centre_xy": [r["x"], r["y"]],
                                **lm_info, "folder": str(kdir),
                                "mean_thickness_mm": {kk: _finite_or_none(maps[kk]) for kk in MAP_KEYS},
                                "roi": roi, **extras}
                        knee = json.loads(json.dumps(knee, default=_jsonable))  # as the journal and summary keep it
                        done = list(getattr(writer, "written", {}).get(name, ())) or sorted(
                            p for p in Path(kdir).iterdir() if p.is_file() and not p.name.startswith("."))
                        note = getattr(writer, "notes", {}).get(name, "")
                        state.record(name, stamp, done, {"knee": knee, "note": note})
                        res.add(name, knee, done, note)
                        current = None
                    bar.update(res.status())
            except KeyboardInterrupt:
                if current is not None:
                    _remove_knee_folder(out_dir, current)  # the knee being written when the run stopped
                if not state.group.sharded:  # (a rank of a sharded run leaves its journal: the re-run resumes)
                    _finish(state, out_dir, run, summary, per_file, interrupted=True)
                logger.warning("%s interrupted: %s lists the complete knees; run the same command again to resume",
                               desc, out_dir / OUTPUTS_MANIFEST)
                raise
        merged = state.merge(per_file)  # every rank's files on rank 0, in file order
        if merged is None:  # another rank of a sharded run: rank 0 writes the summary and the manifest
            return _FileResult.join(per_file).summary(summary, run)
        return _finish(state, out_dir, run, summary, merged)


@dataclass
class _FileResult:
    """What :func:`run_knees` made of one radiograph: its knees (summary records), failures, each knee's files and
    manifest note, and whether every knee was kept from an earlier run."""

    knees: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    written: dict[str, list] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    kept: int = 0

    def add(self, name: str, knee: dict, files: list, note: str, kept: bool = False) -> None:
        self.knees.append(knee)
        self.written[name], self.notes[name] = list(files), note
        self.kept += int(kept)

    def status(self) -> str:
        """For the progress bar: ``failed`` (any knee failed), ``kept`` (all from an earlier run) or ``done``."""
        if self.failures:
            return "failed"
        return "kept" if self.knees and self.kept == len(self.knees) else "done"

    @classmethod
    def join(cls, per_file: Mapping[int, _FileResult]) -> _FileResult:
        """The results of several files, in file order."""
        out = cls()
        for _, r in sorted(per_file.items()):
            out.knees += r.knees
            out.failures += r.failures
            out.written.update(r.written)
            out.notes.update(r.notes)
            out.kept += r.kept
        return out

    def summary(self, summary: Mapping[str, Any], run: KneeRun, interrupted: bool = False) -> dict[str, Any]:
        """``summary`` + landmark source, counts, knees and failures (the contents of ``summary.json``)."""
        n_flagged = sum(1 for k in self.knees if k.get("flagged") or k.get("landmark_status") == "low_confidence")
        result = {**summary, "landmarks_source": run.source, "n_files": len(run.files),
                  "n_knees_ok": len(self.knees) - n_flagged, "n_knees_flagged": n_flagged,
                  "n_failed": len(self.failures), "knees": self.knees, "failures": self.failures}
        if interrupted:
            result["interrupted"] = True
        return result


def _finish(state: RunState, out_dir: Path, run: KneeRun, summary: Mapping[str, Any],
            per_file: Mapping[int, _FileResult], interrupted: bool = False) -> dict[str, Any]:
    """Write ``summary.json`` and ``outputs.csv`` (the complete knees of this run in file order, then those of an
    earlier run in the folder that this one did not reach: their files are there); returns the summary."""
    res = _FileResult.join(per_file)
    result = res.summary(summary, run, interrupted)
    listed = list(res.knees)
    written, notes, failures = dict(res.written), dict(res.notes), res.failures
    for e in state.unreached():
        if "knee" in e.get("record", {}):
            listed.append(e["record"]["knee"])
            written[e["item"]] = [state.path(p) for p in e["outputs"]]
            notes[e["item"]] = e["record"].get("note", "")
    write_text_atomic(out_dir / "summary.json", json.dumps(result, indent=2, default=str))
    write_knee_manifest(out_dir, run.root, listed, failures, notes, written)
    return result

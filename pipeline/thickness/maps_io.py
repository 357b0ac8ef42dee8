"""Thickness maps from DESS label files: one knee, or a whole manifest / folder with failures recorded.

Inputs are label volumes (NIfTI, or a DICOM series folder readable by ITK) with the DESS label table;
outputs per knee (written through :mod:`pipeline.io.results`): ``<stem>_fc.npy`` / ``<stem>_tc.npy`` (float32
mm, NaN outside the fixed footprint, left-knee convention), ``<stem>_grid.json`` (atlas grid description +
coverage), a PNG with a colour bar (``<stem>.png``), and with ``dicom=True`` one DICOM Parametric Map per map
(``<stem>_fc.dcm`` / ``<stem>_tc.dcm``: values in mm, the patient / study of the item's DESS DICOM series, or a
generated study for NIfTI-only inputs; :mod:`pipeline.io.dicom_out`); for a batch also ``maps_manifest.csv``
(the bundle's outputs manifest: ``item, status, reason, outputs, dicom`` then the item's columns; ``status``
ok / low_confidence (flagged, see below) / failed, ``error`` = ``reason``, kept for older readers), and the
run's ``maps_settings.json``.

Safety of a batch (:func:`batch_maps`, issue 12):

* **Containment**: output names come from the item's ``stem`` checked by :func:`pipeline.io.paths.safe_name`
  (no ``..``, separators, absolute paths, control characters, empty names) and every output path is resolved
  inside the output folder; an item whose name is unsafe, or that shares its name with another input
  (case-insensitive), is a ``failed`` row and writes nothing.
* **Plausibility** (:mod:`pipeline.thickness.checks`): a label volume that is not 3D, finite, integer 0-4 or
  has voxels outside 0.1-2 mm is ``failed``; maps with thickness outside 0-8 mm or coverage below 0.5 are
  written but flagged (``low_confidence``, never ``ok``).
* **Re-runs**: the settings of a run are kept in ``maps_settings.json``. A run into a folder holding a run
  with the same settings resumes (items whose ``ok`` / ``low_confidence`` outputs are all present for the
  same, unchanged labels file (column ``labels_stamp``: size and modification time) are kept, the others
  redone); other settings stop the run with :class:`RunSettingsError` unless ``overwrite=True`` (the earlier
  outputs are then deleted first). The manifest lists exactly the output files present; the files of a failed
  item are removed.
* **Concurrency**: ``maps_run.lock`` (:func:`pipeline.io.paths.output_lock`) stops a second run into the same
  folder; a lock of a process that no longer runs is taken over.
* **Interruption**: Ctrl-C (``KeyboardInterrupt``) and SIGTERM (turned into ``KeyboardInterrupt`` while the
  batch holds the folder: :func:`pipeline.io.run_state.sigterm_as_interrupt`; the previous handler is restored
  afterwards) remove the knee being written and write the manifest of the complete items (the manifest is also
  rewritten every :data:`CHECKPOINT_S` seconds, so even SIGKILL leaves one) before the interrupt propagates; the
  re-run resumes.
* **Sharding** (``rank`` / ``world_size``, torchrun: ``bundles/thickness/configs/multi_gpu_inference.json``):
  item ``k`` goes to rank ``k % world_size``; rank 0 alone holds the lock and checks the settings, and its outcome
  is broadcast (a second run's ranks all stop before writing); each rank writes its own items and its part
  manifest (:func:`part_manifest_name`, at checkpoints and on interruption); rank 0 gathers every rank's rows
  and writes the one ``maps_manifest.csv`` (same rows, order and bytes as one process), then removes the parts.
  A later run reads the parts of an interrupted sharded run as complete work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.conventions import side_from_name
from pipeline.io.atomic import remove_partials, write_text_atomic
from pipeline.io.paths import (
    UnsafeNameError,
    contained_path,
    find_collisions,
    name_from_path,
    output_lock,
    safe_name,
)
from pipeline.io.progress import RunProgress
from pipeline.io.results import FAILED, LOW_CONFIDENCE, OK, MapResultWriter, manifest_row, write_manifest
from pipeline.io.run_state import sigterm_as_interrupt
from pipeline.io.sharding import RankGroup
from pipeline.user_errors import UserInputError

from .atlas import labels_to_maps
from .checks import check_map_result, validate_label_volume
from .grid import grid_description

logger = logging.getLogger(__name__)

#: File name of the thickness bundle's outputs manifest.
MAPS_MANIFEST = "maps_manifest.csv"
#: Settings of the run that wrote a maps folder (decides between resume and refusal).
SETTINGS_FILE = "maps_settings.json"
#: Lock file held while a run writes into a maps folder.
LOCK_FILE = "maps_run.lock"
#: The manifest is rewritten at least this often (seconds) during a batch, so a killed run leaves one.
CHECKPOINT_S = 30.0


class RunSettingsError(UserInputError):
    """The output folder holds maps of a run with other settings (pass ``overwrite`` to replace them)."""


def read_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Label volume (``int16``) and its RAS affine from a NIfTI file or a DICOM series folder, checked by
    :func:`pipeline.thickness.checks.validate_label_volume` (raises ``ImplausibleLabelsError``)."""
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
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return validate_label_volume(np.asarray(arr), affine, str(path)), affine
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for non-images and truncated files
        raise ValueError(f"cannot read {path} as NIfTI: {e}") from None
    return validate_label_volume(data, img.affine, str(path)), img.affine


def knee_maps(labels_path: str | Path, side: str, out_dir: str | Path, stem: str, size=(310, 310),
              method: str = "volume", png: bool = True, dicom: bool = False, dicom_source: Any = None,
              study: dict | None = None) -> dict:
    """Compute and save the maps of one knee; returns a manifest row (paths relative to ``out_dir``; ``files``:
    every file written; ``note``: says when the DICOM maps got a generated study; ``flags``: the problems
    :func:`pipeline.thickness.checks.check_map_result` found, empty when the maps are plausible).
    ``dicom_source``: the DICOM whose identifiers the DICOM maps carry (default: the labels when they are a DICOM series folder); ``study``: names the generated study otherwise."""
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
    flags = check_map_result({"fc": res.fc, "tc": res.tc}, res.coverage)
    return {"fc_map": f"{stem}_fc.npy", "tc_map": f"{stem}_tc.npy", "png": f"{stem}.png" if png else "",
            "coverage_fc": round(res.coverage["fc"], 4), "coverage_tc": round(res.coverage["tc"], 4),
            "files": [*files, out_dir / f"{stem}_grid.json"], "note": note, "flags": flags}


def output_names(stem: str, png: bool = True, dicom: bool = False) -> list[str]:
    """File names :func:`knee_maps` may write for an item named ``stem``."""
    names = [f"{stem}_fc.npy", f"{stem}_tc.npy", f"{stem}_grid.json"]
    names += [f"{stem}.png"] if png else []
    names += [f"{stem}_fc.dcm", f"{stem}_tc.dcm"] if dicom else []
    return names


def _remove_outputs(out_dir: Path, names: Iterable[str]) -> None:
    for n in names:
        with contextlib.suppress(UserInputError, OSError):
            contained_path(out_dir, n).unlink(missing_ok=True)


def _stamp(path: Any) -> str:
    """Size and modification time of a labels file (or of the files of a series folder): a re-run recomputes a
    knee whose labels changed in place."""
    try:
        p = Path(str(path))
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        stats = [f.stat() for f in files]
        return f"{sum(st.st_size for st in stats)}:{max((st.st_mtime_ns for st in stats), default=0)}"
    except (OSError, ValueError):
        return ""


def _typed(row: dict) -> dict:
    """An earlier manifest row (read as text) with its numeric columns as numbers again."""
    row = dict(row)
    for k in ("coverage_fc", "coverage_tc"):
        with contextlib.suppress(KeyError, ValueError):
            row[k] = float(row[k])
    with contextlib.suppress(KeyError, ValueError):
        row["visit_month"] = int(float(row["visit_month"]))
    return row


def _listed(out_dir: Path, row: dict) -> list[str]:
    return [p for p in str(row.get("outputs") or "").split(";") if p]


def _complete(out_dir: Path, row: dict) -> bool:
    """An earlier row whose outputs can be kept: ok / flagged and every listed file present inside the folder."""
    if row.get("status") not in (OK, LOW_CONFIDENCE):
        return False
    files = _listed(out_dir, row)
    try:
        return bool(files) and all(contained_path(out_dir, f).is_file() for f in files)
    except UserInputError:
        return False


def _previous_run(out_dir: Path, settings: dict, overwrite: bool) -> dict[str, dict]:
    """Rows of an earlier run in ``out_dir`` that can be kept (``{item: row}``), after the settings check."""
    manifest, settings_file = out_dir / MAPS_MANIFEST, out_dir / SETTINGS_FILE
    parts = _part_manifests(out_dir)  # left by an interrupted sharded run: its ranks' complete items
    if not manifest.exists() and not settings_file.exists() and not parts:
        return {}
    try:
        old_settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old_settings = None
    old = []
    for f in [manifest, *parts]:  # a part's row (newer) replaces the manifest's row of the same item below
        try:
            old += pd.read_csv(f, dtype=str, keep_default_na=False).to_dict("records") if f.exists() else []
        except (OSError, ValueError, pd.errors.EmptyDataError):
            pass
    if old_settings == settings and not overwrite:
        return {r["item"]: _typed(r) for r in old if r.get("item") and _complete(out_dir, r)}
    if not overwrite:
        if old_settings is None:
            what = f"an earlier run without a readable {SETTINGS_FILE}"
        else:
            diff = {k: (old_settings.get(k), v) for k, v in settings.items() if old_settings.get(k) != v}
            what = "a run with other settings (" + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items()) + ")"
        raise RunSettingsError(
            f"{out_dir} holds thickness maps of {what}; pass --overwrite True to replace them, or choose another "
            f"--output_dir (a run with the same settings resumes)")
    n = 0
    for r in old:  # --overwrite: the earlier run's files go first, so the new manifest lists all that is there
        names = _listed(out_dir, r)
        _remove_outputs(out_dir, names)
        n += len(names)
    for f in (manifest, settings_file, *parts):
        f.unlink(missing_ok=True)
    logger.warning("--overwrite: removed %d output file(s) of the earlier run in %s", n, out_dir)
    return {}


def part_manifest_name(rank: int) -> str:
    """File name of rank ``rank``'s part of the outputs manifest in a sharded (torchrun) batch."""
    return f"maps_manifest.rank{int(rank)}.csv"


def _part_manifests(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("maps_manifest.rank*.csv"))


def batch_maps(items: Iterable[dict], out_dir: str | Path, size=(310, 310), method: str = "volume",
               png: bool = True, progress: bool = True, dicom: bool = False, overwrite: bool = False,
               rank: int = 0, world_size: int = 1) -> pd.DataFrame:
    """Maps for many knees. ``items``: dicts with ``labels`` (path), ``side`` and ``stem`` (+ optional
    ``dicom_source``, the DESS DICOM series of the knee, and any metadata columns to carry over; an item with
    a non-empty ``error`` failed upstream and is only recorded). A knee that fails is recorded
    (``status="failed"``, ``error``) and the batch goes on; implausible maps are written and flagged
    (``low_confidence``). Writes ``maps_manifest.csv`` in ``out_dir`` (the outputs manifest of
    :mod:`pipeline.io.results`); ``dicom``: DICOM Parametric Maps too. Re-runs, locking and interruption: see
    the module docstring (``overwrite``: replace an earlier run's outputs instead of resuming / refusing).

    Sharded (``world_size > 1``, every rank calls this with the same ``items`` after
    ``torch.distributed.init_process_group``): item ``k`` is computed by rank ``k % world_size``. Rank 0 alone
    takes the lock, checks the settings (resume / refuse / ``overwrite``) and tells the others the outcome (an
    error stops every rank before it writes anything); each rank then writes its own items' files (and its part
    manifest :func:`part_manifest_name` at checkpoints and on interruption); rank 0 gathers the rows and writes
    the single ``maps_manifest.csv``, the same rows in the same order as a single-process run, then removes the
    parts. Returns the merged manifest on rank 0 and the rank's own rows on the others."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    group = RankGroup(rank, world_size, what="thickness batch")
    sharded = group.world_size > 1
    settings = {"size": [int(x) for x in size], "method": str(method), "png": bool(png), "dicom": bool(dicom)}
    with contextlib.ExitStack() as stack:
        failure, keep = None, {}
        try:
            if group.rank == 0:  # a second concurrent run stops here (its other ranks learn it below)
                stack.enter_context(output_lock(out_dir, LOCK_FILE, what="thickness run"))
            stack.enter_context(sigterm_as_interrupt())  # SIGTERM = Ctrl-C
            if group.rank == 0:
                remove_partials(out_dir)
                keep = _previous_run(out_dir, settings, bool(overwrite))
                write_text_atomic(out_dir / SETTINGS_FILE, json.dumps(settings, indent=1))
        except Exception as e:
            if not sharded:
                raise
            failure = e
        if sharded:
            failure, keep = group.broadcast((failure, keep))
        if failure is not None:
            raise failure
        return _batch_body(items, out_dir, keep, group, size, method, png, dicom, progress)


def _batch_body(items: list[dict], out_dir: Path, keep: dict, group: RankGroup, size, method, png, dicom,
                progress) -> pd.DataFrame:
    sharded = group.world_size > 1
    names, problems = [], {}
    for i, it in enumerate(items):
        try:
            names.append(safe_name(it.get("stem", ""), "item name"))
        except UnsafeNameError as e:
            names.append(str(it.get("stem", "")))
            problems[i] = f"unsafe output name: {e}"
    active = [i for i, it in enumerate(items) if i not in problems and not it.get("error")]
    for name, idx in find_collisions([names[i] for i in active]).items():
        group_idx = [active[j] for j in idx]
        srcs = ", ".join(str(items[j].get("labels") or items[j].get("stem")) for j in group_idx)
        for j in group_idx:
            problems[j] = (f"output name {name!r} is shared by {len(group_idx)} inputs ({srcs}); their maps would "
                           f"overwrite each other, so none is written: rename the inputs (or their subject_id)")
    mine = list(range(group.rank, len(items), group.world_size))  # deterministic split: item k -> rank k % W
    rows: dict[int, dict] = {}
    current = set(names)
    own_manifest = out_dir / (part_manifest_name(group.rank) if sharded else MAPS_MANIFEST)
    last = time.monotonic()

    def _rows(done: dict[int, dict], indices: Iterable[int], extras: bool) -> list[dict]:
        out = []
        for i in indices:
            if i in done:
                out.append(done[i])
            elif names[i] in keep and _complete(out_dir, keep[names[i]]):
                out.append(keep[names[i]])  # not reached (interrupted): the earlier complete row stands
        return out + ([r for n, r in keep.items() if n not in current and _complete(out_dir, r)] if extras else [])

    i = -1
    with RunProgress(out_dir, len(mine), "thickness maps", unit="knee", rank=group.rank,
                     world_size=group.world_size, enabled=progress) as bar:
        try:
            for i in mine:
                rows[i] = _one_item(items[i], names[i], problems.get(i), keep, out_dir, size, method, png, dicom)
                bar.update("kept" if rows[i] is keep.get(names[i]) else "failed" if rows[i]["status"] == FAILED
                           else "done")
                if time.monotonic() - last > CHECKPOINT_S:
                    write_manifest(own_manifest, _rows(rows, mine, not sharded))
                    last = time.monotonic()
        except KeyboardInterrupt:
            prev = keep.get(names[i]) if 0 <= i < len(items) else None
            if 0 <= i < len(items) and i not in rows and i not in problems and not (
                    prev and prev.get("labels", "") == str(items[i].get("labels", "")) and _complete(out_dir, prev)):
                _remove_outputs(out_dir, output_names(names[i], png, dicom))  # the knee being written
                keep.pop(names[i], None)
            write_manifest(own_manifest, _rows(rows, mine, not sharded))
            logger.warning("interrupted: %s lists the %d complete item(s); run the same command again to resume",
                           own_manifest, len(rows))
            raise
    if not sharded:
        df = write_manifest(out_dir / MAPS_MANIFEST, _rows(rows, range(len(items)), True))
        for p in _part_manifests(out_dir):  # an earlier interrupted sharded run's parts are merged now
            p.unlink(missing_ok=True)
        return df
    write_manifest(own_manifest, _rows(rows, mine, False))  # kept should the merge not happen
    merged = group.merge(rows)
    if merged is None:
        return pd.read_csv(own_manifest, dtype=str, keep_default_na=False)
    df = write_manifest(out_dir / MAPS_MANIFEST, _rows(merged, range(len(items)), True))
    for p in _part_manifests(out_dir):
        p.unlink(missing_ok=True)
    return df


def _one_item(it: dict, name: str, problem: str | None, keep: dict, out_dir: Path, size, method, png,
              dicom) -> dict:
    """The manifest row of one item (computed, or kept from an earlier run with the same settings)."""
    row = {k: v for k, v in it.items()}
    if not row.get("error"):
        row["labels_stamp"] = _stamp(it.get("labels", ""))
    prev = keep.get(name)
    if (not problem and not row.get("error") and prev is not None and prev.get("labels", "") == str(it.get("labels", ""))
            and prev.get("labels_stamp", "") == row["labels_stamp"]):
        return prev
    if prev is not None:  # an earlier output under this name, for another input: replaced by this item's outcome
        _remove_outputs(out_dir, _listed(out_dir, prev))
    files: list = []
    note = ""
    status = FAILED
    if problem:
        row["error"] = problem
    elif not row.get("error"):  # (an item with an error failed upstream, e.g. segmentation: recorded only)
        expected = output_names(name, png, dicom)
        try:
            for f in expected:
                contained_path(out_dir, f)
            study = {"patient_id": it.get("subject_id") or name, "study_key": it.get("visit_month", "")}
            res = knee_maps(it["labels"], it["side"], out_dir, name, size=size, method=method, png=png,
                            dicom=dicom, dicom_source=it.get("dicom_source") or None, study=study)
            files, note, flags = res.pop("files"), res.pop("note"), res.pop("flags")
            row.update(res)
            if flags:
                status, row["error"] = LOW_CONFIDENCE, "flagged: " + "; ".join(flags)
            else:
                status, row["error"] = OK, ""
        except KeyboardInterrupt:
            _remove_outputs(out_dir, expected)  # an interrupted knee leaves nothing half-written
            raise
        except Exception as e:  # one knee must not stop the batch; the reason is recorded
            _remove_outputs(out_dir, expected)
            files = []
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            row["traceback"] = traceback.format_exc(limit=3)
    reason = "; ".join(x for x in (row.get("error"), note if status != FAILED else "") if x)
    return manifest_row(name, status, reason, files, out_dir, row)


def items_from_manifest(manifest: str | Path) -> list[dict]:
    """Batch items from a knee-visit manifest (uses ``labels_nifti``; ``dess_dicom_dir``, when present, names
    the DICOM series whose identifiers DICOM outputs carry)."""
    from pipeline.io.manifest import load_manifest, resolve

    m = load_manifest(manifest, require_columns=["labels_nifti"])
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
        stem = name_from_path(p, folder)  # full name less its data extension: knee_L.v3.nii.gz -> knee_L.v3
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
        stem = name_from_path(path, out)  # path below output_dir, "/" -> "_", data extension removed
        items.append({"labels": str(path), "side": p["side"], "stem": stem, "dess": p["image"],
                      "dicom_source": p["image"] if Path(p["image"]).is_dir() else "", "error": ""})
    for f in result.get("failures", []):
        items.append({"labels": "", "side": "", "stem": Path(str(f["image"])).name, "dess": f["image"],
                      "error": f"segmentation ({f.get('stage', '')}): {f.get('error', '')}"})
    return items

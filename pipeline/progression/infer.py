"""Progression inference: baseline sagittal DESS volumes -> per knee P(none), P(fast), P(slow), P(any).

What ``bundles/progression_mr/configs/inference.json`` runs (:func:`run_inference`).

Inputs (:func:`inference_items`): a folder (searched recursively) of NIfTI volumes (``.nii`` / ``.nii.gz``) and
DICOM series (a folder of one file per slice, ``.dcm`` or files with the ``DICM`` marker), one NIfTI file or
series folder, or a knee-visit manifest (``.csv``; the rows at ``visit``, ``dess_dicom_dir`` preferred over
``dess_nifti``). Other image files in a folder (``.png``, ``.mha``, ...) are listed so that they get a
``failed`` row saying what to give instead.

Per knee:

1. the input is checked (:func:`pipeline.io.validate.dess_problems`: readable, 3D, finite, plausible voxel
   size, sagittal, no missing slices in a series); a problem fails the knee with a reason that names the file
   and what to do, and the rest of the folder is processed;
2. the side comes from the manifest, the series' DICOM ``Laterality`` / ``ImageLaterality``, or a
   ``LEFT`` / ``RIGHT`` (``L`` / ``R``) token in the file or folder name below the input folder
   (:func:`pipeline.conventions.side_from_name`); an unknown side is processed as a left knee (not mirrored)
   and flagged ``low_confidence``; so is a manifest knee with ``progression_3class`` -1 (KLG 4 at baseline:
   outside the population the model was trained on);
3. :func:`pipeline.progression.data.mr_transforms` (orientation, right knees mirrored, ``num_slices x size x
   size``, min-max [0, 1]) at the size the checkpoint records, then every checkpoint's network; several
   checkpoints (a fold ensemble: the default, ``models/fold<k>/model.pt``) are averaged once, as probabilities
   (:func:`pipeline.progression.ensemble.ensemble_probabilities`).

Outputs in ``output_dir`` (:func:`run_inference`: a lock stops a second run into the same folder, a re-run with the
same checkpoints resumes, a sharded run under torchrun writes the same bytes): ``predictions.csv`` with
:data:`PREDICTION_COLUMNS` (``item``, ``status`` ok / low_confidence / failed (:mod:`pipeline.io.results`),
``reason``, ``p_none``, ``p_fast``, ``p_slow``, ``p_any`` = ``p_fast + p_slow``, then ``image``, ``side``,
``side_source``, ``checkpoints``), and the common outputs manifest ``outputs.csv``; both written atomically at the
end (or when interrupted). Failed rows have empty probabilities.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import torch

from pipeline.conventions import side_from_name
from pipeline.io.checkpoints import load_network
from pipeline.io.dicom import is_dicom_file, series_laterality
from pipeline.io.manifest import load_manifest, resolve
from pipeline.io.paths import contained_path, find_collisions, name_from_path, safe_name
from pipeline.io.results import (
    FAILED,
    LOW_CONFIDENCE,
    OK,
    OUTPUTS_MANIFEST,
    manifest_row,
    save_csv,
    status_counts,
    status_of,
    write_manifest,
)
from pipeline.io.run_state import RunState, file_stamp, weights_digest
from pipeline.io.validate import describe_exception, dess_problems
from pipeline.progression.data import mr_transforms
from pipeline.progression.ensemble import ensemble_probabilities
from pipeline.user_errors import SettingsMismatchError, UserInputError, require_checkpoint

__all__ = ["PREDICTIONS_CSV", "PREDICTION_COLUMNS", "ProgressionPredictor", "TRAIN_COMMAND", "inference_items",
           "resolve_checkpoints", "require_checkpoints", "run_inference", "summary_counts"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

PREDICTIONS_CSV = "predictions.csv"
PREDICTION_COLUMNS = ("item", "status", "reason", "p_none", "p_fast", "p_slow", "p_any", "image", "side",
                      "side_source", "checkpoints")
#: How to make a checkpoint (quoted when none is found).
TRAIN_COMMAND = ("python -m monai.bundle run training --config_file bundles/progression_mr/configs/train.json "
                 "(or the CPU demo config train_demo.json)")
#: In-plane size used when a checkpoint does not record its ``image_size`` (the paper's 160 px).
DEFAULT_SIZE = 160
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Files listed (to fail with a reason) although they cannot be DESS inputs.
OTHER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".mha", ".mhd", ".nrrd", ".npy", ".npz")
UNKNOWN_SIDE = ("side unknown (no DICOM Laterality, no LEFT / RIGHT in the file or folder name): processed as a "
                "left knee (not mirrored); name the input ..._LEFT / ..._RIGHT or set its Laterality")


# ------------------------------------------------------------------------------------------ checkpoints
def resolve_checkpoints(spec: Any) -> list[Path]:
    """Checkpoint files of ``spec``: one file, a folder (a fold ensemble: every ``model.pt`` below it, sorted --
    the training config writes ``models/fold<k>/model.pt`` -- or, without any, every ``*.pt``), a list of those,
    or a comma-separated string. Nothing found -> empty list."""
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        parts = [s.strip() for s in str(spec).split(",")] if isinstance(spec, str) else [spec]
    else:
        parts = list(spec)
    out: list[Path] = []
    for part in parts:
        if part is None or str(part).strip() in ("", "None", "null"):
            continue
        p = Path(part)
        if p.is_dir():
            found = sorted(q for q in p.rglob("model.pt") if q.is_file())
            out += found or sorted(q for q in p.rglob("*.pt") if q.is_file())
        else:
            out.append(p)
    return out


def require_checkpoints(spec: Any, train: str = TRAIN_COMMAND) -> list[str]:
    """Every checkpoint of ``spec`` (:func:`resolve_checkpoints`) must exist
    (:func:`pipeline.user_errors.require_checkpoint` raises a one-line error naming the file otherwise)."""
    files = resolve_checkpoints(spec)
    if not files:
        require_checkpoint(spec, train)  # raises: nothing there
    return [require_checkpoint(f, train) for f in files]


class ProgressionPredictor:
    """One progression network or a fold ensemble, rebuilt from its checkpoints
    (:func:`pipeline.io.checkpoints.load_network`).

    Args:
        checkpoints: :func:`resolve_checkpoints` spec.
        device: torch device.
        num_slices, image_size: settings given by the user (``None`` = take the checkpoint's); they must agree
            with what each checkpoint records. Every checkpoint must expect the same input size.

    ``probabilities(volume)``: ``1 x S x H x W`` (or ``B x 1 x S x H x W``) -> ``B x 3`` class probabilities, the
    mean over the networks of their softmax (averaged once).
    """

    def __init__(self, checkpoints: Any, device: str | torch.device = "cpu", num_slices: Optional[int] = None,
                 image_size: Optional[int] = None) -> None:
        self.paths = resolve_checkpoints(checkpoints)
        if not self.paths:
            require_checkpoint(checkpoints, TRAIN_COMMAND)
        self.device = torch.device(device)
        self.networks: list[torch.nn.Module] = []
        shapes = set()
        for p in self.paths:
            net = load_network(p, train=TRAIN_COMMAND, num_slices=num_slices, image_size=image_size)
            desc = getattr(net, "description", None) or {}
            settings = desc.get("settings", {})
            if settings.get("arch") == "xray":
                raise SettingsMismatchError(f"{p}: a radiograph model (arch 'xray'); progression_mr inference "
                                            "takes the DESS models (arch trf / fc / lstm / cnn3d)")
            s = settings.get("num_slices", num_slices)
            size = desc.get("preprocessing", {}).get("image_size") or image_size or DEFAULT_SIZE
            if s is None:
                raise SettingsMismatchError(f"{p}: the checkpoint does not record its slice count; pass num_slices")
            shapes.add((int(s), int(size)))
            self.networks.append(net.to(self.device).eval())
        if len(shapes) > 1:
            raise SettingsMismatchError(f"the checkpoints expect different inputs (slices, size) {sorted(shapes)}: "
                                        "an ensemble needs one input size")
        self.num_slices, self.image_size = shapes.pop()

    @torch.no_grad()
    def probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        x = volume.as_subclass(torch.Tensor) if isinstance(volume, torch.Tensor) else torch.as_tensor(volume)
        x = x.float().to(self.device)
        if x.ndim == 4:
            x = x[None]
        logits = [net(x).float().cpu() for net in self.networks]
        return ensemble_probabilities(logits, kind="logits")


# ------------------------------------------------------------------------------------------------ inputs
def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _side(path: Path, root: Path, is_series: bool) -> tuple[str, str]:
    if is_series:
        lat = series_laterality(path)
        if lat:
            return lat, "dicom"
    try:
        rel = path.relative_to(root).as_posix() if path != root else path.name
    except ValueError:
        rel = path.name
    side = side_from_name(rel or path.name, short_tokens=True)
    return (side, "name") if side else ("", "unknown")


def _folder_items(root: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    series: set[Path] = set()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if _is_nifti(p):
            kind = "nifti"
        elif p.suffix.lower() in OTHER_IMAGE_SUFFIXES:
            kind = "other"
        elif is_dicom_file(p):
            series.add(p.parent)
            continue
        else:
            continue
        side, src = _side(p, root, False)
        items.append({"image": str(p), "name": name_from_path(p, root), "side": side, "side_source": src,
                      "kind": kind})
    for d in sorted(series):
        side, src = _side(d, root, True)
        name = name_from_path(d, root) if d != root else d.name
        items.append({"image": str(d), "name": name, "side": side, "side_source": src, "kind": "dicom"})
    return sorted(items, key=lambda it: it["image"])


def _manifest_items(path: Path, visit: int) -> list[dict[str, Any]]:
    df = load_manifest(path, require_columns=("dess_nifti", "dess_dicom_dir"))
    items = []
    for _, row in df[df["visit_month"].astype(int) == int(visit)].iterrows():
        paths = [v.strip() for v in (row["dess_dicom_dir"], row["dess_nifti"]) if isinstance(v, str) and v.strip()]
        if not paths:
            continue
        sid, side = str(row["subject_id"]), str(row["side"])
        label = row.get("progression_3class")
        items.append({"image": str(resolve(df, paths[0])), "name": f"{sid}_{side}", "side": side,
                      "side_source": "manifest", "kind": "manifest",
                      "excluded": label is not None and pd.notna(label) and int(label) == -1})
    return items


def inference_items(source: PathLike, visit: int = 0) -> list[dict[str, Any]]:
    """The knees to predict (module docstring): ``[{"image", "name", "side" ("" unknown), "side_source"
    ("manifest" | "dicom" | "name" | "unknown"), "kind"}]``."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".csv":
        return _manifest_items(p, visit)
    if p.is_dir():
        files = [q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")]
        if files and all(is_dicom_file(q) for q in files) and not any(q.is_dir() for q in p.iterdir()):
            side, src = _side(p, p.parent, True)  # the folder is one series
            return [{"image": str(p), "name": p.name, "side": side, "side_source": src, "kind": "dicom"}]
        return _folder_items(p)
    if p.is_file():
        side, src = _side(p, p.parent, False)
        return [{"image": str(p), "name": name_from_path(p), "side": side, "side_source": src,
                 "kind": "nifti" if _is_nifti(p) else "other"}]
    raise UserInputError(f"input not found: {p}. Pass --input PATH (a folder of DESS DICOM series / NIfTI volumes, "
                         "one volume, or a manifest CSV)")


# -------------------------------------------------------------------------------------------------- run
def _row(name: str, status: str, reason: str, it: dict[str, Any], probs: Optional[np.ndarray],
         checkpoints: str) -> dict[str, Any]:
    p = [float(v) for v in probs] if probs is not None else [np.nan] * 3
    return {"item": name, "status": status_of(status), "reason": reason, "p_none": p[0], "p_fast": p[1],
            "p_slow": p[2], "p_any": p[1] + p[2], "image": it.get("image", ""), "side": it.get("side", ""),
            "side_source": it.get("side_source", ""), "checkpoints": checkpoints}


def run_inference(input: PathLike, output_dir: PathLike, checkpoint: Any, device: str | torch.device = "cpu",
                  num_slices: Optional[int] = None, image_size: Optional[int] = None, visit: int = 0,
                  reader: str = "ITKReader", progress: bool = True,
                  predictor: Optional[ProgressionPredictor] = None, overwrite: bool = False) -> pd.DataFrame:
    """Predict every knee of ``input`` (module docstring) into ``output_dir/predictions.csv``; returns it.

    ``checkpoint``: one checkpoint, a folder of fold checkpoints, or a list (:func:`resolve_checkpoints`);
    ``predictor``: an already built :class:`ProgressionPredictor` (then ``checkpoint`` only labels the rows).

    Re-runs, lock and interruption (:class:`pipeline.io.run_state.RunState`; the settings are the networks' weight
    digests, the input size and the reader; a knee's stamp is its input file / series and side): a run into a
    folder of a run with the same settings resumes (a knee predicted from an unchanged input is kept, a failed or
    missing one is redone); other settings are refused unless ``overwrite``; Ctrl-C / SIGTERM write
    ``predictions.csv`` and ``outputs.csv`` of the knees done so far, then re-raise.

    Sharded (torchrun, ``multi_gpu_inference.json``): knee ``k`` is rank ``k % world_size``'s; rank 0 gathers the
    rows and writes both tables in knee order (the bytes of a single-process run); the other ranks return their
    own rows.
    """
    items = inference_items(input, visit)
    if not items:
        raise UserInputError(f"{input}: no DESS input found (NIfTI .nii / .nii.gz files or DICOM series folders)")
    model = predictor or ProgressionPredictor(checkpoint, device, num_slices, image_size)
    ckpt_names = ";".join(str(p) for p in model.paths)
    chain = mr_transforms(model.num_slices, model.image_size, train=False, reader=reader, keep_meta=False)
    out = Path(output_dir)
    clash = {i for idx in find_collisions([it["name"] for it in items]).values() for i in idx}
    per_knee: dict[int, dict[str, Any]] = {}  # knee index -> predictions row
    settings = {"networks": [weights_digest(net) for net in model.networks], "num_slices": model.num_slices,
                "image_size": model.image_size, "reader": reader}
    with RunState(out, settings, "progression inference", overwrite) as state:
        with state.progress(len(state.group.indices(len(items))), "progression knees", unit="knee",
                            enabled=progress) as bar:
            try:
                for k, it in state.mine(items):
                    per_knee[k], outcome = _predict_knee(state, model, chain, it, k in clash, ckpt_names)
                    bar.update(outcome)
            except KeyboardInterrupt:
                if not state.group.sharded:  # (a rank of a sharded run leaves its journal: the re-run resumes from it)
                    _write_tables(out, [per_knee[k] for k in sorted(per_knee)], state, ckpt_names)
                logger.warning("progression inference interrupted: %s lists the knees done; run the same command "
                               "again to resume", out / PREDICTIONS_CSV)
                raise
        merged = state.merge(per_knee)  # every rank's knees on rank 0, in knee order
        if merged is None:  # another rank of a sharded run: rank 0 writes the tables
            return pd.DataFrame([per_knee[k] for k in sorted(per_knee)], columns=list(PREDICTION_COLUMNS))
        return _write_tables(out, list(merged.values()), state, ckpt_names)


def _predict_knee(state: RunState, model: ProgressionPredictor, chain: Any, it: dict[str, Any], clash: bool,
                  ckpt_names: str) -> tuple[dict[str, Any], str]:
    """One knee's predictions row and how it came (``"kept"`` from the earlier run, ``"done"``: predicted and
    journalled, ``"failed"``: with the reason); never raises, but for an interruption."""
    name = str(it["name"])
    safe = None
    try:
        safe = name = safe_name(name, "item name")
        if clash:
            raise UserInputError(f"{it['image']}: item name {name!r} is shared with another input (they would get "
                                 "one row); rename one of them")
        if it["kind"] == "other":
            raise UserInputError(f"{it['image']}: not a DESS volume (expected a NIfTI file .nii / .nii.gz or a "
                                 "folder holding one DICOM series, one file per slice)")
        stamp = file_stamp(it["image"], it["side"], bool(it.get("excluded")))
        prev = state.previous(name, stamp)
        if prev is not None:  # resumed: the earlier run's probabilities stand (this run's paths in the row)
            return _current(prev["record"], it, ckpt_names), "kept"
        state.forget(name)
        problems = dess_problems(it["image"])
        if problems:
            raise UserInputError("; ".join(problems))
        try:
            volume = chain({"image": it["image"], "side": it["side"]})["image"]
        except Exception as e:  # noqa: BLE001 - a file that passed the header checks but cannot be read
            raise UserInputError(f"{it['image']}: cannot be loaded ({describe_exception(e)}); export the series / "
                                 "volume again") from e
        probs = model.probabilities(volume)[0].numpy()
        flags = []
        if not it["side"]:
            flags.append(UNKNOWN_SIDE)
        if it.get("excluded"):
            flags.append("progression_3class -1 (KLG 4 at baseline): outside the population the model was trained "
                         "on")
        row = _row(name, LOW_CONFIDENCE if flags else OK, "; ".join(flags), it, probs, ckpt_names)
        state.record(name, stamp, [], row)
        return row, "done"
    except Exception as e:  # noqa: BLE001 - one knee's failure never stops the folder
        if safe is not None:
            state.forget(safe)  # an earlier prediction of this knee is not its result any more
        reason = str(e) if isinstance(e, UserInputError) else f"{it['image']}: {describe_exception(e)}"
        logger.warning("progression inference: %s failed: %s", name, reason)
        return _row(name, FAILED, reason, it, None, ckpt_names), "failed"


def _current(row: dict[str, Any], it: dict[str, Any] | None, ckpt_names: str) -> dict[str, Any]:
    """A journalled row with this run's input path, side source and checkpoint names (the probabilities, status
    and reason were decided by what the stamp and settings cover)."""
    now = {"checkpoints": ckpt_names}
    if it is not None:
        now.update(image=it.get("image", ""), side_source=it.get("side_source", ""))
    return {c: now.get(c, row.get(c)) for c in PREDICTION_COLUMNS}


def _write_tables(out: Path, rows: list[dict[str, Any]], state: RunState, ckpt_names: str) -> pd.DataFrame:
    """``predictions.csv`` and ``outputs.csv`` of ``rows`` (knee order), then of the knees predicted by an earlier
    run in the folder that this one did not reach."""
    rows = rows + [_current(e["record"], None, ckpt_names) for e in state.unreached()]
    df = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    pred_path = contained_path(out, PREDICTIONS_CSV)
    save_csv(pred_path, df)
    fields = ("p_none", "p_fast", "p_slow", "p_any", "image", "side")
    write_manifest(contained_path(out, OUTPUTS_MANIFEST), [
        manifest_row(r["item"], r["status"], r["reason"], [] if r["status"] == FAILED else [pred_path], out,
                     {f: r[f] for f in fields}) for r in rows])
    return df


#: ``{status: count}`` of an outputs / predictions table (:func:`pipeline.io.results.status_counts`).
summary_counts = status_counts


"""Inference of segmentation-guided registration: DXA (moving) -> radiograph (fixed) pairs.

Inputs are pair-ready crops (same size, similarity pre-aligned, left-knee convention; see
:mod:`pipeline.registration.data`): one pair (``moving``, ``fixed``), a pairs CSV (columns ``moving``,
``fixed``, optional ``pair_id``; paths relative to the CSV's folder), or two folders whose files are matched
by name. For every pair: segment both images (DXA segmenter, radiograph segmenter), register the label maps
(stage-3 GradICON), warp the REAL moving image with that map. Per pair, in ``output_dir/<pair_id>/``:

* ``warped.nii.gz``: the moving image in the fixed frame (float32, the fixed crop's geometry; NIfTI axes
  (column, row) like the inputs);
* ``displacement_px.npy``: ``2 x H x W`` float32 displacement in PIXELS (channel 0 rows, 1 columns):
  ``phi(x) - x``, i.e. fixed pixel ``x`` takes the moving image's value at ``x + d``;
* ``moving_labels.nii.gz``, ``fixed_labels.nii.gz``, ``warped_labels.nii.gz``: the segmentations (uint8,
  0 background, 1 femur, 2 tibia, 3 fibula) and the moving one warped by nearest neighbour;
* ``overlay.png``: fixed | moving | warped | composite | deformed grid, label contours.

``output_dir/outputs.csv`` lists every pair (``ok`` / ``low_confidence`` / ``failed`` + reason): sizes that
differ, a file that is not an image, a missing partner, or an empty segmentation give a row naming the file;
the rest of the folder is still processed. A pair is ``low_confidence`` when the warped moving segmentation
and the fixed one overlap poorly (mean Dice < :data:`MIN_SEG_DICE`) or the map folds (> :data:`MAX_FOLD_PERCENT`
% of pixels).

Re-runs (:class:`pipeline.io.run_state.RunState`, :func:`run_inference`): a re-run into the same folder with the same
networks resumes (pairs already written from unchanged inputs are kept, failed or missing ones redone); other
networks are refused unless ``overwrite`` (which replaces the earlier outputs); a lock stops a second run into the
same folder; Ctrl-C / SIGTERM leave ``outputs.csv`` of the pairs done. Sharded runs (torchrun,
``bundles/segreg/configs/multi_gpu_inference.json``): pair ``k`` is done by rank ``k % world_size``, rank 0 writes
``outputs.csv`` in pair order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.io.atomic import atomic_path
from pipeline.io.checkpoints import checkpoint_hash, load_network
from pipeline.io.paths import contained_path, find_collisions, safe_name, strip_data_extension
from pipeline.io.results import (
    FAILED,
    LOW_CONFIDENCE,
    OK,
    OUTPUTS_MANIFEST,
    manifest_row,
    status_counts,
    write_manifest,
)
from pipeline.io.run_state import RunState, file_stamp, weights_digest
from pipeline.io.validate import describe_exception
from pipeline.registration.data import BONES, normalise_image, onehot, read_image_2d
from pipeline.user_errors import UserInputError

logger = logging.getLogger(__name__)

MIN_SEG_DICE = 0.6
MAX_FOLD_PERCENT = 1.0
#: The files of a registered pair in ``output_dir/<pair_id>/`` (module docstring).
PAIR_FILES = ("warped.nii.gz", "displacement_px.npy", "moving_labels.nii.gz", "fixed_labels.nii.gz",
              "warped_labels.nii.gz", "overlay.png")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".dcm", ".npy", ".mha", ".nrrd")


def _is_image_name(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and (p.name.lower().endswith(IMAGE_SUFFIXES) or "." not in p.name)


def pairs_from_inputs(moving: str | None = None, fixed: str | None = None, pairs_csv: str | None = None,
                      moving_dir: str | None = None, fixed_dir: str | None = None) -> list[dict]:
    """The pairs to register as ``[{"pair_id", "moving", "fixed", "problem"}]``; ``problem`` non-empty for a pair
    that cannot run (a missing partner, a missing file). Exactly one input form must be given."""
    forms = [bool(moving or fixed), bool(pairs_csv), bool(moving_dir or fixed_dir)]
    if sum(forms) != 1:
        raise UserInputError("give exactly one input: --moving A --fixed B, --pairs PAIRS.csv, or --moving_dir DIR "
                             "--fixed_dir DIR (files matched by name)")
    out: list[dict] = []
    if forms[0]:
        if not (moving and fixed):
            raise UserInputError("a single pair needs both --moving (DXA crop) and --fixed (radiograph crop)")
        out.append({"pair_id": strip_data_extension(Path(moving).name), "moving": str(moving), "fixed": str(fixed)})
    elif forms[1]:
        csv = Path(pairs_csv)
        if not csv.is_file():
            raise UserInputError(f"pairs CSV not found: {csv}")
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise UserInputError(f"{csv}: not a readable CSV ({describe_exception(e)})") from None
        missing = [c for c in ("moving", "fixed") if c not in df.columns]
        if missing:
            raise UserInputError(f"{csv}: missing column(s) {missing}; a pairs CSV has columns moving, fixed "
                                 f"(optional pair_id); present: {list(df.columns)}")
        if df.empty:
            raise UserInputError(f"{csv}: a header line but no pairs")
        for i, r in df.iterrows():
            pid = r.get("pair_id", "") or strip_data_extension(Path(r["moving"] or f"row{i + 2}").name)
            item = {"pair_id": pid}
            for key in ("moving", "fixed"):
                v = r[key].strip()
                item[key] = str(Path(v) if Path(v).is_absolute() else csv.parent / v) if v else ""
            out.append(item)
    else:
        if not (moving_dir and fixed_dir):
            raise UserInputError("folder input needs both --moving_dir and --fixed_dir")
        for d in (moving_dir, fixed_dir):
            if not Path(d).is_dir():
                raise UserInputError(f"not a folder: {d}")
        mov = {p.name: p for p in sorted(Path(moving_dir).iterdir()) if _is_image_name(p)}
        fix = {p.name: p for p in sorted(Path(fixed_dir).iterdir()) if _is_image_name(p)}
        for name in sorted(set(mov) | set(fix)):
            out.append({"pair_id": strip_data_extension(name), "moving": str(mov.get(name, "")),
                        "fixed": str(fix.get(name, ""))})
        if not out:
            raise UserInputError(f"no image files in {moving_dir} or {fixed_dir}")
    for item in out:
        problems = []
        for key, what in (("moving", "DXA (moving)"), ("fixed", "radiograph (fixed)")):
            if not item[key]:
                problems.append(f"no {what} partner for pair {item['pair_id']!r}")
            elif not Path(item[key]).is_file():
                problems.append(f"{item[key]}: no such file ({what})")
        item["problem"] = "; ".join(problems)
    return out


class SegRegInference:
    """The three networks of the method and the per-pair work (:meth:`run_pair`)."""

    def __init__(self, segmenter_dxa: str | os.PathLike, segmenter_xray: str | os.PathLike,
                 registration: str | os.PathLike, device: str | torch.device = "cpu"):
        from pipeline.user_errors import require_checkpoint

        self.device = torch.device(device)
        paths = {"segmenter_dxa": segmenter_dxa, "segmenter_xray": segmenter_xray, "registration": registration}
        hint = "python -m pipeline.registration.demo (or the stage configs in bundles/segreg/docs/README.md)"
        self.paths = {k: require_checkpoint(v, hint) for k, v in paths.items()}
        self.nets = {k: load_network(p).to(self.device).eval() for k, p in self.paths.items()}
        self.digest = "-".join(checkpoint_hash(p)[:12] for p in self.paths.values())
        desc = getattr(self.nets["registration"], "description", None) or {}
        #: the size the networks were trained at (inputs of another size are resampled to it and back)
        self.image_size = (desc.get("preprocessing") or {}).get("image_size")

    def register_arrays(self, moving: np.ndarray, fixed: np.ndarray) -> dict:
        """``moving``/``fixed`` ``H x W`` raw images (same size) -> labels, map and warped image (numpy)."""
        from pipeline.registration.maps import warp, warp_labels
        from pipeline.registration.metrics import bone_dice, fold_percent
        from pipeline.registration.step import register
        from pipeline.registration.train import segment

        m = torch.as_tensor(normalise_image(moving), dtype=torch.float32)[None, None].to(self.device)
        f = torch.as_tensor(normalise_image(fixed), dtype=torch.float32)[None, None].to(self.device)
        size = int(self.image_size) if self.image_size else None
        rs = (lambda t: torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)
              ) if size and tuple(m.shape[-2:]) != (size, size) else (lambda t: t)
        with torch.no_grad():
            lm = segment(self.nets["segmenter_dxa"], rs(m)).to(self.device)
            lf = segment(self.nets["segmenter_xray"], rs(f)).to(self.device)
            phi = register(self.nets["registration"], onehot(lm).to(self.device), onehot(lf).to(self.device))
            if tuple(phi.shape[-2:]) != tuple(m.shape[-2:]):  # maps are on [0, 1]: resample to the input size
                phi = torch.nn.functional.interpolate(phi, size=tuple(m.shape[-2:]), mode="bilinear", align_corners=True)
                lm = torch.nn.functional.interpolate(lm.float(), size=tuple(m.shape[-2:]), mode="nearest").long()
                lf = torch.nn.functional.interpolate(lf.float(), size=tuple(m.shape[-2:]), mode="nearest").long()
            warped = warp(m, phi)
            wl = warp_labels(lm, phi, method="nearest")
            d = bone_dice(wl, lf)
        h, w = phi.shape[-2:]
        scale = torch.tensor([h - 1, w - 1], dtype=phi.dtype, device=phi.device).view(1, 2, 1, 1)
        from pipeline.registration.maps import identity_map

        disp = ((phi - identity_map((h, w), device=phi.device, dtype=phi.dtype)) * scale)[0].cpu().numpy()
        return {"moving_labels": lm[0, 0].cpu().numpy(), "fixed_labels": lf[0, 0].cpu().numpy(),
                "warped_labels": wl[0, 0].cpu().numpy(), "warped": warped[0, 0].cpu().numpy(),
                "phi": phi[0].cpu().numpy(), "displacement_px": disp.astype(np.float32),
                "moving": m[0, 0].cpu().numpy(), "fixed": f[0, 0].cpu().numpy(),
                "seg_dice": {n: float(d[n]) for n in BONES.values()},
                "fold_percent": float(torch.as_tensor(fold_percent(phi)).float().mean())}


def _nifti(path: Path, arr: np.ndarray, dtype) -> None:
    import nibabel as nib

    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(np.asarray(arr).T[:, :, None].astype(dtype), np.eye(4)), str(tmp))


def run_inference(output_dir: str | os.PathLike, segmenter_dxa: str, segmenter_xray: str, registration: str,
                  moving: str | None = None, fixed: str | None = None, pairs: str | None = None,
                  moving_dir: str | None = None, fixed_dir: str | None = None, overwrite: bool = False,
                  device: str | torch.device = "cpu", progress: bool = True) -> pd.DataFrame:
    """Register every pair (module docstring); returns the outputs manifest as a DataFrame.

    Re-runs, lock and interruption (:class:`pipeline.io.run_state.RunState`; the settings are the three networks'
    weight digests, the size they work at and the quality thresholds; a pair's stamp is its two input files'): a
    run into a folder of a run with the same settings resumes (a pair whose inputs are unchanged and whose files
    are all there is kept, a failed, missing or changed one is redone); other settings are refused unless
    ``overwrite`` (which removes the earlier run's files first); Ctrl-C / SIGTERM remove the pair being written,
    write ``outputs.csv`` of the pairs done so far, then re-raise.

    Sharded (torchrun, ``multi_gpu_inference.json``): pair ``k`` is rank ``k % world_size``'s; each rank writes its
    pairs' folders; rank 0 gathers the manifest rows and writes ``outputs.csv`` in pair order (the bytes of a
    single-process run); the other ranks return their own rows.
    """
    items = pairs_from_inputs(moving, fixed, pairs, moving_dir, fixed_dir)
    out = Path(output_dir)
    engine = SegRegInference(segmenter_dxa, segmenter_xray, registration, device)
    collisions = find_collisions([it["pair_id"] for it in items])
    clash = {i for idx in collisions.values() for i in idx}
    per_pair: dict[int, dict] = {}  # pair index -> manifest row
    with RunState(out, _settings(engine), "segreg inference", overwrite) as state:
        writing: list[Path] = []  # the files of the pair being written (removed when it stops half-way)
        with state.progress(len(state.group.indices(len(items))), "segreg pairs", unit="pair",
                            enabled=progress) as bar:
            try:
                for k, it in state.mine(items):
                    pid = it["pair_id"]
                    inputs = {"moving": it["moving"], "fixed": it["fixed"]}
                    name = None
                    try:
                        name = safe_name(pid, "pair id")
                        if k in clash:
                            raise UserInputError(f"pair id {pid!r} is given to several pairs (they would write the "
                                                 "same files); give each pair its own pair_id")
                        if it["problem"]:
                            raise UserInputError(it["problem"])
                        stamp = _pair_stamp(it)
                        prev = state.previous(name, stamp)
                        if prev is not None:  # resumed: the earlier run's files stand
                            per_pair[k] = _manifest_row(name, prev["record"], out, inputs)
                            bar.update("kept")
                            continue
                        state.forget(name)
                        record = _register_pair(engine, name, it, contained_path(out, name), writing)
                        state.record(name, stamp, [out / name / f for f in record["files"]], record)
                        writing.clear()
                        per_pair[k] = _manifest_row(name, record, out)
                        bar.update("done")
                    except Exception as e:  # noqa: BLE001 - one pair's failure never stops the folder
                        state.remove(writing)  # a pair that failed half-way leaves no files
                        writing.clear()
                        if name is not None:
                            state.forget(name)  # files of an earlier attempt of this pair are not its result
                        reason = str(e) if isinstance(e, (UserInputError, ValueError, FileNotFoundError)) else \
                            describe_exception(e)
                        per_pair[k] = manifest_row(str(pid), FAILED, reason, (), out, inputs)
                        bar.update("failed")
            except KeyboardInterrupt:
                state.remove(writing)  # the pair being written when the run stopped
                if not state.group.sharded:  # (a rank of a sharded run leaves its journal: the re-run resumes from it)
                    _write_rows(out, [per_pair[k] for k in sorted(per_pair)], state)
                logger.warning("segreg inference interrupted: %s lists the pairs done; run the same command again to "
                               "resume", out / OUTPUTS_MANIFEST)
                raise
        merged = state.merge(per_pair)  # every rank's pairs on rank 0, in pair order
        if merged is None:  # another rank of a sharded run: rank 0 writes outputs.csv
            return pd.DataFrame([per_pair[k] for k in sorted(per_pair)])
        return _write_rows(out, list(merged.values()), state)


def _settings(engine: SegRegInference) -> dict:
    """What decides the outputs of :func:`run_inference` (compared between runs into one folder)."""
    return {**{k: weights_digest(net) for k, net in engine.nets.items()}, "image_size": engine.image_size,
            "min_seg_dice": MIN_SEG_DICE, "max_fold_percent": MAX_FOLD_PERCENT}


def _pair_stamp(it: dict) -> str:
    """Both input files' :func:`pipeline.io.run_state.file_stamp` (``""``, never unchanged, if either is unreadable)."""
    stamps = [file_stamp(it["moving"]), file_stamp(it["fixed"])]
    return "|".join(stamps) if all(stamps) else ""


def _register_pair(engine: SegRegInference, name: str, it: dict, folder: Path, writing: list[Path]) -> dict:
    """Register one pair and write its files into ``folder`` (each listed in ``writing`` before it is written);
    returns its record: ``status``, ``reason``, ``files`` (names in ``folder``) and the manifest ``fields``."""
    from pipeline.registration.overlay import save_registration_overlay

    mov_arr = read_image_2d(it["moving"])
    fix_arr = read_image_2d(it["fixed"])
    if mov_arr.shape != fix_arr.shape:
        raise ValueError(f"{it['moving']} is {mov_arr.shape[0]} x {mov_arr.shape[1]} px but {it['fixed']} is "
                         f"{fix_arr.shape[0]} x {fix_arr.shape[1]} px: pair-ready crops have one size (make them "
                         "with the cohort's crop step)")
    for arr, p in ((mov_arr, it["moving"]), (fix_arr, it["fixed"])):
        if float(arr.max() - arr.min()) <= 1e-8:
            raise ValueError(f"{p}: the image is constant (nothing to segment or register)")
    res = engine.register_arrays(mov_arr, fix_arr)
    reasons = []
    for key, p in (("moving_labels", it["moving"]), ("fixed_labels", it["fixed"])):
        if not (res[key] > 0).any():
            reasons.append(f"the segmenter found no bone in {p}: is it a knee crop of the right modality?")
    mean_dice = float(np.mean(list(res["seg_dice"].values())))
    if mean_dice < MIN_SEG_DICE:
        reasons.append(f"warped and fixed segmentations overlap poorly (mean Dice {mean_dice:.2f} < {MIN_SEG_DICE}); "
                       "check the pair is the same knee and pre-aligned")
    if res["fold_percent"] > MAX_FOLD_PERCENT:
        reasons.append(f"the map folds at {res['fold_percent']:.2f} % of pixels")
    writing += [folder / f for f in PAIR_FILES]
    folder.mkdir(parents=True, exist_ok=True)
    _nifti(folder / PAIR_FILES[0], res["warped"], np.float32)
    with atomic_path(folder / PAIR_FILES[1], suffix=".npy") as tmp:
        np.save(tmp, res["displacement_px"])
    for f_name, key in zip(PAIR_FILES[2:5], ("moving_labels", "fixed_labels", "warped_labels")):
        _nifti(folder / f_name, res[key], np.uint8)
    save_registration_overlay(folder / PAIR_FILES[5], res["fixed"], res["moving"], res["warped"], res["phi"],
                              fixed_labels=res["fixed_labels"], warped_labels=res["warped_labels"],
                              title=f"{name}: segmentation-guided", dice=res["seg_dice"])
    fields = {"moving": it["moving"], "fixed": it["fixed"],
              **{f"seg_dice_{n}": round(v, 4) for n, v in res["seg_dice"].items()},
              "fold_percent": round(res["fold_percent"], 4)}
    return {"status": LOW_CONFIDENCE if reasons else OK, "reason": "; ".join(reasons), "files": list(PAIR_FILES),
            "fields": fields}


def _manifest_row(name: str, record: dict, out: Path, inputs: dict | None = None) -> dict:
    """The outputs-manifest row of a registered pair from its record (``inputs``: this run's input paths, which
    replace the recorded ones of a pair kept from an earlier run)."""
    return manifest_row(name, record["status"], record["reason"], [out / name / f for f in record["files"]], out,
                        {**record["fields"], **(inputs or {})})


def _write_rows(out: Path, rows: list[dict], state: RunState) -> pd.DataFrame:
    """``outputs.csv`` of ``rows`` (pair order), then the complete pairs of an earlier run in the folder that this
    one did not reach (their files are there)."""
    rows = rows + [_manifest_row(e["item"], e["record"], out) for e in state.unreached()]
    return write_manifest(out / OUTPUTS_MANIFEST, rows)


#: ``{status: count}`` of an outputs / predictions table (:func:`pipeline.io.results.status_counts`).
summary_counts = status_counts


__all__: Sequence[str] = ("SegRegInference", "pairs_from_inputs", "run_inference", "summary_counts")

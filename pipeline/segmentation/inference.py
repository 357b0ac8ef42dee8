"""Fault-tolerant batch inference: one item at a time, failures recorded, the rest carries on.

:class:`SafeInferenceRunner` is what ``bundles/dess_seg/configs/inference.json`` runs. For each data-list
entry it applies ``preprocessing`` (load, orient to PIR, flip right knees, scale), sliding-window
inference, then ``postprocessing`` (softmax/argmax, ``Invertd`` back to the INPUT geometry, ``SaveImaged``).
Before an item is trusted it is checked (:func:`pipeline.io.validate.dess_volume_problems`: a NIfTI read to the
end -- a truncated file fails --, 3D, finite -- NaN / inf fail --, not blank, voxel size 0.1-5 mm), so garbage is
a failure (stage ``load``, reason "implausible input: ..."), never a prediction. Any exception while loading,
predicting or saving one item is caught and written to
``<output_dir>/failures.csv`` (columns ``image, stage, error``; ``error`` is the ROOT cause, not MONAI's
"applying transform" wrapper: :func:`pipeline.io.validate.describe_exception`); successful items go to
``<output_dir>/predictions.csv`` (``image, side, knee_flipped, output``); both, and the outputs manifest
``<output_dir>/outputs.csv`` (:mod:`pipeline.io.results`: one row per item, ``ok`` / ``failed``, its files),
are written atomically. A tqdm bar shows progress.

With ``dicom=True`` each prediction of a DICOM series input is also written as a DICOM SEG next to its NIfTI
(``<...>_seg.dcm``; :func:`pipeline.io.dicom_out.write_segmentation`: BINARY, segments femur, femoral
cartilage, tibia, tibial cartilage = labels 1-4, referencing the source series and carrying its patient /
study identifiers). A NIfTI input gets no SEG (a SEG needs its source series); its row says so in ``reason``.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pipeline.io.checkpoints import load_weights
from pipeline.io.paths import find_collisions
from pipeline.io.results import FAILED, OK, OUTPUTS_MANIFEST, manifest_row, save_csv, write_manifest
from pipeline.io.run_state import RunState, file_stamp, weights_digest
from pipeline.io.validate import describe_exception, dess_volume_problems

from .transforms import FLIP_META_KEY

#: The command that trains the checkpoint this inference needs.
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundles/dess_seg/configs/train.json"

logger = logging.getLogger(__name__)


class SafeInferenceRunner:
    """Run a MONAI inference pipeline item by item, recording (not raising) per-item failures.

    Args:
        datalist: entries with at least ``"image"`` (and ``"side"``), e.g. from
            :func:`pipeline.segmentation.build_datalist`.
        preprocessing: dictionary transform producing a channel-first ``"image"`` MetaTensor.
        network: the segmentation network (put in eval mode here).
        inferer: a MONAI inferer, e.g. ``SlidingWindowInferer``; called as ``inferer(batch, network)``.
        postprocessing: dictionary transform applied to ``{"image": ..., "pred": logits (C, I, J, K)}``;
            should invert the preprocessing geometry and save.
        output_dir: folder for ``predictions.csv`` / ``failures.csv``.
        device: torch device for the network and input.
        checkpoint: optional weights file loaded with :func:`pipeline.io.checkpoints.load_weights` before
            running (``None``: ``network`` comes with its weights, e.g. from
            :func:`pipeline.io.checkpoints.load_network`).
        progress: show a tqdm bar.
        output_key: key under which ``postprocessing``'s ``SaveImaged`` leaves the saved tensor; its
            ``meta["saved_to"]`` is reported when present.
        dicom: also write a DICOM SEG of every prediction whose input is a DICOM series (module docstring).
        overwrite: replace the outputs of an earlier run with other settings in ``output_dir`` (same settings:
            the run resumes; :meth:`run`).
    """

    def __init__(self, datalist: Sequence[dict], preprocessing: Callable, network: torch.nn.Module,
                 inferer: Callable, postprocessing: Callable, output_dir: str,
                 device: torch.device | str = "cpu", checkpoint: Optional[str] = None,
                 progress: bool = True, output_key: str = "pred", dicom: bool = False, overwrite: bool = False) -> None:
        self.datalist = list(datalist)
        self.preprocessing = preprocessing
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.progress = progress
        self.output_key = output_key
        self.dicom = bool(dicom)
        self.overwrite = bool(overwrite)
        self.successes: list[dict] = []
        self.failures: list[dict] = []

    def _one(self, item: dict) -> dict:
        stage = "load"  # reading and checking the input (dess_volume_problems) are part of loading it
        try:
            problems = dess_volume_problems(item.get("image", ""))  # a NIfTI file: read to the end, 3D, finite
            if problems:
                raise _ItemError(stage, "implausible input: " + "; ".join(problems))
            data = self.preprocessing(dict(item))
            img = data["image"]
            problems = dess_volume_problems(img)  # also a DICOM series, as loaded (finite, 3D)
            if problems:
                raise _ItemError(stage, "implausible input: " + "; ".join(problems))
            stage = "predict"
            with torch.no_grad():
                logits = self.inferer(img.unsqueeze(0).to(self.device), self.network)
            data["pred"] = logits[0].detach().cpu()
            stage = "save"
            data = self.postprocessing(data)
        except _ItemError:
            raise
        except Exception as e:  # noqa: BLE001 - every per-item failure is recorded, then we go on
            logger.debug("inference failed for %s\n%s", item.get("image"), traceback.format_exc())
            raise _ItemError(stage, describe_exception(e)) from e
        out = data.get(self.output_key)
        meta = getattr(out, "meta", {}) or {}
        return {"image": item["image"], "side": item.get("side", ""),
                "knee_flipped": bool(getattr(img, "meta", {}).get(FLIP_META_KEY, False)),
                "output": str(meta.get("saved_to", ""))}

    def settings(self) -> dict:
        """What decides this run's outputs (compared between runs into one folder): the network's weights digest,
        the preprocessing, inferer and postprocessing components, ``dicom``."""
        return {"weights": weights_digest(self.network), "checkpoint": file_stamp(self.checkpoint) if self.checkpoint
                else "", "preprocessing": self.preprocessing, "inferer": self.inferer,
                "postprocessing": self.postprocessing, "output_key": self.output_key, "dicom": self.dicom}

    def _expected_output(self, item: dict) -> Path | None:
        """Where the postprocessing's ``SaveImaged`` will write the prediction of ``item`` (None: unknown)."""
        from monai.transforms import Compose, SaveImaged

        chain = self.postprocessing.transforms if isinstance(self.postprocessing, Compose) else [self.postprocessing]
        for t in chain:
            if isinstance(t, SaveImaged) and self.output_key in t.keys:
                with contextlib.suppress(Exception):
                    return Path(str(t.saver.folder_layout.filename(subject=str(item.get("image", "")), idx=None)))
        return None

    def run(self) -> dict[str, list[dict]]:
        """Process every entry; write the two CSVs; return ``{"predictions": [...], "failures": [...]}``.

        Re-runs, lock and interruption (:class:`pipeline.io.run_state.RunState`, settings: :meth:`settings`): a run
        into a folder of a run with the same settings resumes (an item whose input is unchanged and whose files
        are all there is kept; failed and missing items are redone); other settings are refused unless
        ``overwrite``; Ctrl-C / SIGTERM remove the item being written, write the CSVs and the manifest of the
        complete items, then re-raise. Two items whose predictions would be written to the same file are both
        failed (stage ``save``), nothing written for them."""
        if self.checkpoint:
            load_weights(self.network, self.checkpoint, train=TRAIN_COMMAND)
        self.network.to(self.device).eval()
        self.successes, self.failures = [], []
        expected = [self._expected_output(it) for it in self.datalist]
        clash: dict[int, str] = {}
        known = [i for i, e in enumerate(expected) if e is not None]
        for path, idx in find_collisions([str(expected[i]) for i in known]).items():
            group = [known[j] for j in idx]
            srcs = ", ".join(str(self.datalist[j].get("image", "")) for j in group)
            for j in group:
                clash[j] = (f"output {path} is shared by {len(group)} inputs ({srcs}); their predictions would "
                            "overwrite each other, so none is written: rename the inputs")
        per_item: dict[int, tuple[dict | None, dict | None, dict]] = {}  # index -> (prediction, failure, row)
        with RunState(self.output_dir, self.settings(), "dess_seg inference", self.overwrite) as state:
            current = None
            with state.progress(len(state.group.indices(len(self.datalist))), "dess_seg inference", unit="volume",
                                enabled=self.progress) as bar:
                try:
                    for i, item in state.mine(self.datalist):
                        key = f"{item.get('image', '')}|{item.get('side', '')}"
                        if i in clash:
                            fail = {"image": item.get("image", ""), "stage": "save", "error": clash[i]}
                            per_item[i] = (None, fail, self._failed_row(fail))
                            bar.update("failed")
                            continue
                        stamp = file_stamp(item.get("image"), item.get("side", ""))
                        prev = state.previous(key, stamp)
                        if prev is not None:  # resumed: the earlier run's prediction stands
                            per_item[i] = (prev["record"]["prediction"], None, prev["record"]["row"])
                            bar.update("kept")
                            continue
                        state.forget(key)
                        current = expected[i]
                        try:
                            p = self._one(item)
                        except _ItemError as e:
                            if expected[i] is not None:
                                state.remove([expected[i]])  # a save that failed half way leaves nothing
                            current = None
                            fail = {"image": item.get("image", ""), "stage": e.stage, "error": e.message}
                            per_item[i] = (None, fail, self._failed_row(fail))
                            logger.warning("skipped %s (%s): %s", item.get("image"), e.stage, e.message)
                            bar.update("failed")
                            continue
                        files, note = [p["output"]], ""
                        if self.dicom and p["output"]:
                            current = [p["output"], self._seg_path(p)]
                            seg, note = self._write_seg(p)
                            files.append(seg)
                        row = manifest_row(p["image"], OK, note, files, self.output_dir,
                                           {"side": p["side"], "knee_flipped": p["knee_flipped"]})
                        state.record(key, stamp, files, {"prediction": p, "row": row})
                        per_item[i] = (p, None, row)
                        current = None
                        bar.update("done")
                except KeyboardInterrupt:
                    if current is not None:
                        state.remove(current if isinstance(current, list) else [current])
                    rows = self._collect(per_item)
                    if not state.group.sharded:  # (a rank of a sharded run leaves its journal: the re-run resumes)
                        self._write_outputs(rows, state)
                    logger.warning("dess_seg inference interrupted: %s lists the %d complete item(s); run the same "
                                   "command again to resume", self.output_dir / OUTPUTS_MANIFEST, len(self.successes))
                    raise
            merged = state.merge(per_item)  # every rank's items on rank 0, in item order
            rows = self._collect(per_item if merged is None else merged)
            if merged is not None:  # rank 0 (or the single process) writes the CSVs
                self._write_outputs(rows, state)
        logger.info("dess_seg inference%s: %d written, %d failed (see %s)", state.group.label, len(self.successes),
                    len(self.failures), self.output_dir / "failures.csv")
        return {"predictions": self.successes, "failures": self.failures}

    def _collect(self, per_item: dict[int, tuple[dict | None, dict | None, dict]]) -> list[dict]:
        """Set :attr:`successes` / :attr:`failures` from ``per_item`` (item order); returns the manifest rows."""
        order = sorted(per_item)
        self.successes = [per_item[i][0] for i in order if per_item[i][0] is not None]
        self.failures = [per_item[i][1] for i in order if per_item[i][1] is not None]
        return [per_item[i][2] for i in order]

    def _failed_row(self, f: dict) -> dict:
        return manifest_row(f["image"], FAILED, f"{f['stage']}: {f['error']}", (), self.output_dir,
                            {"stage": f["stage"]})

    def _write_outputs(self, rows: list[dict], state: RunState) -> None:
        """``predictions.csv``, ``failures.csv`` and ``outputs.csv`` (the manifest also lists the complete items
        of an earlier run in the folder that this one did not reach: their files are there)."""
        rows = rows + [e["record"]["row"] for e in state.unreached() if "row" in e.get("record", {})]
        save_csv(self.output_dir / "predictions.csv", self.successes, ["image", "side", "knee_flipped", "output"])
        save_csv(self.output_dir / "failures.csv", self.failures, ["image", "stage", "error"])
        write_manifest(self.output_dir / OUTPUTS_MANIFEST, rows)

    @staticmethod
    def _seg_path(prediction: dict) -> Path:
        out = Path(prediction["output"])
        return out.with_name(out.name.split(".")[0] + ".dcm")

    def _write_seg(self, prediction: dict) -> tuple[str, str]:
        """The DICOM SEG of one saved prediction -> (its path or "", note for the manifest)."""
        import nibabel as nib
        import numpy as np

        from pipeline.io.dicom_out import read_source, write_segmentation

        source = read_source(prediction["image"])
        if not source:
            return "", "no DICOM SEG: the input is not a DICOM series"
        out = Path(prediction["output"])
        target = self._seg_path(prediction)
        try:
            img = nib.load(str(out))
            labels = np.rint(np.asarray(img.dataobj)).astype(np.uint8)
            affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # NIfTI RAS -> DICOM LPS
            write_segmentation(target, labels.reshape(labels.shape[:3]), affine_lps, source, out.name.split(".")[0])
        except Exception as e:  # noqa: BLE001 - the NIfTI prediction stands; the manifest says why
            logger.warning("DICOM SEG failed for %s: %s", prediction["image"], e)
            return "", f"no DICOM SEG: {describe_exception(e)}"
        return str(target), ""


class _ItemError(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.message = stage, message

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
* ``checkpoint``: the MRIS model; its variant and image size are read from it (they may be given only for
  checkpoints written before checkpoints recorded them, and must agree otherwise).
* ``database_dir``: an embedding database built by ``evaluate.json`` with the SAME checkpoint and image size
  (both are checked; a mismatch raises ``CheckpointMismatchError`` with a one-line message).

Outputs (``output_dir``)
------------------------
``<knee>/fc.npy``, ``<knee>/tc.npy`` (float32 ``H x W`` mm on the atlas grid, NaN outside the footprint,
LEFT-knee atlas convention: right knees are mirrored like the training data), ``<knee>/fc.png``,
``<knee>/tc.png`` (with colour bar), ``<knee>/neighbours.csv`` (rank, database row, subject, side, visit,
cosine similarity, weight), and ``summary.json`` (every knee: ok or the error; unreadable files named
with the reason; they do not stop the others) and the outputs manifest ``outputs.csv``
(:mod:`pipeline.io.results`); with the writer's ``dicom`` (``--dicom True``) ``<knee>/fc.dcm``, ``<knee>/tc.dcm``
(DICOM Parametric Maps, :mod:`pipeline.io.dicom_out`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose

from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import load_weights, unwrap
from pipeline.knee_inference import (  # noqa: F401  (re-exported: the names MRIS users import from here)
    KneeMapWriter,
    LandmarksRequiredError,
    detect_landmarks,
    find_knees,
    read_landmarks,
    run_knees,
    save_map_png,
)
from pipeline.mris.data import radiograph_transforms
from pipeline.mris.database import EmbeddingDatabase, checkpoint_hash
from pipeline.mris.engine import TRAIN_COMMAND, run_settings

logger = logging.getLogger(__name__)


def run_inference(network: torch.nn.Module, checkpoint: str | Path, input: str | Path,
                  database_dir: str | Path, output_dir: str | Path, landmarks: str | Path | None = None,
                  variant: str | None = None, image_size: int | None = None, k: int = 20,
                  device: torch.device | str = "cpu", png: bool = True, progress: bool = True,
                  kneel_global_ckpt: Any = None, kneel_local_ckpt: Any = None,
                  preprocessing: Callable[[dict], dict] | None = None,
                  writer: Callable[..., Path] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Synthesize FC/TC maps for every knee with landmarks; returns (and writes) the summary dict.

    Knees come from ``landmarks`` if given, else from the KNEEL model (``kneel_global_ckpt`` [+
    ``kneel_local_ckpt``]); with neither, :class:`LandmarksRequiredError` is raised. ``preprocessing``: the
    radiograph chain applied to ``{"image": path, "centre": (x, y), "side": "R"|"L"}`` (default
    :func:`pipeline.mris.data.radiograph_transforms` at ``image_size``, as in training); ``writer``: writes
    one knee (default :class:`KneeMapWriter` with ``png``). ``variant`` / ``image_size``: ``None`` = as the
    checkpoint records them (:func:`pipeline.mris.engine.run_settings`). ``overwrite``: replace the outputs of
    an earlier run with other settings in ``output_dir`` (same settings: the run resumes; see
    :func:`pipeline.knee_inference.run_knees`)."""
    run = find_knees(input, landmarks, kneel_global_ckpt, kneel_local_ckpt, device, progress)
    load_weights(network, checkpoint, train=TRAIN_COMMAND)
    variant, image_size = run_settings(network, variant, image_size)
    model = unwrap(network).to(device).eval()
    db = EmbeddingDatabase.load(database_dir, expected_checkpoint_hash=checkpoint_hash(checkpoint),
                                expected_info={"variant": variant, "image_size": image_size})
    k_used = min(int(k), len(db))
    spaces = MAP_KEYS if variant == "separate" else MAP_KEYS[:1]

    def predict(x: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with torch.no_grad():
            emb = model.embed_xray(x.to(device))
        if isinstance(emb, Mapping):
            res = db.synthesize({kk: v.cpu() for kk, v in emb.items()}, k=k_used)
            maps = {kk: res[kk].maps[0].numpy() for kk in MAP_KEYS}
            nb = {kk: res[kk] for kk in MAP_KEYS}
        else:
            res = db.synthesize(emb.cpu(), k=k_used)
            maps = {kk: res.maps[kk][0].numpy() for kk in MAP_KEYS}
            nb = {kk: res for kk in MAP_KEYS}
        rows = []
        for kk in spaces:
            for rank, (j, s, w) in enumerate(zip(nb[kk].indices[0].tolist(), nb[kk].similarities[0].tolist(),
                                                 nb[kk].weights[0].tolist()), start=1):
                row = db.rows.iloc[j]
                rows.append({"space": kk if variant == "separate" else "combined", "rank": rank, "database_row": j,
                             "subject_id": row.get("subject_id"), "side": row.get("side"),
                             "visit_month": row.get("visit_month"), "similarity": s, "weight": w})
        return maps, {"writer_args": {"neighbours": pd.DataFrame(rows)},
                      "top1_similarity": float(nb[MAP_KEYS[0]].similarities[0, 0])}

    summary = {
        "convention": "maps are in the LEFT-knee atlas convention (right knees mirrored), mm, NaN outside the "
                      "cartilage footprint",
        "variant": variant, "image_size": image_size, "checkpoint": str(checkpoint),
        "checkpoint_hash": db.checkpoint_hash,
        "database": str(database_dir), "database_size": len(db), "k": k_used,
    }
    chain = preprocessing if preprocessing is not None else Compose(radiograph_transforms(image_size))
    return run_knees(run, chain, predict, writer if writer is not None else KneeMapWriter(png=png), output_dir,
                     summary, desc="MRIS inference", progress=progress, overwrite=overwrite)

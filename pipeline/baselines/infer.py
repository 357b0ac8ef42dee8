"""Direct-synthesis inference: radiograph DICOM(s) + joint-centre landmarks -> synthesized FC/TC thickness maps
with a trained U-Net / pix2pix / TransUNet-like generator (``bundles/direct_synthesis/configs/inference.json``).

The inputs, the knee finding and the outputs are those of MRIS inference (:mod:`pipeline.knee_inference`, whose
pieces are shared: the landmarks table :func:`~pipeline.knee_inference.read_landmarks`, the KNEEL landmark model
:func:`~pipeline.knee_inference.detect_landmarks`, the file <-> landmarks matching, the PNG writer) and the
radiograph chain is the training one (:func:`pipeline.mris.data.radiograph_transforms`); only the synthesis
differs: one forward pass of the generator instead of the k-NN retrieval.

Inputs
------
* ``input``: one DICOM file or a folder of DICOMs (not recursive; :func:`pipeline.io.dicom.list_radiographs`).
* ``landmarks``: a CSV with ``file, side, x, y`` (joint centre in original radiograph pixels), a cohort
  manifest or the KNEEL bundle's ``landmarks.csv`` (see :func:`pipeline.knee_inference.read_landmarks`); or,
  without it, ``kneel_global_ckpt`` (+ optional ``kneel_local_ckpt``) to find the knees with the KNEEL model.
* ``checkpoint``: the generator weights written by ``bundles/direct_synthesis/configs/train.json``
  (``models/model.pt``, or the final training checkpoint); the network, its method and image size are read from
  the checkpoint (:func:`pipeline.baselines.synthesize.load_generator`; ``method``, ``image_size`` and
  ``net_kwargs`` are needed only for checkpoints written before generators described themselves, and must
  agree with the checkpoint otherwise), or the network is passed ready-made as ``network``.
* ``map_size``: the atlas grid of the training maps (rows, cols; an int for a square grid): 128 for the
  demo cohort (``python -m pipeline cohort`` default), 310 for maps from ``bundles/thickness``. The cartilage
  footprint of that grid (:func:`pipeline.thickness.grid.footprint`) is the same for every knee.

Outputs (``output_dir``)
------------------------
``<knee>/fc.npy``, ``<knee>/tc.npy`` (float32 ``H x W`` mm on the atlas grid, NaN outside the footprint,
finite inside; LEFT-knee atlas convention: right knees are mirrored like the training data; the generator
output, mm / 3, is converted by :func:`pipeline.baselines.synthesize.outputs_to_atlas` as in evaluation),
``<knee>/fc.png``, ``<knee>/tc.png`` (``png``), ``summary.json`` (every knee that worked, and every file
or knee that failed with the reason: one bad file does not stop the others) and ``outputs.csv``
(:mod:`pipeline.io.results`); with the writer's ``dicom`` (``--dicom True``) ``<knee>/fc.dcm`` / ``tc.dcm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from pipeline.baselines.synthesize import (
    TRAIN_COMMAND,
    generator_settings,
    load_generator,
    network_masks,
    outputs_to_atlas,
)
from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import checkpoint_hash, load_weights, unwrap
from pipeline.knee_inference import KneeMapWriter, find_knees, run_knees
from pipeline.mris.data import radiograph_transforms
from pipeline.thickness.grid import footprint

__all__ = ["atlas_footprints", "run_inference"]

logger = logging.getLogger(__name__)

#: The map convention written into every summary.
CONVENTION = ("maps are in the LEFT-knee atlas convention (right knees mirrored), mm, NaN outside the "
              "cartilage footprint")


def _grid(map_size: int | Sequence[int]) -> tuple[int, int]:
    size = (int(map_size), int(map_size)) if np.ndim(map_size) == 0 else tuple(int(s) for s in map_size)
    if len(size) != 2 or min(size) < 2:
        raise ValueError(f"map_size must be an int or (rows, cols) >= 2, got {map_size!r}")
    return size


def atlas_footprints(map_size: int | Sequence[int]) -> dict[str, np.ndarray]:
    """``{fc, tc}: rows x cols`` bool cartilage footprints of the atlas grid (the NaN pattern of every
    training map of that size: :func:`pipeline.thickness.grid.footprint`)."""
    size = _grid(map_size)
    return {k: footprint(k, size) for k in MAP_KEYS}


def run_inference(network: torch.nn.Module | None, checkpoint: str | Path, input: str | Path,
                  output_dir: str | Path, landmarks: str | Path | None = None, method: str | None = None,
                  image_size: int | None = None, net_kwargs: Mapping[str, Any] | None = None,
                  map_size: int | Sequence[int] = 128, device: torch.device | str = "cpu", png: bool = True,
                  progress: bool = True, kneel_global_ckpt: Any = None, kneel_local_ckpt: Any = None,
                  preprocessing: Callable[[dict], dict] | None = None, writer: Callable[..., Path] | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Synthesize FC/TC maps for every knee of ``input`` with a trained generator; returns (and writes) the
    summary dict. See the module docstring for the inputs and outputs.

    ``network``: the generator (built like ``train.json``'s ``network_def``); ``None`` rebuilds it from the
    checkpoint (:func:`pipeline.baselines.synthesize.load_generator`). ``method`` / ``image_size`` /
    ``net_kwargs``: ``None`` = as the checkpoint records them.
    Knees come from ``landmarks`` if given, else from the KNEEL model (``kneel_global_ckpt`` [+
    ``kneel_local_ckpt``]); with neither, :class:`pipeline.knee_inference.LandmarksRequiredError` is raised.
    ``preprocessing`` / ``writer``: as in :func:`pipeline.mris.infer.run_inference` (defaults: the training
    radiograph chain, :class:`pipeline.knee_inference.KneeMapWriter`). ``overwrite``: replace the outputs of an
    earlier run with other settings in ``output_dir`` (same settings: the run resumes; see
    :func:`pipeline.knee_inference.run_knees`)."""
    masks = atlas_footprints(map_size)
    run = find_knees(input, landmarks, kneel_global_ckpt, kneel_local_ckpt, device, progress)
    kwargs = {k: v for k, v in dict(net_kwargs or {}).items() if v is not None}
    if network is None:
        network = load_generator(method, checkpoint, image_size, **kwargs)
    else:
        load_weights(network, checkpoint, train=TRAIN_COMMAND)
    method, image_size = generator_settings(network, method, image_size)
    model = unwrap(network).to(device).eval()
    net_mask = network_masks(masks, image_size)

    def predict(x: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with torch.no_grad():
            pred = model(x.to(device))
        return {k: v[0] for k, v in outputs_to_atlas(pred.cpu(), masks, net_mask).items()}, {}

    summary = {
        "convention": CONVENTION,
        "method": method, "checkpoint": str(checkpoint), "checkpoint_hash": checkpoint_hash(checkpoint),
        "image_size": int(image_size), "net_kwargs": kwargs or None, "map_size": list(_grid(map_size)),
    }
    chain = preprocessing if preprocessing is not None else Compose(radiograph_transforms(image_size))
    writer = writer if writer is not None else KneeMapWriter(png=png, label=f"synthesized ({method})")
    return run_knees(run, chain, predict, writer, output_dir, summary, desc="direct synthesis inference",
                     progress=progress, overwrite=overwrite)

"""MONAI-engine glue for the KNEEL bundle (``bundles/kneel/configs/train.json``).

* :func:`make_network` -> :class:`pipeline.landmarks.network.KneelHourglass` for a stage; the network
  returns ``(B, N, 2)`` normalised coordinates, so MONAI's default ``SupervisedTrainer`` /
  ``SupervisedEvaluator`` iterations (``batch["image"]`` -> ``network`` -> ``loss(pred, batch["label"])``)
  need no custom step. Loss: :class:`pipeline.landmarks.losses.WingLoss`; validation metrics:
  :class:`pipeline.landmarks.metrics.LandmarkErrorMetric` (mm).
* :func:`load_landmark_model`: a checkpoint file -> the network it describes
  (:func:`pipeline.io.checkpoints.load_network`, which reads bare or nested state dicts, DDP prefixes stripped).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.io.checkpoints import load_network, unwrap
from pipeline.landmarks.geometry import StageSpec
from pipeline.landmarks.network import KneelHourglass
from pipeline.user_errors import CheckpointError

__all__ = ["make_network", "unwrap", "load_landmark_model", "LandmarkCheckpointError"]

#: Every checkpoint problem of the landmark model (missing, unreadable, not a KNEEL network, ...): the shared
#: :class:`pipeline.user_errors.CheckpointError`, under the name landmark code and its users catch.
LandmarkCheckpointError = CheckpointError
#: The command that trains landmark checkpoints (quoted when one is missing).
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundles/kneel/configs/train.json"


def make_network(stage: str, canvas_size: int, canvas_spacing_mm: float, width: int = 64, depth: int = 4,
                 beta: float = 1.0, dropout: float = 0.25, upmode: str = "nearest") -> KneelHourglass:
    """The hourglass for ``stage`` (``"global"``: 1 point, ``"local"``: 16), described by its canvas."""
    spec = StageSpec(stage, int(canvas_size), float(canvas_spacing_mm))
    return KneelHourglass(n_points=spec.n_points, width=int(width), depth=int(depth), beta=float(beta),
                          dropout=float(dropout), upmode=upmode, stage=spec.stage, canvas_size=spec.canvas_size,
                          canvas_spacing_mm=spec.canvas_spacing_mm)


def load_landmark_model(path: str | Path, device: torch.device | str = "cpu") -> KneelHourglass:
    """Rebuild the network a checkpoint describes, load the weights, ``eval()`` mode."""
    net = load_network(path, train=TRAIN_COMMAND)
    if not isinstance(net, KneelHourglass):
        raise LandmarkCheckpointError(f"{path} holds a {type(net).__name__}, not a KNEEL landmark network")
    return net.to(device).eval()

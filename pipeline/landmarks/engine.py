"""MONAI-engine glue for the KNEEL bundle (``bundles/kneel/configs/train.json``).

* :func:`make_network` -> :class:`pipeline.landmarks.network.KneelHourglass` for a stage; the network
  returns ``(B, N, 2)`` normalised coordinates, so MONAI's default ``SupervisedTrainer`` /
  ``SupervisedEvaluator`` iterations (``batch["image"]`` -> ``network`` -> ``loss(pred, batch["label"])``)
  need no custom step. Loss: :class:`pipeline.landmarks.losses.WingLoss`; validation metrics:
  :class:`pipeline.landmarks.metrics.LandmarkErrorMetric` (mm).
* :func:`load_landmark_model`: a checkpoint file (bare state dict, or a dict holding it under ``model`` /
  ``network`` / ``state_dict``; ``module.`` prefixes of DDP stripped) -> the network it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.landmarks.geometry import StageSpec
from pipeline.landmarks.network import KneelHourglass
from pipeline.user_errors import UserInputError

__all__ = ["make_network", "unwrap", "read_state_dict", "load_landmark_model", "LandmarkCheckpointError"]


class LandmarkCheckpointError(UserInputError):
    """A landmark checkpoint is missing or does not describe a KNEEL network."""


def make_network(stage: str, canvas_size: int, canvas_spacing_mm: float, width: int = 64, depth: int = 4,
                 beta: float = 1.0, dropout: float = 0.25, upmode: str = "nearest") -> KneelHourglass:
    """The hourglass for ``stage`` (``"global"``: 1 point, ``"local"``: 16), described by its canvas."""
    spec = StageSpec(stage, int(canvas_size), float(canvas_spacing_mm))
    return KneelHourglass(n_points=spec.n_points, width=int(width), depth=int(depth), beta=float(beta),
                          dropout=float(dropout), upmode=upmode, stage=spec.stage, canvas_size=spec.canvas_size,
                          canvas_spacing_mm=spec.canvas_spacing_mm)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` (or ``network`` itself)."""
    return network.module if hasattr(network, "module") else network


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The network state dict stored in a checkpoint file (see module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise LandmarkCheckpointError(f"landmark checkpoint not found: {p} (train one with bundles/kneel/configs/"
                                      "train.json, or pass the path of your own)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise LandmarkCheckpointError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "network", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise LandmarkCheckpointError(f"{p}: no state dict inside (got {type(obj).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_landmark_model(path: str | Path, device: torch.device | str = "cpu") -> KneelHourglass:
    """Rebuild the network a checkpoint describes (its ``_extra_state``), load the weights, ``eval()`` mode."""
    state = read_state_dict(path)
    desc = state.get("_extra_state")
    if not isinstance(desc, Mapping):
        raise LandmarkCheckpointError(
            f"{path}: no network description (_extra_state) in the checkpoint; it was not written by "
            "pipeline.landmarks (KneelHourglass)")
    try:
        net = KneelHourglass.from_description(desc)
        net.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise LandmarkCheckpointError(f"{path}: cannot build the landmark network ({str(e)[:300]})") from None
    return net.to(device).eval()

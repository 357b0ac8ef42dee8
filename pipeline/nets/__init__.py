"""Networks: the MRIS dual encoder (radiograph / thickness-map ResNet-18 pair), encoder weight loading and
self-describing networks (:mod:`pipeline.nets.describe`).

Names are imported on first use, so ``pipeline.nets.describe`` (torch only) does not pull in MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PAPER_PARAMETERS": "dual_encoder", "DualEncoder": "dual_encoder", "EncoderPair": "dual_encoder",
    "ImageEncoder": "dual_encoder", "MRISSeparate": "dual_encoder", "RadiographDualEncoder": "dual_encoder",
    "RadiographMRISSeparate": "dual_encoder", "count_parameters": "dual_encoder",
    "WeightsMismatchError": "pretrained", "load_encoder_weights": "pretrained", "read_state_dict": "pretrained",
    "DescribedModule": "describe", "network_factory": "describe",
    "DescribedSegResNet": "described", "DescribedUNet": "described",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

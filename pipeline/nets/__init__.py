"""Shared network layer: self-describing networks (:mod:`pipeline.nets.describe`), described MONAI networks
(:mod:`pipeline.nets.described`) and encoder weight loading (:mod:`pipeline.nets.pretrained`). Each method's
own network lives in its package (``pipeline.mris.network``, ``pipeline.landmarks.network``, ...).

Names are imported on first use, so ``pipeline.nets.describe`` (torch only) does not pull in MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
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

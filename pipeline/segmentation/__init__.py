"""DESS cartilage segmentation: data lists, canonical orientation + left-knee flip, network factory,
per-class Dice helpers and fault-tolerant inference, wired by ``bundles/dess_seg``."""

from __future__ import annotations

from .data import (
    DEFAULT_FRACTIONS,
    build_datalist,
    datalist_from_folder,
    datalist_from_manifest,
    input_root,
    side_from_dicom,
    side_from_path,
)
from .inference import SafeInferenceRunner, load_weights
from .metrics import CARTILAGE_CHANNELS, cartilage_dice, select_channels
from .network import N_CLASSES, build_network
from .transforms import (
    CANONICAL_AXCODES,
    FLIP_META_KEY,
    ML_AXIS,
    FlipToLeftKneed,
    canonical_transforms,
    normalise_side,
)

__all__ = [
    "CANONICAL_AXCODES", "CARTILAGE_CHANNELS", "DEFAULT_FRACTIONS", "FLIP_META_KEY", "ML_AXIS", "N_CLASSES",
    "FlipToLeftKneed", "SafeInferenceRunner", "build_datalist", "build_network", "canonical_transforms",
    "cartilage_dice", "datalist_from_folder", "datalist_from_manifest", "input_root",
    "load_weights", "normalise_side", "select_channels", "side_from_dicom", "side_from_path",
]

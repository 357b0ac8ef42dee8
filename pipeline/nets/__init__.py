"""Networks: the MRIS dual encoder (radiograph / thickness-map ResNet-18 pair) and weight loading."""

from pipeline.nets.dual_encoder import (
    PAPER_PARAMETERS,
    DualEncoder,
    ImageEncoder,
    MRISSeparate,
    RadiographDualEncoder,
    RadiographMRISSeparate,
    count_parameters,
)
from pipeline.nets.pretrained import WeightsMismatchError, load_encoder_weights, read_state_dict

__all__ = [
    "PAPER_PARAMETERS",
    "DualEncoder",
    "ImageEncoder",
    "MRISSeparate",
    "RadiographDualEncoder",
    "RadiographMRISSeparate",
    "WeightsMismatchError",
    "count_parameters",
    "load_encoder_weights",
    "read_state_dict",
]

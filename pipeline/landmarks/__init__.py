"""KNEEL-style knee landmark localisation (Tiulpin et al., ICCV-W 2019) for bilateral PA radiographs.

Modules: :mod:`.soft_argmax` (heat map -> normalised (x, y)), :mod:`.losses` (Wing loss),
:mod:`.network` (hourglass + soft-argmax), :mod:`.geometry` (exact canvas matrices, resampling, stages),
:mod:`.data` (manifest -> items, subject folds, MONAI transforms with flip-correct landmark permutation),
:mod:`.engine` (network factory and checkpoint loading for the MONAI bundle), :mod:`.metrics` (error in mm,
recall, outliers per landmark group), :mod:`.infer` (:func:`predict_knees`, the inference bundle),
:mod:`.evaluate` (held-out evaluation and MRIS ROI offset), :mod:`.demo` (one-command demo).

Points are ``(x, y)`` = (column, row) pixels of the ORIGINAL radiograph; KNEEL order: tibial 0-8, femoral
9-15, each left -> right in the image; joint centre = 4; the patient's right knee is on the image's left.
"""

from pipeline.landmarks.losses import WingLoss, wing_loss
from pipeline.landmarks.soft_argmax import soft_argmax_2d

__all__ = ["WingLoss", "wing_loss", "soft_argmax_2d", "predict_knees", "KneeLocaliser", "load_landmark_model"]


def __getattr__(name: str):  # lazy: inference pulls in pydicom / MONAI transforms
    if name in ("predict_knees", "KneeLocaliser"):
        from pipeline.landmarks import infer

        return getattr(infer, name)
    if name == "load_landmark_model":
        from pipeline.landmarks.engine import load_landmark_model

        return load_landmark_model
    raise AttributeError(name)

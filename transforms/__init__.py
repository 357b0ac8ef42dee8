"""MONAI transforms for knee radiographs and cartilage thickness maps.

Array transforms (``X``) and dictionary transforms (``Xd``) in ``monai.transforms`` style, grouped by
subject: :mod:`.radiograph_io` (DICOM loading), :mod:`.roi` (bilateral split, 140 mm knee ROI crop,
flip, point mapping), :mod:`.intensity` (MRIS percentile normalisation), :mod:`.thickness_maps`
(NaN-aware resize, NaN fill, / 3 mm scaling, MRIS-C stacking) and :mod:`.augment` (per-sample MRIS
augmentation). Images are channel-first ``(C, H, W)`` = (channel, rows, columns); points are
``(x, y)`` = (column, row) pixels of the ORIGINAL radiograph (``pipeline.conventions``).
"""

from pipeline.io.dicom import RadiographReadError, list_radiographs, read_radiograph

from .augment import RandKneeAugment, RandKneeAugmentd
from .intensity import PercentileNormalize, PercentileNormalized, nan_quantile
from .knee_side import FlipToLeftKneed
from .radiograph_io import LoadKneeRadiograph, LoadKneeRadiographd, radiograph_affine, radiograph_metatensor
from .roi import (
    ROI_META_KEY,
    BilateralKneeROICropd,
    KneeROICrop,
    KneeROICropd,
    crop_to_original_points,
    image_to_original_points,
    knee_roi_record,
    original_to_crop_points,
    original_to_image_points,
    parse_centres,
    roi_size_px,
)
from .thickness_maps import (
    FillNaN,
    FillNaNd,
    NaNAwareResize,
    NaNAwareResized,
    ScaleThickness,
    ScaleThicknessd,
    StackThicknessMaps,
    StackThicknessMapsd,
    UnstackThicknessMaps,
    UnstackThicknessMapsd,
    nan_aware_resize,
)

__all__ = [
    "RadiographReadError",
    "read_radiograph",
    "list_radiographs",
    "LoadKneeRadiograph",
    "LoadKneeRadiographd",
    "radiograph_affine",
    "radiograph_metatensor",
    "ROI_META_KEY",
    "roi_size_px",
    "KneeROICrop",
    "KneeROICropd",
    "BilateralKneeROICropd",
    "parse_centres",
    "original_to_crop_points",
    "crop_to_original_points",
    "image_to_original_points",
    "original_to_image_points",
    "knee_roi_record",
    "PercentileNormalize",
    "PercentileNormalized",
    "nan_quantile",
    "nan_aware_resize",
    "NaNAwareResize",
    "NaNAwareResized",
    "FillNaN",
    "FillNaNd",
    "ScaleThickness",
    "ScaleThicknessd",
    "StackThicknessMaps",
    "StackThicknessMapsd",
    "UnstackThicknessMaps",
    "UnstackThicknessMapsd",
    "RandKneeAugment",
    "RandKneeAugmentd",
    "FlipToLeftKneed",
]

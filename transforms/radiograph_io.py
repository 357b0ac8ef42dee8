"""Loading knee radiograph DICOMs as channel-first MetaTensors.

Axis order and affine
---------------------
The image is ``(1, H, W)``: channel, then ``H = Rows`` (axis 1, image y) and ``W = Columns`` (axis 2,
image x) -- pydicom's ``pixel_array`` order with a channel axis in front (MONAI's ITK/Pydicom readers
give ``(W, H)``; this loader does not transpose).

The affine (3 x 3, float64) maps a spatial index ``(row, col, 1)`` to a position in mm in the DETECTOR
PLANE of the original image: ``(row * row_spacing, col * col_spacing)``, the origin being the centre of
pixel (0, 0). It is NOT a patient (LPS/RAS) affine: a projection radiograph has no 3D position. Every
transform in this package updates it, so ``inv(meta["original_affine"]) @ affine`` maps an index of a
derived image (crop, flipped crop, resized crop) back to the original pixel exactly (see
:func:`transforms.roi.image_to_original_points`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from pipeline.io.dicom import (
    META_FILENAME,
    META_SPACING,
    META_SPACING_KNOWN,
    RadiographReadError,
    read_radiograph,
)

__all__ = ["LoadKneeRadiograph", "LoadKneeRadiographd", "RadiographReadError", "radiograph_affine",
           "radiograph_metatensor"]


def radiograph_affine(spacing_rc: Sequence[float]) -> torch.Tensor:
    """Index ``(row, col, 1)`` -> detector-plane mm ``(row * sr, col * sc, 1)``: ``diag(sr, sc, 1)``."""
    sr, sc = (float(s) for s in spacing_rc)
    return torch.tensor([[sr, 0.0, 0.0], [0.0, sc, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def radiograph_metatensor(image: np.ndarray, meta: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> MetaTensor:
    """A radiograph decoded by :func:`pipeline.io.dicom.read_radiograph` (``(H, W)`` + its header record) as the
    ``(1, H, W)`` MetaTensor :class:`LoadKneeRadiograph` returns (affine and metadata: module docstring)."""
    affine = radiograph_affine(meta[META_SPACING])
    meta = dict(meta)
    meta["original_affine"] = affine.clone()
    meta["spatial_shape"] = np.asarray(np.shape(image), dtype=np.int64)
    meta["original_channel_dim"] = "no_channel"
    data = torch.as_tensor(np.asarray(image)[None], dtype=dtype)
    if device is not None:
        data = data.to(device)
    return MetaTensor(data, affine=affine, meta=meta)


class LoadKneeRadiograph(Transform):
    """Load a knee radiograph DICOM (file, OAI-style extension-less file, or one-file folder).

    Returns a MetaTensor of shape ``(1, H, W)`` (rows, columns), float32 by default, on ``device``.
    Intensities: MONOCHROME1 inverted (bone bright), BitsStored and RescaleSlope/Intercept applied.
    Metadata (see :func:`pipeline.io.dicom.read_radiograph`): ``filename_or_obj``, ``spacing_mm``
    ([row, column] mm of the ORIGINAL image; the current spacing is ``img.pixdim``), ``spacing_known``,
    ``PatientID``, ``StudyDate``, ``laterality``, ... plus ``affine`` / ``original_affine`` (module doc).
    A radiograph that is already a MetaTensor (decoded once, e.g. for the landmark model, and wrapped by
    :func:`radiograph_metatensor`) is passed through as a copy in ``dtype`` on ``device``: it is not read again.

    Args:
        allow_missing_spacing: accept files without pixel spacing (spacing 1.0 mm, ``spacing_known=False``).
        dtype: output dtype.
        device: output device (default CPU).

    Raises:
        RadiographReadError: unreadable file; the message names the file and the reason.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        allow_missing_spacing: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.allow_missing_spacing = allow_missing_spacing
        self.dtype = dtype
        self.device = device

    def __call__(self, path: Any) -> MetaTensor:
        if isinstance(path, MetaTensor):  # decoded already (e.g. by the landmark model): no second decode
            if not path.meta.get(META_SPACING_KNOWN, True) and not self.allow_missing_spacing:
                raise RadiographReadError(str(path.meta.get(META_FILENAME, "")), "no pixel spacing (neither "
                                          "ImagerPixelSpacing nor PixelSpacing; pass allow_missing_spacing=True)")
            out = path.to(device=self.device if self.device is not None else path.device, dtype=self.dtype)
            return out.clone() if out is path else out  # never share pixels or metadata with the caller's image
        if isinstance(path, (list, tuple)):
            if len(path) != 1:
                raise RadiographReadError(str(path), "expected one path, got a sequence")
            path = path[0]
        image, meta = read_radiograph(path, allow_missing_spacing=self.allow_missing_spacing)
        return radiograph_metatensor(image, meta, self.dtype, self.device)


class LoadKneeRadiographd(MapTransform):
    """Dictionary version of :class:`LoadKneeRadiograph`: ``data[key]`` (a path, or an already decoded
    MetaTensor, passed through) -> MetaTensor (1, H, W)."""

    backend = LoadKneeRadiograph.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        allow_missing_spacing: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadKneeRadiograph(allow_missing_spacing=allow_missing_spacing, dtype=dtype, device=device)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d

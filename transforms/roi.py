"""Knee ROI crop around a joint centre (KNEEL / MRIS style), bilateral split, point mapping.

Coordinates
-----------
* Centres and points are ``(x, y) = (column, row)`` in pixels of the ORIGINAL radiograph
  (:mod:`pipeline.conventions`); images are ``(C, H, W)`` with axis 1 = row, axis 2 = column.
* ROI side in pixels, per axis: ``n = round(roi_mm / spacing)`` (half up), with ``spacing`` the
  row / column spacing in mm, so an anisotropic image gives a PHYSICALLY square ROI.
* Placement: the pixel containing the centre becomes crop index ``n // 2`` on each axis, i.e. the crop
  starts at ``r0 = floor(y + 0.5) - n_r // 2`` and ``c0 = floor(x + 0.5) - n_c // 2``. The crop is a pure
  integer shift (no interpolation): crop index ``(r, c)`` is source index ``(r + r0, c + c0)``.
  Outside the image the crop is filled with ``pad_value`` (never wrapped).
* Sides: the patient's RIGHT knee lies on the image's LEFT half. With ``flip_side="R"`` (default, the
  MRIS convention) right-knee crops are flipped left-right so every knee looks like a left knee; then
  crop column ``c`` is source column ``c0 + (n_c - 1) - c``.
* Every crop carries ``meta["knee_roi"]`` (side, flipped, start_rc, size_rc, centre_xy, roi_mm,
  spacing_rc, source_shape_rc, crop_to_original) and an updated affine, so inference outputs can be
  mapped back: points with :func:`crop_to_original_points` / :func:`image_to_original_points`, images
  with ``inverse`` (MONAI inverse machinery: the crop is unflipped and pasted into an image of the
  source size filled with ``pad_value``).
* A later MONAI ``Resize`` (``align_corners=False``) maps crop index ``i`` to
  ``(i + 0.5) * S / n - 0.5``; pass ``out_size_rc`` to the point helpers to include it.
* :func:`knee_roi_record`: the JSON-ready record of where a crop (or its resize: the network input) came
  from, with its exact output -> original ``(x, y)`` matrix; inference writes it next to every knee's maps.
* The geometry (ROI size, placement, the crop / flip / resize matrices, padding, the landmark permutation) is
  :mod:`pipeline.geometry`, shared with the KNEEL landmark canvases; ``crop_to_original`` and MONAI affines are
  ``(row, col)`` matrices, everything else here is ``(x, y)``.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, TransformBackends

from pipeline.conventions import ROI_MM, SIDE_NAMES, SIDES
from pipeline.geometry import (
    apply_matrix,
    crop_matrix,
    crop_overlap,
    crop_start,
    invert,
    permute_if_flipped,
    resize_matrix,
    roi_record,
    roi_size_px,
    swap_xy_rc,
)

from ._utils import (
    affine_spacing,
    compose_affine,
    numpy_fast_path,
    original_affine,
    plain,
    spatial_affine,
    to_tensor,
)

__all__ = [
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
]

#: Key of the ROI record in a crop's metadata.
ROI_META_KEY = "knee_roi"


def _normalise_side(side: Any) -> str:
    s = str(side).strip().upper()
    for k, name in SIDE_NAMES.items():
        if s in (k, name):
            return k
    raise ValueError(f"side must be one of {SIDES} (or {tuple(SIDE_NAMES.values())}), got {side!r}")


def _as_xy(centre: Any) -> tuple[float, float] | None:
    """``(x, y)`` floats from a pair (list / array / tensor); None for None or a non-finite pair."""
    if centre is None:
        return None
    c = centre.detach().cpu().numpy() if isinstance(centre, torch.Tensor) else np.asarray(centre, dtype=float)
    c = np.asarray(c, dtype=float).reshape(-1)
    if c.size != 2:
        raise ValueError(f"a centre must be one (x, y) pair, got shape {np.shape(centre)}")
    if not np.all(np.isfinite(c)):
        return None
    return float(c[0]), float(c[1])


def parse_centres(centres: Any) -> dict[str, tuple[float, float]]:
    """Per-side centres ``{"R": (x, y), "L": (x, y)}`` from a dict or a ``(2, 2)`` array.

    A dict may use ``"R"/"L"`` or ``"RIGHT"/"LEFT"`` keys; an array's rows are in ``SIDES`` order
    (R first). Missing, None or non-finite entries are dropped (that knee is skipped).
    """
    out: dict[str, tuple[float, float]] = {}
    if isinstance(centres, Mapping):
        for k, v in centres.items():
            xy = _as_xy(v)
            if xy is not None:
                out[_normalise_side(k)] = xy
        return out
    arr = centres.detach().cpu().numpy() if isinstance(centres, torch.Tensor) else np.asarray(centres, float)
    if arr.shape != (len(SIDES), 2):
        raise ValueError(f"centres array must have shape ({len(SIDES)}, 2) in SIDES order {SIDES}, got {arr.shape}")
    for side, row in zip(SIDES, arr):
        xy = _as_xy(row)
        if xy is not None:
            out[side] = xy
    return out


class KneeROICrop(InvertibleTransform, Transform):
    """Square ``roi_mm`` crop around a joint centre, padded outside the image, right knees flipped.

    Input ``(C, H, W)`` numpy or torch (a MetaTensor supplies the spacing through its affine, and a
    possibly resampled image is handled through ``meta["original_affine"]``). Output: MetaTensor
    ``(C, n_r, n_c)`` on the input's device and dtype, ``n = round(roi_mm / spacing)`` per axis, with an
    updated affine and ``meta["knee_roi"]`` (module docstring). ``inverse`` pastes a crop back into the
    source frame.

    Args:
        roi_mm: ROI side in mm (default ``pipeline.conventions.ROI_MM`` = 140).
        pad_value: constant used where the ROI leaves the image.
        flip_side: side whose crops are flipped left-right (``"R"``, default), or None for no flip.
        spacing: ``(row, col)`` spacing in mm overriding the image's; needed for non-MetaTensor input.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        roi_mm: float = ROI_MM,
        pad_value: float = 0.0,
        flip_side: str | None = "R",
        spacing: Sequence[float] | None = None,
    ) -> None:
        self.roi_mm = float(roi_mm)
        self.pad_value = float(pad_value)
        self.flip_side = None if flip_side is None else _normalise_side(flip_side)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def __call__(self, img: Any, centre_xy: Any, side: str) -> torch.Tensor:
        """Crop ``img`` around ``centre_xy`` = (x, y) in ORIGINAL pixels for knee ``side`` ("R"/"L")."""
        side = _normalise_side(side)
        xy = _as_xy(centre_xy)
        if xy is None:
            raise ValueError(f"centre must be a finite (x, y) pair, got {centre_xy!r}")
        img_t = to_tensor(img)
        if img_t.ndim != 3:
            raise ValueError(f"expected a channel-first 2D image (C, H, W), got shape {tuple(img_t.shape)}")
        cur_aff = spatial_affine(img_t)
        orig_aff = original_affine(img_t)
        if self.spacing is not None:
            spacing_rc = self.spacing
        elif isinstance(img, MetaTensor):
            spacing_rc = tuple(float(s) for s in affine_spacing(cur_aff))
        else:
            raise ValueError("KneeROICrop needs the pixel spacing: pass a MetaTensor or spacing=(row, col) mm")
        # original index -> current index (identity unless the image was resampled after loading)
        orig_to_cur = np.linalg.solve(cur_aff, orig_aff)
        n_r, n_c = roi_size_px(self.roi_mm, spacing_rc)
        c0, r0 = crop_start(apply_matrix(swap_xy_rc(orig_to_cur), xy), (n_r, n_c))
        flipped = self.flip_side is not None and side == self.flip_side
        h, w = int(img_t.shape[1]), int(img_t.shape[2])

        out = self._crop(plain(img_t), r0, c0, n_r, n_c, flipped)
        t = swap_xy_rc(crop_matrix((c0, r0), (n_r, n_c), flipped))  # crop (row, col) -> current (row, col)
        crop_to_orig = np.linalg.solve(orig_to_cur, t)
        info = {
            "side": side,
            "flipped": bool(flipped),
            "centre_xy": [xy[0], xy[1]],
            "start_rc": [int(r0), int(c0)],
            "size_rc": [int(n_r), int(n_c)],
            "roi_mm": self.roi_mm,
            "spacing_rc": [float(spacing_rc[0]), float(spacing_rc[1])],
            "source_shape_rc": [h, w],
            "pad_value": self.pad_value,
            "crop_to_original": crop_to_orig.tolist(),
        }
        if not get_track_meta():
            return out
        meta_obj = TraceableTransform.track_transform_meta(
            img_t,
            sp_size=(n_r, n_c),
            affine=torch.as_tensor(t, dtype=torch.float64),
            extra_info={"start_rc": [int(r0), int(c0)], "flipped": bool(flipped), "size_rc": [n_r, n_c]},
            orig_size=(h, w),
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        res = MetaTensor(out)
        res.copy_meta_from(meta_obj)
        res.meta = copy.deepcopy(dict(res.meta))
        res.meta[ROI_META_KEY] = info
        return res

    def _crop(self, x: torch.Tensor, r0: int, c0: int, n_r: int, n_c: int, flipped: bool) -> torch.Tensor:
        inside = crop_overlap((c0, r0), (n_r, n_c), x.shape[1:3])
        if numpy_fast_path(x):
            xn = x.detach().numpy()
            o = np.full((x.shape[0], n_r, n_c), self.pad_value, dtype=xn.dtype)
            if inside is not None:
                o[(slice(None), *inside[1])] = xn[(slice(None), *inside[0])]
            return torch.from_numpy(np.ascontiguousarray(o[:, :, ::-1]) if flipped else o)
        out = torch.full((x.shape[0], n_r, n_c), self.pad_value, dtype=x.dtype, device=x.device)
        if inside is not None:
            out[(slice(None), *inside[1])] = x[(slice(None), *inside[0])]
        return torch.flip(out, dims=(2,)) if flipped else out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Paste a crop (after undoing any later invertible transforms) back into the source frame.

        The result has the source's spatial shape; pixels outside the ROI are ``pad_value``.
        """
        xform = self.pop_transform(data)
        extra = xform[TraceKeys.EXTRA_INFO]
        h, w = (int(s) for s in xform[TraceKeys.ORIG_SIZE])
        r0, c0 = extra["start_rc"]
        n_r, n_c = extra["size_rc"]
        flipped = bool(extra["flipped"])
        x = plain(data)
        if tuple(x.shape[1:]) != (n_r, n_c):
            raise ValueError(f"inverse expects a crop of shape {(n_r, n_c)}, got {tuple(x.shape[1:])}")
        if flipped:
            x = torch.flip(x, dims=(2,))
        out = torch.full((x.shape[0], h, w), self.pad_value, dtype=x.dtype, device=x.device)
        inside = crop_overlap((c0, r0), (n_r, n_c), (h, w))
        if inside is not None:
            out[(slice(None), *inside[0])] = x[(slice(None), *inside[1])]
        if not isinstance(data, MetaTensor):
            return out
        res = MetaTensor(out)
        res.copy_meta_from(data)
        res.affine = compose_affine(data, invert(swap_xy_rc(crop_matrix((c0, r0), (n_r, n_c), flipped))))
        res.meta = dict(res.meta)
        res.meta.pop(ROI_META_KEY, None)
        return res


class KneeROICropd(MapTransform, InvertibleTransform):
    """Single-knee dictionary form of :class:`KneeROICrop`.

    ``data[centre_key]`` is the centre ``(x, y)`` in ORIGINAL pixels; the side is ``side`` if given,
    else ``data[side_key]``. Each of ``keys`` is replaced by its crop (same centre and side for all).
    """

    backend = KneeROICrop.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        centre_key: str = "centre",
        side_key: str = "side",
        side: str | None = None,
        roi_mm: float = ROI_MM,
        pad_value: float = 0.0,
        flip_side: str | None = "R",
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.centre_key, self.side_key, self.side = centre_key, side_key, side
        self.cropper = KneeROICrop(roi_mm=roi_mm, pad_value=pad_value, flip_side=flip_side, spacing=spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        side = self.side if self.side is not None else d[self.side_key]
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], d[self.centre_key], side)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


class BilateralKneeROICropd(MapTransform, InvertibleTransform):
    """Bilateral split: one ROI crop per knee, written to ``output_pattern.format(key=key, side=side)``.

    ``data[centres_key]`` holds the joint centres in ORIGINAL pixels ``(x, y)``: a dict
    ``{"R": (x, y), "L": (x, y)}`` or a ``(2, 2)`` array in ``SIDES`` order (R first); a missing or
    non-finite centre skips that knee. With the default pattern, ``"image"`` gives ``"image_R"`` and
    ``"image_L"`` (right crop flipped to left orientation by default, recorded in
    ``meta["knee_roi"]``). The input keys are kept unless ``delete_keys=True``.
    ``inverse`` replaces each ``{key}_{side}`` crop by its un-cropped, un-flipped full-size image.
    """

    backend = KneeROICrop.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        centres_key: str = "centres",
        sides: Sequence[str] = SIDES,
        output_pattern: str = "{key}_{side}",
        roi_mm: float = ROI_MM,
        pad_value: float = 0.0,
        flip_side: str | None = "R",
        spacing: Sequence[float] | None = None,
        delete_keys: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.centres_key = centres_key
        self.sides = tuple(_normalise_side(s) for s in sides)
        self.output_pattern = output_pattern
        self.delete_keys = delete_keys
        self.cropper = KneeROICrop(roi_mm=roi_mm, pad_value=pad_value, flip_side=flip_side, spacing=spacing)

    def output_key(self, key: Hashable, side: str) -> str:
        return self.output_pattern.format(key=key, side=side)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        centres = parse_centres(d[self.centres_key])
        for key in self.key_iterator(d):
            for side in self.sides:
                if side in centres:
                    d[self.output_key(key, side)] = self.cropper(d[key], centres[side], side)
            if self.delete_keys:
                del d[key]
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            for side in self.sides:
                ok = self.output_key(key, side)
                if ok in d:
                    d[ok] = self.cropper.inverse(d[ok])
        return d


# --------------------------------------------------------------------------------------------- points
def _points(points_xy: Any) -> np.ndarray:
    p = points_xy.detach().cpu().numpy() if isinstance(points_xy, torch.Tensor) else points_xy
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.shape[-1] != 2:
        raise ValueError(f"points must be (N, 2) (x, y), got shape {p.shape}")
    return p


def _roi_info(roi: Any) -> Mapping:
    if isinstance(roi, MetaTensor):
        return roi.meta[ROI_META_KEY]
    return roi


def _crop_to_original_xy(info: Mapping, out_size_rc: Sequence[int] | None) -> np.ndarray:
    """(x, y) matrix: pixel of the crop (or of its later ``Resize`` to ``out_size_rc``) -> ORIGINAL pixel."""
    return swap_xy_rc(info["crop_to_original"]) @ resize_matrix(info["size_rc"], out_size_rc)


def original_to_crop_points(
    points_xy: Any, roi: Any, out_size_rc: Sequence[int] | None = None, permute_landmarks: bool = False
) -> np.ndarray:
    """Map ``(N, 2)`` points ``(x, y)`` of the ORIGINAL image into a crop (flip included).

    Args:
        roi: the crop's ``meta["knee_roi"]`` dict, or the crop MetaTensor itself.
        out_size_rc: ``(rows, cols)`` of a later MONAI ``Resize`` (align_corners=False) of the crop.
        permute_landmarks: for a flipped crop and 16 KNEEL landmarks, reorder them by
            ``FLIP_PERMUTATION`` so index i is again "i-th from the left" in the crop.
    """
    info = _roi_info(roi)
    p = apply_matrix(invert(_crop_to_original_xy(info, out_size_rc)), _points(points_xy))
    return permute_if_flipped(p, info["flipped"] and permute_landmarks)


def crop_to_original_points(
    points_xy: Any, roi: Any, out_size_rc: Sequence[int] | None = None, permute_landmarks: bool = False
) -> np.ndarray:
    """Inverse of :func:`original_to_crop_points` (points of the crop, or of its resize, -> original)."""
    info = _roi_info(roi)
    p = permute_if_flipped(_points(points_xy), info["flipped"] and permute_landmarks)
    return apply_matrix(_crop_to_original_xy(info, out_size_rc), p)


def _image_to_original_xy(img: MetaTensor) -> np.ndarray:
    """(x, y) matrix: pixel of ``img`` -> ORIGINAL pixel, ``inv(original_affine) @ affine``."""
    return swap_xy_rc(np.linalg.solve(original_affine(img), spatial_affine(img)))


def image_to_original_points(points_xy: Any, img: MetaTensor) -> np.ndarray:
    """Points ``(x, y)`` of a derived image -> ORIGINAL pixels, via ``inv(original_affine) @ affine``.

    Valid after any chain of affine-tracking transforms (our crop/flip, MONAI Resize, Rotate, ...).
    """
    return apply_matrix(_image_to_original_xy(img), _points(points_xy))


def original_to_image_points(points_xy: Any, img: MetaTensor) -> np.ndarray:
    """ORIGINAL pixels ``(x, y)`` -> points of the derived image ``img`` (inverse of the above)."""
    return apply_matrix(invert(_image_to_original_xy(img)), _points(points_xy))


def knee_roi_record(img: Any) -> dict[str, Any] | None:
    """The ROI record (:func:`pipeline.geometry.roi_record`) of a knee crop, or of any image derived from one by
    affine-tracking transforms (the inference chain's normalisation and ``Resize``): file, side, flipped, joint
    centre and ROI size in ORIGINAL pixels, size in mm, spacing, and ``output_to_original``, the exact map from a
    pixel ``(u, v)`` of ``img`` to the ORIGINAL radiograph ``(x, y)``. None when ``img`` carries no crop record."""
    if not isinstance(img, MetaTensor) or ROI_META_KEY not in img.meta:
        return None
    info = img.meta[ROI_META_KEY]
    return roi_record(side=info["side"], flipped=info["flipped"], centre_xy=info["centre_xy"],
                      size_rc=info["size_rc"], spacing_rc=info["spacing_rc"],
                      output_to_original=_image_to_original_xy(img), output_size_rc=tuple(img.shape[-2:]),
                      file=str(img.meta.get("filename_or_obj", "")))

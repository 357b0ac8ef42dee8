"""Cartilage thickness-map transforms: NaN-aware resize, NaN fill + mask, scaling, MRIS-C stacking.

Thickness maps are ``(C, H, W)`` (usually C = 1) float maps in mm on the atlas grid, NaN outside the
cartilage footprint, left-knee convention (``pipeline.conventions``). Axis 1 = rows, axis 2 = columns.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.transforms.inverse import TraceableTransform
from monai.transforms.utils import scale_affine
from monai.utils import TraceKeys, TransformBackends

from pipeline.conventions import MAP_KEYS, THICKNESS_SCALE_MM

from ._utils import as_float, compose_affine, plain, to_tensor, with_meta

__all__ = [
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
]

_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    s = tuple(int(v) for v in size)
    if len(s) != 2:
        raise ValueError(f"spatial_size must be an int or (rows, cols), got {size}")
    return s  # type: ignore[return-value]


def nan_aware_resize(
    x: torch.Tensor, spatial_size: int | Sequence[int], mode: str = "bilinear", mask_threshold: float = 0.5
) -> torch.Tensor:
    """Resize a ``(C, H, W)`` map with NaN holes to ``spatial_size`` without letting NaN/0 bleed in.

    ``mask = isfinite(x)`` and ``x`` with non-finite values set to 0 are resized separately
    (``align_corners=False``); the output is ``resized values / resized mask``, NaN where the resized
    mask ``< mask_threshold``, and clamped per channel to ``[min, max]`` of the valid input. Where the
    input mask is all valid around an output pixel, the resized mask is 1 there, so the output is
    valid exactly where the input was. Plain tensor in, plain tensor out (float).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    size = _pair(spatial_size)
    x = as_float(x)
    if tuple(x.shape[1:]) == size:
        return x.clone()
    valid = torch.isfinite(x)
    vals = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    both = torch.cat([vals, valid.to(x.dtype)], dim=0)[None]
    r = F.interpolate(both, size=size, mode=mode, **kw)[0]
    c = x.shape[0]
    r_vals, r_mask = r[:c], r[c:]
    out = r_vals / r_mask.clamp_min(1e-6)
    out = torch.where(r_mask >= mask_threshold, out, torch.full_like(out, float("nan")))
    for ch in range(c):
        v = x[ch][valid[ch]]
        if v.numel():
            out[ch] = torch.where(torch.isnan(out[ch]), out[ch], out[ch].clamp(v.min(), v.max()))
        else:
            out[ch] = float("nan")
    return out


class NaNAwareResize(InvertibleTransform, Transform):
    """Resize ``(C, H, W)`` maps with NaN holes to ``spatial_size`` (see :func:`nan_aware_resize`).

    The affine is updated like MONAI's ``Resize`` (align_corners=False); ``inverse`` resizes back to the
    previous size with the same NaN-aware rule (not bit-exact: resampling loses information).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, spatial_size: int | Sequence[int], mode: str = "bilinear", mask_threshold: float = 0.5):
        self.spatial_size = _pair(spatial_size)
        self.mode = mode
        self.mask_threshold = mask_threshold

    def _resize(self, img: Any, size: tuple[int, int], push: bool) -> torch.Tensor:
        img_t = to_tensor(img)
        orig = tuple(int(s) for s in img_t.shape[1:])
        out = nan_aware_resize(plain(img_t), size, self.mode, self.mask_threshold)
        if not isinstance(img_t, MetaTensor) or not get_track_meta():
            return out if not get_track_meta() else with_meta(out, img_t)
        aff = torch.as_tensor(scale_affine(orig, size, centered=True), dtype=torch.float64)
        if push:
            meta_obj = TraceableTransform.track_transform_meta(
                img_t, sp_size=size, affine=aff, orig_size=orig, transform_info=self.get_transform_info()
            )
            return with_meta(out, img_t, meta_obj)
        res = with_meta(out, img_t)
        res.affine = compose_affine(img_t, aff)
        return res

    def __call__(self, img: Any) -> torch.Tensor:
        return self._resize(img, self.spatial_size, push=True)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        xform = self.pop_transform(data)
        return self._resize(data, tuple(int(s) for s in xform[TraceKeys.ORIG_SIZE]), push=False)


class NaNAwareResized(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`NaNAwareResize`."""

    backend = NaNAwareResize.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: int | Sequence[int],
        mode: str = "bilinear",
        mask_threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizer = NaNAwareResize(spatial_size, mode, mask_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d


class FillNaN(Transform):
    """Replace non-finite values by ``value`` (default 0, the MRIS network input); optionally keep a mask.

    Returns the filled ``(C, H, W)`` map; with ``append_mask=True`` returns ``(2C, H, W)``: the filled
    channels followed by the validity mask channels (1.0 = finite input, 0.0 = NaN/inf), same dtype.
    Use :meth:`mask` for the mask alone.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, value: float = 0.0, append_mask: bool = False) -> None:
        self.value = float(value)
        self.append_mask = append_mask

    @staticmethod
    def mask(img: Any) -> torch.Tensor:
        """Validity mask (1.0 where finite) with the metadata of ``img``."""
        img_t = as_float(to_tensor(img))
        return with_meta(torch.isfinite(plain(img_t)).to(img_t.dtype), img_t)

    def __call__(self, img: Any) -> torch.Tensor:
        img_t = as_float(to_tensor(img))
        x = plain(img_t)
        valid = torch.isfinite(x)
        out = torch.where(valid, x, torch.full_like(x, self.value))
        if self.append_mask:
            out = torch.cat([out, valid.to(x.dtype)], dim=0)
        return with_meta(out, img_t)


class FillNaNd(MapTransform):
    """Dictionary version of :class:`FillNaN`; the mask goes to ``f"{key}_{mask_key_postfix}"``.

    With ``append_mask=True`` the mask is appended as channels instead and no mask key is written.
    """

    backend = FillNaN.backend

    def __init__(
        self,
        keys: KeysCollection = MAP_KEYS,
        value: float = 0.0,
        mask_key_postfix: str | None = "mask",
        append_mask: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.filler = FillNaN(value, append_mask)
        self.mask_key_postfix = mask_key_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.mask_key_postfix and not self.filler.append_mask:
                d[f"{key}_{self.mask_key_postfix}"] = FillNaN.mask(d[key])
            d[key] = self.filler(d[key])
        return d


class ScaleThickness(InvertibleTransform, Transform):
    """Thickness in mm -> network units: ``x / scale_mm`` (default ``THICKNESS_SCALE_MM`` = 3 mm).

    ``invert=True`` builds the inverse map (``x * scale_mm``, network output -> mm); ``inverse()``
    applies the opposite of the configured direction (a pure scaling: no trace is needed, so it also
    works on fresh network outputs). The inverse is exact in real arithmetic; in float32 a round trip
    is within 1 ulp (relative 6e-8). With ``dtype=torch.float64`` float32 inputs round-trip exactly.
    NaN stays NaN.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, scale_mm: float = THICKNESS_SCALE_MM, invert: bool = False, dtype: torch.dtype | None = None):
        if scale_mm <= 0:
            raise ValueError(f"scale_mm must be positive, got {scale_mm}")
        self.scale_mm = float(scale_mm)
        self.invert = invert
        self.dtype = dtype

    def _apply(self, img: Any, divide: bool) -> torch.Tensor:
        img_t = as_float(to_tensor(img, dtype=self.dtype))
        x = plain(img_t)
        out = x / self.scale_mm if divide else x * self.scale_mm
        return with_meta(out, img_t)

    def __call__(self, img: Any) -> torch.Tensor:
        return self._apply(img, divide=not self.invert)

    def inverse(self, data: Any) -> torch.Tensor:
        return self._apply(data, divide=self.invert)


class ScaleThicknessd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ScaleThickness`."""

    backend = ScaleThickness.backend

    def __init__(
        self,
        keys: KeysCollection = MAP_KEYS,
        scale_mm: float = THICKNESS_SCALE_MM,
        invert: bool = False,
        dtype: torch.dtype | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleThickness(scale_mm, invert, dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler.inverse(d[key])
        return d


class StackThicknessMaps(Transform):
    """MRIS-C input: resize each map to ``S x S`` (NaN-aware) and stack them vertically.

    ``__call__(maps)`` takes a sequence of ``(C, h, w)`` maps (default order FC, TC) and returns
    ``(C, n * S, S)``: map 0 in rows ``[0, S)``, map 1 in rows ``[S, 2S)``. Metadata is taken from the
    first map; ``meta["stacked_maps"] = n`` and ``meta["stack_size"] = S`` are recorded.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, spatial_size: int = 256, mode: str = "bilinear") -> None:
        self.size = int(spatial_size)
        self.mode = mode

    def __call__(self, maps: Sequence[Any]) -> torch.Tensor:
        if len(maps) < 1:
            raise ValueError("need at least one map to stack")
        ts = [to_tensor(m) for m in maps]
        parts = [nan_aware_resize(plain(t), self.size, self.mode) for t in ts]
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError(f"maps must have the same channel count, got {[p.shape[0] for p in parts]}")
        out = with_meta(torch.cat(parts, dim=1), ts[0])
        if isinstance(out, MetaTensor):
            out.meta = dict(out.meta)
            out.meta["stacked_maps"] = len(parts)
            out.meta["stack_size"] = self.size
        return out


class UnstackThicknessMaps(Transform):
    """Inverse of :class:`StackThicknessMaps`: ``(C, n * S, S)`` -> list of ``n`` maps ``(C, S, S)``.

    With ``spatial_size`` each map is then resized NaN-aware to that size (e.g. the atlas grid).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, n_maps: int = len(MAP_KEYS), spatial_size: int | Sequence[int] | None = None,
                 mode: str = "bilinear") -> None:
        self.n_maps = int(n_maps)
        self.spatial_size = spatial_size
        self.mode = mode

    def __call__(self, img: Any) -> list[torch.Tensor]:
        img_t = to_tensor(img)
        x = plain(img_t)
        rows = x.shape[1]
        if rows % self.n_maps:
            raise ValueError(f"{rows} rows cannot be split into {self.n_maps} maps")
        s = rows // self.n_maps
        parts = [x[:, i * s : (i + 1) * s] for i in range(self.n_maps)]
        if self.spatial_size is not None:
            parts = [nan_aware_resize(p, self.spatial_size, self.mode) for p in parts]
        else:
            parts = [p.clone() for p in parts]
        outs = [with_meta(p, img_t) for p in parts]
        for o in outs:
            if isinstance(o, MetaTensor):
                o.meta = {k: v for k, v in o.meta.items() if k not in ("stacked_maps", "stack_size")}
        return outs


class StackThicknessMapsd(MapTransform):
    """Dictionary version of :class:`StackThicknessMaps`: ``keys`` (default ``("fc", "tc")``) ->
    ``data[output_key]`` of shape ``(C, n * S, S)``; the inputs are removed if ``delete_keys``."""

    backend = StackThicknessMaps.backend

    def __init__(
        self,
        keys: KeysCollection = MAP_KEYS,
        output_key: str = "maps",
        spatial_size: int = 256,
        mode: str = "bilinear",
        delete_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.output_key = output_key
        self.delete_keys = delete_keys
        self.stacker = StackThicknessMaps(spatial_size, mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.output_key] = self.stacker([d[k] for k in self.keys])
        if self.delete_keys:
            for k in self.keys:
                del d[k]
        return d


class UnstackThicknessMapsd(MapTransform):
    """Dictionary version of :class:`UnstackThicknessMaps`: ``data[keys[0]]`` -> ``output_keys``."""

    backend = UnstackThicknessMaps.backend

    def __init__(
        self,
        keys: KeysCollection = "maps",
        output_keys: Sequence[str] = MAP_KEYS,
        spatial_size: int | Sequence[int] | None = None,
        mode: str = "bilinear",
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.output_keys = tuple(output_keys)
        self.unstacker = UnstackThicknessMaps(len(self.output_keys), spatial_size, mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        parts = self.unstacker(d[self.keys[0]])
        for k, p in zip(self.output_keys, parts):
            d[k] = p
        return d

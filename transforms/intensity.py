"""Radiograph intensity normalisation (the MRIS rule: min -> 0, 99th percentile -> 0.99)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from ._utils import as_float, numpy_fast_path, plain, to_tensor, with_meta

__all__ = ["PercentileNormalize", "PercentileNormalized", "nan_quantile"]


def nan_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) of the finite values of ``x``, any size/device.

    Uses ``torch.kthvalue`` (``torch.quantile`` refuses inputs above 16 M elements). Returns NaN when
    ``x`` has no finite value.
    """
    v = x[torch.isfinite(x)].reshape(-1)
    n = v.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    pos = float(q) * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(v, lo + 1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


class PercentileNormalize(Transform):
    """``out = (x - min) * target / (p - min)`` with ``p`` the ``percentile``-th percentile (MRIS rule).

    Defaults give min -> 0 and the 99th percentile -> 0.99; values above the percentile exceed 0.99
    (up to > 1) unless ``clip=True`` clamps the result to ``[0, 1]``. Unit-free; shape, device and
    metadata are kept (output floating point, float32 for integer input).

    * Statistics use the finite values only (over all channels, or per channel with ``channel_wise``).
      NaN stays NaN in the output unless ``nan_fill`` is a number (then NaN -> ``nan_fill`` after scaling).
    * Degenerate images: if ``p == min`` the maximum is used instead of ``p``; if the image is constant
      (or has no finite value) the output is all zeros (NaN kept/filled as above). No division by zero.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        percentile: float = 99.0,
        target: float = 0.99,
        clip: bool = False,
        nan_fill: float | None = None,
        channel_wise: bool = False,
    ) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.target = float(target)
        self.clip = clip
        self.nan_fill = nan_fill
        self.channel_wise = channel_wise

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if numpy_fast_path(x):
            return torch.from_numpy(self._normalise_np(x.detach().numpy()))
        return self._normalise_torch(x)

    def _normalise_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Device path (CUDA): torch reductions, ``nan_quantile`` via ``kthvalue``."""
        finite = torch.isfinite(x)
        if not bool(finite.any()):
            out = torch.zeros_like(x)
        else:
            vals = x[finite]
            vmin = vals.min()
            p = nan_quantile(vals, self.percentile / 100.0)
            if not bool(p > vmin):
                p = vals.max()
            if bool(p > vmin):
                out = (x - vmin) * (self.target / (p - vmin))
            else:
                out = torch.zeros_like(x)
        out = torch.where(torch.isnan(x), x, out)
        if self.clip:
            out = out.clamp(0.0, 1.0)
        if self.nan_fill is not None:
            out = torch.where(torch.isnan(out), torch.full_like(out, float(self.nan_fill)), out)
        return out

    def _normalise_np(self, x: np.ndarray) -> np.ndarray:
        """CPU path (numpy is much faster than torch for these reductions on small CPU tensors)."""
        finite = np.isfinite(x)
        all_finite = bool(finite.all())
        vals = x.reshape(-1) if all_finite else x[finite]
        out = np.zeros_like(x)
        if vals.size:
            vmin = vals.min()
            p = np.percentile(vals, self.percentile)
            if not p > vmin:
                p = vals.max()
            if p > vmin:
                out = (x - vmin) * np.asarray(self.target / (float(p) - float(vmin)), dtype=x.dtype)
        if not all_finite:
            out = np.where(np.isnan(x), x, out)
        if self.clip:
            out = np.clip(out, 0.0, 1.0)
        if self.nan_fill is not None:
            out = np.nan_to_num(out, nan=float(self.nan_fill), posinf=np.inf, neginf=-np.inf)
        return np.ascontiguousarray(out, dtype=x.dtype)

    def __call__(self, img: Any) -> torch.Tensor:
        img_t = as_float(to_tensor(img))
        x = plain(img_t)
        if self.channel_wise and x.ndim > 0:
            out = torch.stack([self._normalise(c) for c in x], dim=0)
        else:
            out = self._normalise(x)
        return with_meta(out, img_t)


class PercentileNormalized(MapTransform):
    """Dictionary version of :class:`PercentileNormalize`."""

    backend = PercentileNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        percentile: float = 99.0,
        target: float = 0.99,
        clip: bool = False,
        nan_fill: float | None = None,
        channel_wise: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normaliser = PercentileNormalize(percentile, target, clip, nan_fill, channel_wise)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normaliser(d[key])
        return d

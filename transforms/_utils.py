"""Small helpers shared by the transform modules (tensor conversion, affines)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.utils import convert_to_tensor


def to_tensor(img: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``img`` (numpy or torch) as a tensor on its own device; a MetaTensor when meta tracking is on."""
    return convert_to_tensor(img, dtype=dtype, track_meta=get_track_meta())


def as_float(img: torch.Tensor) -> torch.Tensor:
    """Floating-point view of ``img`` (float32 unless already floating)."""
    return img if torch.is_floating_point(img) else img.to(torch.float32)


def plain(img: torch.Tensor) -> torch.Tensor:
    """The data of ``img`` as a plain ``torch.Tensor`` (no metadata), same device."""
    return img.as_tensor() if isinstance(img, MetaTensor) else img


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.uint8, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.bool)


def numpy_fast_path(x: torch.Tensor) -> bool:
    """True when ``x`` can be processed through a zero-copy numpy view (CPU, numpy dtype, no grad).

    On small CPU machines numpy copies/reductions are several times faster than torch's threaded ops.
    """
    return x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and not x.requires_grad


def spatial_affine(img: Any, ndim: int = 2) -> np.ndarray:
    """The ``(ndim + 1)`` square index -> mm affine of ``img`` (identity when it has none), float64."""
    if isinstance(img, MetaTensor):
        aff = np.asarray(img.peek_pending_affine().detach().cpu().numpy(), dtype=np.float64)
        return _affine_nd(aff, ndim)
    return np.eye(ndim + 1)


def original_affine(img: Any, ndim: int = 2) -> np.ndarray:
    """The affine of the ORIGINAL image (``meta["original_affine"]``), else the current affine."""
    if isinstance(img, MetaTensor) and img.meta.get("original_affine") is not None:
        aff = img.meta["original_affine"]
        aff = aff.detach().cpu().numpy() if isinstance(aff, torch.Tensor) else np.asarray(aff)
        return _affine_nd(np.asarray(aff, dtype=np.float64), ndim)
    return spatial_affine(img, ndim)


def _affine_nd(aff: np.ndarray, ndim: int) -> np.ndarray:
    if aff.shape == (ndim + 1, ndim + 1):
        return aff
    out = np.eye(ndim + 1)
    k = min(ndim, aff.shape[0] - 1)
    out[:k, :k] = aff[:k, :k]
    out[:k, -1] = aff[:k, -1]
    return out


def compose_affine(img: MetaTensor, m: Any) -> torch.Tensor:
    """``img.affine @ m`` with the 2D index matrix ``m`` embedded in the affine's own rank (float64)."""
    from monai.data.utils import to_affine_nd

    aff = img.affine.to(torch.float64)
    m_t = torch.as_tensor(np.asarray(m, dtype=np.float64))
    return aff @ to_affine_nd(aff.shape[-1] - 1, m_t, dtype=torch.float64)


def affine_spacing(aff: np.ndarray) -> np.ndarray:
    """Spacing per axis (mm) of an index -> mm affine: the norms of its columns."""
    a = np.asarray(aff, dtype=np.float64)
    return np.sqrt((a[:-1, :-1] ** 2).sum(axis=0))


def with_meta(out: torch.Tensor, like: Any, meta_obj: Any = None) -> torch.Tensor:
    """Wrap ``out`` as a MetaTensor carrying the metadata of ``meta_obj`` (or ``like``) when tracking."""
    if not get_track_meta():
        return plain(out)
    src = meta_obj if meta_obj is not None else like
    res = MetaTensor(plain(out))
    if isinstance(src, MetaTensor) or hasattr(src, "meta"):
        res.copy_meta_from(src)
    return res

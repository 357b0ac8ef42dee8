"""Losses of GradICON registration: signed LNCC, mutual information, soft Dice, and the GradICON penalty.

* :func:`lncc` / :func:`lncc_loss`: local normalised cross-correlation with a Gaussian window (sigma 3 px,
  13 taps), SIGNED (MONAI's ``LocalNormalizedCrossCorrelationLoss`` squares it and uses a box window, so it is
  not the same similarity).
* :func:`mi_loss`: MONAI's ``GlobalMutualInformationLoss`` (Parzen windows; intensities expected in [0, 1]).
* :func:`soft_dice_loss`: 1 - soft Dice of one-hot / softmax maps (stage 3: label maps warped bilinearly).
* :func:`gradicon_penalty`: ``mean || d/dx (phi_AB o phi_BA)(x) - I ||^2`` by finite differences at jittered
  stride-2 points (Tian et al., GradICON, CVPR 2023), normalised as the authors' code (see the function).

All take ``B x C x H x W`` float tensors; maps are ``B x 2 x H x W`` on [0, 1] (:mod:`pipeline.registration.maps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, GlobalMutualInformationLoss

from pipeline.registration.maps import check_map, identity_map, sample_map

__all__ = ["MapLike", "gaussian_kernel1d", "gaussian_smooth", "gradicon_penalty", "lncc", "lncc_loss", "mi_loss",
           "soft_dice_loss"]

#: A map tensor ``B x 2 x H x W`` or a function of coordinates ``B x 2 x ...`` -> coordinates (ICON style).
MapLike = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def gaussian_kernel1d(sigma: float, truncate: float = 2.0, dtype: torch.dtype = torch.float32,
                      device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Normalised 1D Gaussian, ``2 r + 1`` taps with ``r = int(truncate * sigma + 0.5)`` (sigma 3 -> 13 taps,
    as ICON's ``4 sigma + 1`` and scipy's ``gaussian_filter(truncate=2)``)."""
    r = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_smooth(x: torch.Tensor, sigma: float = 3.0, truncate: float = 2.0) -> torch.Tensor:
    """Separable Gaussian filter of ``B x C x H x W`` per channel, zero padding ("same" size), sigma in pixels."""
    k = gaussian_kernel1d(sigma, truncate, x.dtype, x.device)
    c, r = x.shape[1], k.numel() // 2
    out = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)
    return F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)


def lncc(a: torch.Tensor, b: torch.Tensor, sigma: float = 3.0, eps: float = 1e-5) -> torch.Tensor:
    """Signed local NCC per batch item (``B``), in [-1, 1].

    With ``G`` the Gaussian window (:func:`gaussian_smooth`, sigma px, 13 taps, zero padding):
    ``ncc = (G(ab) - G(a)G(b)) / sqrt((G(a^2) - G(a)^2 + eps) (G(b^2) - G(b)^2 + eps))`` per pixel (variances
    clamped at 0 before ``eps``), averaged over channels and pixels. ``lncc(a, a)`` is 1 and ``lncc(a, -a)``
    is -1 up to ``eps`` / local variance."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"lncc needs two B x C x H x W tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ga, gb = gaussian_smooth(a, sigma), gaussian_smooth(b, sigma)
    cov = gaussian_smooth(a * b, sigma) - ga * gb
    va = (gaussian_smooth(a * a, sigma) - ga * ga).clamp_min(0.0) + eps
    vb = (gaussian_smooth(b * b, sigma) - gb * gb).clamp_min(0.0) + eps
    return (cov / torch.sqrt(va * vb)).flatten(1).mean(1)


def lncc_loss(a: torch.Tensor, b: torch.Tensor, sigma: float = 3.0, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean(lncc(a, b))`` over the batch (0 for identical images, 2 for inverted ones)."""
    return 1.0 - lncc(a, b, sigma, eps).mean()


_MI: dict[tuple[int, float], GlobalMutualInformationLoss] = {}


def mi_loss(a: torch.Tensor, b: torch.Tensor, num_bins: int = 23, sigma_ratio: float = 0.5) -> torch.Tensor:
    """Negative global mutual information (MONAI ``GlobalMutualInformationLoss``, Gaussian Parzen windows,
    ``num_bins`` bin centres on [0, 1]); intensities should lie in [0, 1]. Lower is better."""
    key = (int(num_bins), float(sigma_ratio))
    if key not in _MI:
        _MI[key] = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=key[0], sigma_ratio=key[1])
    return _MI[key](a, b)


_DICE: dict[bool, DiceLoss] = {}


def soft_dice_loss(onehot_a: torch.Tensor, onehot_b: torch.Tensor, include_background: bool = True) -> torch.Tensor:
    """``1 - mean Dice`` of two ``B x C x H x W`` one-hot / probability maps (MONAI ``DiceLoss`` without
    activation, Dice per item and class, ``smooth`` 1e-5, mean over items and classes). Symmetric in its
    arguments. Stage 3's similarity: one-hot label maps warped bilinearly against the fixed one-hot map."""
    if onehot_a.shape != onehot_b.shape:
        raise ValueError(f"soft_dice_loss needs maps of one shape, got {tuple(onehot_a.shape)} and "
                         f"{tuple(onehot_b.shape)}")
    key = bool(include_background)
    if key not in _DICE:
        _DICE[key] = DiceLoss(include_background=key, smooth_nr=1e-5, smooth_dr=1e-5)
    return _DICE[key](onehot_a, onehot_b)


def _as_function(phi: MapLike) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(phi, torch.Tensor):
        check_map(phi)
        return lambda pts: sample_map(phi, pts)
    if callable(phi):
        return phi
    raise TypeError(f"a map must be a B x 2 x H x W tensor or a function of coordinates, got {type(phi).__name__}")


def gradicon_penalty(phi_ab: MapLike, phi_ba: MapLike, shape: Optional[Sequence[int]] = None, batch: int = 1,
                     stride: int = 2, jitter: float = 2.0, delta: float = 1e-3,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """GradICON penalty: how far the Jacobian of ``phi_AB o phi_BA`` is from the identity (scalar tensor).

    Args:
        phi_ab, phi_ba: maps ``B x 2 x H x W`` on [0, 1] (evaluated off-grid by :func:`~pipeline.registration.maps.
            sample_map`: bilinear displacement, border-extended), or functions of coordinate tensors
            ``B x 2 x ...`` (ICON's representation; used to test against exact affine maps).
        shape: ``(H, W)`` of the sample grid; default the map tensors' own (required for two functions).
        batch: the batch size for two functions (tensors give their own).
        stride: sample every ``stride``-th pixel of the grid (ICON: 2).
        jitter: standard deviation of the Gaussian jitter of the sample points, in pixels (ICON:
            ``2 / W`` in [0, 1] units, i.e. about 2 px). 0 = the plain grid.
        delta: finite-difference step in [0, 1] units (ICON: 1e-3).
        generator: random generator of the jitter (tests and reproducible runs); ``None`` = torch's global one.

    Definition, at the jittered points ``x`` and axis steps ``delta e_d`` (row, column), with ``f = phi_AB o
    phi_BA``: ``L = sum_d mean_{items, points, components} ((f(x + delta e_d) - f(x)) / delta - e_d)^2``.
    That is ICON's ``GradientICONSparse`` normalisation, the one the paper's lambda = 1.5 was tuned with; it
    equals ``mean_x || J_f(x) - I ||_F^2 / 2`` in 2D. Deviation from ICON: the jittered points are clamped into
    ``[0, 1 - delta]``, so the points (and their steps) where ``phi_BA`` is evaluated lie in the image domain
    (border-extended map tensors are not affine outside it). The penalty is 0 for inverse-consistent pairs
    (identity pairs, an affine map and its exact inverse) and positive where ``phi_AB o phi_BA`` is not a rigid
    identity (e.g. a map composed with itself when it is not an involution, or folds).
    """
    tensors = [p for p in (phi_ab, phi_ba) if isinstance(p, torch.Tensor)]
    if shape is None:
        if not tensors:
            raise ValueError("gradicon_penalty needs `shape` (H, W) when both maps are functions")
        shape = tuple(tensors[0].shape[-2:])
    h, w = int(shape[-2]), int(shape[-1])
    b = max([int(batch)] + [int(t.shape[0]) for t in tensors])
    ref = tensors[0] if tensors else torch.zeros(())
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    f_ab, f_ba = _as_function(phi_ab), _as_function(phi_ba)
    pts = identity_map((h, w), batch=b, device=ref.device, dtype=dtype)[:, :, ::stride, ::stride]
    if jitter:
        noise = torch.randn(pts.shape, generator=generator, dtype=dtype, device="cpu" if generator is None
                            else generator.device).to(pts.device)
        scale = torch.tensor([jitter / max(h - 1, 1), jitter / max(w - 1, 1)], dtype=dtype, device=pts.device)
        pts = pts + noise * scale.view(1, 2, 1, 1)
    pts = pts.clamp(0.0, 1.0 - delta)
    base = f_ab(f_ba(pts))
    total = pts.new_zeros(())
    for d in range(2):
        step = torch.zeros(1, 2, 1, 1, dtype=dtype, device=pts.device)
        step[0, d] = delta
        moved = f_ab(f_ba(pts + step))
        grad_err = (moved - base) / delta - step / delta  # J e_d - e_d
        total = total + (grad_err ** 2).mean()
    return total


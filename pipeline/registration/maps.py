"""2D transforms as coordinate maps on [0, 1] (the ICON convention), and warping images and label maps with them.

A *map* ``phi`` is a tensor ``B x 2 x H x W`` (float): ``phi[:, 0]`` the ROW coordinate (y, down) and
``phi[:, 1]`` the COLUMN coordinate (x, right) of the point that pixel ``(row, col)`` maps to, on ``[0, 1]``:
0 is the centre of the first pixel and 1 the centre of the last one (``grid_sample(align_corners=True)``).
``identity_map`` gives ``phi(x) = x``. A registration network returns the map from fixed-frame points to
moving-frame points, so ``warp(moving, phi)`` is the moving image resampled into the fixed frame:
``warp(I, phi)(x) = I(phi(x))``.

Evaluating a map at points that are not pixel centres (:func:`sample_map`, used by :func:`compose` and by the
GradICON penalty) interpolates its *displacement* ``phi - identity`` bilinearly and adds the points back:
``phi(p) = p + u(clamp(p))``. Inside ``[0, 1]`` this equals bilinear interpolation of ``phi`` itself (the
identity is bilinear, so it is interpolated exactly); outside, the displacement of the nearest border pixel is
kept (ICON's ``FunctionFromVectorField`` + border padding), so a translation stays a translation everywhere.
ICON keeps maps as Python functions and evaluates the network's displacement field the same way; we keep them
as tensors sampled on the pixel grid, which is what ICON's closures compute at the identity grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["NUM_CLASSES", "check_map", "compose", "displacement_to_map", "identity_map", "map_to_pixels",
           "pixels_to_map", "sample_map", "to_grid", "warp", "warp_labels"]

#: Bone label maps: 0 background, 1 femur, 2 tibia, 3 fibula.
NUM_CLASSES = 4

Shape = Union[Sequence[int], torch.Size]


def _spatial(shape: Shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"a 2D shape (H, W) or (B, C, H, W) is needed, got {shape}")
    return shape[-2], shape[-1]


def identity_map(shape: Shape, batch: int = 1, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The identity map ``batch x 2 x H x W`` on [0, 1] (channel 0 row, channel 1 column).

    ``shape``: ``(H, W)``, or any shape whose last two entries are ``H, W`` (e.g. an image's ``B x C x H x W``).
    A size of 1 gives coordinate 0 along that axis."""
    h, w = _spatial(shape)
    rows = torch.linspace(0.0, 1.0, h, device=device, dtype=dtype) if h > 1 else torch.zeros(1, device=device, dtype=dtype)
    cols = torch.linspace(0.0, 1.0, w, device=device, dtype=dtype) if w > 1 else torch.zeros(1, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(int(batch), 2, h, w).contiguous()


def check_map(phi: torch.Tensor, name: str = "phi") -> torch.Tensor:
    """``phi`` if it is a ``B x 2 x H x W`` floating tensor, else a ``ValueError`` naming its shape."""
    if not isinstance(phi, torch.Tensor) or phi.ndim != 4 or phi.shape[1] != 2 or not phi.is_floating_point():
        got = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
        raise ValueError(f"{name} must be a float map B x 2 x H x W on [0, 1] (row, column), got {got}")
    return phi


def to_grid(points: torch.Tensor) -> torch.Tensor:
    """Points ``B x 2 x ...`` on [0, 1] (row, column) -> ``grid_sample``'s grid ``B x ... x 2`` on [-1, 1] (x, y)."""
    xy = torch.stack((points[:, 1], points[:, 0]), dim=-1)
    return xy * 2.0 - 1.0


def _batch_to(x: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise ValueError(f"batch sizes differ: {what} has {x.shape[0]}, expected {b} (or 1)")


def _pair(image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = max(image.shape[0], points.shape[0])
    return _batch_to(image, b, "the image"), _batch_to(points, b, "the map")


def warp(image: torch.Tensor, phi: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
         ) -> torch.Tensor:
    """``image`` (``B x C x H' x W'``) resampled at the points of ``phi`` (``B x 2 x H x W`` on [0, 1]):
    ``B x C x H x W``, ``out(x) = image(phi(x))``.

    ``grid_sample(align_corners=True)``; ``mode`` ``"bilinear"`` / ``"nearest"`` / ``"bicubic"``;
    ``padding_mode`` ``"border"`` (default: points outside [0, 1] take the nearest edge value), ``"zeros"``,
    ``"reflection"``. A batch of 1 on either side is broadcast. Integer images are warped as float (use
    :func:`warp_labels` for label maps)."""
    check_map(phi)
    if image.ndim != 4:
        raise ValueError(f"image must be B x C x H x W, got shape {tuple(image.shape)}")
    img = image if image.is_floating_point() else image.float()
    img, pts = _pair(img, phi.to(img.dtype))
    return F.grid_sample(img, to_grid(pts), mode=mode, padding_mode=padding_mode, align_corners=True)


def sample_map(phi: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The map ``phi`` (``B x 2 x H x W``) evaluated at ``points`` (``B x 2 x ...`` on [0, 1], any grid):
    ``points + u(points)`` with the displacement ``u = phi - identity`` interpolated bilinearly, border-extended
    (module docstring)."""
    check_map(phi)
    disp = phi - identity_map(phi.shape, device=phi.device, dtype=phi.dtype)
    spatial = points.shape[2:]
    pts = points.reshape(points.shape[0], 2, -1, 1) if points.ndim != 4 else points
    disp, pts = _pair(disp, pts.to(phi.dtype))
    u = F.grid_sample(disp, to_grid(pts), mode="bilinear", padding_mode="border", align_corners=True)
    return (pts + u).reshape(pts.shape[0], 2, *spatial)


def compose(phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``phi o psi``: ``compose(phi, psi)(x) = phi(psi(x))`` on ``psi``'s grid (:func:`sample_map`).

    Two-step registration: with ``phi = net1(A, B)`` and ``psi = net2(warp(A, phi), B)``, ``warp(A, compose(phi,
    psi)) == warp(warp(A, phi), psi)`` up to interpolation."""
    check_map(psi, "psi")
    return sample_map(phi, psi)


def displacement_to_map(disp: torch.Tensor) -> torch.Tensor:
    """A displacement field ``B x 2 x H x W`` in [0, 1] units (row, column) -> the map ``identity + disp``."""
    check_map(disp, "disp")
    return identity_map(disp.shape, device=disp.device, dtype=disp.dtype) + disp


def map_to_pixels(phi: torch.Tensor) -> torch.Tensor:
    """``phi`` in pixel units of its own grid: ``B x 2 x H x W`` with ``(row * (H - 1), col * (W - 1))``
    (0 = centre of the first pixel)."""
    check_map(phi)
    h, w = phi.shape[-2:]
    scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], device=phi.device, dtype=phi.dtype).view(1, 2, 1, 1)
    return phi * scale


def pixels_to_map(coords: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`map_to_pixels`: pixel coordinates ``B x 2 x H x W`` (row, column) -> [0, 1]."""
    check_map(coords, "coords")
    h, w = coords.shape[-2:]
    scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], device=coords.device, dtype=coords.dtype).view(1, 2, 1, 1)
    return coords / scale


def warp_labels(labels: torch.Tensor, phi: torch.Tensor, num_classes: int = NUM_CLASSES, method: str = "nearest"
                ) -> torch.Tensor:
    """An integer label map ``B x 1 x H' x W'`` warped by ``phi``: ``B x 1 x H x W`` int64 holding only values
    present in ``labels`` (never bilinear + rounding, which invents labels between two others).

    ``method``: ``"nearest"`` (nearest-neighbour sampling, border) or ``"onehot"`` (one-hot with
    ``num_classes`` channels, warped bilinearly, argmax; a class absent from the input has an all-zero channel
    and never wins, since the warped channels sum to 1). Labels must lie in ``[0, num_classes)`` for
    ``"onehot"``."""
    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(f"labels must be B x 1 x H x W integer label maps, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must hold integer values (got non-integer floats)")
    lab = labels.long()
    if method == "nearest":
        out = warp(lab.to(phi.dtype), phi, mode="nearest", padding_mode="border")
        return out.round().long()
    if method == "onehot":
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}) for one-hot warping, got values "
                             f"{int(lab.min())}..{int(lab.max())}")
        oh = F.one_hot(lab[:, 0], num_classes).permute(0, 3, 1, 2).to(phi.dtype)
        return warp(oh, phi, mode="bilinear", padding_mode="border").argmax(1, keepdim=True)
    raise ValueError(f"method must be 'nearest' or 'onehot', got {method!r}")

"""Radiograph augmentation as in MRIS, with parameters drawn PER SAMPLE.

Rotation uniform in ``+-rotate_deg`` degrees (MONAI ``Rotate``, keep size, zero padding), contrast /
gamma (MONAI ``AdjustContrast``, gamma uniform in ``gamma_range``, probability ``prob_contrast``),
Gaussian noise (MONAI ``RandGaussianNoise`` logic: std uniform in ``[0, noise_std]``, probability
``prob_noise``), applied in that order. All draws come from the transform's ``self.R``, so
``set_random_state(seed)`` makes a run reproducible; tensors stay on their device (CPU or CUDA).
The MRIS reference drew one parameter set per batch; here a ``(B, C, H, W)`` batch gets B draws.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.transforms import (
    AdjustContrast,
    InvertibleTransform,
    MapTransform,
    RandGaussianNoise,
    RandomizableTransform,
    Rotate,
)
from monai.utils import TraceKeys, TransformBackends

from ._utils import as_float, plain, to_tensor

__all__ = ["RandKneeAugment", "RandKneeAugmentd"]


class RandKneeAugment(RandomizableTransform, InvertibleTransform):
    """Per-sample MRIS radiograph augmentation (module docstring).

    Input: one image ``(C, H, W)`` (numpy or torch, any device), or a batch ``(B, C, H, W)`` that
    gets independent draws per sample (batch mode returns a plain tensor and records no inverse).
    Intensities are assumed normalised (about [0, 1]); rotation pads with 0. Output float, same
    device. ``inverse`` undoes the rotation (intensity changes are not invertible).

    Args:
        rotate_deg: maximum absolute rotation angle in degrees (uniform in ``[-rotate_deg, rotate_deg]``).
        prob_rotate: probability of rotating (MRIS: always, 1.0).
        noise_std: maximum Gaussian noise standard deviation (intensity units).
        prob_noise: probability of adding noise.
        gamma_range: range of the contrast gamma (MONAI ``RandAdjustContrast`` default (0.5, 4.5)).
        prob_contrast: probability of the contrast change.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        rotate_deg: float = 15.0,
        prob_rotate: float = 1.0,
        noise_std: float = 0.1,
        prob_noise: float = 0.5,
        gamma_range: Sequence[float] = (0.5, 4.5),
        prob_contrast: float = 0.5,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.rotate_deg = float(rotate_deg)
        self.prob_rotate = float(prob_rotate)
        self.prob_noise = float(prob_noise)
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.prob_contrast = float(prob_contrast)
        self.mode = mode
        self.padding_mode = padding_mode
        self._noise = RandGaussianNoise(prob=1.0, mean=0.0, std=noise_std, sample_std=True)
        self._noise.set_random_state(state=self.R)
        self.angle = 0.0
        self.do_rotate = self.do_contrast = self.do_noise = False
        self.gamma = 1.0

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self._noise.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw rotation, contrast and noise-switch parameters for one sample."""
        self.do_rotate = self.R.rand() < self.prob_rotate
        self.angle = math.radians(self.R.uniform(-self.rotate_deg, self.rotate_deg)) if self.do_rotate else 0.0
        self.do_contrast = self.R.rand() < self.prob_contrast
        self.gamma = self.R.uniform(*self.gamma_range) if self.do_contrast else 1.0
        self.do_noise = self.R.rand() < self.prob_noise

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        """Apply the current draws to one ``(C, H, W)`` image (noise values are drawn here)."""
        out = img
        if self.do_rotate:
            out = Rotate(angle=self.angle, keep_size=True, mode=self.mode, padding_mode=self.padding_mode)(out)
        if self.do_contrast:
            out = AdjustContrast(gamma=self.gamma)(out)
        if self.do_noise:
            self._noise.randomize(out)
            out = self._noise(out, randomize=False)
        if out is img:  # nothing applied: never hand back (and later trace onto) the input object
            out = img.clone()
        return out

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        img_t = as_float(to_tensor(img))
        if img_t.ndim == 4:
            return self._batch(img_t)
        if img_t.ndim != 3:
            raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {tuple(img_t.shape)}")
        if randomize:
            self.randomize()
        out = self.apply(img_t)
        if isinstance(out, MetaTensor) and get_track_meta():
            self._do_transform = self.do_rotate
            self.push_transform(out, replace=True)
        return out

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        prev = get_track_meta()
        set_track_meta(False)
        try:
            outs = []
            for sample in plain(x):
                self.randomize()
                outs.append(plain(self.apply(sample)))
        finally:
            set_track_meta(prev)
        return torch.stack(outs, dim=0)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        xform = self.pop_transform(data)
        if not xform[TraceKeys.DO_TRANSFORM]:
            return data
        return Rotate(0).inverse_transform(data, xform[TraceKeys.EXTRA_INFO])


class RandKneeAugmentd(RandomizableTransform, MapTransform, InvertibleTransform):
    """Dictionary version of :class:`RandKneeAugment`: one draw per sample, shared by all ``keys``."""

    backend = RandKneeAugment.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        rotate_deg: float = 15.0,
        prob_rotate: float = 1.0,
        noise_std: float = 0.1,
        prob_noise: float = 0.5,
        gamma_range: Sequence[float] = (0.5, 4.5),
        prob_contrast: float = 0.5,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.augment = RandKneeAugment(
            rotate_deg, prob_rotate, noise_std, prob_noise, gamma_range, prob_contrast, mode, padding_mode
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.augment.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.augment.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = self.augment(d[key], randomize=False)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.augment.inverse(d[key])
        return d

"""Stage 2 of segmentation-guided registration: the DXA (source) bone segmenter ``S_S``.

* :func:`make_segmenter`: MONAI ``UNet`` (2D, 1 input channel, 4 output logits: 0 background, 1 femur,
  2 tibia, 3 fibula) with the paper's settings as defaults (channels ``(4, 8, 16, 32, 64, 128)``, all strides 1,
  8 residual units); ``channels`` / ``num_res_units`` shrink it for tests and demos. Self-describing
  (:mod:`pipeline.nets.describe`): :func:`pipeline.io.checkpoints.load_network` rebuilds it from a checkpoint.
* :func:`segmentation_loss`: ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True)`` (background included).
* :func:`train_segmenter`: MONAI ``SupervisedTrainer`` on in-memory arrays (Adam 5e-4, batch 12, 5,000 steps in
  the paper), a ``SupervisedEvaluator`` with ``MeanDice`` (background excluded) every ``val_interval`` steps, and
  the best validation state kept IN MEMORY (a deep copy of the ``state_dict``; no ``CheckpointSaver``), loaded
  back at the end and optionally written to ``save_path``.
* :func:`predict_labels`: ``B x 1 x H x W`` int64 label maps (argmax of the logits).

Images: ``B x 1 x H x W`` float32 (``N x H x W`` accepted), intensities in ``[-1, 1]`` (:func:`to_model_range`),
the range of the CycleGAN generators' ``tanh`` output, so the same segmenter reads real and translated images.
``H`` and ``W`` are free (all strides are 1: the U-Net never downsamples). Labels: ``B x 1 x H x W`` integers
in ``0..3``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, from_engine
from monai.losses import DiceLoss
from monai.transforms import AsDiscreted, Compose, RandScaleIntensityd, RandShiftIntensityd
from monai.utils import CommonKeys, set_determinism

from pipeline.nets.describe import network_factory
from pipeline.nets.described import DescribedUNet

__all__ = ["DEFAULT_CHANNELS", "DEFAULT_NUM_RES_UNITS", "NUM_CLASSES", "PREPROCESSING", "make_segmenter",
           "predict_labels", "segmentation_loss", "to_model_range", "train_segmenter"]

#: Output classes: 0 background, 1 femur, 2 tibia, 3 fibula.
NUM_CLASSES = 4
#: The paper's U-Net widths (one level per entry, all at full resolution).
DEFAULT_CHANNELS = (4, 8, 16, 32, 64, 128)
#: The paper's residual units per level.
DEFAULT_NUM_RES_UNITS = 8
#: The input the weights expect, recorded in every checkpoint.
PREPROCESSING = {"intensity": "per image min..max -> [-1, 1] (pipeline.registration.segmenters.to_model_range)",
                 "labels": "0 background, 1 femur, 2 tibia, 3 fibula",
                 "frame": "256 x 256 pair-ready crop, affinely pre-aligned (any size works: strides are 1)"}

ArrayLike = Union[np.ndarray, torch.Tensor]


@network_factory
def make_segmenter(channels: Sequence[int] = DEFAULT_CHANNELS, num_res_units: int = DEFAULT_NUM_RES_UNITS,
                   in_channels: int = 1, out_channels: int = NUM_CLASSES, norm: str = "instance",
                   dropout: float = 0.0) -> torch.nn.Module:
    """The bone segmenter: MONAI ``UNet(spatial_dims=2, in_channels, out_channels, channels,
    strides=(1,) * (len(channels) - 1), num_res_units)``; ``B x in x H x W`` -> ``B x out x H x W`` logits.

    Defaults are the paper's (Demir & Niethammer 2024). Tiny networks for tests: e.g. ``channels=(4, 8),
    num_res_units=1``. The network records these settings (:mod:`pipeline.nets.describe`)."""
    channels = [int(c) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"make_segmenter needs at least 2 channel entries, got {channels}")
    settings = {"channels": channels, "num_res_units": int(num_res_units), "in_channels": int(in_channels),
                "out_channels": int(out_channels), "norm": str(norm), "dropout": float(dropout)}
    net = DescribedUNet(spatial_dims=2, in_channels=int(in_channels), out_channels=int(out_channels),
                        channels=tuple(channels), strides=(1,) * (len(channels) - 1),
                        num_res_units=int(num_res_units), norm=norm, dropout=float(dropout))
    return net.describe(make_segmenter, settings, PREPROCESSING)


def segmentation_loss() -> DiceLoss:
    """Dice loss on logits ``B x C x H x W`` against integer labels ``B x 1 x H x W`` (softmax, one-hot, background
    included, mean over classes and batch)."""
    return DiceLoss(softmax=True, to_onehot_y=True)


def to_model_range(images: ArrayLike, eps: float = 1e-8) -> torch.Tensor:
    """Each image's min..max -> ``[-1, 1]`` (a constant image -> -1); ``N x 1 x H x W`` or ``N x H x W`` in,
    ``N x 1 x H x W`` float32 out."""
    x = _as_images(images)
    flat = x.reshape(len(x), -1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    return (2.0 * (x - lo) / (hi - lo).clamp_min(eps) - 1.0).float()


def _as_images(images: ArrayLike) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images N x 1 x H x W or N x H x W, got shape {tuple(x.shape)}")
    return x.float()


def _as_labels(labels: ArrayLike, n: int, shape: Sequence[int]) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.ndim == 3:
        y = y[:, None]
    if y.ndim != 4 or y.shape[0] != n or y.shape[1] != 1 or tuple(y.shape[2:]) != tuple(shape):
        raise ValueError(f"expected labels {n} x 1 x {shape[0]} x {shape[1]}, got shape {tuple(y.shape)}")
    return y.long()


def _items(images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{CommonKeys.IMAGE: images[i], CommonKeys.LABEL: labels[i]} for i in range(len(images))]


def train_segmenter(images: ArrayLike, labels: ArrayLike, val_images: ArrayLike, val_labels: ArrayLike,
                    network: Optional[torch.nn.Module] = None, channels: Sequence[int] = DEFAULT_CHANNELS,
                    num_res_units: int = DEFAULT_NUM_RES_UNITS, steps: int = 5000, batch_size: int = 12,
                    lr: float = 5e-4, val_interval: int = 250, augment: bool = False, seed: int = 0,
                    device: Union[str, torch.device] = "cpu", save_path: Optional[Union[str, Path]] = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a segmenter on in-memory images (``[-1, 1]``) and labels (``0..3``) with MONAI engines.

    ``steps`` optimiser steps of ``batch_size`` images drawn by a seeded shuffle (reshuffled every pass);
    loss :func:`segmentation_loss`; Adam(``lr``). Every ``val_interval`` steps and after the last one a
    ``SupervisedEvaluator`` computes the mean Dice over femur, tibia, fibula (``MeanDice``, background excluded,
    argmax predictions) on the validation set; the best state (first maximum) is kept in memory and loaded back
    at the end (and written with ``torch.save`` to ``save_path`` if given; it carries the network description).
    ``augment``: random intensity scale (x [0.9, 1.1]) and shift ([-0.1, 0.1]) with probability 0.5 each.
    ``network``: start from this network (default: :func:`make_segmenter` with ``channels``, ``num_res_units``).
    Seeded by ``seed`` (:func:`monai.utils.set_determinism`, reset afterwards).

    Returns ``(network in eval mode with the best weights, history)``; history: ``"loss"`` (per step),
    ``"val_step"``, ``"val_dice"`` (per validation), ``"best_dice"``, ``"best_step"``.
    """
    x, xv = _as_images(images), _as_images(val_images)
    y, yv = _as_labels(labels, len(x), x.shape[2:]), _as_labels(val_labels, len(xv), xv.shape[2:])
    if len(x) == 0 or len(xv) == 0:
        raise ValueError(f"train_segmenter needs training and validation images, got {len(x)} and {len(xv)}")
    steps, batch_size, val_interval = int(steps), int(batch_size), max(1, int(val_interval))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    set_determinism(seed=int(seed))
    try:
        device = torch.device(device)
        net = (network if network is not None else make_segmenter(channels, num_res_units)).to(device)
        transform = None
        if augment:
            transform = Compose([RandScaleIntensityd(CommonKeys.IMAGE, factors=0.1, prob=0.5),
                                 RandShiftIntensityd(CommonKeys.IMAGE, offsets=0.1, prob=0.5)])
            transform.set_random_state(seed=int(seed))
        generator = torch.Generator().manual_seed(int(seed))
        sampler = torch.utils.data.RandomSampler(range(len(x)), num_samples=steps * batch_size, generator=generator)
        train_loader = DataLoader(Dataset(_items(x, y), transform=transform), batch_size=batch_size, sampler=sampler,
                                  num_workers=0)
        val_loader = DataLoader(Dataset(_items(xv, yv)), batch_size=batch_size, shuffle=False, num_workers=0)
        post = Compose([AsDiscreted(keys=CommonKeys.PRED, argmax=True, to_onehot=NUM_CLASSES),
                        AsDiscreted(keys=CommonKeys.LABEL, to_onehot=NUM_CLASSES)])
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=val_loader, network=net, postprocessing=post,
            key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                      output_transform=from_engine([CommonKeys.PRED,
                                                                                    CommonKeys.LABEL]))},
            amp=False)
        optimizer = torch.optim.Adam(net.parameters(), lr=float(lr))
        trainer = SupervisedTrainer(device=device, max_epochs=1, epoch_length=steps, train_data_loader=train_loader,
                                    network=net, optimizer=optimizer, loss_function=segmentation_loss(),
                                    decollate=False, amp=False)
        history: dict[str, Any] = {"loss": [], "val_step": [], "val_dice": [], "best_dice": -math.inf,
                                   "best_step": 0}
        best: dict[str, Any] = {"state": copy.deepcopy(net.state_dict())}

        @trainer.on(Events.ITERATION_COMPLETED)
        def _record(engine) -> None:
            history["loss"].append(float(engine.state.output[CommonKeys.LOSS].detach()))

        @trainer.on(Events.ITERATION_COMPLETED(event_filter=lambda _, i: i % val_interval == 0 or i == steps))
        def _validate(engine) -> None:
            evaluator.run()
            dice = float(evaluator.state.metrics["val_mean_dice"])
            history["val_step"].append(int(engine.state.iteration))
            history["val_dice"].append(dice)
            if dice > history["best_dice"]:
                history["best_dice"], history["best_step"] = dice, int(engine.state.iteration)
                best["state"] = copy.deepcopy(net.state_dict())
            net.train()

        trainer.run()
        net.load_state_dict(best["state"])
        if save_path is not None:
            Path(save_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), save_path)
    finally:
        set_determinism(seed=None)
    return net.eval(), history


def predict_labels(model: torch.nn.Module, images: ArrayLike, batch_size: int = 16) -> torch.Tensor:
    """Label maps ``B x 1 x H x W`` int64 (values ``0..C-1``, argmax of the logits) of ``images``
    (``B x 1 x H x W`` or ``B x H x W``, in ``[-1, 1]``), without gradients, in eval mode (the model's mode is
    restored), on the model's device; returned on the CPU."""
    x = _as_images(images)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            out = [torch.as_tensor(model(x[i:i + batch_size].to(device))).argmax(1, keepdim=True).cpu()
                   for i in range(0, len(x), max(1, int(batch_size)))]
    finally:
        model.train(was_training)
    return torch.cat(out).long() if out else torch.zeros((0, 1, *x.shape[2:]), dtype=torch.long)

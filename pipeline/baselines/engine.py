"""MONAI-engine pieces of the direct-synthesis baselines (``bundles/direct_synthesis/configs/train.json``).

* :class:`SynthesisTrainStep` -> ``SupervisedTrainer(iteration_update=...)``: generator on the radiograph,
  masked L1 against the FC/TC target (U-Net and transformer baselines).
* :class:`Pix2PixStep` -> ``GanTrainer(iteration_update=...)``: conditional PatchGAN step (discriminator on
  ``(radiograph, maps)`` pairs, BCE adversarial loss) then generator step (adversarial + ``l1_weight`` x masked
  L1, pix2pix's 100).
* :class:`SynthesisEvalStep` -> ``SupervisedEvaluator(iteration_update=...)``: predictions for validation.
* :class:`MapMedianError` (ignite ``Metric``): the MRIS synthesis error (mean over maps of the per-map median
  ``|synth - truth|`` in mm inside the footprint, :func:`pipeline.metrics.per_map_errors`), FC and TC pooled;
  lower is better (the model-selection key).
* :func:`make_trainer`: ``SupervisedTrainer`` (unet, transformer) or ``GanTrainer`` (pix2pix).

Batch layout (:mod:`pipeline.baselines.data`): ``image`` ``B x 1 x S x S``; ``maps`` and ``mask``
``B x 2 x S x S`` (channel 0 FC, 1 TC; maps in mm / 3, 0 outside; mask 1 inside the footprint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines import GanTrainer, SupervisedTrainer
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys

from pipeline.baselines.data import MASK_KEY, TARGET_KEY
from pipeline.baselines.nets import check_method
from pipeline.metrics import per_map_errors
from transforms import ScaleThickness

__all__ = ["MapMedianError", "Pix2PixStep", "SynthesisEvalStep", "SynthesisTrainStep", "make_trainer",
           "adversarial_loss", "to_mm"]

_TO_MM = ScaleThickness(invert=True)


def to_mm(x: torch.Tensor) -> torch.Tensor:
    """Network units -> mm (``x * 3 mm``, :class:`transforms.ScaleThickness` inverted); any shape."""
    return torch.as_tensor(_TO_MM(x))


def _batch(batch: Mapping[str, Any], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (batch[CommonKeys.IMAGE].to(device, non_blocking=True), batch[TARGET_KEY].to(device, non_blocking=True),
            batch[MASK_KEY].to(device, non_blocking=True))


class SynthesisTrainStep:
    """``SupervisedTrainer`` iteration: ``pred = network(image)``, ``loss = loss_function(pred, maps, mask)``
    (the masked L1), backward, optional gradient-norm clip (``max_grad_norm``), optimiser step.

    Returns ``{"image", "pred", "loss"}`` (pred and loss detached).
    """

    def __init__(self, max_grad_norm: float | None = None) -> None:
        self.max_grad_norm = max_grad_norm

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        image, target, mask = _batch(batch, engine.state.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pred = engine.network(image)
        loss = engine.loss_function(pred, target, mask)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        engine.optimizer.step()
        return {CommonKeys.IMAGE: image, CommonKeys.PRED: pred.detach(), CommonKeys.LOSS: loss.detach()}


def adversarial_loss() -> PatchAdversarialLoss:
    """pix2pix's adversarial criterion: binary cross-entropy on the patch logits (MONAI applies the sigmoid)."""
    return PatchAdversarialLoss(criterion="bce", reduction="mean")


class Pix2PixStep:
    """``GanTrainer`` iteration of conditional pix2pix.

    The generator output is multiplied by the footprint mask (the targets are 0 outside it) before it is
    shown to the discriminator, so the discriminator judges the maps, not the unconstrained background.
    Discriminator: ``0.5 * (BCE(D(x, y), real) + BCE(D(x, G(x)), fake))``. Generator:
    ``BCE(D(x, G(x)), real) + l1_weight * masked_L1(G(x), y)`` with ``engine.g_loss_function`` = masked L1
    and ``engine.d_loss_function`` = :func:`adversarial_loss`.

    Returns ``{"image", "pred", "loss" (generator total), "l1", "g_adv", "d_loss"}``.
    """

    def __init__(self, l1_weight: float = 100.0) -> None:
        self.l1_weight = float(l1_weight)

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        image, target, mask = _batch(batch, engine.state.device)
        g, d, adv = engine.g_network, engine.d_network, engine.d_loss_function
        g.train()
        d.train()
        pred = g(image)
        fake = pred * mask
        # discriminator
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        d_fake = d(torch.cat([image, fake.detach()], 1))[-1]
        d_real = d(torch.cat([image, target], 1))[-1]
        d_loss = 0.5 * (adv(d_fake, target_is_real=False, for_discriminator=True)
                        + adv(d_real, target_is_real=True, for_discriminator=True))
        d_loss.backward()
        engine.d_optimizer.step()
        # generator
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        g_adv = adv(d(torch.cat([image, fake], 1))[-1], target_is_real=True, for_discriminator=False)
        l1 = engine.g_loss_function(pred, target, mask)
        loss = g_adv + self.l1_weight * l1
        loss.backward()
        engine.g_optimizer.step()
        return {CommonKeys.IMAGE: image, CommonKeys.PRED: pred.detach(), CommonKeys.LOSS: loss.detach(),
                "l1": l1.detach(), "g_adv": g_adv.detach(), "d_loss": d_loss.detach()}


class SynthesisEvalStep:
    """``SupervisedEvaluator`` iteration: ``{"pred", "label", "mask"}`` under ``no_grad`` (network units)."""

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        image, target, mask = _batch(batch, engine.state.device)
        engine.network.eval()
        with torch.no_grad():
            pred = engine.network(image)
        return {CommonKeys.PRED: pred, CommonKeys.LABEL: target, MASK_KEY: mask}


class MapMedianError(Metric):
    """Mean over maps of the per-map median ``|synth - truth|`` (mm) inside the footprint, FC and TC maps
    pooled (:func:`pipeline.metrics.per_map_errors`). Reads ``output["pred"]``, ``["label"]``, ``["mask"]``
    (network units, ``B x 2 x S x S``); lower is better."""

    required_output_keys = (CommonKeys.PRED, CommonKeys.LABEL, MASK_KEY)

    def __init__(self, output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._medians: list[np.ndarray] = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        pred, label, mask = (torch.as_tensor(o).detach().float().cpu() for o in output)
        synth, truth = to_mm(pred).numpy(), to_mm(label).numpy()
        m = mask.numpy() > 0.5
        for c in range(synth.shape[1]):
            self._medians.append(per_map_errors(synth[:, c], truth[:, c], m[:, c])["median_mm"].to_numpy())

    def compute(self) -> float:
        if not self._medians:
            raise RuntimeError("MapMedianError needs at least one batch")
        return float(np.concatenate(self._medians).mean())


def make_trainer(method: str, device: torch.device | str, max_epochs: int, train_data_loader: Any,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
                 train_handlers: Sequence | None = None, discriminator: torch.nn.Module | None = None,
                 d_optimizer: torch.optim.Optimizer | None = None, l1_weight: float = 100.0,
                 max_grad_norm: float | None = None) -> SupervisedTrainer | GanTrainer:
    """The MONAI trainer of ``method``: ``SupervisedTrainer`` + :class:`SynthesisTrainStep` (unet,
    transformer) or ``GanTrainer`` + :class:`Pix2PixStep` (pix2pix; needs ``discriminator`` and
    ``d_optimizer``). ``loss_function`` is the masked L1 (:class:`pipeline.baselines.losses.MaskedL1Loss`)."""
    method = check_method(method)
    if method == "pix2pix":
        if discriminator is None or d_optimizer is None:
            raise ValueError("pix2pix needs a discriminator and a d_optimizer")
        return GanTrainer(device=device, max_epochs=int(max_epochs), train_data_loader=train_data_loader,
                          g_network=network, g_optimizer=optimizer, g_loss_function=loss_function,
                          d_network=discriminator, d_optimizer=d_optimizer, d_loss_function=adversarial_loss(),
                          iteration_update=Pix2PixStep(l1_weight), train_handlers=train_handlers, decollate=False)
    return SupervisedTrainer(device=device, max_epochs=int(max_epochs), train_data_loader=train_data_loader,
                             network=network, optimizer=optimizer, loss_function=loss_function,
                             iteration_update=SynthesisTrainStep(max_grad_norm), train_handlers=train_handlers,
                             decollate=False, amp=False)

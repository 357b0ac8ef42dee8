"""ResNet-18 classifiers on thickness maps (KLG, progression) with MONAI ``SupervisedTrainer`` /
``SupervisedEvaluator``.

Network: MONAI ``resnet18(spatial_dims=2)``, 2 input channels (FC and TC maps, mm / 3, NaN -> 0, ``S x S``),
stem stride 2 (the original ResNet stem), ``num_classes`` raw logits. Loss: ``CrossEntropyLoss`` with
inverse-frequency class weights on the RAW logits (no softmax before the loss); probabilities are computed
only for the metrics. Optimiser AdamW, learning rate x ``lr_gamma`` every ``lr_step_epochs`` epochs (paper:
30 epochs, batch 64, x0.2 every 10 epochs, lr 1e-5 for KLG and 1e-4 for progression). The model of the
last epoch is used (no validation split exists in the downstream set).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.networks.nets import resnet18
from monai.utils import CommonKeys, set_determinism

from pipeline.downstream.metrics import class_weights

__all__ = ["ClassifierConfig", "make_classifier", "predict_logits", "train_classifier"]

logger = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    """Training settings of one classifier (defaults: the paper's, except ``lr`` which is per task)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 1e-2
    lr_step_epochs: int = 10
    lr_gamma: float = 0.2
    widen_factor: float = 1.0
    stem_stride: int = 2
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_classifier(num_classes: int, in_channels: int = 2, widen_factor: float = 1.0,
                    stem_stride: int = 2) -> torch.nn.Module:
    """MONAI 2D ResNet-18: ``B x in_channels x S x S`` -> ``B x num_classes`` raw logits."""
    return resnet18(spatial_dims=2, n_input_channels=int(in_channels), num_classes=int(num_classes),
                    conv1_t_stride=int(stem_stride), widen_factor=float(widen_factor))


class _EpochLoss:
    """Mean training loss per epoch (kept in ``history``, logged at each epoch end)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.history: list[float] = []
        self._batch: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        self._batch.append(float(torch.as_tensor(engine.state.output[CommonKeys.LOSS]).detach()))

    def _epoch(self, engine: Engine) -> None:
        self.history.append(float(np.mean(self._batch)) if self._batch else float("nan"))
        self._batch = []
        logger.info("%s epoch %d/%d: train loss %.4f", self.name, engine.state.epoch, engine.state.max_epochs,
                    self.history[-1])


def _loader(x: torch.Tensor, y: np.ndarray | None, batch_size: int, shuffle: bool) -> DataLoader:
    data = [{CommonKeys.IMAGE: x[i], CommonKeys.LABEL: torch.tensor(int(y[i]) if y is not None else -1)}
            for i in range(len(x))]
    return DataLoader(Dataset(data), batch_size=batch_size, shuffle=shuffle, num_workers=0)


def train_classifier(x: torch.Tensor, y: np.ndarray, num_classes: int, cfg: ClassifierConfig,
                     name: str = "classifier") -> tuple[torch.nn.Module, list[float]]:
    """Train a ResNet-18 on ``x`` (``N x 2 x S x S``) with labels ``y`` (``N`` ints in ``0..C-1``).

    Seeded by ``cfg.seed`` (:func:`monai.utils.set_determinism`: same seed, same data -> same weights).
    Returns ``(network in eval mode, mean training loss per epoch)``.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"{name}: {len(x)} inputs for {len(y)} labels (need the same positive number)")
    set_determinism(seed=int(cfg.seed))
    device = torch.device(cfg.device)
    net = make_classifier(num_classes, x.shape[1], cfg.widen_factor, cfg.stem_stride).to(device)
    loss = torch.nn.CrossEntropyLoss(weight=class_weights(y, num_classes).to(device))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(cfg.lr_step_epochs)), gamma=cfg.lr_gamma)
    epoch_loss = _EpochLoss(name)
    trainer = SupervisedTrainer(device=device, max_epochs=int(cfg.epochs),
                                train_data_loader=_loader(x, y, cfg.batch_size, shuffle=True), network=net,
                                optimizer=opt, loss_function=loss,
                                train_handlers=[LrScheduleHandler(sched, print_lr=False), epoch_loss],
                                decollate=False, amp=False)
    trainer.run()
    set_determinism(seed=None)
    return net.eval(), epoch_loss.history


def predict_logits(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Raw logits ``N x C`` of ``x`` with a ``SupervisedEvaluator`` (no gradient, eval mode), on the CPU."""
    if len(x) == 0:
        raise ValueError("predict_logits: no inputs")
    evaluator = SupervisedEvaluator(device=torch.device(device), val_data_loader=_loader(x, None, batch_size, False),
                                    network=net, decollate=False, amp=False)
    parts: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED,
                                lambda e: parts.append(e.state.output[CommonKeys.PRED].detach().float().cpu()))
    evaluator.run()
    return torch.cat(parts)

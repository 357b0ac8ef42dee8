"""MONAI-engine pieces of progression training (Panfilov et al., ISBI 2022): the paper's recipe as components.

Used by ``bundles/progression_mr/configs/train.json`` and by :func:`pipeline.progression.train.cross_validate`:

* :func:`warmup_lr` / :class:`WarmupLambda` / :func:`warmup_scheduler`: Adam's learning rate rises linearly from
  ``start_lr`` (1e-5) to ``end_lr`` (1e-4) over ``warmup_epochs`` (5) epochs, then stays; a ``LambdaLR`` stepped
  once per epoch (``LrScheduleHandler``, ``epoch_level=True``). Epoch ``e`` (1-based) trains at
  ``warmup_lr(e - 1)``.
* :func:`class_balanced_weights` / :class:`ClassBalancedSampler`: class-balanced resampling, each sample drawn
  with probability proportional to ``1 / count(its class)`` (so every class is drawn equally often in
  expectation), with replacement, ``len(labels)`` draws per epoch (one epoch = as many draws as training
  knees); a ``torch.utils.data.WeightedRandomSampler`` whose draw of epoch ``e`` is seeded by ``(seed, e)`` and
  which splits that draw over distributed ranks (``rank::num_replicas``), so the same class yields one
  balanced epoch under DDP (``set_epoch`` each epoch: :class:`pipeline.handlers.SamplerEpochHandler`).
* :class:`ProgressionMetric` (ignite ``Metric``): AP (default), ROC AUC or balanced accuracy of
  ``P(any) = P(fast) + P(slow)`` over EVERY validation sample (the reference code's validation loader dropped
  its last batch; use ``drop_last=False``); :attr:`ProgressionMetric.n_samples` tells how many were counted.
* :func:`make_engines`: the SupervisedTrainer (focal loss, Adam, warm-up, balanced sampler, handlers) and the
  SupervisedEvaluator (metrics, best snapshot by validation AP) of one fold, as the bundle wires them.
* :func:`predict_probabilities`: ``N x 3`` softmax probabilities of a network over a loader, in loader order.

Batches: ``image`` ``B x 1 x S x H x W`` (MR; S sagittal slices first) or ``B x 1 x H x W`` (radiograph ROI),
``label`` ``B`` int64 (0 none, 1 fast, 2 slow). Network outputs: ``B x 3`` logits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from ignite.metrics import Metric
from torch.utils.data import DataLoader, WeightedRandomSampler

from pipeline.progression.labels import NUM_CLASSES, any_progression
from pipeline.progression.losses import FocalLoss
from pipeline.progression.metrics import average_precision, balanced_accuracy, roc_auc

__all__ = ["ClassBalancedSampler", "ProgressionMetric", "WarmupLambda", "class_balanced_weights", "make_engines",
           "predict_probabilities", "warmup_lr", "warmup_scheduler"]

logger = logging.getLogger(__name__)

#: Paper settings of the optimiser (Adam, warm-up 1e-5 -> 1e-4 over 5 epochs, weight decay 1e-4) and loss.
PAPER_OPTIM = {"start_lr": 1e-5, "end_lr": 1e-4, "warmup_epochs": 5, "weight_decay": 1e-4, "gamma": 2.0}
PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------- warm-up
def warmup_lr(epoch: float, start_lr: float = 1e-5, end_lr: float = 1e-4, warmup_epochs: int = 5) -> float:
    """Learning rate after ``epoch`` completed epochs: ``start + (end - start) * min(epoch, W) / W`` (linear
    warm-up over ``W = warmup_epochs`` epochs, then ``end_lr``; ``W = 0``: always ``end_lr``)."""
    if warmup_epochs <= 0:
        return float(end_lr)
    t = min(max(float(epoch), 0.0), float(warmup_epochs)) / float(warmup_epochs)
    return float(start_lr + (end_lr - start_lr) * t)


class WarmupLambda:
    """``LambdaLR`` factor of :func:`warmup_lr` for an optimiser whose base lr is ``end_lr``: ``factor(e) =
    warmup_lr(e) / end_lr`` (a picklable object, so the scheduler's state dict holds it)."""

    def __init__(self, start_lr: float = 1e-5, end_lr: float = 1e-4, warmup_epochs: int = 5) -> None:
        if end_lr <= 0 or start_lr < 0:
            raise ValueError(f"need end_lr > 0 and start_lr >= 0, got {start_lr}, {end_lr}")
        self.start_lr, self.end_lr, self.warmup_epochs = float(start_lr), float(end_lr), int(warmup_epochs)

    def __call__(self, epoch: int) -> float:
        return warmup_lr(epoch, self.start_lr, self.end_lr, self.warmup_epochs) / self.end_lr


def warmup_scheduler(optimizer: torch.optim.Optimizer, start_lr: float = 1e-5, end_lr: float = 1e-4,
                     warmup_epochs: int = 5) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, WarmupLambda(...))``; the optimiser's lr must be ``end_lr`` (it is the base the
    factor multiplies). Step it once per epoch (``LrScheduleHandler(epoch_level=True)``)."""
    for g in optimizer.param_groups:
        lr = g.get("initial_lr", g["lr"])
        if not math.isclose(lr, end_lr, rel_tol=1e-9):
            raise ValueError(f"warmup_scheduler: the optimiser's lr ({lr}) must be end_lr ({end_lr})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLambda(start_lr, end_lr, warmup_epochs))


# ------------------------------------------------------------------------------------ balanced sampling
def class_balanced_weights(labels: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Per-sample weights ``1 / count(class of the sample)`` (float64, ``N``): each class present gets total
    weight 1, so a weighted draw picks every class with equal probability."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size == 0:
        raise ValueError("class_balanced_weights: no labels")
    if (y < 0).any():
        raise ValueError("labels must be >= 0 (drop excluded knees, label -1, first)")
    counts = np.bincount(y)
    return torch.as_tensor(1.0 / counts[y], dtype=torch.float64)


def _seed_of(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ClassBalancedSampler(WeightedRandomSampler):
    """Class-balanced resampling (module docstring): ``num_samples`` (default ``len(labels)``) draws with
    replacement, weights :func:`class_balanced_weights`, drawn by a ``torch.Generator`` seeded by
    ``(seed, epoch)``; :meth:`set_epoch` selects the epoch (call it every epoch, e.g. with
    :class:`pipeline.handlers.SamplerEpochHandler`; without it every epoch repeats one draw, as with
    ``DistributedSampler``).

    Distributed: the epoch's draw of ``ceil(num_samples / num_replicas) * num_replicas`` indices is the same on
    every rank; rank ``r`` takes ``draw[r::num_replicas]`` (``num_replicas`` / ``rank`` default from
    ``torch.distributed`` when it is initialised, else 1 / 0).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, seed: int = 0, num_samples: Optional[int] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        weights = class_balanced_weights(labels)
        n = len(weights) if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {n}")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = (torch.distributed.get_world_size() if dist_on else 1) if num_replicas is None else num_replicas
        rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.num_replicas, self.rank, self.seed, self.epoch = int(num_replicas), int(rank), int(seed), 0
        self.total_size = math.ceil(n / self.num_replicas) * self.num_replicas
        super().__init__(weights, self.total_size // self.num_replicas, replacement=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        """Every rank's indices of the current epoch (before the rank split)."""
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch))
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------------------- metric
_METRICS: dict[str, Callable[..., float]] = {"ap": average_precision, "auc": roc_auc, "ba": balanced_accuracy}


def _pred_label(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred, label)`` of a MONAI engine output: a dict (``decollate=False``) or a list of per-sample dicts."""
    if isinstance(output, Mapping):
        return output["pred"], output["label"]
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        return (torch.stack([torch.as_tensor(o["pred"]) for o in output]),
                torch.stack([torch.as_tensor(o["label"]).reshape(()) for o in output]))
    return output


class ProgressionMetric(Metric):
    """AP (``"ap"``, default), ROC AUC (``"auc"``) or balanced accuracy at P(any) >= 0.5 (``"ba"``) of the
    any-progression score ``P(fast) + P(slow)`` (softmax of the ``B x 3`` logits ``pred``) against ``label``
    (0/1/2 -> any = label > 0), over every sample the evaluator saw in one run.

    After :meth:`compute`: :attr:`n_samples` (samples counted), :attr:`probabilities` (``N x 3``) and
    :attr:`labels` (``N``), in loader order. A validation set with one class only has no AP / AUC / BA:
    ``compute`` then returns ``undefined_value`` (default -1.0, below any real value, so the best-snapshot
    logic still works) and logs a warning.
    """

    def __init__(self, metric: str = "ap", undefined_value: float = -1.0, output_transform=_pred_label,
                 device: Union[str, torch.device] = "cpu") -> None:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
        self.metric, self.undefined_value = metric, float(undefined_value)
        self.n_samples = 0
        self.probabilities = torch.zeros(0, NUM_CLASSES)
        self.labels = torch.zeros(0, dtype=torch.long)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._p: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        pred, label = output
        pred = torch.as_tensor(pred).detach().float().cpu()
        if pred.ndim != 2 or pred.shape[1] != NUM_CLASSES:
            raise ValueError(f"ProgressionMetric expects B x {NUM_CLASSES} logits, got {list(pred.shape)}")
        self._p.append(torch.softmax(pred, dim=1))
        self._y.append(torch.as_tensor(label).detach().long().cpu().reshape(-1))

    def compute(self) -> float:
        if not self._p:
            raise RuntimeError("ProgressionMetric needs at least one batch")
        self.probabilities, self.labels = torch.cat(self._p), torch.cat(self._y)
        self.n_samples = int(self.labels.numel())
        if self.n_samples != self.probabilities.shape[0]:
            raise RuntimeError(f"{self.probabilities.shape[0]} predictions for {self.n_samples} labels")
        y = any_progression(self.labels.numpy())
        score = (self.probabilities[:, 1] + self.probabilities[:, 2]).double().numpy()
        value = _METRICS[self.metric](y, score)
        if not np.isfinite(value):
            logger.warning("validation set holds one class only (%d samples): %s undefined, reported as %s",
                           self.n_samples, self.metric, self.undefined_value)
            return self.undefined_value
        return float(value)


# ------------------------------------------------------------------------------------------- engines
def make_engines(network: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader, ckpt_dir: PathLike,
                 epochs: int, device: Union[str, torch.device] = "cpu", sampler: Optional[Any] = None,
                 start_lr: float = 1e-5, end_lr: float = 1e-4, warmup_epochs: int = 5, weight_decay: float = 1e-4,
                 gamma: float = 2.0, val_interval: int = 1, log_dir: Optional[PathLike] = None,
                 progress: bool = False, desc: str = "progression training", stats: bool = True):
    """The trainer and evaluator of one fold as ``bundles/progression_mr/configs/train.json`` wires them:
    ``SupervisedTrainer`` (:class:`~pipeline.progression.losses.FocalLoss` ``gamma``, Adam ``end_lr`` with
    ``weight_decay`` and the :func:`warmup_scheduler`, ``LrScheduleHandler`` per epoch, ``SamplerEpochHandler``
    when ``sampler`` is given, ``ValidationHandler`` every ``val_interval`` epochs, ``StatsHandler``,
    ``TensorBoardStatsHandler`` when ``log_dir``, :class:`pipeline.handlers.ProgressBar` when ``progress``) and
    ``SupervisedEvaluator`` (key metric ``val_ap``, additional ``val_auc`` / ``val_ba``, all
    :class:`ProgressionMetric`; ``CheckpointSaver`` writes the best snapshot by validation AP to
    ``ckpt_dir/model.pt``). Returns ``(trainer, evaluator)``; ``trainer.run()`` trains.
    """
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import (
        CheckpointSaver,
        LrScheduleHandler,
        StatsHandler,
        TensorBoardStatsHandler,
        ValidationHandler,
    )

    from pipeline.handlers import ProgressBar, SamplerEpochHandler

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=end_lr, weight_decay=weight_decay)
    scheduler = warmup_scheduler(optimizer, start_lr, end_lr, warmup_epochs)
    val_handlers: list[Any] = [
        CheckpointSaver(save_dir=str(ckpt_dir), save_dict={"model": network}, save_key_metric=True,
                        key_metric_filename="model.pt", key_metric_greater_or_equal=False),
    ]
    if stats:
        val_handlers.insert(0, StatsHandler(iteration_log=False, name=None))
    if log_dir is not None:
        val_handlers.append(TensorBoardStatsHandler(log_dir=str(log_dir), iteration_log=False))
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=val_loader, network=network,
        key_val_metric={"val_ap": ProgressionMetric("ap")},
        additional_metrics={"val_auc": ProgressionMetric("auc"), "val_ba": ProgressionMetric("ba")},
        val_handlers=val_handlers, decollate=False, amp=False)
    loss_out = lambda out: out["loss"].item()  # noqa: E731
    handlers: list[Any] = []
    if sampler is not None and hasattr(sampler, "set_epoch"):
        handlers.append(SamplerEpochHandler(sampler))
    handlers += [LrScheduleHandler(lr_scheduler=scheduler, print_lr=stats, epoch_level=True),
                 ValidationHandler(validator=evaluator, epoch_level=True, interval=val_interval)]
    if stats:
        handlers.append(StatsHandler(tag_name="train_loss", output_transform=loss_out, name=None))
    if log_dir is not None:
        handlers.append(TensorBoardStatsHandler(log_dir=str(log_dir), tag_name="train_loss",
                                                output_transform=loss_out))
    if progress:
        handlers.append(ProgressBar(desc=desc))
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=train_loader, network=network, optimizer=optimizer,
        loss_function=FocalLoss(gamma=gamma), train_handlers=handlers, decollate=False, amp=False)
    trainer.lr_scheduler = scheduler
    return trainer, evaluator


def predict_probabilities(network: torch.nn.Module, loader: DataLoader,
                          device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """``N x 3`` softmax class probabilities (float64) of ``network`` over every batch of ``loader`` (in loader
    order; ``network.eval()``, no gradients)."""
    network.eval()
    out = []
    with torch.no_grad():
        for batch in loader:
            logits = network(torch.as_tensor(batch["image"]).to(device))
            out.append(torch.softmax(logits.float(), dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES))

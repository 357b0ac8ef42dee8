"""One GradICON training step: the symmetric loss, an ignite/MONAI iteration function, and inference.

* :func:`gradicon_loss`: ``Sim(warp(A, phi_AB), B) + Sim(warp(B, phi_BA), A) + lam * L_icon`` with
  ``phi_AB = net(A, B)``, ``phi_BA = net(B, A)`` (:func:`pipeline.registration.losses.gradicon_penalty`).
* :func:`similarity_by_name`: ``"lncc"`` (1 - signed LNCC, sigma 3 px), ``"mi"`` (MONAI global mutual
  information), ``"dice"`` (1 - soft Dice of one-hot label maps warped bilinearly; stage 3).
* :class:`GradICONTrainStep`: ``SupervisedTrainer(iteration_update=GradICONTrainStep(...))``; batches
  ``{"moving": B x C x H x W, "fixed": B x C x H x W}``; label batches (``C = 1`` integer label maps) are
  turned into one-hot maps when the network takes ``num_classes`` channels.
* :func:`register`: ``phi = net(moving, fixed)`` under ``torch.no_grad`` in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from monai.utils import CommonKeys

from pipeline.registration.losses import gradicon_penalty, lncc_loss, mi_loss, soft_dice_loss
from pipeline.registration.maps import NUM_CLASSES, warp

__all__ = ["GradICONTrainStep", "LAMBDA", "SIMILARITIES", "gradicon_loss", "onehot_labels", "register",
           "similarity_by_name"]

#: GradICON weight of the paper (Demir & Niethammer 2024; Tian et al. 2023).
LAMBDA = 1.5
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Similarity losses by name (lower is better; each takes ``(warped, target)``).
SIMILARITIES: dict[str, Similarity] = {"lncc": lncc_loss, "mi": mi_loss, "dice": soft_dice_loss}


def similarity_by_name(name: Union[str, Similarity]) -> Similarity:
    """A similarity loss from :data:`SIMILARITIES` (a callable is returned unchanged)."""
    if callable(name):
        return name
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; choose one of {sorted(SIMILARITIES)}")
    return SIMILARITIES[name]


def onehot_labels(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Integer label maps ``B x 1 x H x W`` -> float one-hot ``B x num_classes x H x W``."""
    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(f"label maps must be B x 1 x H x W, got {tuple(labels.shape)}")
    lab = labels.long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes}), got {int(lab.min())}..{int(lab.max())}")
    return F.one_hot(lab[:, 0], num_classes).permute(0, 3, 1, 2).float()


def gradicon_loss(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor,
                  similarity: Union[str, Similarity] = lncc_loss, lam: float = LAMBDA,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, parts)`` of GradICON on the pair ``a`` (moving), ``b`` (fixed), both ``B x C x H x W``.

    ``total = Sim(warp(a, phi_AB), b) + Sim(warp(b, phi_BA), a) + lam * L_icon(phi_AB, phi_BA)``;
    ``parts``: ``"similarity_ab"``, ``"similarity_ba"``, ``"icon"`` (unweighted penalty), ``"total"``, plus
    ``"phi_ab"`` (detached map). Images (and one-hot label maps) are warped bilinearly. ``generator`` seeds the
    penalty's sample jitter."""
    sim = similarity_by_name(similarity)
    phi_ab = net(a, b)
    phi_ba = net(b, a)
    s_ab = sim(warp(a, phi_ab), b)
    s_ba = sim(warp(b, phi_ba), a)
    icon = gradicon_penalty(phi_ab, phi_ba, generator=generator)
    total = s_ab + s_ba + float(lam) * icon
    parts = {"similarity_ab": s_ab.detach(), "similarity_ba": s_ba.detach(), "icon": icon.detach(),
             "total": total.detach(), "phi_ab": phi_ab.detach()}
    return total, parts


class GradICONTrainStep:
    """``SupervisedTrainer`` iteration function of GradICON (like :class:`pipeline.mris.engine.MRISTrainStep`).

    Reads ``batch[moving_key]`` and ``batch[fixed_key]`` (``B x C x H x W``). With ``labels=True`` they are
    integer label maps ``B x 1 x H x W`` and are fed as one-hot maps (``num_classes`` channels; similarity
    ``"dice"``). Computes :func:`gradicon_loss`, backward, optional gradient-norm clipping, optimiser step.
    Returns ``{"image": moving, "label": fixed, "loss": total, "similarity", "icon", "phi"}`` (detached), so
    MONAI's ``StatsHandler`` / ignite metrics can read ``"loss"``.
    """

    def __init__(self, similarity: Union[str, Similarity] = "lncc", lam: float = LAMBDA, moving_key: str = "moving",
                 fixed_key: str = "fixed", labels: bool = False, num_classes: int = NUM_CLASSES,
                 max_grad_norm: Optional[float] = None) -> None:
        self.similarity = similarity_by_name(similarity)
        self.lam = float(lam)
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.labels, self.num_classes = bool(labels), int(num_classes)
        self.max_grad_norm = max_grad_norm

    def prepare(self, batch: Mapping[str, Any], device: Union[str, torch.device, None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(moving, fixed)`` of ``batch`` on ``device``; one-hot for label batches."""
        for key in (self.moving_key, self.fixed_key):
            if key not in batch:
                raise KeyError(f"the batch has no {key!r} (keys: {sorted(map(str, batch))})")
        pair = [torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in (self.moving_key, self.fixed_key)]
        if self.labels:
            return onehot_labels(pair[0], self.num_classes), onehot_labels(pair[1], self.num_classes)
        return pair[0].float(), pair[1].float()

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        moving, fixed = self.prepare(batch, engine.state.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", True))
        total, parts = gradicon_loss(engine.network, moving, fixed, self.similarity, self.lam)
        total.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        engine.optimizer.step()
        return {CommonKeys.IMAGE: moving, CommonKeys.LABEL: fixed, CommonKeys.LOSS: total.detach(),
                "similarity": (parts["similarity_ab"] + parts["similarity_ba"]), "icon": parts["icon"],
                "phi": parts["phi_ab"]}


def register(net: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``phi = net(moving, fixed)`` (``B x 2 x H x W`` on [0, 1]) in eval mode under ``torch.no_grad``
    (the network's train/eval mode is restored). ``warp(moving, phi)`` is then aligned with ``fixed``."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(moving, fixed)
    finally:
        net.train(was_training)

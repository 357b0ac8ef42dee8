"""Longitudinally-aware triplet loss of MRIS (Chen & Niethammer 2023, eq. 2-3).

Cosine distance ``d(x, y) = 1 - <f(x), g(y)> / (|f(x)| |g(y)|)``. Every radiograph ``x_a`` in the batch is an
anchor, its own thickness map ``y_a`` the positive, and every other in-batch map ``y_b`` a negative:

    l(a, b) = max(0, d(x_a, y_a) - d(x_a, y_b) + margin),   margin = 0.1.

Differences from the reference code (deliberate):

* the diagonal ``a == b`` is masked (the reference adds the constant ``B * margin``);
* pairs whose items belong to the same subject (another visit, or the other knee of the same patient) are
  masked, so a subject is never its own negative;
* ``reduction="mean"`` (default) averages over the VALID (unmasked) pairs, so the scale does not depend
  on the batch size; ``"sum"`` sums them (the paper's eq. 3 up to the masked terms); ``"none"`` returns the
  ``B x B`` matrix of per-pair terms with masked entries set to 0.
* ``symmetric=True`` adds the map -> radiograph term ``max(0, d(x_a, y_a) - d(x_b, y_a) + margin)`` (off by
  default, as in the paper). With ``"mean"`` the result is the mean over the valid terms of both
  directions (= the average of the two directional means), with ``"sum"`` the sum of both.

If no pair is valid (e.g. a batch of one subject), the loss is an exact 0 that still depends on the inputs
(so ``backward()`` works and yields zero gradients), never NaN.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "cosine_distance_matrix",
    "groups_to_tensor",
    "longitudinal_triplet_loss",
    "LongitudinalTripletLoss",
]

GroupsLike = Union[torch.Tensor, Sequence, None]


def cosine_distance_matrix(xray_emb: torch.Tensor, map_emb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``D[a, b] = 1 - cos(xray_emb[a], map_emb[b])`` for ``B x D`` inputs -> ``B x B``."""
    x = F.normalize(xray_emb, dim=1, eps=eps)
    y = F.normalize(map_emb, dim=1, eps=eps)
    return 1.0 - x @ y.transpose(0, 1)


def groups_to_tensor(groups: GroupsLike, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Subject ids (tensor of ints, or any sequence of hashables such as strings) -> ``B`` int64 tensor.

    ``None`` gives ``arange(B)`` (every item its own subject: only the diagonal is masked).
    """
    if groups is None:
        return torch.arange(batch_size, device=device)
    if isinstance(groups, torch.Tensor):
        g = groups.reshape(-1).to(device)
    else:
        codes: dict = {}
        g = torch.tensor(
            [codes.setdefault(s, len(codes)) for s in list(groups)], dtype=torch.long, device=device
        )
    if g.numel() != batch_size:
        raise ValueError(f"got {g.numel()} subject ids for a batch of {batch_size}")
    return g


def longitudinal_triplet_loss(
    xray_emb: torch.Tensor,
    map_emb: torch.Tensor,
    groups: GroupsLike = None,
    margin: float = 0.1,
    reduction: str = "mean",
    symmetric: bool = False,
) -> torch.Tensor:
    """MRIS triplet loss with same-subject masking (see the module docstring).

    Args:
        xray_emb: radiograph embeddings ``f(x)``, ``B x D`` (normalised here again, defensively).
        map_emb: thickness-map embeddings ``g(y)``, ``B x D``; row ``a`` is the positive of radiograph ``a``.
        groups: subject id per row (``B`` ints or strings); rows with equal ids are never negatives of
            each other. ``None``: only the diagonal is masked.
        margin: triplet margin (paper: 0.1).
        reduction: ``"mean"`` over valid pairs (default), ``"sum"``, or ``"none"`` (``B x B``).
        symmetric: also add the map -> radiograph direction.

    Returns:
        scalar loss (or ``B x B`` for ``"none"``).
    """
    if xray_emb.ndim != 2 or xray_emb.shape != map_emb.shape:
        raise ValueError(
            f"expected two B x D embeddings of equal shape, got {tuple(xray_emb.shape)} "
            f"and {tuple(map_emb.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    b = xray_emb.shape[0]
    g = groups_to_tensor(groups, b, device=xray_emb.device)
    valid = g[:, None] != g[None, :]  # also False on the diagonal

    dist = cosine_distance_matrix(xray_emb, map_emb)
    pos = torch.diagonal(dist)
    # anchor radiograph a (rows), negative map b (columns)
    terms = F.relu(pos[:, None] - dist + margin) * valid
    n_valid = valid.sum()
    if symmetric:
        # anchor map a (columns of dist), negative radiograph b: d(x_b, y_a) = dist[b, a] -> transpose
        terms_t = F.relu(pos[:, None] - dist.transpose(0, 1) + margin) * valid
        if reduction == "none":
            return terms + terms_t
        terms = torch.cat([terms, terms_t])
        n_valid = 2 * n_valid
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    # total is an exact 0 (still attached to the graph) when nothing is valid: avoid 0 / 0.
    return total / n_valid.clamp(min=1).to(total.dtype)


class LongitudinalTripletLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`longitudinal_triplet_loss`.

    ``forward(xray_emb, map_emb, subject_ids=None)`` with ``B x D`` embeddings and ``B`` subject ids.
    """

    def __init__(self, margin: float = 0.1, reduction: str = "mean", symmetric: bool = False) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.margin = float(margin)
        self.reduction = reduction
        self.symmetric = bool(symmetric)

    def forward(
        self, xray_emb: torch.Tensor, map_emb: torch.Tensor, subject_ids: GroupsLike = None
    ) -> torch.Tensor:
        return longitudinal_triplet_loss(
            xray_emb,
            map_emb,
            subject_ids,
            margin=self.margin,
            reduction=self.reduction,
            symmetric=self.symmetric,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, symmetric={self.symmetric}"

"""Direct synthesis at inference: radiograph items -> FC / TC maps in mm on the atlas grid, NaN outside.

The generator output (``B x 2 x S x S``, mm / 3) is converted to mm (:func:`pipeline.baselines.engine.to_mm`,
clamped at 0 mm), restricted to the footprint at ``S x S`` (the atlas masks resized like the training
targets), resized NaN-aware to the atlas grid ``H x W`` (:func:`transforms.nan_aware_resize`, so values
outside the footprint never bleed in) and set to NaN outside the atlas masks. The result is what MRIS's
k-NN synthesis returns, so both go through the same evaluation (:mod:`pipeline.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from scipy import ndimage
from tqdm import tqdm

from pipeline.baselines.data import synthesis_transforms
from pipeline.baselines.engine import to_mm
from pipeline.baselines.nets import check_method, make_generator
from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import load_network, network_settings
from pipeline.io.sharded_batches import batch_indices, my_batches
from pipeline.io.sharding import RankGroup
from transforms import nan_aware_resize

__all__ = ["atlas_masks", "generator_settings", "load_generator", "network_masks", "outputs_to_atlas",
           "predict_maps"]

#: The command that trains a generator checkpoint (quoted when one is missing).
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundles/direct_synthesis/configs/train.json"

logger = logging.getLogger(__name__)


def atlas_masks(items: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """``{fc, tc}: H x W`` bool atlas footprints = the finite pixels of the first item's maps (the grid is in
    atlas space, so the footprint is the same for every knee)."""
    if not items:
        raise ValueError("atlas_masks: no items")
    return {k: np.isfinite(np.load(items[0][k])) for k in MAP_KEYS}


def network_masks(masks: Mapping[str, np.ndarray], image_size: int) -> torch.Tensor:
    """``2 x S x S`` bool: the atlas footprints resized to the network grid exactly like the training targets
    (:class:`transforms.NaNAwareResized`, threshold 0.5)."""
    out = []
    for k in MAP_KEYS:
        m = torch.from_numpy(np.where(masks[k], 1.0, np.nan).astype(np.float32))[None]
        out.append(torch.isfinite(nan_aware_resize(m, int(image_size)))[0])
    return torch.stack(out)


def _fill_nearest(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return a[tuple(idx)]


def outputs_to_atlas(pred: torch.Tensor, masks: Mapping[str, np.ndarray], net_mask: torch.Tensor | None = None
                     ) -> dict[str, np.ndarray]:
    """Generator outputs ``B x 2 x S x S`` (mm / 3) -> ``{fc, tc}: B x H x W`` float32 mm, NaN outside the
    atlas masks ``{key: H x W}``. Atlas pixels inside the footprint that no network pixel of the footprint
    reaches (rare, at the rim) take the nearest resized value."""
    if pred.ndim != 4 or pred.shape[1] != len(MAP_KEYS):
        raise ValueError(f"expected B x {len(MAP_KEYS)} x S x S generator outputs, got {tuple(pred.shape)}")
    s = int(pred.shape[-1])
    nm = network_masks(masks, s) if net_mask is None else net_mask.bool()
    mm = to_mm(pred.detach().float().cpu()).clamp_min(0.0)
    mm = torch.where(nm[None], mm, torch.full_like(mm, float("nan")))
    out: dict[str, np.ndarray] = {}
    for c, k in enumerate(MAP_KEYS):
        h, w = masks[k].shape
        maps = []
        for b in range(mm.shape[0]):
            r = nan_aware_resize(mm[b, c][None], (h, w), mode="bilinear", mask_threshold=1e-3)[0].numpy()
            valid = np.isfinite(r)
            if (masks[k] & ~valid).any():
                r = _fill_nearest(r, valid)
            r = r.astype(np.float32)
            r[~masks[k]] = np.nan
            maps.append(r)
        out[k] = np.stack(maps)
    return out


def load_generator(method: str | None, checkpoint: str | Path, image_size: int | None = None,
                   **net_kwargs) -> torch.nn.Module:
    """The generator of ``checkpoint`` (``models/model.pt`` or the final checkpoint) with its weights, rebuilt
    from the checkpoint's own record (:func:`pipeline.io.checkpoints.load_network`). ``method``, ``image_size`` and
    the keyword arguments of :func:`pipeline.baselines.nets.make_generator` (``None`` = not given) must agree with
    that record; a checkpoint written before generators described themselves is built from them."""
    return load_network(checkpoint, fallback=make_generator, train=TRAIN_COMMAND,
                        method=None if method is None else check_method(method), image_size=image_size, **net_kwargs)


def generator_settings(network: torch.nn.Module, method: str | None = None, image_size: int | None = None
                       ) -> tuple[str, int]:
    """``(method, image_size)`` of a generator: its own record, checked against those given (``None`` = not
    given; needed only for generators whose checkpoint does not record them)."""
    s = network_settings(network, required=("method", "image_size"),
                         method=None if method is None else check_method(method), image_size=image_size)
    return check_method(s["method"]), int(s["image_size"])


def predict_maps(network: torch.nn.Module, items: Sequence[dict], image_size: int,
                 masks: Mapping[str, np.ndarray], device: torch.device | str = "cpu", batch_size: int = 32,
                 keep_images: bool = False, progress: bool = True, group: RankGroup | None = None
                 ) -> tuple[dict[str, np.ndarray] | None, torch.Tensor | None]:
    """Synthesize ``{fc, tc}: N x H x W`` (mm, NaN outside ``masks``) for ``items`` (MRIS item dicts) with a
    trained generator; with ``keep_images`` also the ``N x 1 x S x S`` radiograph inputs.

    ``group`` (``None``: one process): each rank synthesizes its batches (:func:`pipeline.io.sharded_batches.my_batches`:
    the batches of one process, batch ``b`` -> rank ``b % world_size``); rank 0 gathers and returns them all, the
    other ranks return ``(None, None)``."""
    if not items:
        raise ValueError("predict_maps: no items")
    group = group if group is not None else RankGroup(0, 1)
    ds = Dataset(list(items), synthesis_transforms(image_size, train=False, with_maps=False))
    nm = network_masks(masks, image_size)
    network = network.to(device).eval()
    n_mine = len(group.indices(len(batch_indices(len(ds), batch_size))))
    per_batch: dict[int, tuple[dict[str, np.ndarray], torch.Tensor | None]] = {}
    with torch.no_grad():
        for b, batch in tqdm(my_batches(ds, batch_size, group), total=n_mine, desc=f"direct synthesis{group.label}",
                             unit="batch", disable=not progress):
            x = torch.as_tensor(batch["image"]).to(device)
            per_batch[b] = (outputs_to_atlas(network(x).cpu(), masks, nm), x.cpu() if keep_images else None)
    merged = group.merge(per_batch)  # every rank's batches on rank 0, in batch order
    if merged is None:
        return None, None
    parts = list(merged.values())
    return ({k: np.concatenate([res[k] for res, _ in parts]) for k in MAP_KEYS},
            torch.cat([x for _, x in parts]) if keep_images else None)

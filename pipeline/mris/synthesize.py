"""MRIS synthesis of arbitrary items (e.g. the downstream and test sets) for comparisons and downstream tasks.

Built only from the existing MRIS pieces: :func:`pipeline.mris.evaluate.build_mris_database` (embedding
database of the database split), :func:`pipeline.mris.evaluate.embed_radiographs` (radiograph encoder),
:meth:`pipeline.mris.database.EmbeddingDatabase.synthesize` (:func:`pipeline.mris.knn.knn_synthesize` /
:func:`~pipeline.mris.knn.knn_synthesize_separate`), :func:`pipeline.mris.evaluate.mean_map_baseline`.

Maps are ``{fc, tc}: N x H x W`` float32 in mm on the atlas grid (left-knee convention), NaN outside the
atlas footprint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.conventions import MAP_KEYS
from pipeline.mris.data import check_variant
from pipeline.mris.database import EmbeddingDatabase
from pipeline.mris.engine import load_mris_network, run_settings
from pipeline.mris.evaluate import (
    build_mris_database,
    embed_radiographs,
    load_raw_maps,
    mean_map_baseline,
    truth_stack,
)

__all__ = ["MRISSynthesizer", "mean_map", "truth_maps"]

logger = logging.getLogger(__name__)


def truth_maps(items: Sequence[dict], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MR-extracted maps of ``items`` (the manifest's ``fc_map`` / ``tc_map``): ``{fc, tc}: N x H x W`` mm, NaN
    outside the footprint; NaN inside ``masks`` set to 0 mm with a warning (as the MRIS evaluation does)."""
    if not items:
        raise ValueError("truth_maps: no items")
    return truth_stack(items, masks)


def mean_map(items: Sequence[dict], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The naive baseline of the MRIS tables: the mean map of ``items`` (the database split), ``{fc, tc}: H x W``
    mm, NaN outside ``masks`` (computed by :func:`pipeline.mris.evaluate.mean_map_baseline`, maps stored with
    0 outside the footprint as in the embedding database)."""
    if not items:
        raise ValueError("mean_map: no items")
    stacks = {k: np.stack([np.nan_to_num(load_raw_maps(it)[k], nan=0.0) for it in items]) for k in MAP_KEYS}
    stacks = {k: np.where(masks[k][None], v, 0.0) for k, v in stacks.items()}
    return mean_map_baseline(SimpleNamespace(map_keys=list(MAP_KEYS), maps=stacks, masks=dict(masks)))


@dataclass
class MRISSynthesizer:
    """A trained MRIS model + its embedding database, ready to synthesize maps of any items.

    Args:
        checkpoint: ``models/model.pt`` of an MRIS bundle root.
        manifest: the knee-visit manifest (the database split is taken from it).
        database_dir: where the embedding database is (re)built.
        variant: ``"combined"`` (MRIS-C) or ``"separate"`` (MRIS-S); ``None``: as the checkpoint records it.
        image_size, widen_factor, stem_stride: as in the MRIS training config; ``None``: as the checkpoint records
            them (given values must agree with the checkpoint's record).
        split_fractions, split_seed, database_split: the MRIS split (database = the synthesis database).
        k: neighbours (capped at the database size).
    """

    checkpoint: str | Path
    manifest: str | Path
    database_dir: str | Path
    variant: str | None = None
    image_size: int | None = None
    widen_factor: float | None = None
    stem_stride: int | None = None
    split_fractions: Mapping[str, float] | None = None
    split_seed: int = 0
    database_split: str = "database"
    k: int = 20
    device: torch.device | str = "cpu"
    batch_size: int = 32
    network: torch.nn.Module | None = field(default=None, repr=False)
    db: EmbeddingDatabase | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.variant = None if self.variant is None else check_variant(self.variant)
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"MRIS checkpoint not found: {self.checkpoint}")

    def build(self, progress: bool = True) -> MRISSynthesizer:
        """Load the checkpoint and (re)build the embedding database of the database split."""
        net = load_mris_network(self.checkpoint, variant=self.variant, image_size=self.image_size,
                                widen_factor=self.widen_factor, stem_stride=self.stem_stride)
        self.variant, self.image_size = run_settings(net, self.variant, self.image_size)
        self.network = net.to(self.device).eval()
        self.db = build_mris_database(self.network, self.checkpoint, self.manifest, self.database_dir,
                                      variant=self.variant, image_size=self.image_size,
                                      split_fractions=self.split_fractions, split_seed=self.split_seed,
                                      database_split=self.database_split, device=self.device,
                                      overwrite=True, progress=progress)
        return self

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Atlas footprints ``{fc, tc}: H x W`` of the database."""
        if self.db is None:
            self.build()
        return dict(self.db.masks)

    def synthesize(self, items: Sequence[dict], keep_images: bool = False
                   ) -> tuple[dict[str, np.ndarray], torch.Tensor | None, dict[str, Any]]:
        """k-NN synthesis for ``items``: ``({fc, tc}: N x H x W mm, NaN outside; radiograph inputs
        ``N x 1 x S x S`` or None; info {"k", "neighbour_indices" (N x k, of the fc key for MRIS-S)})``."""
        if self.db is None or self.network is None:
            self.build()
        if not items:
            raise ValueError("MRISSynthesizer.synthesize: no items")
        emb, images = embed_radiographs(self.network, items, self.variant, self.image_size, self.device,
                                        self.batch_size, keep_images=keep_images)
        k = min(int(self.k), len(self.db))
        res = self.db.synthesize(emb, k=k)
        if isinstance(res, Mapping):  # MRIS-S: {key: KNNResult}
            maps = {key: r.maps.numpy() for key, r in res.items()}
            indices = res[MAP_KEYS[0]].indices.numpy()
        else:
            maps = {key: v.numpy() for key, v in res.maps.items()}
            indices = res.indices.numpy()
        return maps, images, {"k": k, "neighbour_indices": indices}

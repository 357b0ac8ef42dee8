"""Test-set evaluation of one direct-synthesis baseline (``bundles/direct_synthesis/configs/evaluate.json``):
the MRIS synthesis error (:func:`pipeline.metrics.synthesis_error_report`) against the MR-extracted maps,
next to the mean-map baseline of the database split, overall and per KLG bucket.

Sharded (torchrun, ``bundles/direct_synthesis/configs/multi_gpu_evaluate.json``; ``group``, a
:class:`pipeline.io.sharding.RankGroup`): the generator runs the batches of one process, batch ``b`` on rank
``b % world_size`` (:func:`pipeline.baselines.synthesize.predict_maps`); rank 0 gathers the maps, computes the
metrics (and the mean-map baseline) and writes every file, the bytes of a one-process run (same threads per
process) but for the timing (``seconds``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.baselines.synthesize import atlas_masks, generator_settings, load_generator, predict_maps
from pipeline.io.sharding import RankGroup
from pipeline.metrics import synthesis_error_report
from pipeline.mris.data import manifest_items, select
from pipeline.mris.synthesize import mean_map, truth_maps

__all__ = ["METHOD_LABELS", "evaluate_test", "klg_or_none"]

logger = logging.getLogger(__name__)

#: Display names of the baselines in tables.
METHOD_LABELS = {"unet": "U-Net", "pix2pix": "pix2pix", "transformer": "TransUNet-like"}


def klg_or_none(items) -> list[int | None]:
    """KLG of each item, ``None`` where unknown (-1): the ``klg`` argument of the synthesis tables."""
    return [it["klg"] if it["klg"] >= 0 else None for it in items]


def evaluate_test(method: str | None, checkpoint: str | Path, manifest: str | Path, output_dir: str | Path,
                  image_size: int | None = None, net_kwargs: Mapping[str, Any] | None = None,
                  split_fractions: Mapping[str, float] | None = None, split_seed: int = 0,
                  database_split: str = "database", test_split: str = "test",
                  device: torch.device | str = "cpu", batch_size: int = 32, figure: bool = True,
                  group: RankGroup | None = None) -> dict[str, Any] | None:
    """Synthesize every test knee-visit with the trained generator and write to ``output_dir``:
    ``synthesis_errors.csv`` (method x map x KLG group: n_maps, mean per-map median / MAD of |error| in mm),
    ``metrics.json``, ``report.md`` and (``figure``) ``examples.png``. The generator is rebuilt from the
    checkpoint (:func:`pipeline.baselines.synthesize.load_generator`): ``method``, ``image_size`` and
    ``net_kwargs`` (``None`` = as the checkpoint records them) are needed only for older checkpoints.

    ``group`` (``None``: one process): each rank synthesizes its batches of test radiographs; rank 0 gathers
    them, computes the metrics, writes the files and returns the metrics, the other ranks return ``None``."""
    t0 = time.time()
    items = manifest_items(manifest, split_fractions, split_seed)
    test, db_items = select(items, test_split), select(items, database_split)
    if not test or not db_items:
        raise ValueError(f"{manifest}: split {test_split!r} has {len(test)} items and {database_split!r} "
                         f"{len(db_items)}; both must be non-empty")
    masks = atlas_masks(test)
    net = load_generator(method, checkpoint, image_size, **dict(net_kwargs or {}))
    method, image_size = generator_settings(net, method, image_size)
    synth, images = predict_maps(net, test, image_size, masks, device, batch_size, keep_images=figure, group=group)
    if synth is None:  # another rank of a sharded run: rank 0 has the maps, computes and writes the rest
        return None
    truth = truth_maps(test, masks)
    base = mean_map(db_items, masks)
    klg = klg_or_none(test)
    label = METHOD_LABELS[method]
    tab = synthesis_error_report(synth, truth, masks=masks, klg=klg)
    tab.insert(0, "method", label)
    tab_b = synthesis_error_report({k: base[k][None].repeat(len(test), 0) for k in base}, truth, masks=masks, klg=klg)
    tab_b.insert(0, "method", "mean database map")
    table = pd.concat([tab, tab_b], ignore_index=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "synthesis_errors.csv", index=False)
    metrics = {"method": method, "checkpoint": str(checkpoint), "image_size": int(image_size),
               "n_test_subjects": len({it["subject_id"] for it in test}), "n_test_visits": len(test),
               "synthesis_errors": table.to_dict(orient="records"), "seconds": round(time.time() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    lines = [f"# Direct synthesis evaluation: {label}", "",
             f"Test: {metrics['n_test_subjects']} subjects, {len(test)} knee-visits; image size {image_size}.", "",
             "Synthesis error (mm; mean over maps of the per-map median / MAD of |synth - truth| inside the mask)",
             "", "| method | map | group | n maps | median | MAD |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.map} | {r.group} | {r.n_maps} | {r.median_mm:.3f} | {r.mad_mm:.3f} |"
              for r in table.itertuples()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if figure:
        from pipeline.metrics.figures import example_maps_figure

        example_maps_figure(out / "examples.png", test, truth, {label: synth}, images=images)
    logger.info("direct synthesis (%s) evaluation written to %s", method, out)
    return metrics

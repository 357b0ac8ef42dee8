"""MRIS evaluation: embedding database from the database split, test-set retrieval recall, k-NN synthesis
error vs the mean-map baseline, report tables and an example figure.

Shapes/units: radiograph ROIs ``B x 1 x S x S`` in [0, 1]; thickness maps ``N x H x W`` in mm on the atlas
grid (left-knee convention), NaN outside the footprint; embeddings ``N x D`` unit-norm (MRIS-S:
``{"fc": N x D, "tc": N x D}``).

Sharded (torchrun, ``bundles/mris/configs/multi_gpu_evaluate.json``; ``group``, a
:class:`pipeline.io.sharding.RankGroup`): the network passes run in the batches of one process, batch ``b`` on rank
``b % world_size`` (the database maps, the test radiographs), so every embedding has the bits of a one-process run
(same threads per process); rank 0 gathers them, writes the database, runs the k-NN synthesis and the metrics and
writes every report, table and figure.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from monai.data import Dataset
from monai.transforms import Compose
from tqdm import tqdm

from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import load_weights, unwrap
from pipeline.io.sharded_batches import batch_indices, my_batches
from pipeline.io.sharding import RankGroup
from pipeline.metrics import synthesis_error_report
from pipeline.metrics.figures import pick_examples
from pipeline.mris.data import (
    check_variant,
    manifest_items,
    map_preprocess_transforms,
    mris_transforms,
    select,
)
from pipeline.mris.database import EmbeddingDatabase, EmbedFn, build_database, checkpoint_hash
from pipeline.mris.engine import TRAIN_COMMAND, run_settings, similarity_matrix
from pipeline.mris.metrics import recall_at_k

logger = logging.getLogger(__name__)
RECALL_KS = (1, 5, 10, 20)


# --------------------------------------------------------------------------------------------- embedding
def make_map_embed_fn(network: torch.nn.Module, variant: str, image_size: int,
                      device: torch.device | str = "cpu") -> Callable[[Mapping[str, torch.Tensor]], Any]:
    """``embed_fn`` for :func:`pipeline.mris.database.build_database`: ``{fc, tc}: B x H x W`` mm (NaN outside)
    -> NaN-aware resize, NaN -> 0, / 3 mm, (MRIS-C) stacking -> map encoder(s) -> ``B x D`` or ``{key: B x D}``."""
    variant = check_variant(variant)
    prep = Compose(map_preprocess_transforms(variant, image_size))
    model = unwrap(network)

    def embed_fn(maps: Mapping[str, torch.Tensor]) -> Any:
        n = len(next(iter(maps.values())))
        outs = [prep({k: torch.as_tensor(np.asarray(maps[k][i]), dtype=torch.float32)[None] for k in MAP_KEYS})
                for i in range(n)]
        model.eval()
        with torch.no_grad():
            if variant == "combined":
                x = torch.stack([torch.as_tensor(o["maps"]) for o in outs]).to(device)
                return model.embed_map(x).cpu()
            x = {k: torch.stack([torch.as_tensor(o[k]) for o in outs]).to(device) for k in MAP_KEYS}
            return {k: v.cpu() for k, v in model.embed_map(x).items()}

    return embed_fn


def embed_radiographs(network: torch.nn.Module, items: Sequence[dict], variant: str, image_size: int,
                      device: torch.device | str = "cpu", batch_size: int = 32, num_workers: int = 0,
                      keep_images: bool = False, group: RankGroup | None = None
                      ) -> tuple[Any, torch.Tensor | None]:
    """Radiograph embeddings of ``items`` (deterministic chain, no augmentation): ``Q x D`` or
    ``{key: Q x D}``; with ``keep_images`` also the ``Q x 1 x S x S`` network inputs (CPU).

    ``group`` (``None``: one process): each rank embeds its batches (:func:`pipeline.io.sharded_batches.my_batches`:
    batch ``b`` -> rank ``b % world_size``); rank 0 gathers and returns them all, the other ranks return
    ``(None, None)``."""
    group = group if group is not None else RankGroup(0, 1)
    ds = Dataset(list(items), mris_transforms(variant, image_size, train=False, with_maps=False))
    model = unwrap(network)
    model.eval()
    per_batch: dict[int, tuple[Any, torch.Tensor | None]] = {}
    with torch.no_grad():
        for b, batch in my_batches(ds, batch_size, group, num_workers):
            x = torch.as_tensor(batch["image"]).to(device)
            e = model.embed_xray(x)
            per_batch[b] = ({k: v.cpu() for k, v in e.items()} if isinstance(e, Mapping) else e.cpu(),
                            x.cpu() if keep_images else None)
    merged = group.merge(per_batch)  # every rank's batches on rank 0, in batch order
    if merged is None:
        return None, None
    embs = [e for e, _ in merged.values()]
    emb = {k: torch.cat([e[k] for e in embs]) for k in embs[0]} if isinstance(embs[0], Mapping) else torch.cat(embs)
    return emb, (torch.cat([x for _, x in merged.values()]) if keep_images else None)


def load_raw_maps(item: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{fc, tc}: H x W`` float32 mm (NaN outside the footprint) of one item."""
    return {k: np.load(item[k]).astype(np.float32) for k in MAP_KEYS}


def database_rows(items: Sequence[dict]) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """``(row, fc, tc)`` for :func:`pipeline.mris.database.build_database` (every visit of every item)."""
    for it in items:
        m = load_raw_maps(it)
        row = {k: it[k] for k in ("subject_id", "side", "visit_month", "klg", "knee_id")}
        row["source"] = it["fc"]
        yield row, m["fc"], m["tc"]


# --------------------------------------------------------------------------------------------- database
def build_mris_database(network: torch.nn.Module, checkpoint: str | Path, manifest: str | Path,
                        database_dir: str | Path, variant: str | None = None, image_size: int | None = None,
                        split_fractions: Mapping[str, float] | None = None, split_seed: int = 0,
                        database_split: str = "database", device: torch.device | str = "cpu",
                        batch_size: int = 64, overwrite: bool = True, progress: bool = True,
                        group: RankGroup | None = None) -> EmbeddingDatabase:
    """Load ``checkpoint`` into ``network`` and embed every visit of the ``database_split`` subjects.

    ``group`` (``None``: one process): each rank embeds its batches of maps
    (:func:`pipeline.io.sharded_batches.batch_indices` of ``batch_size``, batch ``b`` -> rank ``b % world_size``); rank 0 gathers the embeddings and writes the database, the other
    ranks wait for it and open it (an error of rank 0 stops them all).

    The database is stamped with :func:`pipeline.mris.database.checkpoint_hash` of the checkpoint FILE and records
    the variant and image size, so a later query with another checkpoint or image size fails
    (:class:`pipeline.mris.database.CheckpointMismatchError`). ``variant`` / ``image_size``: ``None`` = as the
    checkpoint records them (:func:`pipeline.mris.engine.run_settings`).
    """
    load_weights(network, checkpoint, train=TRAIN_COMMAND)
    variant, image_size = run_settings(network, variant, image_size)
    network.to(device)
    items = select(manifest_items(manifest, split_fractions, split_seed), database_split)
    if not items:
        raise ValueError(f"no items in split {database_split!r} of {manifest}")
    info = {"manifest": str(manifest), "split": database_split, "split_seed": split_seed,
            "variant": variant, "image_size": image_size, "checkpoint": str(checkpoint)}
    embed_fn = make_map_embed_fn(network, variant, image_size, device)
    group = group if group is not None else RankGroup(0, 1)
    if not group.sharded:
        return build_database(database_dir, database_rows(items), embed_fn, checkpoint_hash(checkpoint),
                              batch_size=batch_size, overwrite=overwrite, progress=progress, total=len(items),
                              info=info)
    gathered = _embed_map_batches(embed_fn, items, batch_size, group, progress)
    error = None
    if gathered is not None:  # rank 0 writes the database with the gathered embeddings
        try:
            build_database(database_dir, database_rows(items), _replay(gathered), checkpoint_hash(checkpoint),
                           batch_size=batch_size, overwrite=overwrite, progress=progress, total=len(items), info=info)
        except Exception as e:  # noqa: BLE001 - told to the other ranks, raised below on every rank
            error = e
    message = group.broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not write the MRIS embedding database {database_dir}: {message}")
    return EmbeddingDatabase.load(database_dir)


def _embed_map_batches(embed_fn: EmbedFn, items: Sequence[dict], batch_size: int, group: RankGroup,
                       progress: bool) -> dict[int, Any] | None:
    """``{batch: embeddings}`` of this rank's batches of database maps (stacked as
    :func:`pipeline.mris.database.build_database` stacks them), gathered on rank 0 (``None`` on the others)."""
    all_batches = batch_indices(len(items), batch_size)
    per_batch: dict[int, Any] = {}
    for b in tqdm(group.indices(len(all_batches)), desc=f"embedding database{group.label}", unit="batch",
                  disable=not progress):
        maps = [load_raw_maps(items[i]) for i in all_batches[b]]
        with torch.inference_mode():
            per_batch[b] = embed_fn({k: torch.from_numpy(np.stack([m[k] for m in maps])) for k in MAP_KEYS})
    return group.merge(per_batch)


def _replay(per_batch: Mapping[int, Any]) -> EmbedFn:
    """An ``embed_fn`` for :func:`pipeline.mris.database.build_database` that returns the embeddings of
    ``per_batch`` (computed beforehand, batch by batch in the same batches) in batch order."""
    order = iter(per_batch.values())

    def embed_fn(maps: Mapping[str, torch.Tensor]) -> Any:
        return next(order)

    return embed_fn


def mean_map_baseline(db: EmbeddingDatabase, chunk: int = 1024) -> dict[str, np.ndarray]:
    """The naive baseline: mean database map per key, ``H x W`` mm (NaN outside the mask)."""
    out = {}
    for k in db.map_keys:
        arr = db.maps[k]
        total = np.zeros(arr.shape[1:], dtype=np.float64)
        for s in range(0, len(arr), chunk):
            total += np.asarray(arr[s:s + chunk], dtype=np.float64).sum(0)
        m = (total / len(arr)).astype(np.float32)
        m[~db.masks[k]] = np.nan
        out[k] = m
    return out


# --------------------------------------------------------------------------------------------- evaluation
def truth_stack(items: Sequence[dict], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    truth = {k: np.stack([load_raw_maps(it)[k] for it in items]) for k in MAP_KEYS}
    for k in MAP_KEYS:
        inside_nan = np.isnan(truth[k]) & masks[k][None]
        if inside_nan.any():
            warnings.warn(f"{k}: {int(inside_nan.sum())} NaN pixels inside the atlas mask set to 0 mm", stacklevel=2)
            truth[k][inside_nan] = 0.0
    return truth


def evaluate_test(network: torch.nn.Module, checkpoint: str | Path, manifest: str | Path,
                  database_dir: str | Path, output_dir: str | Path, variant: str | None = None,
                  image_size: int | None = None, split_fractions: Mapping[str, float] | None = None, split_seed: int = 0,
                  test_split: str = "test", k: int = 20, device: torch.device | str = "cpu",
                  batch_size: int = 32, figure: bool = True, group: RankGroup | None = None
                  ) -> dict[str, Any] | None:
    """Test-set retrieval recall, k-NN synthesis error and the mean-map baseline; writes to ``output_dir``:

    ``retrieval.json`` (R@1/5/10/20 in %, chance, N), ``synthesis_errors.csv`` (method x map x KLG group:
    n_maps, mean per-map median / MAD of |error| in mm), ``metrics.json`` (everything), ``report.md``
    (markdown tables), ``examples.png`` (one test knee per KLG bucket), ``test_synthesis.csv`` (per query:
    knee, visit, KLG, first neighbours).

    Retrieval: queries = the FIRST visit of each test knee; gallery = those knees' maps (N items), so
    chance R@k = min(k, N) / N. Synthesis: every test visit, ``k`` nearest database maps (``k`` is capped at
    the database size), weights = similarity / sum. ``variant`` / ``image_size``: ``None`` = as the checkpoint
    records them; the database must have been built with the same checkpoint, variant and image size.

    ``group`` (``None``: one process): each rank embeds its batches of the test radiographs
    (:func:`embed_radiographs`); rank 0 embeds the gallery maps (one batch), runs the k-NN synthesis and the
    metrics, writes every file and returns the metrics, the other ranks return ``None``.
    """
    t0 = time.time()
    load_weights(network, checkpoint, train=TRAIN_COMMAND)
    variant, image_size = run_settings(network, variant, image_size)
    network.to(device)
    db = EmbeddingDatabase.load(database_dir, expected_checkpoint_hash=checkpoint_hash(checkpoint),
                                expected_info={"variant": variant, "image_size": image_size})
    items = select(manifest_items(manifest, split_fractions, split_seed), test_split)
    if not items:
        raise ValueError(f"no items in split {test_split!r} of {manifest}")
    first = select(items, first_visit=True)
    q_emb, _ = embed_radiographs(network, first, variant, image_size, device, batch_size, group=group)
    x_emb, images = embed_radiographs(network, items, variant, image_size, device, batch_size, keep_images=figure,
                                      group=group)
    if q_emb is None:  # another rank of a sharded run: rank 0 has the embeddings, computes and writes the rest
        return None
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- retrieval recall, first visit per knee
    embed_map = make_map_embed_fn(network, variant, image_size, device)
    fm = {kk: np.stack([load_raw_maps(it)[kk] for it in first]) for kk in MAP_KEYS}
    g_emb = embed_map({kk: torch.from_numpy(v) for kk, v in fm.items()})
    sim = similarity_matrix(q_emb, g_emb).numpy()
    n = sim.shape[0]
    recall = recall_at_k(sim, ks=RECALL_KS)
    retrieval = {"n_queries": n, "gallery": "maps of the same first-visit test knees",
                 "recall_percent": {f"R@{kk}": v for kk, v in recall.items()},
                 "chance_percent": {f"R@{kk}": 100.0 * min(kk, n) / n for kk in RECALL_KS}}
    if variant == "separate":
        for key in MAP_KEYS:
            r = recall_at_k((q_emb[key] @ g_emb[key].T).numpy(), ks=RECALL_KS)
            retrieval[f"recall_percent_{key}"] = {f"R@{kk}": v for kk, v in r.items()}

    # ---- synthesis on every test visit
    k_used = min(int(k), len(db))
    res = db.synthesize(x_emb, k=k_used)
    synth = ({kk: r.maps.numpy() for kk, r in res.items()} if isinstance(res, Mapping)
             else {kk: v.numpy() for kk, v in res.maps.items()})
    neighbours = res[MAP_KEYS[0]] if isinstance(res, Mapping) else res
    truth = truth_stack(items, db.masks)
    base = mean_map_baseline(db)
    base_stack = {kk: np.broadcast_to(base[kk], truth[kk].shape) for kk in MAP_KEYS}
    klg = [it["klg"] if it["klg"] >= 0 else None for it in items]
    tab_mris = synthesis_error_report(synth, truth, masks=db.masks, klg=klg)
    tab_mris.insert(0, "method", f"MRIS-{'C' if variant == 'combined' else 'S'} (k={k_used})")
    tab_base = synthesis_error_report(base_stack, truth, masks=db.masks, klg=klg)
    tab_base.insert(0, "method", "mean database map")
    table = pd.concat([tab_mris, tab_base], ignore_index=True)
    table.to_csv(out_dir / "synthesis_errors.csv", index=False)

    rows = []
    for i, it in enumerate(items):
        nb = neighbours.indices[i].tolist()
        rows.append({"knee_id": it["knee_id"], "visit_month": it["visit_month"], "klg": it["klg"],
                     "neighbour_subjects": " ".join(str(db.rows["subject_id"].iloc[j]) for j in nb[:5]),
                     "top1_similarity": float(neighbours.similarities[i, 0])})
    pd.DataFrame(rows).to_csv(out_dir / "test_synthesis.csv", index=False)

    metrics = {"variant": variant, "image_size": image_size, "checkpoint": str(checkpoint),
               "checkpoint_hash": db.checkpoint_hash,
               "database": str(database_dir), "database_size": len(db), "k": k_used,
               "n_test_subjects": len({it["subject_id"] for it in items}), "n_test_visits": len(items),
               "retrieval": retrieval, "synthesis_errors": table.to_dict(orient="records"),
               "seconds": round(time.time() - t0, 1)}
    (out_dir / "retrieval.json").write_text(json.dumps(retrieval, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out_dir / "report.md").write_text(markdown_report(metrics, table))
    if figure:
        example_figure(out_dir / "examples.png", items, images, truth, synth, db.masks)
    logger.info("MRIS evaluation written to %s: %s", out_dir, retrieval["recall_percent"])
    return metrics


def markdown_report(metrics: Mapping[str, Any], table: pd.DataFrame) -> str:
    """Markdown tables: retrieval recall vs chance, synthesis error (mm) MRIS vs the mean-map baseline."""
    r = metrics["retrieval"]
    lines = [f"# MRIS evaluation ({metrics['variant']})", "",
             f"Database: {metrics['database_size']} maps; test: {metrics['n_test_subjects']} subjects, "
             f"{metrics['n_test_visits']} knee-visits; k = {metrics['k']}.", "",
             f"## Retrieval recall (%; {r['n_queries']} queries = first visit per test knee, gallery = their maps)",
             "", "| | " + " | ".join(r["recall_percent"]) + " |", "|---" * (len(RECALL_KS) + 1) + "|",
             "| MRIS | " + " | ".join(f"{v:.1f}" for v in r["recall_percent"].values()) + " |",
             "| chance | " + " | ".join(f"{v:.1f}" for v in r["chance_percent"].values()) + " |", "",
             "## Synthesis error (mm; mean over maps of the per-map median / MAD of |synth - truth| inside the mask)",
             "", "| method | map | group | n maps | median | MAD |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        med = "n/a" if np.isnan(row.median_mm) else f"{row.median_mm:.3f}"
        mad = "n/a" if np.isnan(row.mad_mm) else f"{row.mad_mm:.3f}"
        lines.append(f"| {row.method} | {row.map} | {row.group} | {row.n_maps} | {med} | {mad} |")
    return "\n".join(lines) + "\n"


def example_figure(path: str | Path, items: Sequence[dict], images: torch.Tensor | None,
                   truth: Mapping[str, np.ndarray], synth: Mapping[str, np.ndarray],
                   masks: Mapping[str, np.ndarray]) -> Path | None:
    """One row per KLG bucket with data: radiograph ROI, true FC/TC, synthesized FC/TC, |error| FC/TC (mm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = pick_examples(items)
    if not picks:
        return None
    vmax = float(max(np.nanmax(truth[k]) for k in MAP_KEYS))
    fig, axes = plt.subplots(len(picks), 7, figsize=(17, 2.6 * len(picks)), squeeze=False)
    for r, (name, i) in enumerate(picks):
        panels: list[tuple[str, np.ndarray | None, str, float]] = [
            (f"KLG {name}: {items[i]['knee_id']} m{items[i]['visit_month']}",
             None if images is None else images[i, 0].numpy(), "gray", 1.0)]
        for k in MAP_KEYS:
            panels.append((f"true {k.upper()} (mm)", truth[k][i], "viridis", vmax))
        for k in MAP_KEYS:
            panels.append((f"synth {k.upper()} (mm)", synth[k][i], "viridis", vmax))
        for k in MAP_KEYS:
            err = np.abs(synth[k][i] - truth[k][i])
            err[~masks[k]] = np.nan
            panels.append((f"|error| {k.upper()} (mm)", err, "magma", 1.0))
        for c, (title, img, cmap, vm) in enumerate(panels):
            ax = axes[r, c]
            ax.set_title(title, fontsize=8)
            ax.axis("off")
            if img is not None:
                im = ax.imshow(img, cmap=cmap, vmin=0.0, vmax=vm)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle("MRIS synthesis examples (maps in left-knee atlas convention)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)

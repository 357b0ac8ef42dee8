"""Evaluation of DXA -> radiograph registration on held-out knees, every method on the same pairs.

A pair is one test knee: moving = its DXA crop, fixed = its radiograph crop (both pair-ready, see
:mod:`pipeline.registration.data`). Each method gives a map ``phi`` (``1 x 2 x H x W``, [0, 1] coordinates,
fixed -> moving); the moving TRUE label map is warped by nearest neighbour and compared with the fixed TRUE
label map (per-bone Dice: femur, tibia, fibula, and their mean), and ``phi``'s % of pixels with a negative
Jacobian determinant counts folds.

Methods (:data:`METHODS`):

* ``affine``: the similarity pre-alignment only (the identity map on the pre-aligned crops);
* ``gradicon_lncc`` / ``gradicon_mi``: GradICON trained on DXA/radiograph IMAGE pairs with signed LNCC /
  MONAI's global mutual information as similarity (image-based baselines);
* ``bspline_mi``: classical iterative B-spline registration of the images (SimpleITK, Mattes MI);
* ``segreg``: segment both images (DXA segmenter; radiograph segmenter from CycleGAN adaptation), register
  the label maps with the stage-3 GradICON network, warp the real moving image with that map;
* ``oracle``: the stage-3 network on the TRUE label maps of both images (an upper bound).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.io.atomic import write_text_atomic
from pipeline.io.checkpoints import load_network
from pipeline.registration.data import BONES, load_role_arrays, load_roles, onehot

METHODS = ("affine", "gradicon_lncc", "gradicon_mi", "bspline_mi", "segreg", "oracle")
#: Checkpoint file (in the models folder) each learned method needs.
CHECKPOINTS = {"gradicon_lncc": ("baseline_lncc.pt",), "gradicon_mi": ("baseline_mi.pt",),
               "segreg": ("segmenter_dxa.pt", "segmenter_xray.pt", "stage3.pt"), "oracle": ("stage3.pt",)}
#: Table 1 of Demir & Niethammer (MIDL 2024), mean Dice on real DXA/radiograph pairs, 5 DXA segmentations.
PAPER_MEAN_DICE = {"segreg": 0.957, "best image-based (non-oracle)": 0.946, "gradicon_lncc": 0.752, "oracle": 0.993}
DESCRIPTIONS = {
    "affine": "similarity pre-alignment only (identity on the pre-aligned crops)",
    "gradicon_lncc": "GradICON on images, signed LNCC (sigma 3 px)",
    "gradicon_mi": "GradICON on images, global mutual information (MONAI)",
    "bspline_mi": "classical iterative B-spline, Mattes MI (SimpleITK)",
    "segreg": "ours: segment both, GradICON on the label maps, warp the image",
    "oracle": "GradICON (stage 3) on the TRUE label maps",
}


def _models(ckpt_dir: Path, names: Sequence[str], device: torch.device) -> list[torch.nn.Module]:
    from pipeline.user_errors import require_checkpoint

    nets = []
    for name in names:
        path = require_checkpoint(ckpt_dir / name, "python -m pipeline.registration.demo (or the stage's train "
                                  "config in bundles/segreg/docs/README.md)")
        nets.append(load_network(path).to(device).eval())
    return nets


def method_maps(method: str, moving: torch.Tensor, fixed: torch.Tensor, moving_labels: torch.Tensor | None,
                fixed_labels: torch.Tensor | None, nets: Sequence[torch.nn.Module], bspline: dict | None = None
                ) -> torch.Tensor:
    """The maps of one method for a batch (``B x 2 x H x W``). ``moving``/``fixed`` ``B x 1 x H x W`` images in
    [0, 1]; labels ``B x 1 x H x W`` (used by ``oracle`` only); ``nets`` = the method's networks in
    :data:`CHECKPOINTS` order."""
    from pipeline.registration.maps import identity_map
    from pipeline.registration.step import register
    from pipeline.registration.train import segment

    if method == "affine":
        return identity_map(tuple(fixed.shape[-2:]), batch=fixed.shape[0], device=fixed.device)
    if method in ("gradicon_lncc", "gradicon_mi"):
        return register(nets[0], moving, fixed)
    if method == "bspline_mi":
        out = [_bspline_map(m[0].cpu().numpy(), f[0].cpu().numpy(), bspline) for m, f in zip(moving, fixed)]
        return torch.stack(out).to(fixed.device)
    if method == "segreg":
        seg_dxa, seg_xray, stage3 = nets
        with torch.no_grad():
            lm, lf = segment(seg_dxa, moving), segment(seg_xray, fixed)
        return register(stage3, onehot(lm).to(fixed.device), onehot(lf).to(fixed.device))
    if method == "oracle":
        if moving_labels is None or fixed_labels is None:
            raise ValueError("the oracle needs both true label maps")
        return register(nets[0], onehot(moving_labels).to(fixed.device), onehot(fixed_labels).to(fixed.device))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _bspline_map(moving: np.ndarray, fixed: np.ndarray, settings: dict | None) -> torch.Tensor:
    """The B-spline map of one pair; where SimpleITK gives up (e.g. "All samples map outside moving image
    buffer" after a diverging step) the pair keeps its pre-alignment (identity map) and a warning is logged:
    the baseline is scored as it would serve a user, failures included."""
    import logging

    from pipeline.registration.classical import bspline_register
    from pipeline.registration.maps import identity_map

    try:
        phi = bspline_register(moving, fixed, **(settings or {}))
    except RuntimeError as e:
        logging.getLogger(__name__).warning("B-spline registration failed, identity map kept: %s",
                                            " ".join(str(e).split())[-200:])
        return identity_map(tuple(fixed.shape))[0]
    return torch.as_tensor(np.asarray(phi, dtype=np.float32))


def pair_scores(phi: torch.Tensor, moving_labels: torch.Tensor, fixed_labels: torch.Tensor) -> list[dict]:
    """Per pair of a batch: Dice per bone + mean of the NEAREST-warped moving labels vs the fixed labels, and
    the % of pixels where ``phi`` folds."""
    from pipeline.registration.maps import warp_labels
    from pipeline.registration.metrics import bone_dice, fold_percent

    warped = warp_labels(moving_labels.to(phi.device), phi, method="nearest")
    rows = []
    for b in range(phi.shape[0]):
        d = bone_dice(warped[b:b + 1], fixed_labels[b:b + 1].to(phi.device))
        row = {f"dice_{name}": float(d[name]) for name in BONES.values()}
        row["dice_mean"] = float(np.mean([row[f"dice_{n}"] for n in BONES.values()]))
        row["fold_percent"] = float(torch.as_tensor(fold_percent(phi[b:b + 1])).float().mean())
        rows.append(row)
    return rows


PAIRINGS = ("same", "different")


def held_out_pairs(table: pd.DataFrame, rows: Sequence[int], pairing: str = "both", seed: int = 0
               ) -> list[tuple[int, int, str]]:
    """``(moving index, fixed index, kind)`` into ``rows``: ``"same"`` = each test knee's DXA onto its own
    radiograph; ``"different"`` = each DXA onto the radiograph of a knee of ANOTHER subject (a seeded shuffle,
    every radiograph used once); ``"both"`` = the two lists."""
    kinds = PAIRINGS if pairing == "both" else (pairing,)
    if any(k not in PAIRINGS for k in kinds):
        raise ValueError(f"pairing must be 'same', 'different' or 'both', got {pairing!r}")
    out: list[tuple[int, int, str]] = []
    if "same" in kinds:
        out += [(i, i, "same") for i in range(len(rows))]
    if "different" in kinds:
        subj = table["subject_id"].iloc[list(rows)].to_numpy()
        rng = np.random.default_rng(seed)
        for _ in range(100):
            perm = rng.permutation(len(rows))
            if all(subj[i] != subj[j] for i, j in enumerate(perm)):
                break
        else:
            raise ValueError("cannot pair every test knee with another subject's knee (too few test subjects)")
        out += [(i, int(j), "different") for i, j in enumerate(perm)]
    return out


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over pairs per (pairing, method) of every score column, methods in :data:`METHODS` order."""
    cols = [f"dice_{n}" for n in BONES.values()] + ["dice_mean", "fold_percent", "seconds_per_pair"]
    keys = ["pairing", "method"]
    g = scores.groupby(keys)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_sd"))
    out["n_pairs"] = scores.groupby(keys).size()
    out = out.reset_index()
    rank = {m: i for i, m in enumerate(METHODS)}
    out["_order"] = [(PAIRINGS.index(p) if p in PAIRINGS else 9, rank.get(m, 99)) for p, m in zip(out.pairing, out.method)]
    return out.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def markdown_table(summary: pd.DataFrame) -> str:
    """The report's method table: mean (SD) Dice per bone and overall, % folds, seconds per pair."""
    lines = ["| pairs | method | femur | tibia | fibula | mean Dice | % folds | s / pair | what it is |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        cells = [f"{r[f'dice_{n}_mean']:.3f} ({r[f'dice_{n}_sd']:.3f})" for n in BONES.values()]
        lines.append(f"| {r['pairing']} | {r['method']} | " + " | ".join(cells) + f" | **{r['dice_mean_mean']:.3f}** "
                     f"({r['dice_mean_sd']:.3f}) | {r['fold_percent_mean']:.3f} | {r['seconds_per_pair_mean']:.3f} | "
                     f"{DESCRIPTIONS.get(r['method'], '')} |")
    return "\n".join(lines)


def overlay_pairs(pairs: Sequence[tuple[int, int, str]], n_overlays: int) -> set[int]:
    """Positions in ``pairs`` that get an overlay PNG: the first ``n_overlays`` pairs of each pairing."""
    seen: dict[str, int] = {}
    out = set()
    for p, (_, _, kind) in enumerate(pairs):
        if seen.get(kind, 0) < n_overlays:
            seen[kind] = seen.get(kind, 0) + 1
            out.add(p)
    return out


def run_evaluation(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   image_size: int = 256, n_labelled: int = 5, test_fraction: float = 0.25, split_seed: int = 0,
                   methods: Sequence[str] = METHODS, n_overlays: int = 4, batch_size: int = 8,
                   bspline: dict | None = None, device: str | torch.device = "cpu", progress: bool = True,
                   extra_note: str = "", pairing: str = "both") -> pd.DataFrame | None:
    """Score every method on the held-out pairs (:func:`held_out_pairs`); write ``pairs.csv`` (one row per pair and
    method), ``summary.csv``/``summary.json``, ``report.md`` (table beside the paper's figures) and overlay PNGs
    (``overlays/<pairing>_<moving>_to_<fixed>_<method>.png`` for the first ``n_overlays`` pairs of each pairing).
    Returns the summary.

    Sharded (torchrun, ``bundles/segreg/configs/multi_gpu_evaluate.json``; :class:`pipeline.io.sharding.RankGroup`):
    the work items are the ``(method, batch of pairs)`` of a single process, in its order (batches keep their
    pairs, so a network sees the same inputs); item ``k`` is registered and scored by rank ``k % world_size``,
    which also renders the arrays of the overlay pairs it owns. Rank 0 gathers the rows and overlay arrays
    (:meth:`~pipeline.io.sharding.RankGroup.merge`), draws every overlay and writes every file: the files equal a
    single process's (same threads per process) bar the measured ``seconds_per_pair``. Other ranks write
    nothing and return None. Every rank loads the pairs and each method's networks (a missing checkpoint stops
    every rank alike)."""
    from pipeline.io.sharding import RankGroup, flatten
    from pipeline.registration.overlay import save_registration_overlay

    group = RankGroup.current("segreg evaluation")
    device = torch.device(device)
    out = Path(output_dir)
    if group.rank == 0:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    table, roles = load_roles(manifest, n_labelled, test_fraction, split_seed)
    rows = roles.test
    pairs = held_out_pairs(table, rows, pairing, seed=split_seed)
    arrays = (torch.as_tensor(load_role_arrays(table, rows, "dxa_crop", image_size)),
              torch.as_tensor(load_role_arrays(table, rows, "xray_crop", image_size)),
              torch.as_tensor(load_role_arrays(table, rows, "dxa_crop_labels", image_size)),
              torch.as_tensor(load_role_arrays(table, rows, "xray_crop_labels", image_size, allow_xray_labels=True)))
    knee = [f"{table['subject_id'].iloc[r]}_{table['side'].iloc[r]}" for r in rows]
    drawn = overlay_pairs(pairs, n_overlays)
    batches = [(n, s) for n in range(len(methods)) for s in range(0, len(pairs), batch_size)]
    mine = group.indices(len(batches))
    per_batch: dict[int, list[tuple[dict, dict | None]]] = {}
    for n, method in enumerate(methods):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        nets = _models(Path(ckpt_dir), CHECKPOINTS.get(method, ()), device)
        todo = [k for k in mine if batches[k][0] == n]
        bar = tqdm(total=sum(len(pairs[batches[k][1]:batches[k][1] + batch_size]) for k in todo),
                   desc=f"evaluate {method}{group.label}", unit="pair", disable=not progress)
        for k in todo:
            s = batches[k][1]
            per_batch[k] = _score_batch(method, pairs, s, batch_size, arrays, knee, drawn, nets, bspline, device)
            bar.update(len(per_batch[k]))
        bar.close()
    merged = group.merge(per_batch)  # every rank's rows on rank 0, in single-process order
    if merged is None:  # another rank of a sharded run: rank 0 writes every file
        return None
    records = []
    for rec, overlay in flatten(merged):
        records.append(rec)
        if overlay is not None:
            overlay = dict(overlay)
            save_registration_overlay(out / "overlays" / overlay.pop("name"), **overlay)
    scores = pd.DataFrame.from_records(records)
    summary = summarise(scores)
    write_text_atomic(out / "pairs.csv", scores.to_csv(index=False))
    write_text_atomic(out / "summary.csv", summary.to_csv(index=False))
    meta = {"manifest": str(manifest), "image_size": image_size, "n_labelled_dxa": n_labelled,
            "split_seed": split_seed, "roles": roles.summary(), "methods": list(methods), "pairing": pairing,
            "summary": summary.to_dict(orient="records"), "paper_mean_dice": PAPER_MEAN_DICE}
    write_text_atomic(out / "summary.json", json.dumps(meta, indent=1, default=float))
    paper = ", ".join(f"{k} {v:.3f}" for k, v in PAPER_MEAN_DICE.items())
    report = (f"# Segmentation-guided DXA -> radiograph registration: held-out pairs\n\n"
              f"{len(rows)} test knees ({image_size} px pair-ready crops), {n_labelled} labelled DXA images in "
              f"training, split seed {split_seed}. Pairs `same`: each knee's DXA onto its own radiograph; "
              f"`different`: onto the radiograph of another subject's knee. Dice of the moving TRUE labels warped "
              f"by nearest neighbour vs the fixed TRUE labels; % folds = pixels with det(J) < 0.\n\n"
              f"{markdown_table(summary)}\n\nPaper (Table 1, real pairs, 256 px, full training): {paper}.\n"
              + (f"\n{extra_note}\n" if extra_note else ""))
    write_text_atomic(out / "report.md", report)
    return summary


def _score_batch(method: str, pairs: Sequence[tuple[int, int, str]], start: int, batch_size: int,
                 arrays: tuple[torch.Tensor, ...], knee: Sequence[str], drawn: set[int],
                 nets: Sequence[torch.nn.Module], bspline: dict | None, device: torch.device
                 ) -> list[tuple[dict, dict | None]]:
    """One batch of :func:`run_evaluation` (pairs ``start .. start + batch_size - 1``): per pair its row of
    ``pairs.csv`` and, for the pairs in ``drawn``, the overlay: its file ``name`` and the other keyword arguments
    of :func:`pipeline.registration.overlay.save_registration_overlay` (numpy arrays, CPU), else None."""
    import time

    from pipeline.registration.maps import warp, warp_labels

    mov_all, fix_all, mlab_all, flab_all = arrays
    chunk = pairs[start:start + batch_size]
    mi = torch.tensor([p[0] for p in chunk])
    fi = torch.tensor([p[1] for p in chunk])
    m, f = mov_all[mi].to(device), fix_all[fi].to(device)
    ml, fl = mlab_all[mi], flab_all[fi]
    t0 = time.perf_counter()
    phi = method_maps(method, m, f, ml, fl, nets, bspline)
    dt = (time.perf_counter() - t0) / m.shape[0]
    done = []
    for b, sc in enumerate(pair_scores(phi, ml, fl)):
        i, j, kind = chunk[b]
        rec = {"pairing": kind, "moving": knee[i], "fixed": knee[j], "method": method, **sc, "seconds_per_pair": dt}
        overlay = None
        if start + b in drawn:  # copies of the pair's arrays (a view would keep the whole batch alive)
            warped = warp(m[b:b + 1], phi[b:b + 1])[0, 0].cpu().numpy()
            wl = warp_labels(ml[b:b + 1].to(device), phi[b:b + 1], method="nearest")[0, 0].cpu().numpy()
            overlay = {"name": f"{kind}_{knee[i]}_to_{knee[j]}_{method}.png",
                       "fixed": f[b, 0].cpu().numpy().copy(), "moving": m[b, 0].cpu().numpy().copy(),
                       "warped": warped, "phi": phi[b].detach().cpu().numpy().copy(),
                       "fixed_labels": fl[b, 0].numpy().copy(), "warped_labels": wl,
                       "title": f"{method}: DXA {knee[i]} -> radiograph {knee[j]}",
                       "dice": {n: rec[f"dice_{n}"] for n in BONES.values()}, "fold_percent": rec["fold_percent"]}
        done.append((rec, overlay))
    return done


def evaluation_methods(value: str | Sequence[str] | None) -> list[str]:
    """``"all"``/None -> :data:`METHODS`; a comma-separated string or a list -> checked list."""
    if value in (None, "all"):
        return list(METHODS)
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {METHODS}")
    return items


"""Cross-validation of the progression models and its report (Panfilov et al., ISBI 2022).

* :func:`fold_items`: the training and validation knees of one fold (5 folds by subject,
  :func:`pipeline.progression.data.folds_by_subject`; KLG 4 at baseline excluded by
  :func:`pipeline.progression.data.progression_items`); used by ``bundles/progression_mr/configs/train.json``.
* :func:`make_transforms`: the MR chain (``arch`` ``trf`` / ``fc`` / ``lstm`` / ``cnn3d``) or the radiograph ROI
  chain (``xray``) of :mod:`pipeline.progression.data`, reduced to ``image`` and ``label``.
* :func:`train_fold`: one fold trained with :func:`pipeline.progression.engine.make_engines`; returns the best
  snapshot (by validation AP) and its probabilities for every validation knee.
* :func:`cross_validate`: every fold, the out-of-fold (OOF) probabilities of all knees (each knee predicted
  once, by the fold that did not train on it), the report on them (:func:`cv_report`), and, when test knees
  are given, the fold ensemble on them (:func:`pipeline.progression.ensemble.ensemble_probabilities`:
  probabilities averaged once).
* :func:`metrics_with_ci` / :func:`cv_report`: AP (main), ROC AUC and balanced accuracy of
  ``P(any) = P(fast) + P(slow)``, each with a subject-level bootstrap 95 % interval
  (:func:`pipeline.progression.metrics.bootstrap_ci`, 2.5 / 97.5 percentiles, ``n_resamples`` >= 1000 by
  default); predictions CSV, ``metrics.json`` and ROC / PR curves (PNG).
* :func:`report_from_checkpoints`: the same report from fold checkpoints already trained (``evaluate.json``).

Output layout under ``out_dir``: ``fold<k>/model.pt`` (best snapshot), ``oof_predictions.csv`` (knee,
subject_id, side, label, fold, p_none, p_fast, p_slow, p_any), ``metrics.json``, ``roc_pr.png``; with test knees
also ``test_predictions.csv`` and the test metrics in ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from pipeline.progression.engine import ClassBalancedSampler, make_engines, predict_probabilities
from pipeline.progression.ensemble import ensemble_probabilities
from pipeline.progression.labels import any_progression
from pipeline.progression.metrics import (
    BootstrapCI,
    any_progression_score,
    average_precision,
    balanced_accuracy,
    bootstrap_ci,
    roc_auc,
)

__all__ = ["FoldResult", "build_network", "cached_datasets", "cross_validate", "cv_report", "fold_items",
           "make_transforms", "metrics_with_ci", "report_from_checkpoints", "roc_pr_png", "train_fold"]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]
Items = list[dict]
TransformFactory = Callable[[bool], Any]
MR_ARCHS = ("trf", "fc", "lstm", "cnn3d")
#: The metrics of the report: name -> (function, label).
METRICS = {"ap": (average_precision, "AP"), "auc": (roc_auc, "ROC AUC"), "ba": (balanced_accuracy, "balanced accuracy")}
#: The command that trains fold ``k`` (``TRAIN_COMMAND.format(k=k)``).
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundles/progression_mr/configs/train.json --fold {k}"


def _items(manifest_or_items: Union[PathLike, Sequence[dict]]) -> Items:
    if isinstance(manifest_or_items, (str, Path)):
        from pipeline.progression.data import progression_items

        return list(progression_items(manifest_or_items))
    return list(manifest_or_items)


def _folds(items: Items, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from pipeline.progression.data import folds_by_subject

    return [(np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.int64))
            for t, v in folds_by_subject(items, n_folds=n_folds, seed=seed)]


def fold_items(manifest: Union[PathLike, Sequence[dict]], fold: int, n_folds: int = 5, seed: int = 0
               ) -> tuple[Items, Items]:
    """``(training knees, validation knees)`` of fold ``fold`` (0-based) of ``n_folds`` folds by subject."""
    items = _items(manifest)
    folds = _folds(items, n_folds, seed)
    if not 0 <= int(fold) < len(folds):
        raise ValueError(f"fold must be 0 .. {len(folds) - 1}, got {fold}")
    tr, va = folds[int(fold)]
    return [items[i] for i in tr], [items[i] for i in va]


def make_transforms(arch: str, num_slices: int = 64, size: int = 160, train: bool = False,
                    xray_size: Optional[int] = None) -> Any:
    """The preprocessing of ``arch`` (MR volume ``1 x S x size x size`` or radiograph ROI
    ``1 x xray_size x xray_size``; ``xray_size`` defaults to ``size``) with the paper's augmentation when
    ``train``, followed by ``SelectItemsd(["image", "label"])`` (only what the engines read is collated)."""
    from monai.transforms import Compose, SelectItemsd

    from pipeline.progression import data

    if arch == "xray":
        chain = data.xray_transforms(size=int(xray_size or size), train=train)
    elif arch in MR_ARCHS:
        chain = data.mr_transforms(num_slices=int(num_slices), size=int(size), train=train)
    else:
        raise ValueError(f"arch must be one of {MR_ARCHS + ('xray',)}, got {arch!r}")
    # flat, so that CacheDataset caches up to the first random transform (a nested Compose counts as random)
    return Compose([*chain.flatten().transforms, SelectItemsd(keys=["image", "label"])])


def build_network(arch: str = "trf", num_slices: int = 64, size: int = 160,
                  settings: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """:func:`pipeline.progression.network.make_progression_network` of ``arch`` for inputs ``1 x num_slices x
    size x size`` (``xray``: ``1 x size x size``; ``num_slices`` unused), with those of ``settings`` that ``arch``
    takes (:data:`pipeline.progression.network.ARCH_SETTINGS`; the others' settings are ignored, so one
    settings table serves every architecture)."""
    from pipeline.progression.network import ARCH_SETTINGS, make_progression_network

    if arch not in ARCH_SETTINGS:
        raise ValueError(f"arch must be one of {tuple(ARCH_SETTINGS)}, got {arch!r}")
    kw = {k: v for k, v in dict(settings or {}).items() if k in ARCH_SETTINGS[arch] and k != "num_slices"}
    if "num_slices" in ARCH_SETTINGS[arch]:
        kw["num_slices"] = int(num_slices)
    return make_progression_network(arch, image_size=int(size), **kw)


@dataclass
class FoldResult:
    """One trained fold: ``checkpoint`` (best snapshot by validation AP), ``val_index`` (positions of its
    validation knees in the item list), ``val_probabilities`` (``N_val x 3``), ``seconds`` (training time)."""

    fold: int
    checkpoint: Path
    val_index: np.ndarray
    val_probabilities: np.ndarray
    seconds: float


def _loader(dataset: Any, batch_size: int, num_workers: int, sampler: Any = None):
    from monai.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False,
                      num_workers=num_workers)


def train_fold(train_ds: Any, val_ds: Any, train_labels: Sequence[int], arch: str, fold_dir: PathLike, *,
               num_slices: int = 64, size: int = 160, network_settings: Optional[Mapping[str, Any]] = None,
               epochs: int = 100, batch_size: int = 16, val_batch_size: Optional[int] = None, seed: int = 0,
               device: Union[str, torch.device, None] = None, num_workers: int = 0, progress: bool = False,
               log_dir: Optional[PathLike] = None, stats: bool = False, **optim: Any
               ) -> tuple[Path, np.ndarray]:
    """Train ``arch`` on ``train_ds`` (labels ``train_labels``, class-balanced resampling seeded by ``seed``),
    validating on ``val_ds`` every epoch; returns ``(fold_dir/model.pt, N_val x 3 probabilities of that best
    snapshot on val_ds in dataset order)``. ``optim``: ``start_lr``, ``end_lr``, ``warmup_epochs``,
    ``weight_decay``, ``gamma`` of :func:`pipeline.progression.engine.make_engines` (paper defaults)."""
    from monai.utils import set_determinism

    from pipeline.io.checkpoints import load_weights

    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    fold_dir = Path(fold_dir)
    set_determinism(seed=seed)
    network = build_network(arch, num_slices, size, network_settings).to(device)
    sampler = ClassBalancedSampler(train_labels, seed=seed)
    train_loader = _loader(train_ds, batch_size, num_workers, sampler)
    val_loader = _loader(val_ds, val_batch_size or batch_size, num_workers)
    trainer, _ = make_engines(network, train_loader, val_loader, fold_dir, epochs, device=device, sampler=sampler,
                              log_dir=log_dir, progress=progress, stats=stats, desc=f"{arch} {fold_dir.name}",
                              **optim)
    trainer.run()
    set_determinism(seed=None)
    ckpt = fold_dir / "model.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"training wrote no best snapshot {ckpt} (did validation run?)")
    load_weights(network, ckpt)
    return ckpt, predict_probabilities(network, val_loader, device)


class _RandomSuffix:
    """Dataset view: item ``i`` of ``base`` (deep-copied: cached items stay untouched) through ``transform``."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        from copy import deepcopy

        from monai.transforms import apply_transform

        return apply_transform(self.transform, deepcopy(self.base[index]))


def cached_datasets(items: Sequence[dict], transforms: TransformFactory, cache_rate: float = 1.0,
                    num_workers: int = 0) -> tuple[Any, Any]:
    """``(training dataset, validation dataset)`` over ``items`` sharing ONE cache of the deterministic
    preprocessing: the validation chain ``transforms(False)`` is cached (``CacheDataset``, ``cache_rate``; 0 =
    no cache) and the training dataset applies to each cached item the training chain ``transforms(True)`` from
    its first random transform on (the augmentation). This relies on the training chain being the validation
    chain with the augmentation inserted before the final type conversion, as in
    :mod:`pipeline.progression.data` (tests/test_progression_engine.py checks it). ``transforms`` returning
    None means no preprocessing (items used as they are)."""
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose, Transform
    from monai.transforms.traits import RandomizableTrait

    val_tf, train_tf = transforms(False), transforms(True)
    if val_tf is None:
        val = Dataset(list(items))
    elif cache_rate > 0:
        val = CacheDataset(list(items), val_tf, cache_rate=cache_rate, num_workers=num_workers or None,
                           progress=False)
    else:
        val = Dataset(list(items), val_tf)
    if train_tf is None:
        return val, val
    ts = list(Compose(train_tf).flatten().transforms)
    first = next((i for i, t in enumerate(ts) if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)),
                 len(ts))
    return _RandomSuffix(val, Compose(ts[first:])), val


def cross_validate(manifest: Union[PathLike, Sequence[dict]], arch: str = "trf", out_dir: PathLike = "cv", *,
                   n_folds: int = 5, seed: int = 0, epochs: int = 100, batch_size: int = 16, num_slices: int = 64,
                   size: int = 160, network_settings: Optional[Mapping[str, Any]] = None,
                   val_batch_size: Optional[int] = None, folds: Optional[Sequence[tuple[Any, Any]]] = None,
                   test: Union[PathLike, Sequence[dict], None] = None, transforms: Optional[TransformFactory] = None,
                   n_resamples: int = 1000, device: Union[str, torch.device, None] = None, num_workers: int = 0,
                   cache_rate: float = 1.0, progress: bool = False, name: Optional[str] = None,
                   figure: bool = True, datasets: Optional[tuple[Any, Any]] = None, **optim: Any) -> dict[str, Any]:
    """K-fold cross-validation of ``arch`` by subject; returns the report dict (:func:`cv_report`) with
    ``"folds"`` (per fold: checkpoint, n_train, n_val, seconds) added.

    Args:
        manifest: cohort manifest CSV (knees from :func:`pipeline.progression.data.progression_items`) or the
            items themselves (dicts with ``image`` ..., ``label``, ``subject_id``, ``knee``).
        folds: ``(train_idx, val_idx)`` pairs; default :func:`pipeline.progression.data.folds_by_subject`
            (``n_folds``, ``seed``). Several models compared on the same knees must get the same folds.
        test: held-out knees (manifest or items): the fold ensemble's probabilities and metrics on them.
        transforms: ``transforms(train: bool) -> transform``; default :func:`make_transforms` of ``arch``.
        num_slices, size: MR input ``1 x num_slices x size x size`` (radiograph: ``1 x size x size``).
        network_settings: extra settings of :func:`pipeline.progression.network.make_progression_network`.
        optim: ``start_lr``, ``end_lr``, ``warmup_epochs``, ``weight_decay``, ``gamma`` (paper defaults).
        cache_rate: > 0 caches the deterministic part of the transforms (:func:`cached_datasets`), 0 loads every
            time.
        datasets: ``(training, validation)`` datasets over ``items`` already built (:func:`cached_datasets`),
            e.g. shared by several models with the same input; ``transforms`` and ``cache_rate`` are then unused.
    """
    from torch.utils.data import Subset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _items(manifest)
    folds = [(np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.int64))
             for t, v in (folds if folds is not None else _folds(items, n_folds, seed))]
    seen = np.sort(np.concatenate([v for _, v in folds]))
    if not np.array_equal(seen, np.arange(len(items))):
        raise ValueError("the folds' validation sets must cover every knee exactly once")
    if transforms is None:
        transforms = lambda train: make_transforms(arch, num_slices, size, train)  # noqa: E731
    if datasets is None:
        datasets = cached_datasets(items, transforms, cache_rate, num_workers)
    train_all, val_all = datasets
    labels = np.asarray([int(it["label"]) for it in items], dtype=np.int64)
    oof = np.full((len(items), 3), np.nan)
    fold_of = np.full(len(items), -1, dtype=np.int64)
    results: list[FoldResult] = []
    for k, (tr, va) in enumerate(folds):
        t0 = time.time()
        ckpt, probs = train_fold(Subset(train_all, tr.tolist()), Subset(val_all, va.tolist()), labels[tr], arch,
                                 out_dir / f"fold{k}", num_slices=num_slices, size=size,
                                 network_settings=network_settings, epochs=epochs, batch_size=batch_size,
                                 val_batch_size=val_batch_size, seed=seed + k, device=device,
                                 num_workers=num_workers, progress=progress, **optim)
        if probs.shape[0] != len(va):
            raise RuntimeError(f"fold {k}: {probs.shape[0]} predictions for {len(va)} validation knees")
        oof[va], fold_of[va] = probs, k
        results.append(FoldResult(k, ckpt, va, probs, time.time() - t0))
        logger.info("%s fold %d: %d train / %d val knees, %.1f s", arch, k, len(tr), len(va), time.time() - t0)
    report = cv_report(items, oof, out_dir, name=name or arch, n_resamples=n_resamples, seed=seed, fold=fold_of,
                       figure=figure)
    report["folds"] = [{"fold": r.fold, "checkpoint": str(r.checkpoint), "n_train": int(len(folds[r.fold][0])),
                        "n_val": int(len(r.val_index)), "seconds": round(r.seconds, 1)} for r in results]
    if test is not None:
        report["test"] = _ensemble_test(_items(test), transforms, [r.checkpoint for r in results], out_dir,
                                        name or arch, val_batch_size or batch_size, device, num_workers,
                                        n_resamples, seed)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def _ensemble_test(test_items: Items, transforms: TransformFactory, checkpoints: Sequence[Path], out_dir: Path,
                   name: str, batch_size: int, device: Any, num_workers: int, n_resamples: int,
                   seed: int) -> dict[str, Any]:
    from monai.data import Dataset

    from pipeline.progression.network import load_progression_network

    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    loader = _loader(Dataset(test_items, transforms(False)), batch_size, num_workers)
    fold_probs = [predict_probabilities(load_progression_network(c).to(device), loader, device) for c in checkpoints]
    probs = ensemble_probabilities(fold_probs, kind="probabilities").double().numpy()
    _write_predictions(out_dir / "test_predictions.csv", test_items, probs)
    return _summary(test_items, probs, n_resamples, seed)


def metrics_with_ci(labels: Sequence[int] | np.ndarray, probabilities: np.ndarray,
                    groups: Optional[Sequence[Any]] = None, n_resamples: int = 1000, seed: int = 0
                    ) -> dict[str, BootstrapCI]:
    """AP, ROC AUC and balanced accuracy (threshold 0.5 on P(any)) of ``N x 3`` ``probabilities`` against
    3-class ``labels``, each a :class:`~pipeline.progression.metrics.BootstrapCI` (point, 2.5 %, 97.5 %) from
    ``n_resamples`` subject-level resamples (``groups`` = subject ids; one seed, the same draws per metric)."""
    y = any_progression(np.asarray(labels))
    score = any_progression_score(probabilities)
    return {k: bootstrap_ci(y, score, fn, n_resamples=n_resamples, seed=seed, groups=groups)
            for k, (fn, _) in METRICS.items()}


def _summary(items: Items, probs: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    labels = np.asarray([int(it["label"]) for it in items])
    groups = [str(it.get("subject_id", i)) for i, it in enumerate(items)]
    cis = metrics_with_ci(labels, probs, groups, n_resamples, seed)
    y = any_progression(labels)
    return {"n_knees": int(len(items)), "n_subjects": int(len(set(groups))), "n_progressors": int(y.sum()),
            "prevalence": float(y.mean()) if y.size else float("nan"),
            "class_counts": {str(c): int((labels == c).sum()) for c in (0, 1, 2)}, "n_resamples": int(n_resamples),
            "metrics": {k: {"value": v.point, "low": v.low, "high": v.high, "n_used": v.n_used,
                            "n_skipped": v.n_skipped} for k, v in cis.items()}}


def _write_predictions(path: Path, items: Items, probs: np.ndarray, fold: Optional[np.ndarray] = None) -> None:
    import pandas as pd

    df = pd.DataFrame({"knee": [it.get("knee", "") for it in items],
                       "subject_id": [it.get("subject_id", "") for it in items],
                       "side": [it.get("side", "") for it in items],
                       "label": [int(it["label"]) for it in items]})
    if fold is not None:
        df["fold"] = fold
    df["p_none"], df["p_fast"], df["p_slow"] = probs[:, 0], probs[:, 1], probs[:, 2]
    df["p_any"] = any_progression_score(probs)
    df.to_csv(path, index=False)


def cv_report(items: Sequence[dict], probabilities: np.ndarray, out_dir: PathLike, name: str = "model",
              n_resamples: int = 1000, seed: int = 0, fold: Optional[np.ndarray] = None,
              figure: bool = True) -> dict[str, Any]:
    """Report of out-of-fold ``probabilities`` (``N x 3``, row i = knee ``items[i]``, every row filled):
    writes ``oof_predictions.csv``, ``metrics.json`` and (``figure``) ``roc_pr.png`` under ``out_dir``; returns
    ``{"name", "n_knees", "n_subjects", "n_progressors", "prevalence", "class_counts", "n_resamples",
    "metrics": {"ap"|"auc"|"ba": {"value", "low", "high", "n_used", "n_skipped"}}, "files"}``."""
    items = list(items)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(items), 3) or not np.isfinite(probs).all():
        raise ValueError(f"need finite N x 3 probabilities for all {len(items)} knees, got shape {list(probs.shape)}"
                         f"{'' if np.isfinite(probs).all() else ' with missing rows (NaN)'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions(out_dir / "oof_predictions.csv", items, probs, fold)
    report = {"name": name, **_summary(items, probs, n_resamples, seed),
              "files": {"predictions": str(out_dir / "oof_predictions.csv")}}
    if figure:
        png = roc_pr_png(out_dir / "roc_pr.png", {name: (items, probs)}, title=f"{name}: out-of-fold predictions")
        if png is not None:
            report["files"]["roc_pr"] = str(png)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def roc_pr_png(path: PathLike, curves: Mapping[str, tuple[Sequence[dict], np.ndarray]],
               title: str = "Any progression (P(fast) + P(slow))") -> Optional[Path]:
    """ROC and precision-recall curves of P(any) per model (``curves[name] = (items, N x 3 probabilities)``)
    in one PNG (:func:`pipeline.metrics.figures.roc_pr_figure`); None when a model's labels hold one class."""
    from pipeline.metrics.figures import roc_pr_figure

    data = {n: (any_progression([int(it["label"]) for it in its]), any_progression_score(p))
            for n, (its, p) in curves.items()}
    return roc_pr_figure(path, data, title=title)


def report_from_checkpoints(manifest: Union[PathLike, Sequence[dict]], ckpt_root: PathLike, output_dir: PathLike,
                            n_folds: int = 5, split_seed: int = 0, arch: Optional[str] = None,
                            num_slices: Optional[int] = None, size: Optional[int] = None, batch_size: int = 8,
                            n_resamples: int = 1000, device: Union[str, torch.device, None] = None,
                            num_workers: int = 0, name: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The cross-validation report (:func:`cv_report`) from fold checkpoints ``ckpt_root/fold<k>/model.pt``
    trained by ``train.json --fold k``: each fold's network (rebuilt from its checkpoint's record; ``arch``,
    ``num_slices``, ``size`` given here must agree with it) predicts its own validation knees. Every fold must
    be trained: a missing one raises :class:`pipeline.user_errors.CheckpointNotFoundError` (checked for every fold
    before any prediction).

    Sharded (torchrun, ``bundles/progression_mr/configs/multi_gpu_evaluate.json``;
    :class:`pipeline.io.sharding.RankGroup`): the work items are the ``(fold, batch of validation knees)`` of a
    single process, in its order (a batch keeps its knees, so the network sees the same inputs); item ``k`` is
    predicted by rank ``k % world_size``, which loads only the folds it has batches of. Rank 0 gathers the
    probabilities (:meth:`~pipeline.io.sharding.RankGroup.merge`), computes the metrics and writes every file:
    they equal a single process's (same threads per process) byte for byte. Other ranks write nothing and
    return None."""
    from monai.data import DataLoader, Dataset

    from pipeline.io.checkpoints import network_settings
    from pipeline.io.sharding import RankGroup
    from pipeline.progression.network import load_progression_network
    from pipeline.user_errors import require_checkpoint

    group = RankGroup.current("progression evaluation")
    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    items = _items(manifest)
    folds = _folds(items, n_folds, split_seed)
    ckpts = [require_checkpoint(str(Path(ckpt_root) / f"fold{k}" / "model.pt"), TRAIN_COMMAND.format(k=k),
                                what=f"fold {k} checkpoint", option="--ckpt_root") for k in range(len(folds))]
    batches = [(k, s) for k, (_, va) in enumerate(folds) for s in range(0, len(va), batch_size)]
    mine = group.indices(len(batches))
    per_batch: dict[int, np.ndarray] = {}
    for k, (_, va) in enumerate(folds):
        todo = [b for b in mine if batches[b][0] == k]
        if not todo:
            continue
        net = load_progression_network(ckpts[k], arch=arch, num_slices=num_slices).to(device)
        s = network_settings(net, required=("arch",))
        tf = make_transforms(s["arch"], int(s.get("num_slices") or 64), int(size or s.get("image_size") or 160),
                             train=False)
        positions = [list(range(batches[b][1], min(batches[b][1] + batch_size, len(va)))) for b in todo]
        loader = DataLoader(Dataset([items[i] for i in va], tf), batch_sampler=positions, num_workers=num_workers)
        probs = predict_probabilities(net, loader, device)
        for b, rows in zip(todo, np.split(probs, np.cumsum([len(p) for p in positions])[:-1])):
            per_batch[b] = rows
    merged = group.merge(per_batch)  # every rank's probabilities on rank 0, in single-process order
    if merged is None:  # another rank of a sharded run: rank 0 computes the metrics and writes the files
        return None
    oof = np.full((len(items), 3), np.nan)
    fold_of = np.full(len(items), -1, dtype=np.int64)
    for b, rows in merged.items():
        k, start = batches[b]
        index = folds[k][1][start:start + len(rows)]
        oof[index], fold_of[index] = rows, k
    return cv_report(items, oof, output_dir, name=name or "cross-validation", n_resamples=n_resamples,
                     seed=split_seed, fold=fold_of)

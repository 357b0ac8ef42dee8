"""Progression demo on the synthetic cohort: ``python -m pipeline.progression.demo --out DIR``.

1. a cohort with the protocol visits the label needs (0, 12, 24, 36, 48, 72, 96 months), fast MR (baseline
   sagittal DESS 160 x 160 x 64, NIfTI) and radiographs (``--subjects``; reused when ``DIR/cohort`` holds it);
2. the knees of :func:`pipeline.progression.data.progression_items` (KLG 4 at baseline excluded) split ONCE into
   folds by subject (:func:`pipeline.progression.data.folds_by_subject`); every model is cross-validated on those
   same folds (:func:`pipeline.progression.train.cross_validate`): 2D + TRF, 2D + FC, 2D + BiLSTM on the MR
   volume and the radiograph CNN on the baseline knee ROI;
3. ``DIR/report.md``: AP, ROC AUC and balanced accuracy of the out-of-fold P(fast) + P(slow) with subject-level
   bootstrap 95 % intervals per model, beside the paper's figures; the paired AP difference of each MR model
   against the radiograph model (same subjects resampled); ROC / PR curves ``DIR/roc_pr.png``; the settings
   and the time each step took.

The demo's settings (slices, pixels, network widths, epochs, folds) are far below the paper's so that it fits
about 20 minutes on 2 CPU cores; the paper's settings are ``bundles/progression_mr/configs/train.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.progression.labels import any_progression
from pipeline.progression.metrics import any_progression_score, average_precision

__all__ = ["DEMO", "MODELS", "PAPER", "main", "paired_ap_difference", "run_demo"]

#: The models of the demo: name -> architecture.
MODELS = {"2D + TRF": "trf", "2D + FC": "fc", "2D + BiLSTM": "lstm", "radiograph CNN": "xray"}
#: The paper's figures (Panfilov et al. 2022, OAI, sagittal DESS; AP, ROC AUC).
PAPER = {"2D + TRF": (0.58, 0.78), "radiograph CNN": (0.54, 0.74), "2D + FC": (None, None),
         "2D + BiLSTM": (None, None)}
#: CPU demo settings (the paper's in brackets in the report).
DEMO: dict[str, Any] = {
    "subjects": 160, "folds": 5, "epochs": 6, "batch_size": 16, "num_slices": 16, "size": 48, "xray_size": 96,
    "start_lr": 5e-5, "end_lr": 5e-4, "warmup_epochs": 1, "weight_decay": 1e-4, "gamma": 2.0,
    "network_settings": {"widen_factor": 0.25, "encoder_depth": 18, "token_dim": 128, "heads": 4, "layers": 2,
                         "mlp_dim": 128, "fc_hidden": 128, "lstm_hidden": 64, "dropout": 0.1, "emb_dropout": 0.1,
                         "xray_depth": 18},
}
PAPER_SETTINGS = ("64 slices x 160 x 160 px, ResNet-50 (width 1) slice encoder, token width 2048, 8 heads, "
                  "4 blocks, batch 16, 100 epochs, warm-up 1e-5 -> 1e-4 over 5 epochs, 5 folds")
VISITS = (0, 12, 24, 36, 48, 72, 96)

logger = logging.getLogger(__name__)


def paired_ap_difference(labels: Sequence[int], probs_a: np.ndarray, probs_b: np.ndarray, groups: Sequence[Any],
                         n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``AP(a) - AP(b)`` of two models' ``N x 3`` probabilities on the same knees, with a paired percentile
    bootstrap interval: each resample draws subjects with replacement (the scheme of
    :func:`pipeline.progression.metrics.bootstrap_ci`) and evaluates BOTH models on it; resamples with one class
    are skipped. Returns ``(difference, low, high)``."""
    y = any_progression(np.asarray(labels))
    sa, sb = any_progression_score(probs_a), any_progression_score(probs_b)
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1
    members = [np.flatnonzero(inverse == k) for k in range(n_groups)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_resamples):
        idx = np.concatenate([members[k] for k in rng.integers(0, n_groups, size=n_groups)])
        if y[idx].min() == y[idx].max():
            continue
        diffs.append(average_precision(y[idx], sa[idx]) - average_precision(y[idx], sb[idx]))
    low, high = np.percentile(diffs, [50 - 50 * level, 50 + 50 * level]) if diffs else (np.nan, np.nan)
    return average_precision(y, sa) - average_precision(y, sb), float(low), float(high)


def _cohort(out: Path, subjects: int, seed: int, workers: int) -> Path:
    from pipeline.cohort.generate import MR_FAST, CohortConfig, generate_cohort

    cfg = CohortConfig(n_subjects=subjects, seed=seed, visits=VISITS, xray_spacing_mm=0.6, write_dxa=False,
                       mr_spacing_mm=MR_FAST["mr_spacing_mm"], mr_half_extent_mm=MR_FAST["mr_half_extent_mm"],
                       write_mr_dicom=False, mr_visits=MR_FAST["mr_visits"], workers=workers)
    generate_cohort(out, cfg)
    return out / "manifest.csv"


def _fmt(m: dict[str, Any]) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _report(path: Path, reports: dict[str, dict], diffs: dict[str, tuple], settings: dict[str, Any],
            timing: dict[str, float], cohort: dict[str, Any], figure: Optional[Path]) -> None:
    first = next(iter(reports.values()))
    lines = [
        "# Knee OA progression from baseline DESS MRI: cross-validated demo on the SYNTHETIC cohort", "",
        f"Knees: {first['n_knees']} of {first['n_subjects']} subjects at baseline "
        f"({cohort.get('excluded', '?')} knees with KLG 4 at baseline excluded); progressors (fast + slow): "
        f"{first['n_progressors']} (prevalence {first['prevalence']:.3f} = the AP of a random score); "
        f"classes none / fast / slow: {first['class_counts']['0']} / {first['class_counts']['1']} / "
        f"{first['class_counts']['2']}.",
        f"Out-of-fold predictions of {settings['folds']}-fold cross-validation by subject, the SAME folds for every "
        f"model; metrics on P(any) = P(fast) + P(slow); 95 % intervals: percentile bootstrap over subjects "
        f"({first['n_resamples']} resamples, 2.5 / 97.5 percentiles). Balanced accuracy at P(any) >= 0.5.", "",
        "| model | AP [95 % CI] | ROC AUC [95 % CI] | balanced accuracy [95 % CI] | paper AP / AUC (OAI) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep in reports.items():
        pap, pauc = PAPER.get(name, (None, None))
        paper = f"{pap:.2f} / {pauc:.2f}" if pap is not None else "-"
        m = rep["metrics"]
        lines.append(f"| {name} | {_fmt(m['ap'])} | {_fmt(m['auc'])} | {_fmt(m['ba'])} | {paper} | "
                     f"{timing.get(name, float('nan')):.0f} |")
    lines += ["", "Paper (Panfilov et al., ISBI 2022, OAI): 2D + TRF AP 0.58 +- 0.02, ROC AUC 0.78 +- 0.01; "
              "radiograph prior art AP 0.54, ROC AUC 0.74 (their prevalence: AP 0.26 = chance).",
              "Balanced accuracy uses the fixed threshold P(any) >= 0.5; class-balanced resampling over three "
              "classes gives an uninformed model P(any) = 2/3, so a model that separates little calls every knee "
              "a progressor (balanced accuracy 0.5 with a zero-width interval).", ""]
    if diffs:
        lines += ["## Does MRI beat the radiograph here?", "",
                  "Paired difference AP(MR model) - AP(radiograph CNN) on the same knees, subjects resampled "
                  "together (95 % interval):", ""]
        for name, (d, lo, hi) in diffs.items():
            verdict = ("MR better (interval above 0)" if lo > 0 else "radiograph better (interval below 0)"
                       if hi < 0 else "no difference shown (interval contains 0)")
            lines.append(f"- {name}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}")
        lines.append("")
    ns = settings["network_settings"]
    lines += [
        "## Settings (far below the paper's)", "",
        f"- Demo: {settings['num_slices']} slices x {settings['size']} x {settings['size']} px MR input, radiograph "
        f"ROI {settings['xray_size']} px; ResNet-{ns['encoder_depth']} slice encoder at width "
        f"{ns['widen_factor']}, token width {ns['token_dim']}, {ns['heads']} heads, {ns['layers']} blocks; "
        f"batch {settings['batch_size']}, {settings['epochs']} epochs, Adam warm-up {settings['start_lr']:g} -> "
        f"{settings['end_lr']:g} over {settings['warmup_epochs']} epoch(s), weight decay "
        f"{settings['weight_decay']:g}, focal loss gamma {settings['gamma']:g}, class-balanced resampling, best "
        f"snapshot by validation AP, {settings['folds']} folds, seed {settings['seed']}.",
        f"- Paper: {PAPER_SETTINGS} (bundles/progression_mr/configs/train.json).",
        "- The cohort is synthetic: its MR progression markers are drawn from the knee's latent progression rate "
        "(pipeline/cohort); these numbers say what this pipeline measures on it, not what it would on OAI.", "",
        "## Time (2 CPU cores unless stated)", "",
    ]
    lines += [f"- {k}: {v:.0f} s" for k, v in timing.items()]
    if figure is not None:
        lines += ["", f"ROC and precision-recall curves: `{figure.name}`."]
    lines += ["", "Per model: `models/<arch>/` (fold checkpoints `fold<k>/model.pt`, `oof_predictions.csv`, "
              "`metrics.json`, `roc_pr.png`)."]
    path.write_text("\n".join(lines) + "\n")


def run_demo(out: str | Path, subjects: int = DEMO["subjects"], folds: int = DEMO["folds"],
             epochs: int = DEMO["epochs"], seed: int = 0, workers: int = 2, models: Sequence[str] = tuple(MODELS),
             manifest: Optional[str | Path] = None, n_resamples: int = 1000, **overrides: Any) -> Path:
    """Run the demo (module docstring) under ``out``; returns ``out/report.md``. ``overrides``: any key of
    :data:`DEMO` (``num_slices``, ``size``, ``xray_size``, ``batch_size``, learning rates, ``network_settings``)."""
    import torch

    from pipeline.progression.data import folds_by_subject, progression_items
    from pipeline.progression.train import cached_datasets, cross_validate, make_transforms, roc_pr_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**DEMO, **overrides, "subjects": subjects, "folds": folds, "epochs": epochs, "seed": seed}
    timing: dict[str, float] = {}
    t0 = time.time()
    if manifest is None:
        manifest = _cohort(out / "cohort", subjects, seed, workers)
        timing["cohort"] = time.time() - t0
    items, excluded = progression_items(manifest, return_excluded=True)
    fold_idx = folds_by_subject(items, n_folds=folds, seed=seed)
    reports: dict[str, dict] = {}
    probs: dict[str, np.ndarray] = {}
    optim = {k: settings[k] for k in ("start_lr", "end_lr", "warmup_epochs", "weight_decay", "gamma")}
    shared: dict[str, tuple] = {}  # one preprocessing cache per input: MR volume, radiograph ROI
    for name in models:
        arch = MODELS[name]
        kind = "radiograph" if arch == "xray" else "MR"
        size = settings["xray_size"] if arch == "xray" else settings["size"]
        if kind not in shared:
            t1 = time.time()
            shared[kind] = cached_datasets(
                items, lambda train, a=arch, sz=size: make_transforms(a, settings["num_slices"], sz, train))
            timing[f"preprocessing ({kind}, cached once)"] = time.time() - t1
        t1 = time.time()
        logger.info("cross-validating %s (%s), %d folds, %d epochs", name, arch, folds, epochs)
        rep = cross_validate(items, arch, out / "models" / arch, folds=fold_idx, seed=seed, epochs=epochs,
                             batch_size=settings["batch_size"], num_slices=settings["num_slices"],
                             size=size, network_settings=settings["network_settings"], n_resamples=n_resamples,
                             name=name, device=torch.device("cpu"), datasets=shared[kind], **optim)
        timing[name] = time.time() - t1
        reports[name] = rep
        import pandas as pd

        df = pd.read_csv(out / "models" / arch / "oof_predictions.csv")
        probs[name] = df[["p_none", "p_fast", "p_slow"]].to_numpy()
    labels = [it["label"] for it in items]
    groups = [it["subject_id"] for it in items]
    diffs = {n: paired_ap_difference(labels, probs[n], probs["radiograph CNN"], groups, n_resamples, seed)
             for n in probs if n != "radiograph CNN" and "radiograph CNN" in probs}
    figure = roc_pr_png(out / "roc_pr.png", {n: (items, p) for n, p in probs.items()},
                        title="Any progression, out-of-fold (synthetic cohort)")
    timing["total"] = time.time() - t0
    _report(out / "report.md", reports, diffs, settings, timing, {"excluded": excluded}, figure)
    (out / "summary.json").write_text(json.dumps({"settings": settings, "timing_s": timing, "reports": reports,
                                                  "ap_difference_vs_radiograph": diffs}, indent=2, default=str))
    return out / "report.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.progression.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (cohort, models, report.md)")
    p.add_argument("--subjects", "-n", type=int, default=DEMO["subjects"], help="cohort subjects (2 knees each)")
    p.add_argument("--folds", type=int, default=DEMO["folds"], help="cross-validation folds (paper: 5)")
    p.add_argument("--epochs", type=int, default=DEMO["epochs"], help="epochs per fold (paper: 100)")
    p.add_argument("--num-slices", type=int, default=DEMO["num_slices"], help="MR slices (paper: 64)")
    p.add_argument("--size", type=int, default=DEMO["size"], help="MR in-plane pixels (paper: 160)")
    p.add_argument("--xray-size", type=int, default=DEMO["xray_size"], help="radiograph ROI pixels")
    p.add_argument("--models", default=",".join(MODELS.values()),
                   help=f"comma-separated architectures from {list(MODELS.values())}")
    p.add_argument("--manifest", default=None, help="use this cohort manifest instead of generating one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="cohort processes")
    p.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples (>= 1000 for the report)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    by_arch = {v: k for k, v in MODELS.items()}
    archs = [s.strip() for s in a.models.split(",") if s.strip()]
    unknown = [s for s in archs if s not in by_arch]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(by_arch)}")
    report = run_demo(a.out, subjects=a.subjects, folds=a.folds, epochs=a.epochs, seed=a.seed, workers=a.workers,
                      models=[by_arch[s] for s in archs], manifest=a.manifest, n_resamples=a.n_resamples,
                      num_slices=a.num_slices, size=a.size, xray_size=a.xray_size)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One command for the MRIS paper's comparison on a cohort: train (or reuse) every synthesis method with the
same split and budget, synthesize the downstream and test maps of each, and write the three tables
(retrieval recall, synthesis error per KLG bucket with the mean-map baseline, downstream KLG / progression
classifiers per source), model size, figures, the config and the seed into one output folder.

Output folder::

    config.json            the resolved settings (split, budget, seed, bundle files, classifier settings)
    report.md              the tables, who wins each column and by how much, budget and timing
    retrieval.csv  synthesis.csv  downstream.csv  model_size.csv  budget.csv  winners.csv  metrics.json
    examples.png           one test knee per KLG bucket: MR-extracted vs every method (FC and TC)
    roc_pr.png             progression ROC and precision-recall curves per source
    <method>/              bundle root of each method trained here (models/, logs), MRIS database + eval/
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.utils import set_determinism
from tqdm import tqdm

from pipeline.baselines.evaluate import klg_or_none
from pipeline.baselines.nets import make_discriminator, make_generator
from pipeline.baselines.synthesize import atlas_masks, load_generator, predict_maps
from pipeline.bundle_paths import repository_root
from pipeline.compare import tables
from pipeline.compare.config import (
    BASELINE_METHODS,
    DS_CONFIG_DIR,
    LABELS,
    MRIS_CONFIG_DIR,
    MRIS_METHODS,
    CompareConfig,
    downstream_settings,
)
from pipeline.compare.model_size import model_size_row
from pipeline.conventions import MAP_KEYS
from pipeline.downstream.data import attach_progression
from pipeline.downstream.engine import make_classifier
from pipeline.downstream.run import evaluate_source
from pipeline.io.atomic import write_text_atomic
from pipeline.metrics import synthesis_error_report
from pipeline.mris.data import manifest_items, select, train_val_subjects
from pipeline.mris.engine import make_network
from pipeline.mris.evaluate import evaluate_test
from pipeline.mris.synthesize import MRISSynthesizer, mean_map, truth_maps

__all__ = ["run_bundle", "run_compare", "run_short_report"]

logger = logging.getLogger(__name__)
MEAN_MAP = "mean database map"


def _say(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def run_bundle(run_id: str, config_dir: Path, files: Sequence[str], bundle_root: Path, manifest: str | Path,
               overrides: Mapping[str, Any], log_name: str | None = None, threads: int | None = None) -> float:
    """``python -m monai.bundle run <run_id>`` as a subprocess (as ``make demo`` runs MRIS), output in
    ``bundle_root/<run_id>.log``; returns the wall time (s). Raises ``RuntimeError`` naming the log."""
    cfg = "[" + ",".join(f"'{Path(config_dir) / f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", cfg, "--logging_file",
           str(Path(config_dir) / "logging.conf"), "--bundle_root", str(bundle_root), "--manifest", str(manifest)]
    for k, v in overrides.items():
        cmd += [f"--{k}", repr(v)]
    bundle_root.mkdir(parents=True, exist_ok=True)
    log = bundle_root / (log_name or f"{run_id}.log")
    env = os.environ.copy()
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(log, "w") as fh:
        fh.write("# " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=repository_root(), env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{run_id} of {bundle_root} failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def _budget_row(method: str, res: Mapping[str, Any], n_train_subjects: int, trained: str,
                root: Path, seconds: float | None) -> dict[str, Any]:
    sh = res["shared"]
    epochs = int(res["epochs_override"].get(method, sh["epochs"]))
    samples = epochs * int(sh["draws_per_epoch"]) * n_train_subjects
    steps = epochs * math.ceil(int(sh["draws_per_epoch"]) * n_train_subjects / int(sh["batch_size"]))
    where = {"here": "here", "earlier": "here, earlier run (--resume)", "reused": f"reused {root}"}[trained]
    return {"method": LABELS[method], "trained": where,
            "image_size": sh["image_size"], "epochs": epochs, "draws_per_epoch": sh["draws_per_epoch"],
            "batch_size": sh["batch_size"], "training_subjects": n_train_subjects, "samples_seen": samples,
            "optimiser_steps": steps, "train_seconds": float("nan") if seconds is None else round(seconds, 1)}


def _model_sizes(res: Mapping[str, Any], methods: Sequence[str]) -> pd.DataFrame:
    s = int(res["shared"]["image_size"])
    x = torch.zeros(1, 1, s, s)
    rows = []
    for m in methods:
        if m in MRIS_METHODS:
            net = make_network("combined" if m == "mris-c" else "separate", **res["mris"]["net"])
            xr = [net.xray] if m == "mris-c" else [net[k].xray for k in net.keys]
            rows.append(model_size_row(LABELS[m], [net], [(e, (x,)) for e in xr],
                                       "params: radiograph + map encoders; compute: radiograph encoder(s) per "
                                       "query (+ N x D MACs of the k-NN search)"))
        else:
            g = make_generator(m, s, **res["baselines"]["net"])
            mods = [g] + ([make_discriminator(**_disc_kwargs(res))] if m == "pix2pix" else [])
            rows.append(model_size_row(LABELS[m], mods, [(g, (x,))],
                                       "params incl. the PatchGAN discriminator (training only)" if m == "pix2pix"
                                       else "generator"))
    ds = res["downstream"]
    cs = int(ds["image_size"])
    clf = make_classifier(4, 2, ds["klg"]["widen_factor"], ds["klg"]["stem_stride"])
    rows.append(model_size_row("classifier (ResNet-18, per task)", [clf], [(clf, (torch.zeros(1, 2, cs, cs),))],
                               f"2-channel FC+TC input at {cs} px"))
    return pd.DataFrame(rows)


def _disc_kwargs(res: Mapping[str, Any]) -> dict[str, int]:
    from pipeline.compare.config import read_bundle_config

    cfg = read_bundle_config(res["baselines"]["config_files"], DS_CONFIG_DIR)
    cfg.update(res["baselines"]["overrides"])
    return {"channels": int(cfg.get("d_channels", 64)), "num_layers": int(cfg.get("d_layers", 3))}


#: Resolved-config keys that decide what a trained model is (a model is reused by ``resume`` only if equal).
TRAINING_KEYS = ("manifest", "seed", "shared", "mris", "baselines")


def _resumable(out: Path, res: Mapping[str, Any]) -> set[str]:
    """Methods whose model an earlier run in ``out`` trained with the same training settings."""
    path = out / "config.json"
    if not path.is_file():
        return set()
    old = json.loads(path.read_text()).get("resolved", {})
    def strip(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (v if k != "mris" else {**v, "roots": None}) for k, v in d.items() if k in TRAINING_KEYS}

    if strip(old) != strip(res):
        _say(f"--resume: {path} has other training settings; every method is trained again")
        return set()
    ok = set()
    for m in res["methods"]:
        if (old.get("epochs_override", {}).get(m) == res["epochs_override"].get(m)
                and (out / m / "models" / "model.pt").is_file() and (out / m / "train_seconds.txt").is_file()):
            ok.add(m)
    return ok


def _train(m: str, run: Any, root: Path, reusable: set[str]) -> tuple[float, bool]:
    """Train ``m`` with ``run()`` unless reusable; returns (training seconds, trained in this run)."""
    if m in reusable:
        secs = float((root / "train_seconds.txt").read_text())
        _say(f"{LABELS[m]}: reusing {root / 'models' / 'model.pt'} from an earlier run (--resume)")
        return secs, False
    secs = run()
    (root / "train_seconds.txt").write_text(f"{secs:.1f}\n")
    _say(f"    {LABELS[m]} trained in {secs:.0f} s")
    return secs, True


def run_compare(config: CompareConfig) -> Path:
    """Run the whole comparison (see the module docstring); returns the path of ``report.md``."""
    t_start = time.time()
    res = config.resolve()
    out = Path(res["out"])
    out.mkdir(parents=True, exist_ok=True)
    reusable = _resumable(out, res) if config.resume else set()
    write_text_atomic(out / "config.json", json.dumps({**config.to_dict(), "resolved": res}, indent=2, default=str))
    sh, seed, device = res["shared"], res["seed"], res["device"]
    manifest = res["manifest"]
    timings: dict[str, float] = {}
    threads = res["threads"]
    if threads:
        torch.set_num_threads(int(threads))
    set_determinism(seed=seed)

    items = attach_progression(manifest_items(manifest, sh["split_fractions"], sh["split_seed"]), manifest)
    db_items, ds_items, test_items = (select(items, s) for s in ("database", "downstream", "test"))
    if not db_items or not test_items:
        raise ValueError(f"{manifest}: the split {sh['split_fractions']} (seed {sh['split_seed']}) gives "
                         f"{len(db_items)} database and {len(test_items)} test knee-visits; both must be non-empty")
    tr_subj, _ = train_val_subjects(items, "database", sh["val_fraction"], sh["split_seed"])
    counts = {s: (len({it["subject_id"] for it in v}), len(v))
              for s, v in (("database", db_items), ("downstream", ds_items), ("test", test_items))}
    _say(f"split {sh['split_fractions']} seed {sh['split_seed']}: " + ", ".join(
        f"{s} {n} subjects / {m} knee-visits" for s, (n, m) in counts.items()))
    masks = atlas_masks(test_items)
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = {"mr": {"test": truth_maps(test_items, masks)}}
    if ds_items:
        maps["mr"]["downstream"] = truth_maps(ds_items, masks)
    images = None
    budget_rows, retrieval = [], {}
    common = {**{k: sh[k] for k in sh}, "seed": seed}

    # ---------------------------------------------------------------- MRIS
    for m in [m for m in res["methods"] if m in MRIS_METHODS]:
        variant = "combined" if m == "mris-c" else "separate"
        given = res["mris"]["roots"][m]
        root = Path(given) if given else out / m
        secs, fresh = None, False
        if not given:
            ov = {**common, **res["mris"]["overrides"], "variant": variant}
            if m in res["epochs_override"]:
                ov["epochs"] = res["epochs_override"][m]
            if m not in reusable:
                _say(f"training {LABELS[m]} (bundles/mris, {res['mris']['config_files']}) -> {root} ...")
            secs, fresh = _train(m, lambda ov=ov, root=root: run_bundle(
                "training", MRIS_CONFIG_DIR, res["mris"]["config_files"], root, manifest, ov, threads=threads),
                root, reusable)
        ckpt = root / "models" / "model.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{LABELS[m]}: no checkpoint {ckpt} (train the bundle or pass another root)")
        t0 = time.time()
        work = out / m
        syn = MRISSynthesizer(ckpt, manifest, work / "database", variant, sh["image_size"],
                              split_fractions=sh["split_fractions"], split_seed=sh["split_seed"], k=res["k"],
                              device=device, **res["mris"]["net"]).build(progress=False)
        maps[m] = {}
        maps[m]["test"], imgs, info = syn.synthesize(test_items, keep_images=images is None)
        images = imgs if imgs is not None else images
        if ds_items:
            maps[m]["downstream"] = syn.synthesize(ds_items)[0]
        ev = evaluate_test(syn.network, ckpt, manifest, work / "database", work / "eval", variant=variant,
                           image_size=sh["image_size"], split_fractions=sh["split_fractions"],
                           split_seed=sh["split_seed"], k=res["k"], device=device, figure=False)
        retrieval[LABELS[m]] = ev["retrieval"]
        timings[f"{m} synthesis + retrieval"] = time.time() - t0
        if fresh:
            timings[f"{m} training"] = secs
        budget_rows.append(_budget_row(m, res, len(tr_subj), "reused" if given else ("here" if fresh else "earlier"),
                                       root, secs))

    # ---------------------------------------------------------------- direct synthesis baselines
    for m in [m for m in res["methods"] if m in BASELINE_METHODS]:
        root = out / m
        ov = {**common, **res["baselines"]["overrides"], "method": m}
        if m in res["epochs_override"]:
            ov["epochs"] = res["epochs_override"][m]
        if m not in reusable:
            _say(f"training {LABELS[m]} (bundles/direct_synthesis, {res['baselines']['config_files']}) -> {root} ...")
        secs, fresh = _train(m, lambda ov=ov, root=root: run_bundle(
            "training", DS_CONFIG_DIR, res["baselines"]["config_files"], root, manifest, ov, threads=threads),
            root, reusable)
        if fresh:
            timings[f"{m} training"] = secs
        t0 = time.time()
        net = load_generator(m, root / "models" / "model.pt", sh["image_size"], **res["baselines"]["net"])
        maps[m] = {"test": predict_maps(net, test_items, sh["image_size"], masks, device, progress=False)[0]}
        if ds_items:
            maps[m]["downstream"] = predict_maps(net, ds_items, sh["image_size"], masks, device, progress=False)[0]
        timings[f"{m} synthesis"] = time.time() - t0
        budget_rows.append(_budget_row(m, res, len(tr_subj), "here" if fresh else "earlier", root, secs))

    # ---------------------------------------------------------------- synthesis error (test set)
    t0 = time.time()
    klg = klg_or_none(test_items)
    truth = maps["mr"]["test"]
    parts = []
    for m in res["methods"]:
        tab = synthesis_error_report(maps[m]["test"], truth, masks=masks, klg=klg)
        tab.insert(0, "method", LABELS[m])
        parts.append(tab)
    base = mean_map(db_items, masks)
    tab = synthesis_error_report({k: np.broadcast_to(base[k], truth[k].shape) for k in MAP_KEYS}, truth,
                                 masks=masks, klg=klg)
    tab.insert(0, "method", MEAN_MAP)
    parts.append(tab)
    maps["_mean"] = {"test": {k: np.broadcast_to(base[k], truth[k].shape) for k in MAP_KEYS}}
    synthesis = pd.concat(parts, ignore_index=True)
    timings["synthesis error tables"] = time.time() - t0

    # ---------------------------------------------------------------- downstream classifiers
    settings = downstream_settings(res)
    downstream: dict[str, Any] = {}
    if ds_items:
        sources = ["mr"] + list(res["methods"])
        _say(f"downstream classifiers (KLG, progression) for {len(sources)} sources ...")
        for src in tqdm(sources, desc="downstream sources", unit="source"):
            t0 = time.time()
            downstream[LABELS[src]] = evaluate_source(LABELS[src], ds_items, maps[src]["downstream"], test_items,
                                                      maps[src]["test"], settings)
            timings[f"{src} classifiers"] = time.time() - t0
    else:
        _say("no downstream subjects in this split: the downstream table is skipped")

    # ---------------------------------------------------------------- model size, tables, figures, report
    sizes = _model_sizes(res, res["methods"])
    budget = pd.DataFrame(budget_rows)
    timings["total"] = time.time() - t_start
    report = write_report(out, res, counts, retrieval, synthesis, downstream, sizes, budget, timings,
                          test_items, maps, images)
    _say(f"report: {report} ({timings['total']:.0f} s)")
    return report


def write_report(out: Path, res: Mapping[str, Any], counts: Mapping[str, tuple[int, int]],
                 retrieval: Mapping[str, Any], synthesis: pd.DataFrame, downstream: Mapping[str, Any],
                 sizes: pd.DataFrame, budget: pd.DataFrame, timings: Mapping[str, float],
                 test_items: Sequence[dict], maps: Mapping[str, Any], images: torch.Tensor | None) -> Path:
    """Write the CSV / JSON tables, figures and ``report.md``; returns the report path."""
    sh = res["shared"]
    ret = tables.retrieval_table(retrieval)
    ret.to_csv(out / "retrieval.csv", index=False)
    synthesis.to_csv(out / "synthesis.csv", index=False)
    down = tables.downstream_table(downstream) if downstream else pd.DataFrame()
    down.to_csv(out / "downstream.csv", index=False)
    sizes.to_csv(out / "model_size.csv", index=False)
    budget.to_csv(out / "budget.csv", index=False)

    win: list[dict] = []
    ret_cols = [c for c in ret.columns if "R@" in c]
    win += tables.winners(ret, "method", ret_cols, True, exclude=("chance",), table="retrieval (%)")
    if "chance" in set(ret["method"]):
        chance = ret[ret["method"] == "chance"].iloc[0]
        for r in win:
            if r["table"] == "retrieval (%)":
                c = float(chance[r["column"]])
                r["note"] = (r["note"] + "; " if r["note"] else "") + (
                    f"chance {c:.1f}" + (", NOT above chance" if r["value"] <= c else ""))
    wide = {k: tables.synthesis_wide(synthesis, k) for k in MAP_KEYS}
    for k, w in wide.items():
        win += tables.winners(w, "method", [c for c in w.columns if c != "method"], False,
                              table=f"synthesis {k.upper()} (mm, lower is better)")
    if not down.empty:
        cols = [c for c in down.columns if c not in ("source", "test prevalence", "KLG classes predicted")]
        dw = tables.winners(down, "source", cols, True, table="downstream (higher is better)")
        synth_only = {r["column"]: r for r in tables.winners(down, "source", cols, True, exclude=(LABELS["mr"],))}
        for r in dw:
            best = synth_only.get(r["column"])
            if r["winner"] == LABELS["mr"] and best is not None:
                r["note"] = (r["note"] + "; " if r["note"] else "") + (
                    f"best synthesized source {best['winner']} {best['value']:.3f}")
        win += dw
    pd.DataFrame(win).to_csv(out / "winners.csv", index=False)

    figs = {}
    if res["figures"]:
        from pipeline.compare.figures import example_maps_figure, roc_pr_figure

        synth = {LABELS[m]: maps[m]["test"] for m in res["methods"]}
        if "_mean" in maps:
            synth[MEAN_MAP] = maps["_mean"]["test"]
        figs["examples"] = example_maps_figure(out / "examples.png", test_items, maps["mr"]["test"], synth,
                                               images=images)
        curves = {src: (d["progression"]["labels"], d["progression"]["scores"]) for src, d in downstream.items()
                  if "labels" in d.get("progression", {})}
        figs["roc_pr"] = roc_pr_figure(out / "roc_pr.png", curves) if curves else None

    unequal = sorted({int(v) for v in budget["epochs"]}) if not budget.empty else []
    summary = summary_lines(ret, synthesis, down, win, budget)
    write_text_atomic(out / "summary.md", "\n".join([f"# {res['title']}", ""] + summary) + "\n")
    thr = f", {res['threads']} CPU thread(s) per process" if res["threads"] else ""
    L = [f"# {res['title']}", "",
         f"Manifest `{res['manifest']}`; seed {res['seed']}; preset `{res['preset']}`; device {res['device']}"
         f"{thr}; "
         f"total wall time {timings.get('total', float('nan')) / 60:.1f} min.", "",
         "Split (by subject, `pipeline.io.manifest.split_subjects`, fractions "
         f"{sh['split_fractions']}, seed {sh['split_seed']}): " + "; ".join(
             f"{s} {n} subjects / {m} knee-visits" for s, (n, m) in counts.items()) + ".", ""]
    L += summary + [""]
    L += ["## Training budget (the same for every synthesis method unless flagged)", "",
          f"Image size {sh['image_size']} px, batch {sh['batch_size']}, {sh['epochs']} epochs x "
          f"{sh['draws_per_epoch']} draws (one random visit per training subject per draw), lr step every "
          f"{sh['lr_step_epochs']} epochs, validation fraction {sh['val_fraction']} of the database subjects "
          f"(model selection), seed {res['seed']}. MRIS bundle configs {res['mris']['config_files']}, "
          f"direct-synthesis configs {res['baselines']['config_files']} (+ overrides in config.json).", "",
          tables.markdown_table(budget, 1), ""]
    if len(unequal) > 1:
        L += [f"**UNEQUAL BUDGET**: the methods were trained for different numbers of epochs ({unequal}); "
              "this is not a fair comparison of the methods, only a check that the pipeline runs.", ""]
    if any(str(t).startswith("reused") for t in budget.get("trained", [])):
        L += ["Reused MRIS roots were trained outside this run; their budget is ASSUMED to be the configured "
              "one above (the MRIS bundle configs this report reads).", ""]
    L += ["## 1. Retrieval recall (%, test set: first visit per knee; gallery = those knees' maps)", "",
          "MRIS-C embeds the stacked FC+TC map once, so only its combined recall exists; MRIS-S combined = mean "
          "of its FC and TC cosine similarities.", "", tables.markdown_table(ret, 1), ""]
    L += ["## 2. Synthesis error (mm; mean over test maps of the per-map median ± MAD of |synth - MR| inside "
          "the footprint)", "", f"MRIS k = {res['k']} neighbours from the database split; the mean database map "
          "is the naive baseline.", ""]
    for k, w in wide.items():
        L += [f"### {k.upper()}", "", tables.markdown_table(w), ""]
    L += ["## 3. Downstream classifiers (trained on each source's downstream-set maps, tested on its test-set "
          "maps)", ""]
    if down.empty:
        L += ["Skipped: the split has no downstream subjects (set a `downstream` fraction > 0).", ""]
    else:
        ds = res["downstream"]
        first = next(iter(downstream.values()))
        n_info = []
        if "n_test_per_bucket" in first.get("klg", {}):
            n_info.append("KLG test knee-visits per bucket " + str(first["klg"]["n_test_per_bucket"])
                          + f", training {first['klg']['n_train_per_bucket']}")
        if "n_test" in first.get("progression", {}):
            p = first["progression"]
            n_info.append(f"progression: {p['n_train']} training knees ({p['n_pos_train']} progressors), "
                          f"{p['n_test']} test knees ({p['n_pos_test']} progressors)")
        L += [f"ResNet-18 (MONAI, 2 channels FC+TC at {ds['image_size']} px, widen {ds['klg']['widen_factor']}), "
              f"class-weighted cross-entropy on raw logits; KLG: {ds['klg']['epochs']} epochs, lr {ds['klg']['lr']}; "
              f"progression (`progression_72m`, {ds['progression_visits']} visit per knee): "
              f"{ds['progression']['epochs']} epochs, lr {ds['progression']['lr']}; AdamW, batch "
              f"{ds['klg']['batch_size']}, lr x{ds['klg']['lr_gamma']} every {ds['klg']['lr_step_epochs']} epochs; "
              f"seed {res['seed']} for every source.", "", "; ".join(n_info) + ".", "",
              tables.markdown_table(down), "",
              "Balanced accuracy = mean of the four bucket accuracies (chance 0.25); a classifier that predicts "
              "one class only (`KLG classes predicted` = 1) scores 1.0 in that bucket and 0 in the others, so "
              "single-bucket wins of such a source mean nothing. Progression AP of a random classifier = the test "
              "prevalence; ROC AUC 0.5.", ""]
    L += ["## Who wins each column (and by how much)", ""]
    for t in dict.fromkeys(r["table"] for r in win):
        unit = " mm" if t.startswith("synthesis") else ""
        L += [f"**{t}**", ""] + tables.winner_lines([r for r in win if r["table"] == t], unit=unit) + [""]
    L += ["## Model size", "", "GFLOPs per knee counted by `torch.utils.flop_counter` (2 FLOPs per multiply-add) "
          f"at {sh['image_size']} px; GMACs = GFLOPs / 2 (the paper's 'FLOPs' are MACs).", "",
          tables.markdown_table(sizes, 3), ""]
    L += ["## Wall time (s)", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [""]
    if figs:
        L += ["## Figures", ""] + [f"- `{p.name}`" for p in figs.values() if p is not None] + [""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(L))
    metrics = {"config": res, "counts": counts, "retrieval": retrieval, "synthesis": synthesis.to_dict("records"),
               "downstream": downstream, "model_size": sizes.to_dict("records"), "budget": budget.to_dict("records"),
               "winners": win, "timings": timings}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
    return report


def summary_lines(ret: pd.DataFrame, synthesis: pd.DataFrame, down: pd.DataFrame, win: Sequence[Mapping],
                  budget: pd.DataFrame) -> list[str]:
    """The short version of the report (``summary.md``, top of ``report.md``): the 'all' numbers of each
    table, the budget in one line, and how many columns each method wins per table."""
    L = ["## Summary", ""]
    if not budget.empty:
        L.append("- Budget: " + "; ".join(f"{r.method} {r.epochs} epochs x {r.draws_per_epoch} draws at "
                                           f"{r.image_size} px ({r.trained.split(',')[0].split(' ')[0]})"
                                           for r in budget.itertuples()))
        if budget["epochs"].nunique() > 1:
            L.append("- **UNEQUAL BUDGET**: the numbers below do not compare the methods fairly.")
    for label in ret["method"]:
        row = ret[ret["method"] == label].iloc[0]
        L.append(f"- Retrieval, {label}: combined R@1/5/10/20 = "
                 + "/".join(f"{row[f'combined R@{k}']:.1f}" for k in (1, 5, 10, 20)) + " %")
    for key in MAP_KEYS:
        sub = synthesis[(synthesis["map"] == key) & (synthesis["group"] == "all")]
        L.append(f"- Synthesis error {key.upper()}, all test maps (mm, median ± MAD): " + "; ".join(
            f"{r.method} {r.median_mm:.3f} ± {r.mad_mm:.3f}" for r in sub.itertuples()))
    if not down.empty:
        L.append("- Downstream (KLG accuracy overall / progression AP / ROC AUC): " + "; ".join(
            f"{r['source']} {r['acc overall']:.3f} / {r['progression AP']:.3f} / {r['progression ROC AUC']:.3f}"
            for _, r in down.iterrows()))
    for t in dict.fromkeys(r["table"] for r in win):
        recs = [r for r in win if r["table"] == t]
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["winner"]] = counts.get(r["winner"], 0) + 1
        L.append(f"- Columns won, {t}: " + ", ".join(f"{k} {v}/{len(recs)}" for k, v in
                                                    sorted(counts.items(), key=lambda kv: -kv[1]))
                 + " (ties go to the first listed)")
    return L


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_short_report(out: str | Path, manifest: str | Path, mris_c_root: str | Path | None = None,
                     seed: int = 0, baseline_epochs: int = 2, classifier_epochs: int = 10,
                     shared: Mapping[str, Any] | None = None, preset: str = "demo",
                     device: str = "cpu", threads: int | None = None,
                     mris_overrides: Mapping[str, Any] | None = None,
                     baseline_overrides: Mapping[str, Any] | None = None,
                     downstream: Mapping[str, Any] | None = None) -> Path:
    """The short comparison for the end of ``make demo``: MRIS-C (reused from ``mris_c_root`` when given,
    e.g. the demo's ``demo_output/mris``) vs a U-Net trained for only ``baseline_epochs`` epochs, MR-extracted
    maps as the reference, classifiers of ``classifier_epochs`` epochs (instead of 30). MRIS-S, pix2pix and the transformer
    are skipped. The report flags the budget as unequal. ``shared`` / ``mris_overrides`` /
    ``baseline_overrides`` / ``downstream``: as in :class:`CompareConfig` (the split and image size default to
    the MRIS demo config, i.e. those of the demo's MRIS-C). Returns the path of ``report.md``."""
    down = {"klg": {"epochs": int(classifier_epochs)}, "progression": {"epochs": int(classifier_epochs)}}
    for key, val in dict(downstream or {}).items():
        down[key] = {**down.get(key, {}), **val} if isinstance(val, Mapping) else val
    cfg = CompareConfig(
        manifest=str(manifest), out=str(out), methods=["mris-c", "unet"], seed=seed, preset=preset,
        shared=dict(shared or {}), mris_c_root=None if mris_c_root is None else str(mris_c_root),
        mris_overrides=dict(mris_overrides or {}), baseline_overrides=dict(baseline_overrides or {}),
        epochs_override={"unet": int(baseline_epochs)}, downstream=down, device=device, threads=threads,
        title="Short comparison (demo): MRIS-C vs a briefly trained U-Net; MRIS-S, pix2pix and the "
              "TransUNet-like model skipped",
    )
    return run_compare(cfg)

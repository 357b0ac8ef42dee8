"""bundles/segreg end to end on a tiny cohort (64 px, a few iterations per stage): every stage's config runs
through ``python -m monai.bundle run``, training never reads a radiograph label, the evaluation scores every
method on both pairings, and inference reports bad inputs per pair while the rest of the folder is processed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.registration.data import (
    CROP_COLUMNS,
    crop_table,
    load_role_arrays,
    read_image_2d,
    split_roles,
)
from pipeline.registration.demo import STAGES, run_stage
from pipeline.registration.evaluate import METHODS, held_out_pairs

TINY_STAGES = {"image_size": 64, "iterations": 2, "iterations_per_epoch": 2, "batch_size": 2, "steps": 2,
               "val_interval": 1, "epochs_constant": 1, "epochs_decay": 1, "epoch_length": 2, "n_overlays": 1,
               "bspline": {"iterations": 3, "shrink_factors": [1], "smoothing_sigmas": [0]}, "progress_bar": False}
CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "segreg" / "configs"


def run_in_process(run_id: str, files: list[str], bundle_root: Path, manifest: Path) -> None:
    """One stage as ``python -m monai.bundle run`` does it, in this process, merged with stages_demo.json like the demo
    (the demo itself runs the same configs in subprocesses: pipeline.registration.demo.run_stage)."""
    from monai.bundle import run

    run(run_id, config_file=[str(CONFIGS / f) for f in files] + [str(CONFIGS / "stages_demo.json")],
        bundle_root=str(bundle_root), manifest=str(manifest), **TINY_STAGES)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from pipeline.cohort.generate import CohortConfig, generate_cohort

    out = tmp_path_factory.mktemp("segreg_cohort")
    generate_cohort(out, CohortConfig(n_subjects=8, seed=3, visits=(0,), xray_spacing_mm=1.0, write_mr=False,
                                      missing_rate=0.0, workers=1), progress=False)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """Every training stage on a copy of the cohort whose radiograph label files are DELETED (training must not
    read them), then the evaluation on the full cohort."""
    blind = tmp_path_factory.mktemp("blind")
    shutil.copytree(cohort.parent, blind / "cohort")
    for p in (blind / "cohort").rglob("xray_crop_labels*"):
        p.unlink()
    for p in (blind / "cohort").rglob("labels.nii.gz"):  # the uncropped radiograph labels too
        if "XRAY" in p.parts:
            p.unlink()
    root = tmp_path_factory.mktemp("segreg_bundle")
    for k, (run_id, files) in enumerate(STAGES):
        manifest = cohort if run_id == "evaluating" else blind / "cohort" / "manifest.csv"
        if k == 0:  # the first stage through the command line, as the demo runs every stage
            run_stage(run_id, files, root, manifest, {k: v for k, v in TINY_STAGES.items() if k != "bspline"})
        else:
            run_in_process(run_id, files, root, manifest)
    return root


def test_roles_split_by_subject_and_keep_radiograph_labels_for_scoring(cohort):
    table = crop_table(cohort)
    roles = split_roles(table, n_labelled=5, test_fraction=0.25, seed=0)
    train_subjects = set(table["subject_id"].iloc[roles.train_xray])
    test_subjects = set(table["subject_id"].iloc[roles.test])
    assert train_subjects and test_subjects and not train_subjects & test_subjects
    assert len(roles.labelled_dxa) == 5 and not set(roles.labelled_dxa) & set(roles.unlabelled_dxa)
    with pytest.raises(PermissionError, match="scoring only"):
        load_role_arrays(table, roles.train_xray, CROP_COLUMNS["xray"][1], 64)
    labels = load_role_arrays(table, roles.test, CROP_COLUMNS["xray"][1], 64, allow_xray_labels=True)
    assert labels.shape == (len(roles.test), 1, 64, 64) and set(np.unique(labels)) <= {0, 1, 2, 3}
    pairs = held_out_pairs(table, roles.test, "both", seed=0)
    subj = table["subject_id"].iloc[roles.test].to_numpy()
    assert [(i, j) for i, j, k in pairs if k == "same"] == [(i, i) for i in range(len(roles.test))]
    different = [(i, j) for i, j, k in pairs if k == "different"]
    assert sorted(j for _, j in different) == list(range(len(roles.test)))
    assert all(subj[i] != subj[j] for i, j in different)


def test_every_stage_writes_its_model_and_the_augmented_set(trained, cohort):
    models = trained / "models"
    for name in ("stage1.pt", "segmenter_dxa.pt", "segmenter_xray.pt", "stage3.pt", "baseline_lncc.pt",
                 "baseline_mi.pt", "augmented.png"):
        assert (models / name).is_file(), name
    aug = np.load(models / "augmented.npz")
    table = crop_table(cohort)
    roles = split_roles(table, n_labelled=5, test_fraction=0.25, seed=0)
    n = len(roles.labelled_dxa) * len(roles.unlabelled_dxa)
    assert aug["images"].shape == (n, 1, 64, 64) and aug["labels"].shape == (n, 1, 64, 64)
    assert set(np.unique(aug["labels"])) <= {0, 1, 2, 3}  # nearest-neighbour warping keeps label values
    assert sorted(set(aug["source"].tolist())) == roles.labelled_dxa


def test_evaluation_scores_every_method_on_both_pairings(trained):
    ev = trained / "eval"
    scores = pd.read_csv(ev / "pairs.csv")
    summary = pd.read_csv(ev / "summary.csv")
    assert set(scores["method"]) == set(METHODS) and set(scores["pairing"]) == {"same", "different"}
    n_pairs = scores.groupby(["pairing", "method"]).size()
    assert n_pairs.nunique() == 1 and len(summary) == 2 * len(METHODS)
    dice = scores[["dice_femur", "dice_tibia", "dice_fibula", "dice_mean"]].to_numpy()
    assert np.isfinite(dice).all() and (dice >= 0).all() and (dice <= 1).all()
    assert (scores["fold_percent"] >= 0).all()
    affine = scores[scores.method == "affine"]
    assert (affine["fold_percent"] == 0).all()
    report = (ev / "report.md").read_text()
    assert "0.957" in report and all(m in report for m in METHODS)
    pngs = list((ev / "overlays").glob("*.png"))
    assert len(pngs) == 2 * len(METHODS)  # n_overlays = 1 per pairing and method


@pytest.fixture()
def pair_folder(cohort, tmp_path):
    """A pairs CSV with two good pairs and every bad case of the issue."""
    table = crop_table(cohort)
    d = tmp_path / "pairs"
    d.mkdir()
    good = [(table["dxa_crop"].iloc[k], table["xray_crop"].iloc[k]) for k in range(2)]
    small = d / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((128, 128)).astype(np.float32), np.eye(4)), str(small))
    blank = d / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256), np.float32), np.eye(4)), str(blank))
    text = d / "notes.nii.gz"
    text.write_text("this is not an image")
    rows = [{"pair_id": "good0", "moving": good[0][0], "fixed": good[0][1]},
            {"pair_id": "good1", "moving": good[1][0], "fixed": good[1][1]},
            {"pair_id": "sizes", "moving": good[0][0], "fixed": str(small)},
            {"pair_id": "blank", "moving": str(blank), "fixed": good[0][1]},
            {"pair_id": "text", "moving": str(text), "fixed": good[0][1]},
            {"pair_id": "partner", "moving": good[0][0], "fixed": ""},
            {"pair_id": "../escape", "moving": good[0][0], "fixed": good[0][1]}]
    pd.DataFrame(rows).to_csv(d / "pairs.csv", index=False)
    return d / "pairs.csv"


def test_inference_reports_bad_pairs_and_processes_the_rest(trained, pair_folder, tmp_path):
    from monai.bundle import run

    out = tmp_path / "out"
    cfg = str(Path(__file__).resolve().parents[1] / "bundles" / "segreg" / "configs" / "inference.json")
    run("inference", config_file=cfg, bundle_root=str(trained), pairs=str(pair_folder), output_dir=str(out),
        progress_bar=False)
    df = pd.read_csv(out / "outputs.csv", keep_default_na=False).set_index("item")
    assert set(df.loc[["good0", "good1"], "status"]) <= {"ok", "low_confidence"}
    for pid in ("good0", "good1"):
        files = df.loc[pid, "outputs"].split(";")
        assert {Path(f).name for f in files} >= {"warped.nii.gz", "displacement_px.npy", "overlay.png"}
        warped = read_image_2d(out / pid / "warped.nii.gz")
        assert warped.shape == (256, 256) and np.isfinite(warped).all()
        disp = np.load(out / pid / "displacement_px.npy")
        assert disp.shape == (2, 256, 256)
        assert set(np.unique(nib.load(str(out / pid / "warped_labels.nii.gz")).get_fdata())) <= {0, 1, 2, 3}
    reasons = df["reason"].to_dict()
    assert df.loc["sizes", "status"] == "failed" and "small.nii.gz" in reasons["sizes"] and "128" in reasons["sizes"]
    assert df.loc["blank", "status"] == "failed" and "blank.nii.gz" in reasons["blank"] and "constant" in reasons["blank"]
    assert df.loc["text", "status"] == "failed" and "notes.nii.gz" in reasons["text"]
    assert df.loc["partner", "status"] == "failed" and "partner" in reasons["partner"]
    assert df.loc["../escape", "status"] == "failed" and "separator" in reasons["../escape"]
    assert not (tmp_path / "escape").exists()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))

    # a re-run skips finished pairs (their files are not rewritten) and lists the same outputs
    stamp = (out / "good0" / "warped.nii.gz").stat().st_mtime_ns
    run("inference", config_file=cfg, bundle_root=str(trained), pairs=str(pair_folder), output_dir=str(out),
        progress_bar=False)
    again = pd.read_csv(out / "outputs.csv", keep_default_na=False).set_index("item")
    assert (out / "good0" / "warped.nii.gz").stat().st_mtime_ns == stamp
    assert again.loc["good0", "outputs"] == df.loc["good0", "outputs"]


def test_inference_refuses_a_folder_in_use(trained, pair_folder, tmp_path):
    from pipeline.io.paths import OutputLockedError, output_lock
    from pipeline.registration.infer import run_inference

    out = tmp_path / "busy"
    models = trained / "models"
    with output_lock(out, what="segreg inference"):
        with pytest.raises(OutputLockedError, match="in use"):
            run_inference(out, str(models / "segmenter_dxa.pt"), str(models / "segmenter_xray.pt"),
                          str(models / "stage3.pt"), pairs=str(pair_folder), progress=False)
    assert not (out / "outputs.csv").exists()


def test_folder_pairs_match_by_name_and_list_missing_partners(tmp_path):
    from pipeline.registration.infer import pairs_from_inputs
    from pipeline.user_errors import UserInputError

    (tmp_path / "dxa").mkdir()
    (tmp_path / "xr").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "dxa" / name).write_bytes(b"x")
    (tmp_path / "xr" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "xr" / "c.nii.gz").write_bytes(b"x")
    items = {it["pair_id"]: it for it in pairs_from_inputs(moving_dir=str(tmp_path / "dxa"), fixed_dir=str(tmp_path / "xr"))}
    assert sorted(items) == ["a", "b", "c"] and items["a"]["problem"] == ""
    assert "no radiograph (fixed) partner" in items["b"]["problem"] and "no DXA (moving) partner" in items["c"]["problem"]
    with pytest.raises(UserInputError, match="exactly one input"):
        pairs_from_inputs(moving="a", pairs_csv="p.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("moving,other\na,b\n")
    with pytest.raises(UserInputError, match="missing column"):
        pairs_from_inputs(pairs_csv=str(bad))


def test_summary_json_records_roles(trained):
    meta = json.loads((trained / "eval" / "summary.json").read_text())
    assert meta["roles"]["labelled_dxa"] == 5 and meta["pairing"] == "both"


def test_label_map_checks_name_the_file(tmp_path):
    from pipeline.registration.data import load_crop

    empty = tmp_path / "empty_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.uint8), np.eye(4)), str(empty))
    with pytest.raises(ValueError, match="empty_labels.nii.gz.*empty"):
        load_crop(empty, 64, labels=True)
    odd = tmp_path / "odd_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.full((64, 64), 7, np.uint8), np.eye(4)), str(odd))
    with pytest.raises(ValueError, match="odd_labels.nii.gz.*outside the bone table"):
        load_crop(odd, 64, labels=True)
    ok = tmp_path / "ok_labels.nii.gz"
    arr = np.zeros((64, 64), np.uint8)
    arr[10:30, 5:40] = 1
    arr[35:60, 5:40] = 2
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(ok))
    lab = load_crop(ok, 32, labels=True)
    assert lab.shape == (1, 32, 32) and set(np.unique(lab)) == {0, 1, 2}  # nearest resampling keeps the values


def _without_timing(files: dict[str, bytes]) -> dict[str, object]:
    """The evaluation files with the measured seconds per pair left out (they differ between any two runs)."""
    import io

    out: dict[str, object] = {}
    for name, data in files.items():
        if name.endswith(".csv"):
            df = pd.read_csv(io.BytesIO(data))
            out[name] = df.drop(columns=[c for c in df.columns if c.startswith("seconds_per_pair")]).to_csv(index=False)
        elif name == "summary.json":
            meta = json.loads(data)
            for row in meta["summary"]:
                for k in [k for k in row if k.startswith("seconds_per_pair")]:
                    row.pop(k)
            out[name] = meta
        elif name == "report.md":  # the table's "s / pair" column (the 8th cell) masked
            out[name] = ["|".join(c if k != 8 else "" for k, c in enumerate(line.split("|")))
                         for line in data.decode().splitlines()]
        else:
            out[name] = data
    return out


def test_two_ranks_under_torchrun_write_what_one_process_writes(trained, cohort, tmp_path):
    """multi_gpu_evaluate.json (issue 16): 2 CPU processes (gloo) share the (method, batch of pairs) items (item k
    -> rank k % 2) and rank 0 writes every file: pairs.csv, summaries, report and overlays as one process, byte for
    byte bar the measured seconds per pair."""
    from dist_helpers import folder_files, run_one_and_two

    one, two = tmp_path / "one", tmp_path / "two"
    settings = {k: TINY_STAGES[k] for k in ("image_size", "batch_size", "n_overlays", "bspline")}
    _, r2 = run_one_and_two("evaluating", [CONFIGS / "evaluate.json", CONFIGS / "stages_demo.json"],
                            CONFIGS / "multi_gpu_evaluate.json", one, two, bundle_root=str(trained),
                            manifest=str(cohort), **settings)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks registered pairs
    a, b = folder_files(one), folder_files(two)
    assert sorted(a) == sorted(b) and "pairs.csv" in a and [f for f in a if f.startswith("overlays/")]
    assert _without_timing(a) == _without_timing(b)
    assert len(pd.read_csv(two / "pairs.csv")) == len(pd.read_csv(trained / "eval" / "pairs.csv"))

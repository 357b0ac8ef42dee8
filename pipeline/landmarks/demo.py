"""One command for the KNEEL demo: synthetic cohort -> global + local stage training (demo config) ->
evaluation on held-out subjects -> inference on a folder with deliberately bad inputs.

``python -m pipeline.landmarks.demo --out kneel_demo`` (about 10 minutes on 2 CPU cores: cohort ~3 min,
training ~4-5 min, evaluation and inference ~1-2 min). Outputs under ``--out``: ``cohort/`` (unless
``--cohort``), ``models/{global,local}/model.pt``, ``logs/``, ``eval/`` (``report.md``, ``metrics.json``,
``errors.csv``, ``examples/``), ``bad_inputs/`` + ``inference/`` (``landmarks.csv``, ``overlays/``,
``summary.json``) and ``demo_summary.json`` (timings and the headline numbers).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.bundle_paths import bundle_configs

CONFIGS = bundle_configs("kneel")


def _bad_inputs(folder: Path, test_image: str) -> None:
    """A test radiograph plus: pydicom's CT_small.dcm (not a knee), the same radiograph without pixel spacing,
    its left half only (one knee, ImageLaterality 'B'), and a file that is not DICOM. The two variants are
    the test file's own dataset with tags removed / pixels cropped (uncompressed, as the cohort writes it)."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_image, folder / "bilateral.dcm")
    ds = pydicom.dcmread(test_image)
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        if tag in ds:
            delattr(ds, tag)
    ds.save_as(folder / "no_spacing.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(test_image)
    half = np.ascontiguousarray(ds.pixel_array[:, : int(ds.Columns) // 2])
    ds.Columns = half.shape[1]
    ds.ImageLaterality = "B"
    ds.PixelData = half.tobytes()
    ds.save_as(folder / "one_knee_tagged_bilateral.dcm", enforce_file_format=True)
    ct = glob.glob(str(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"))
    if ct:  # never pydicom.data.get_testdata_files: it may try to download (hangs offline)
        shutil.copy(ct[0], folder / "CT_small.dcm")
    (folder / "not_a_dicom.dcm").write_bytes(b"this is not a DICOM file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.landmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (bundle_root of the demo models)")
    p.add_argument("--cohort", default=None, help="cohort folder (generated or resumed there; default OUT/cohort)")
    p.add_argument("--subjects", type=int, default=60, help="cohort subjects (default 60)")
    p.add_argument("--seed", type=int, default=11, help="cohort seed (default 11)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1: fastest on a "
                   "busy 2-core machine)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    from monai.bundle import run

    from pipeline.cohort.generate import CohortConfig, generate_cohort
    from pipeline.landmarks.infer import run_folder

    t = time.time()
    cohort = Path(a.cohort) if a.cohort else out / "cohort"
    cfg = CohortConfig(n_subjects=a.subjects, seed=a.seed, visits=(0, 48), write_mr=False, write_dxa=False)
    print(f"[kneel demo] 1/4 cohort: {a.subjects} subjects, visits 0/48, 0.3 mm radiographs -> {cohort}", flush=True)
    generate_cohort(cohort, cfg)
    manifest = cohort / "manifest.csv"
    times["cohort_s"] = time.time() - t

    train = [str(CONFIGS / "train.json"), str(CONFIGS / "train_demo.json")]
    for stage in ("global", "local"):
        print(f"[kneel demo] 2/4 training the {stage} stage (train.json + train_demo.json: 128 px canvases, width 12, "
              "30 epochs; the paper config uses 450 px, width 70, 100 epochs)", flush=True)
        t = time.time()
        run("training", config_file=train, logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(out),
            manifest=str(manifest), stage=stage, torch_threads=a.threads)
        times[f"train_{stage}_s"] = time.time() - t

    print("[kneel demo] 3/4 evaluation on the held-out test subjects (full DICOM -> global -> local path)", flush=True)
    t = time.time()
    run("evaluating", config_file=str(CONFIGS / "evaluate.json"), logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(out), manifest=str(manifest))
    times["evaluate_s"] = time.time() - t
    metrics = json.loads((out / "eval" / "metrics.json").read_text())

    print("[kneel demo] 4/4 inference on a folder with bad inputs -> inference/landmarks.csv + overlays", flush=True)
    t = time.time()
    from pipeline.landmarks.data import manifest_items, split_items

    test_image = split_items(manifest_items(manifest))["test"][0]["image"]
    _bad_inputs(out / "bad_inputs", test_image)
    df = run_folder(out / "bad_inputs", out / "inference", out / "models" / "global" / "model.pt",
                    out / "models" / "local" / "model.pt")
    times["inference_s"] = time.time() - t
    summary = {"times_s": times, "train_total_s": times["train_global_s"] + times["train_local_s"],
               "joint_centre": metrics["joint_centre"], "global_stage_centre": metrics["global_stage_centre"],
               "groups": metrics.get("groups"), "mris_roi_offset_mm": metrics["mris_roi_offset_mm"],
               "bad_inputs": df[["file", "side", "status", "confidence", "message"]].assign(
                   file=lambda d: d["file"].map(lambda f: Path(f).name)).to_dict(orient="records")}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("bad inputs:")
    for r in summary["bad_inputs"]:
        print(f"  {r['file']:32s} {r['side'] or '-':2s} {r['status']:15s} {r['message'][:150]}")
    print(f"timings (s): {json.dumps({k: round(v, 1) for k, v in times.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Radiographs per second: load -> bilateral 140 mm ROI crop -> normalise -> resize 256, two ways.

* ours: ``transforms`` dictionary transforms in a MONAI ``Compose`` (MetaTensors, affine tracking);
* reference: plain pydicom + numpy + scikit-image (``skimage.transform.resize``, order 1, anti-aliasing),
  the way the MRIS/KNEEL reference scripts do it (with padding added so both produce the same crops).

Both run in the same process on the same files; the ratio ours / reference is printed.

Usage::

    python benchmarks/bench_transforms.py                 # 20 synthetic 1000 x 860 DX files in a temp dir
    python benchmarks/bench_transforms.py --folder DIR    # every DICOM directly in DIR (centres at 1/4, 3/4)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # allow `python benchmarks/bench_transforms.py` from a checkout
    if str(_p) not in sys.path:  # (tests/ holds dicom_helpers, the small DX writer of the tests)
        sys.path.insert(0, str(_p))

SIZE = 256
ROUNDS = 3


def make_files(folder: Path, n: int, rows: int = 1000, cols: int = 860) -> list[Path]:
    from dicom_helpers import synthetic_knee_image, write_radiograph_dicom

    out = []
    for i in range(n):
        px = synthetic_knee_image(rows, cols, [(cols * 0.25, rows * 0.5), (cols * 0.75, rows * 0.5)], seed=i)
        out.append(Path(write_radiograph_dicom(folder / f"knee_{i:03d}.dcm", px, imager_spacing=(0.3, 0.3),
                                               photometric="MONOCHROME1" if i % 4 == 3 else "MONOCHROME2",
                                               bits_stored=12, slope=1.0, intercept=0.0)))
    return out


def centres_for(shape_rc) -> dict[str, tuple[float, float]]:
    h, w = shape_rc
    return {"R": (w * 0.25, h * 0.5), "L": (w * 0.75, h * 0.5)}


def reference_pipeline(path: Path, roi_mm: float = 140.0) -> dict[str, np.ndarray]:
    """pydicom + numpy + skimage implementation of the same steps."""
    import pydicom
    from skimage.transform import resize

    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = float((1 << int(ds.BitsStored)) - 1) - img
    img = img * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    sr, sc = (float(v) for v in (ds.get("ImagerPixelSpacing") or ds.PixelSpacing))
    n_r, n_c = int(np.floor(roi_mm / sr + 0.5)), int(np.floor(roi_mm / sc + 0.5))
    padded = np.pad(img, ((n_r, n_r), (n_c, n_c)), mode="constant")
    out = {}
    for side, (x, y) in centres_for(img.shape).items():
        r0 = int(np.floor(y + 0.5)) - n_r // 2 + n_r
        c0 = int(np.floor(x + 0.5)) - n_c // 2 + n_c
        crop = padded[r0 : r0 + n_r, c0 : c0 + n_c]
        if side == "R":
            crop = crop[:, ::-1]
        lo, p99 = crop.min(), np.percentile(crop, 99)
        crop = (crop - lo) * (0.99 / (p99 - lo)) if p99 > lo else np.zeros_like(crop)
        out[side] = resize(crop, (SIZE, SIZE), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    return out


def ours_pipeline():
    from monai.transforms import Compose, Resized

    from transforms import BilateralKneeROICropd, LoadKneeRadiographd, PercentileNormalized

    knees = ["image_R", "image_L"]
    return Compose(
        [
            LoadKneeRadiographd("image"),
            BilateralKneeROICropd("image", centres_key="centres", delete_keys=True),
            PercentileNormalized(knees),
            Resized(knees, (SIZE, SIZE), mode="area"),
        ]
    )


def shape_of(path: Path) -> tuple[int, int]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


def run(files: list[Path]) -> None:
    import torch

    pipe = ours_pipeline()
    items = [{"image": str(f), "centres": centres_for(shape_of(f))} for f in files]
    pipe(items[0])  # warm-up (imports, allocator)
    reference_pipeline(files[0])

    t_ours = t_ref = float("inf")
    for _ in range(ROUNDS):  # interleaved rounds, best of each (the machine may be shared / noisy)
        t0 = time.perf_counter()
        ours = [pipe(it) for it in items]
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        refs = [reference_pipeline(f) for f in files]
        t_ref = min(t_ref, time.perf_counter() - t0)

    diff = np.mean([np.abs(o[f"image_{s}"][0].numpy() - r[s]).mean() for o, r in zip(ours, refs) for s in "RL"])
    n = len(files)
    print(f"best of {ROUNDS} rounds; files: {n}  shape: {shape_of(files[0])}  torch threads: {torch.get_num_threads()}  cpus: {os.cpu_count()}")
    print(f"ours (transforms, MONAI Compose): {n / t_ours:7.2f} radiographs/s  ({t_ours:.2f} s)")
    print(f"reference (pydicom + skimage):    {n / t_ref:7.2f} radiographs/s  ({t_ref:.2f} s)")
    print(f"ratio ours / reference: {t_ref / t_ours:.2f}x")
    print(f"mean |ours - reference| per pixel (normalised units): {diff:.4f} (area vs anti-aliased bilinear)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=None, help="folder of DICOM radiographs (default: synthetic)")
    ap.add_argument("-n", type=int, default=20, help="number of synthetic files")
    args = ap.parse_args(argv)
    if args.folder is not None:
        from pipeline.io.dicom import list_radiographs

        run(list_radiographs(args.folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = make_files(Path(tmp), args.n)
        print(f"wrote {len(files)} synthetic DICOMs in {time.perf_counter() - t0:.1f} s")
        run(files)


if __name__ == "__main__":
    main()

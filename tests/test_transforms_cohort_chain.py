"""The cohort's radiographs through the full preprocessing chain: the crop is centred on the joint."""

from __future__ import annotations

import json

import numpy as np
from monai.transforms import Compose, Resized

from transforms import (
    BilateralKneeROICropd,
    LoadKneeRadiographd,
    PercentileNormalized,
    original_to_crop_points,
)


def test_cohort_chain_centres_the_joint(tmp_path):
    # radiographs at a realistic 0.3 mm (the ROI is 467 px, so one original pixel is 0.55 px at 256)
    from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort

    cfg = CohortConfig(n_subjects=2, seed=11, workers=1, **{**TINY, "xray_spacing_mm": 0.3, "visits": (0,),
                                                            "write_mr_dicom": False, "write_dxa": False})
    root = tmp_path
    m = generate_cohort(root, cfg, progress=False)
    keys = ["image_R", "image_L"]
    chain = Compose([
        LoadKneeRadiographd("image"),
        BilateralKneeROICropd("image", centres_key="centres", delete_keys=True),
        PercentileNormalized(keys, clip=True),
        Resized(keys, (256, 256), mode="area"),
    ])
    for path, rows in m.groupby("xray_dicom"):
        lm = {r.side: np.asarray(json.loads(r.landmarks)) for r in rows.itertuples()}
        out = chain({"image": str(root / path), "centres": {s: tuple(p[4]) for s, p in lm.items()}})
        for side in ("R", "L"):
            img = out[f"image_{side}"]
            assert tuple(img.shape) == (1, 256, 256)
            assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
            roi = img.meta["knee_roi"]
            assert roi["flipped"] == (side == "R")
            c = original_to_crop_points(lm[side][4:5], roi, out_size_rc=(256, 256))[0]
            assert np.abs(c - 127.5).max() <= 1.0, (side, c)
            # after the flip the permuted KNEEL indices run left -> right again in the crop
            pts = original_to_crop_points(lm[side], roi, out_size_rc=(256, 256), permute_landmarks=True)
            assert (np.diff(pts[:9, 0]) > 0).all() and (np.diff(pts[9:, 0]) > 0).all()
            # femoral landmarks above the tibial ones, all inside the 140 mm ROI
            assert pts[9:, 1].mean() < pts[:9, 1].mean() and ((pts > 0) & (pts < 256)).all()
            # bone (bright after loading) just below the tibial plateau vs. soft tissue at the ROI's side
            a = np.asarray(img[0])
            r = int(pts[4, 1]) + 20
            assert a[r, 118:138].mean() > a[r, 2:12].mean()

"""MR-visible progression markers and menisci of the synthetic cohort (pipeline.cohort.mr_markers)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.special import expit

from pipeline.cohort.anatomy import knee_at_visit
from pipeline.cohort.disease import PHENOTYPES, DiseaseParams
from pipeline.cohort.generate import MR_FAST, TINY, CohortConfig, generate_subject
from pipeline.cohort.mr import SIGNAL, MRGrid, dess_signal, label_volume, tissue_sdfs
from pipeline.cohort.mr_markers import (
    MARKER_COLUMNS,
    MARKER_MODELS,
    RATE_REF,
    KneeMarkers,
    draw_latents,
    knee_markers,
    marker_signal_values,
    sample_knee_markers,
)
from pipeline.cohort.subject import sample_subject
from pipeline.conventions import LABEL_FEMUR, LABEL_TIBIA

ROOT = Path(__file__).resolve().parents[1]


def _disease(rate: float, s0: float = 0.25, phenotype: str = "non") -> DiseaseParams:
    return DiseaseParams(s0=s0, rate=rate, phenotype=phenotype, osteophyte_propensity=1.0, lateral=False)


def _values(markers: list[KneeMarkers]) -> dict[str, float]:
    return {c: float(np.mean([m.row()[c] for m in markers])) for c in MARKER_COLUMNS}


def test_marker_means_increase_with_the_latent_rate_at_equal_severity():
    rng = np.random.default_rng(0)
    means = {}
    for phen, (_, (lo, hi)) in PHENOTYPES.items():
        ms = [knee_markers(_disease(float(rng.uniform(lo, hi)), 0.25, phen), 0, draw_latents(rng))
              for _ in range(3000)]
        means[phen] = _values(ms)
    for c in MARKER_COLUMNS:
        assert means["fast"][c] > means["slow"][c] > means["non"][c], (c, means)


def test_presence_odds_follow_the_documented_logistic_model():
    """P(score > 0) at fixed severity and rate = expit(a + b S + ln(OR) rate / RATE_REF), checked by counting."""
    rng = np.random.default_rng(1)
    lat = [draw_latents(rng) for _ in range(20000)]
    a, b, odds = MARKER_MODELS["bml"]
    for rate in (0.0, RATE_REF):
        present = np.mean([knee_markers(_disease(rate, 0.3), 0, x).bml_mm3 > 0 for x in lat])
        assert abs(present - expit(a + b * 0.3 + np.log(odds) * rate / RATE_REF)) < 0.015
    p0 = np.mean([knee_markers(_disease(0.0, 0.3), 0, x).meniscal_damage >= 1 for x in lat])
    p1 = np.mean([knee_markers(_disease(RATE_REF, 0.3), 0, x).meniscal_damage >= 1 for x in lat])
    emp_or = (p1 / (1 - p1)) / (p0 / (1 - p0))
    assert abs(emp_or / MARKER_MODELS["damage"][2] - 1.0) < 0.15


def test_same_seed_same_markers_and_markers_grow_over_visits():
    d = _disease(0.06, 0.3, "fast")
    a, b = sample_knee_markers(3, 5, 0, d, 0), sample_knee_markers(3, 5, 0, d, 0)
    assert a == b
    assert sample_knee_markers(3, 5, 1, d, 0) != a  # the other knee has its own stream
    later = sample_knee_markers(3, 5, 0, d, 48)
    for c in MARKER_COLUMNS:
        assert later.row()[c] >= a.row()[c]


@pytest.fixture(scope="module")
def knee():
    sub = sample_subject(2, 0)
    return knee_at_visit(sub.knees["L"], 0)


STRONG = KneeMarkers(bml_mm3=1500.0, effusion_ml=20.0, meniscal_extrusion_mm=4.0, meniscal_damage=3,
                     cartilage_signal_change=0.1)


def _image(kv, grid, markers, noise=0.0):
    sd = tissue_sdfs(kv, grid, markers)
    img = dess_signal(sd, grid.shape, grid.spacing, np.random.default_rng(0), noise=noise, bias=0.0,
                      values=marker_signal_values(sd, grid, kv, markers))
    return sd, label_volume(sd, grid.shape), img


@pytest.mark.parametrize("markers", [None, STRONG])
def test_menisci_sit_at_the_periphery_never_on_labelled_voxels_and_are_dark(knee, markers):
    grid = MRGrid.around_knee((1.0, 1.0, 0.5), (46.0, 40.0, 20.0))
    sd, lab, img = _image(knee, grid, markers)
    sl, inside = sd["meniscus"].inside()
    assert inside.sum() > 200
    assert not (lab[sl][inside] > 0).any()  # never overlaps bone or cartilage labels
    u = np.broadcast_to(grid.coords(sl)[0], inside.shape)[inside]
    assert (u < -10).any() and (u > 10).any()  # medial and lateral menisci
    assert np.abs(u).min() >= 5.0  # intercondylar gap
    core = sd["meniscus"].arr < -0.5  # away from partial-volume edges
    men = img[sl][core].mean()
    assert men < 0.3 < img[(lab == 2) | (lab == 4)].mean()


def test_medial_extrusion_moves_the_meniscus_beyond_the_rim(knee):
    grid = MRGrid.around_knee((0.5, 1.0, 0.5), (46.0, 30.0, 12.0))

    def medial_edge(e):
        sd = tissue_sdfs(knee, grid, replace(STRONG, meniscal_extrusion_mm=e, meniscal_damage=0))
        sl, inside = sd["meniscus"].inside()
        return float(np.broadcast_to(grid.coords(sl)[0], inside.shape)[inside].min())

    rim = -knee.spec.plateau_axes[0]
    e0, e4 = medial_edge(0.0), medial_edge(4.0)
    assert abs(e0 - rim) < 1.0 and abs((e0 - e4) - 4.0) < 1.0


@pytest.mark.parametrize("in_femur", [False, True])
def test_bml_brightens_subchondral_bone_only(knee, in_femur):
    grid = MRGrid.around_knee((1.0, 1.0, 1.0), (40.0, 36.0, 30.0))
    base = KneeMarkers(bml_in_femur=in_femur)
    _, lab, without = _image(knee, grid, base)
    _, _, with_bml = _image(knee, grid, replace(base, bml_mm3=1500.0))
    diff = with_bml - without
    assert diff.min() > -1e-5 and diff.max() > 0.2
    bone = LABEL_FEMUR if in_femur else LABEL_TIBIA
    peak = np.unravel_index(np.argmax(diff), diff.shape)
    assert lab[peak] == bone
    region = diff > 0.1
    assert (lab[region] == bone).mean() > 0.95
    w = np.broadcast_to(grid.w[None, None, :], diff.shape)[peak]
    assert (w > 0) if in_femur else (w < 0)  # subchondral: just above / below the joint line
    assert with_bml[region].mean() > without[region].mean() + 0.1


def test_effusion_and_cartilage_change_brighten_the_image(knee):
    grid = MRGrid.around_knee((1.0, 1.0, 1.0), (40.0, 45.0, 40.0))
    _, lab, small = _image(knee, grid, KneeMarkers(effusion_ml=2.0))
    _, _, large = _image(knee, grid, KneeMarkers(effusion_ml=30.0))
    fluid = SIGNAL["fluid"] - 0.1
    assert (large > fluid).sum() * 1.0 > (small > fluid).sum() + 10000  # > 10 mL more bright voxels (1 mm^3)
    _, _, csc = _image(knee, grid, KneeMarkers(cartilage_signal_change=0.1))
    _, _, plain = _image(knee, grid, KneeMarkers())
    cart = (lab == 2) | (lab == 4)
    diff = csc - plain
    assert diff[cart].max() > 0.04 and diff.min() > -1e-5
    assert np.abs(diff[(lab == 1) | (lab == 3)]).max() < 0.02  # only cartilage (plus blur at its border)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_markers_are_mr_only_and_fast_mode_keeps_the_radiographs(tmp_path):
    kw = {**TINY, "visits": (0, 24)}
    rows = {}
    for name, cfg in (("on", CohortConfig(n_subjects=1, seed=4, workers=1, **kw)),
                      ("off", CohortConfig(n_subjects=1, seed=4, workers=1, mr_markers=False, **kw)),
                      ("fast", CohortConfig(n_subjects=1, seed=4, workers=1, **{**kw, **MR_FAST}))):
        rows[name] = generate_subject(cfg, 0, tmp_path / name)
    for i, r in enumerate(rows["on"]):
        for other in ("off", "fast"):
            o = rows[other][i]
            for col in ("xray_dicom", "fc_map", "tc_map"):
                assert _sha(tmp_path / "on" / r[col]) == _sha(tmp_path / other / o[col]), (col, other)
            assert r["landmarks"] == o["landmarks"] and r["klg"] == o["klg"]
    on0, off0 = rows["on"][0], rows["off"][0]
    assert _sha(tmp_path / "on" / on0["dess_nifti"]) != _sha(tmp_path / "off" / off0["dess_nifti"])
    assert _sha(tmp_path / "on" / on0["labels_nifti"]) == _sha(tmp_path / "off" / off0["labels_nifti"])
    assert all(off0[c] == "" for c in MARKER_COLUMNS) and all(on0[c] != "" for c in MARKER_COLUMNS)


def test_fast_mode_grid_spacing_and_baseline_only_mr(tmp_path):
    cfg = CohortConfig(n_subjects=1, seed=6, workers=1, **{**TINY, **MR_FAST, "visits": (0, 24)})
    rows = generate_subject(cfg, 0, tmp_path)
    for r in rows:
        assert (r["dess_nifti"] != "") == (r["visit_month"] == 0) and r["dess_dicom_dir"] == ""
        assert (tmp_path / r["fc_map"]).exists()
    img = nib.load(tmp_path / rows[0]["dess_nifti"])
    assert img.shape == (160, 160, 64)
    assert np.allclose(img.header.get_zooms()[:3], (0.6, 0.6, 1.5), atol=1e-4)
    assert not list(tmp_path.rglob("dicom"))


def test_schema_documents_every_marker_column():
    cols = json.loads((ROOT / "data_manifests/knee_visit.schema.json").read_text())["columns"]
    for c in MARKER_COLUMNS:
        assert c in cols and "must not read" in cols[c]["description"]


def test_cli_mr_fast_sets_the_fast_grid_and_user_values_win():
    from pipeline.__main__ import _config, build_parser

    cfg = _config(build_parser().parse_args(["cohort", "--out", "x", "--mr-fast"]))
    assert cfg.mr_spacing_mm == MR_FAST["mr_spacing_mm"] and cfg.mr_visits == (0,) and not cfg.write_mr_dicom
    cfg = _config(build_parser().parse_args(["cohort", "--out", "x", "--mr-fast", "--mr-visits", "0,24",
                                             "--mr-spacing", "1.0", "--no-mr-markers"]))
    assert cfg.mr_spacing_mm == (1.0, 1.0, 1.0) and cfg.mr_visits == (0, 24) and not cfg.mr_markers
    with pytest.raises(ValueError, match="mr_visits"):
        CohortConfig(mr_visits=(24, 0))


def test_patch_values_on_matches_a_full_array_reference():
    from pipeline.cohort.mr import Patch

    rng = np.random.default_rng(0)
    full = np.full((12, 10, 8), 9.0, np.float32)
    p = Patch((slice(2, 7), slice(3, 9), slice(0, 5)), rng.normal(size=(5, 6, 5)).astype(np.float32))
    full[p.sl] = p.arr
    for sl in [(slice(0, 12), slice(0, 10), slice(0, 8)), (slice(5, 10), slice(1, 4), slice(4, 8)),
               (slice(8, 12), slice(0, 3), slice(6, 8))]:
        assert np.array_equal(p.values_on(sl, 9.0), full[sl])


def test_bml_half_axes_hold_the_recorded_volume():
    from pipeline.cohort.mr_markers import bml_half_axes

    a, b, c = bml_half_axes(1234.0)
    assert abs(4.0 / 3.0 * np.pi * a * b * c - 1234.0) < 1e-6 and abs(a / b - 1.3) < 1e-9 and abs(c / b - 0.7) < 1e-9

"""MR-visible risk markers of future progression, drawn from a knee's latent disease (MR ground truth).

In the disease model (:mod:`pipeline.cohort.disease`) a knee's future is its latent ``rate`` (severity
units per year); its baseline images otherwise show only the current severity ``S``. Real knees carry
MR-visible markers associated with later radiographic progression at equal baseline grade. Each marker
here is a monotone function of one latent logistic score

    score_m(t) = a_m + b_m * S(t) + ln(OR_m) * rate / RATE_REF + eps_m,   eps_m ~ Logistic(0, 1),

``eps_m`` drawn once per knee (so a marker only grows as ``S`` grows over visits). For any threshold on
the score, ``logit P(score_m > c) = a_m - c + b_m S + ln(OR_m) rate / RATE_REF``: at equal severity the
odds ratio between a knee at ``rate = RATE_REF`` (0.04 / year, about the mean rate of the cohort's slow +
fast progressors) and a knee at ``rate = 0`` is exactly ``OR_m`` for every dichotomisation of the marker
(presence, a grade, a size cut-off). ``OR_m`` is taken from published OA cohort studies of progressors
versus non-progressors; ``a_m`` and ``b_m`` (prevalence and its rise with severity) are rough.
The values were chosen from the literature before any model was trained and are not tuned to it.

Effect sizes (all approximate, from the literature as remembered; not verified here):

* Bone-marrow-lesion-like subchondral signal, ``OR = 3``: Felson et al. 2003 (Ann Intern Med; medial BMLs
  and medial radiographic progression over 15 months: odds ratio about 6 unadjusted, about 2-3 after
  adjustment for limb alignment); larger lesions carry more risk (Roemer et al., MOST / BOKS studies of
  BML size and cartilage loss). ``a = -1.2, b = 4``: present (score > 0) in about 23 % of healthy and
  about 70 % of severe (S = 0.5) non-progressing knees. Volume ``bml_mm3 = 400 exp(0.5 score)`` when
  present (capped at 8000 mm^3), a fuzzy ellipsoid (u : v : w = 1.3 : 1 : 0.7, the half-maximum region
  has that volume) in the subchondral marrow of the dominant compartment, under the contact point, in the
  tibia or (40 %) the femoral condyle; peak signal marrow + 0.35 (DESS marrow 0.42 -> 0.77).
* Effusion(-synovitis), ``OR = 2``: Roemer et al. 2009 (MOST; effusion / synovitis and later cartilage
  loss, odds ratios about 2); Atukorala et al. 2016 (OAI; effusion-synovitis before incident radiographic
  OA, of the same order). ``a = 0, b = 2``; ``effusion_ml = 3 exp(0.45 score)`` in [0.5, 60] mL, drawn
  as a fluid layer on the anterior femur (suprapatellar / patellofemoral recess).
* Medial meniscal extrusion, ``OR = 2``: Berthiaume et al. 2005 (Ann Rheum Dis; extrusion and cartilage
  volume loss), Emmanuel et al. 2016 (OAI; quantitative extrusion and incident radiographic OA), MOST
  meniscal studies (Englund, Roemer); ``>= 3 mm`` is the usual pathological cut-off (Costa et al. 2004).
  ``a = -0.5, b = 3``; ``meniscal_extrusion_mm = clip(1.2 + 0.8 score, 0, 8)`` beyond the plateau rim.
* Meniscal damage, ``OR = 2``: Hunter et al. 2006 (BOKS; meniscal damage / extrusion and cartilage loss),
  Englund et al. (MOST). ``a = -1, b = 4``; grade 0 (score < 0), 1 (linear intrameniscal signal: a bright
  cleft in the posterior horn of the medial meniscus), 2 and 3 (maceration: medial meniscus height x 0.8 /
  0.6 and signal raised from 0.08 to 0.14 / 0.18) at score 1.5 and 3.
* Cartilage signal change before thinning, ``OR = 2``: Liebl et al. 2015 (OAI; higher baseline cartilage
  T2 in knees with incident radiographic OA); Joseph et al. (OAI T2 / texture and progression). ``a =
  -1.5, b = 1``; ``cartilage_signal_change = 0.10 sigmoid(score)`` (fractional DESS signal increase, about
  2-5 %), applied as ``1 + change x g`` with a Gaussian blob ``g`` (half maximum at 9 x 12 x 8 mm, u x v x w)
  on the dominant compartment's load-bearing femoral and tibial cartilage.

The markers are drawn from their own random stream (``subject_rng(seed, index, 30 + side index)``), so a
cohort's radiographs, analytic thickness maps and every other draw are unchanged by them; only the MR
signal shows them. Manifest columns (``bml_mm3``, ``effusion_ml``, ``meniscal_extrusion_mm``,
``meniscal_damage``, ``cartilage_signal_change``) are ground truth: a model must not read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import KneeVisit
from .disease import DiseaseParams
from .mr import MENISCUS_HEIGHT_MM, MENISCUS_MACERATION, SIGNAL, MRGrid, Patch
from .subject import subject_rng

#: Reference rate contrast (severity units / year): OR_m is the odds ratio between rate RATE_REF and 0.
RATE_REF = 0.04
#: marker -> (a, b_severity, odds ratio per RATE_REF of rate); see the module docstring for the sources.
MARKER_MODELS: dict[str, tuple[float, float, float]] = {
    "bml": (-1.2, 4.0, 3.0),
    "effusion": (0.0, 2.0, 2.0),
    "extrusion": (-0.5, 3.0, 2.0),
    "damage": (-1.0, 4.0, 2.0),
    "cartilage": (-1.5, 1.0, 2.0),
}
MARKER_STREAM = 30  #: subject_rng stream of side index 0; side index i uses MARKER_STREAM + i
BML_AMPLITUDE = 0.35  #: peak DESS signal added to marrow at a BML centre
DAMAGE_THRESHOLDS = (0.0, 1.5, 3.0)  #: score cut-offs of meniscal damage grades 1, 2, 3
MENISCUS_DAMAGE_SIGNAL = (0.08, 0.08, 0.14, 0.18)  #: meniscus signal per damage grade
TEAR_SIGNAL = 0.6  #: signal of the grade >= 1 intrameniscal cleft
#: manifest columns (ground truth; see data_manifests/knee_visit.schema.json)
MARKER_COLUMNS = ("bml_mm3", "effusion_ml", "meniscal_extrusion_mm", "meniscal_damage", "cartilage_signal_change")


@dataclass(frozen=True)
class MarkerLatents:
    """Visit-independent draws of one knee: logistic noise per marker and the BML placement."""

    eps: dict  #: marker name -> Logistic(0, 1) draw
    bml_in_femur: bool  #: BML in the femoral condyle (else the tibial plateau)
    bml_offset_mm: tuple[float, float]  #: (u, v) offset of the BML centre from the contact point (mm)


@dataclass(frozen=True)
class KneeMarkers:
    """Marker values of one knee at one visit (ground truth; units in the field comments)."""

    bml_mm3: float = 0.0  #: nominal BML volume (half-maximum ellipsoid), mm^3; 0 = none
    bml_in_femur: bool = False
    bml_offset_mm: tuple[float, float] = (0.0, 0.0)
    effusion_ml: float = 0.0  #: extra fluid pouch volume, mL; 0 = none
    meniscal_extrusion_mm: float = 0.0  #: medial meniscus outer edge beyond the plateau rim, mm
    meniscal_damage: int = 0  #: 0 none, 1 intrameniscal signal (tear), 2-3 maceration
    cartilage_signal_change: float = 0.0  #: fractional DESS signal increase in the load-bearing zone
    lateral: bool = False  #: dominant compartment is lateral (from the disease)

    def row(self) -> dict:
        """Manifest columns (:data:`MARKER_COLUMNS`), rounded."""
        vals = (round(self.bml_mm3, 1), round(self.effusion_ml, 2), round(self.meniscal_extrusion_mm, 2),
                int(self.meniscal_damage), round(self.cartilage_signal_change, 4))
        return dict(zip(MARKER_COLUMNS, vals))


def draw_latents(rng: np.random.Generator) -> MarkerLatents:
    """Draw a knee's marker latents (7 draws in a fixed order)."""
    eps = {name: float(rng.logistic(0.0, 1.0)) for name in MARKER_MODELS}
    return MarkerLatents(eps, bool(rng.random() < 0.4), (float(rng.normal(0.0, 3.0)), float(rng.normal(0.0, 3.0))))


def marker_score(name: str, severity: float, rate: float, eps: float) -> float:
    """Latent score ``a + b S + ln(OR) rate / RATE_REF + eps`` of marker ``name`` (module docstring)."""
    a, b, odds = MARKER_MODELS[name]
    return float(a + b * severity + np.log(odds) * rate / RATE_REF + eps)


def knee_markers(disease: DiseaseParams, month: float, latents: MarkerLatents) -> KneeMarkers:
    """Marker values at ``month`` from the disease (severity at that month, rate) and the latents."""
    sev, rate = disease.severity(month), disease.rate
    sc = {n: marker_score(n, sev, rate, latents.eps[n]) for n in MARKER_MODELS}
    bml = float(min(400.0 * np.exp(0.5 * sc["bml"]), 8000.0)) if sc["bml"] > 0 else 0.0
    return KneeMarkers(
        bml_mm3=bml,
        bml_in_femur=latents.bml_in_femur,
        bml_offset_mm=latents.bml_offset_mm,
        effusion_ml=float(np.clip(3.0 * np.exp(0.45 * sc["effusion"]), 0.5, 60.0)),
        meniscal_extrusion_mm=float(np.clip(1.2 + 0.8 * sc["extrusion"], 0.0, 8.0)),
        meniscal_damage=int(np.searchsorted(np.asarray(DAMAGE_THRESHOLDS), sc["damage"], side="right")),
        cartilage_signal_change=float(0.10 / (1.0 + np.exp(-sc["cartilage"]))),
        lateral=disease.lateral,
    )


def sample_knee_markers(seed: int, index: int, side_index: int, disease: DiseaseParams, month: float) -> KneeMarkers:
    """The markers of knee ``side_index`` (0 = R, 1 = L) of subject ``index`` at ``month``, from the knee's
    own random stream (the same at every visit)."""
    return knee_markers(disease, month, draw_latents(subject_rng(seed, index, MARKER_STREAM + side_index)))


# ---------------------------------------------------------------------------------------------- imaging
def _blob(du, dv, dw, half: tuple[float, float, float]) -> np.ndarray:
    """Smooth blob exp(-ln 2 r^2), r normalised by the half-maximum semi-axes ``half`` (mm)."""
    r2 = (du / half[0]) ** 2 + (dv / half[1]) ** 2 + (dw / half[2]) ** 2
    return np.exp(-np.log(2.0) * r2).astype(np.float32)


def bml_half_axes(volume_mm3: float) -> tuple[float, float, float]:
    """Half-maximum semi-axes (u, v, w) in mm of a BML of ``volume_mm3`` (aspect 1.3 : 1 : 0.7)."""
    k = (volume_mm3 / (4.0 / 3.0 * np.pi * 1.3 * 1.0 * 0.7)) ** (1.0 / 3.0)
    return 1.3 * k, 1.0 * k, 0.7 * k


def _contact(kv: KneeVisit, k: int) -> tuple[float, float]:
    return ((-kv.spec.condyle_u[0], kv.spec.condyle_u[1])[k], kv.spec.condyle_v)


def marker_signal_values(sdfs: dict[str, Patch], grid: MRGrid, kv: KneeVisit,
                         markers: KneeMarkers | None) -> dict[str, np.ndarray]:
    """Per-tissue signal arrays (on each tissue's patch) for :func:`pipeline.cohort.mr.dess_signal`.

    * the BML: marrow of the chosen bone + ``BML_AMPLITUDE x`` blob, centred ``0.9 x`` its depth
      semi-axis below the subchondral surface under the dominant compartment's contact point;
    * cartilage: ``SIGNAL["cartilage"] x (1 + change x blob)`` at the dominant contact point;
    * meniscus: damage-grade signal, and for grade >= 1 a bright horizontal cleft (Gaussian profile,
      0.5 mm) at 35 % of the rim height in the posterior horn of the medial meniscus.
    Returns ``{}`` for ``markers=None``.
    """
    if markers is None:
        return {}
    out: dict[str, np.ndarray] = {}
    k = 1 if markers.lateral else 0
    uc, vc = _contact(kv, k)
    if markers.bml_mm3 > 0:
        half = bml_half_axes(markers.bml_mm3)
        du0, dv0 = markers.bml_offset_mm
        if markers.bml_in_femur:
            name = "femur_marrow"
            cond = kv.condyles[k]
            cu, cv, cw = cond.surface_point(np.deg2rad(5.0), 0.0, offset=-(1.2 + 0.9 * half[2]))
            p = sdfs[name]
            u, v, w = grid.coords(p.sl)
            lu, lv, lw = kv.femur_pose.to_local(u, v, w)
            g = _blob(lu - cu - du0, lv - cv - dv0, lw - cw, half)
        else:
            name = "tibia_marrow"
            p = sdfs[name]
            u, v, w = grid.coords(p.sl)
            delta, b = kv.tc_plane_coords(u, v, w)
            g = _blob(u - uc - du0, b - vc - dv0, delta + 1.0 + 0.9 * half[2], half)
        out[name] = SIGNAL["marrow"] + BML_AMPLITUDE * g
    if markers.cartilage_signal_change > 0:
        p = sdfs["cartilage"]
        u, v, w = grid.coords(p.sl)
        g = _blob(u - uc, v - vc, w - 0.5 * kv.contact_jsw_mm[k], (9.0, 12.0, 8.0))
        out["cartilage"] = SIGNAL["cartilage"] * (1.0 + markers.cartilage_signal_change * g)
    if "meniscus" in sdfs and markers.meniscal_damage > 0:
        p = sdfs["meniscus"]
        val = np.full(p.arr.shape, MENISCUS_DAMAGE_SIGNAL[markers.meniscal_damage], np.float32)
        u, v, w = grid.coords(p.sl)
        delta, b = kv.tc_plane_coords(u, v, w)
        hc = 0.35 * MENISCUS_HEIGHT_MM * kv.spec.scale * MENISCUS_MACERATION[markers.meniscal_damage]
        cleft = np.exp(-0.5 * ((delta - hc) / 0.5) ** 2) * (u < 0) * (b > kv.spec.condyle_v + 4.0)
        out["meniscus"] = (val + (TEAR_SIGNAL - val) * cleft).astype(np.float32)
    return out

"""Longitudinal disease model and the explicit Kellgren-Lawrence rule of the synthetic cohort.

Each knee has a latent severity ``S(t) = S0 + rate * t_years`` (non-decreasing). Severity drives

* load-bearing cartilage loss: the thinning at the centre of the medial (or, for a minority of knees,
  lateral) load-bearing zone is ``S * healthy thickness`` there, so ``S`` is about the fraction of the
  compartment's joint space that is lost;
* osteophyte size (mm) ``= 12 * propensity * max(0, S - 0.05)`` at the joint margins.

KLG is derived from two semi-quantitative grades, both computed from the anatomy (not from images):

* JSN grade from the narrowing fraction ``1 - JSW / JSW_healthy`` of the narrower compartment, where
  JSW is femoral + tibial cartilage thickness at the contact point: ``< 0.15 -> 0``, ``< 0.35 -> 1``,
  ``< 0.70 -> 2``, else ``3``.
* Osteophyte grade from the largest osteophyte: ``< 1 mm -> 0``, ``< 2.5 mm -> 1``, ``< 4.5 mm -> 2``,
  else ``3``.

The rule (:func:`klg_rule`), following the KL definitions (1 doubtful, 2 definite osteophytes, 3 definite
narrowing, 4 severe narrowing): KLG 4 if JSN grade 3; KLG 3 if JSN grade 2; KLG 2 if osteophyte grade >= 2;
KLG 1 if osteophyte grade 1 or JSN grade 1; else KLG 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JSN_THRESHOLDS = (0.15, 0.35, 0.70)
OSTEOPHYTE_THRESHOLDS_MM = (1.0, 2.5, 4.5)
OSTEOPHYTE_SCALE_MM = 12.0

# Progression phenotypes: (probability, rate range in severity units per year).
PHENOTYPES = {
    "non": (0.72, (0.0, 0.006)),
    "slow": (0.19, (0.012, 0.035)),
    "fast": (0.09, (0.05, 0.11)),
}
# Baseline severity mixture: (probability, range).
BASELINE_SEVERITY = ((0.40, (0.0, 0.09)), (0.20, (0.12, 0.24)), (0.23, (0.26, 0.34)), (0.13, (0.36, 0.68)),
                     (0.04, (0.71, 0.9)))


@dataclass(frozen=True)
class DiseaseParams:
    """Per-knee disease parameters."""

    s0: float  #: baseline severity
    rate: float  #: severity increase per year
    phenotype: str  #: "non", "slow" or "fast"
    osteophyte_propensity: float  #: multiplies osteophyte growth
    lateral: bool  #: lateral-dominant disease (minority); else medial

    def severity(self, month: float) -> float:
        return float(self.s0 + self.rate * month / 12.0)

    def osteophyte_mm(self, month: float) -> float:
        return float(OSTEOPHYTE_SCALE_MM * self.osteophyte_propensity * max(0.0, self.severity(month) - 0.05))


def sample_disease(rng: np.random.Generator, subject_risk: float) -> DiseaseParams:
    """Draw a knee's disease parameters. ``subject_risk`` (0..1) correlates the two knees of a subject."""
    probs = np.array([p for p, _ in BASELINE_SEVERITY])
    # Higher subject risk shifts mass towards worse baseline states.
    probs = probs * np.exp(np.linspace(0, 2.0, len(probs)) * (subject_risk - 0.5))
    probs = probs / probs.sum()
    lo, hi = BASELINE_SEVERITY[rng.choice(len(probs), p=probs)][1]
    s0 = float(rng.uniform(lo, hi))
    names = list(PHENOTYPES)
    pp = np.array([PHENOTYPES[n][0] for n in names]) * np.exp(np.array([0.0, 0.8, 1.4]) * (subject_risk - 0.5))
    phen = names[rng.choice(len(names), p=pp / pp.sum())]
    r_lo, r_hi = PHENOTYPES[phen][1]
    return DiseaseParams(
        s0=s0,
        rate=float(rng.uniform(r_lo, r_hi)),
        phenotype=phen,
        osteophyte_propensity=float(rng.uniform(0.6, 1.4)),
        lateral=bool(rng.random() < 0.12),
    )


def _grade(value: float, thresholds: tuple[float, ...]) -> int:
    return int(np.searchsorted(np.asarray(thresholds), value, side="right"))


def jsn_grade(narrowing_fraction: float) -> int:
    """OARSI-like joint-space-narrowing grade 0-3 from ``1 - JSW / JSW_healthy``."""
    return _grade(narrowing_fraction, JSN_THRESHOLDS)


def osteophyte_grade(size_mm: float) -> int:
    """Osteophyte grade 0-3 from the largest osteophyte size in mm."""
    return _grade(size_mm, OSTEOPHYTE_THRESHOLDS_MM)


def klg_rule(jsn: int, ost: int) -> int:
    """Kellgren-Lawrence grade from JSN grade and osteophyte grade (see module docstring)."""
    if jsn >= 3:
        return 4
    if jsn == 2:
        return 3
    if ost >= 2:
        return 2
    if ost == 1 or jsn == 1:
        return 1
    return 0


def progression_labels(klg_by_month: dict[int, int]) -> tuple[int, int]:
    """Progression labels from the latent KLG at the protocol months (every month, observed or not).

    Returns ``(progression_72m, progression_3class)``:

    * ``progression_72m``: 1 if KLG at any month in (0, 72] exceeds baseline KLG, else 0 (the MRIS label).
    * ``progression_3class`` (Panfilov et al.): 0 no increase within 96 months, 1 fast (increase by 36
      months), 2 slow (first increase at 48-96 months); an increase from KLG 0 to 1 is not progression;
      ``-1`` (not applicable) when baseline KLG is 4.
    """
    base = klg_by_month[0]
    months = sorted(m for m in klg_by_month if m > 0)
    prog72 = int(any(klg_by_month[m] > base for m in months if m <= 72))
    if base >= 4:
        return prog72, -1
    first = None
    for m in months:
        k = klg_by_month[m]
        if k > base and not (base == 0 and k == 1):
            first = m
            break
    if first is None or first > 96:
        return prog72, 0
    return prog72, 1 if first <= 36 else 2

"""Subject-level sampling: demographics, both knees (mirror-consistent bones), visit schedule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.conventions import SIDES, VISITS

from .anatomy import KneeSpec, sample_knee_spec
from .disease import sample_disease

SITES = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class Subject:
    subject_id: str
    index: int
    age: float
    sex: str
    bmi: float
    site: str
    knees: dict[str, KneeSpec]  #: side -> spec
    visits: tuple[int, ...]  #: months with an examination (baseline always present)
    knee_distance_mm: float  #: distance between the two knee centres in the radiograph
    baseline_date: str  #: YYYYMMDD


def subject_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, subject, purpose): parallel-safe."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def sample_subject(seed: int, index: int, visits=VISITS, missing_rate: float = 0.15) -> Subject:
    """Draw one subject. Bones of the two knees share the same shape parameters (mirror images);
    cartilage, disease and positioning differ per knee."""
    rng = subject_rng(seed, index, 0)
    sex = "F" if rng.random() < 0.58 else "M"
    age = float(np.round(rng.uniform(45, 79), 1))
    bmi = float(np.round(np.clip(rng.normal(28.5, 4.5), 18.5, 45.0), 1))
    scale = float(rng.normal(1.07 if sex == "M" else 0.95, 0.035))
    # Cartilage thickness scales with joint size (larger bones carry thicker cartilage), plus a residual.
    thick = float(scale**1.5 * rng.normal(1.0, 0.04))
    risk = float(np.clip((age - 45) / 34 * 0.5 + (bmi - 22) / 20 * 0.5 + rng.normal(0, 0.15), 0, 1))
    varus = float(np.deg2rad(rng.normal(1.0, 1.5)))
    knees = {}
    shape_seed = rng.integers(0, 2**31)
    for si, side in enumerate(SIDES):
        shape_rng = np.random.default_rng(shape_seed)  # identical bones for both knees
        tissue_rng = subject_rng(seed, index, 1 + si)
        disease = sample_disease(tissue_rng, risk)
        knees[side] = sample_knee_spec(shape_rng, tissue_rng, scale, bmi, disease, thick, varus)
    vis = [int(visits[0])] + [int(m) for m in visits[1:] if rng.random() >= missing_rate]
    year = 2004 + int(rng.integers(0, 3))
    day = int(rng.integers(1, 28))
    month = int(rng.integers(1, 13))
    return Subject(
        subject_id=f"9{seed % 100:02d}{index:04d}",
        index=index, age=age, sex=sex, bmi=bmi, site=SITES[int(rng.integers(len(SITES)))],
        knees=knees, visits=tuple(vis), knee_distance_mm=float(rng.normal(185.0, 10.0) * scale),
        baseline_date=f"{year:04d}{month:02d}{day:02d}",
    )


def visit_date(baseline: str, months: int) -> str:
    """Calendar date (YYYYMMDD) ``months`` after ``baseline`` (same day of month, day <= 28)."""
    y, m, d = int(baseline[:4]), int(baseline[4:6]), int(baseline[6:])
    total = (m - 1) + int(months)
    return f"{y + total // 12:04d}{total % 12 + 1:02d}{d:02d}"

"""Voxel local thickness on analytic shapes with anisotropic spacing (OAI-like 0.36 x 0.36 x 0.7 mm)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.thickness import half_voxel_extent, local_thickness
from pipeline.thickness.phantoms import cylindrical_shell, oblique_plate, spherical_shell

SPACING = (0.36, 0.36, 0.7)


def _plate(axis: int, n: int, shape=(24, 24, 24), start: int = 7) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    sl = [slice(None)] * 3
    sl[axis] = slice(start, start + n)
    mask[tuple(sl)] = True
    return mask


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_axis_plate_is_n_times_spacing(axis: int, n: int) -> None:
    mask = _plate(axis, n)
    thick = local_thickness(mask, SPACING)
    expected = n * SPACING[axis]
    values = thick[mask]
    assert values.dtype == np.float32
    assert np.all(np.abs(values - expected) < 0.5 * SPACING[axis])
    assert abs(float(np.median(values)) - expected) < 1e-5  # exact, for odd and even n alike
    assert np.all(np.isnan(thick[~mask]))


def test_plate_rim_inside_the_volume() -> None:
    # The axis plates above cross the volume border laterally without any rim effect (the border is not a
    # surface); a plate whose rim lies inside the volume is thinner at the rim corners only.
    rimmed = np.zeros((30, 30, 12), dtype=bool)
    rimmed[5:25, 5:25, 3:9] = True
    thick = local_thickness(rimmed, SPACING)
    assert abs(float(np.median(thick[rimmed])) - 6 * 0.7) < 1e-5
    assert thick[rimmed].min() < 6 * 0.7 - 0.35


@pytest.mark.parametrize("base_axis", [0, 2])
@pytest.mark.parametrize("tilt_deg", [20.0, 30.0])
def test_oblique_plate(base_axis: int, tilt_deg: float) -> None:
    a = np.radians(tilt_deg)
    normal = np.zeros(3)
    others = [x for x in range(3) if x != base_axis]
    normal[base_axis] = np.cos(a)
    normal[others[0]] = np.sin(a) * np.cos(np.radians(30.0))
    normal[others[1]] = np.sin(a) * np.sin(np.radians(30.0))
    t_mm = 2.5
    mask = oblique_plate((56, 56, 32), SPACING, normal, t_mm)
    values = local_thickness(mask, SPACING)[mask]
    half_voxel = float(half_voxel_extent(normal.reshape(3, 1), np.asarray(SPACING))[0])  # along the normal
    assert abs(float(np.median(values)) - t_mm) < half_voxel
    assert np.percentile(np.abs(values - t_mm), 75) < 2 * half_voxel


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cylindrical_shell(axis: int) -> None:
    r1, r2 = 8.0, 10.5
    shape = [64, 64, 34]
    shape[axis] = 10
    mask = cylindrical_shell(tuple(shape), SPACING, axis, r1, r2)
    values = local_thickness(mask, SPACING)[mask]
    assert abs(float(np.median(values)) - (r2 - r1)) < 0.5 * min(SPACING)
    assert np.percentile(np.abs(values - (r2 - r1)), 90) < max(SPACING)


def test_spherical_shell() -> None:
    r1, r2 = 8.0, 10.5
    mask = spherical_shell((64, 64, 34), SPACING, r1, r2)
    values = local_thickness(mask, SPACING)[mask]
    assert abs(float(np.median(values)) - (r2 - r1)) < 0.5 * min(SPACING)
    assert np.percentile(np.abs(values - (r2 - r1)), 90) < max(SPACING)


def test_thickness_tracks_varying_layers() -> None:
    # Two plates of different thickness in one mask keep their own values.
    mask = np.zeros((40, 20, 20), dtype=bool)
    mask[2:5, :, :] = True  # 3 voxels along i -> 1.08 mm
    mask[20:28, :, :] = True  # 8 voxels -> 2.88 mm
    thick = local_thickness(mask, SPACING)
    assert np.allclose(thick[2:5], 3 * 0.36, atol=1e-5)
    assert np.allclose(thick[20:28], 8 * 0.36, atol=1e-5)

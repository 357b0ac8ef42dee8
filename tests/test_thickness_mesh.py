"""Marching-cubes closest-point baseline: agreement with the voxel method on simple layers."""

from __future__ import annotations

import numpy as np

from pipeline.thickness import local_thickness, mesh_thickness

SPACING = (0.36, 0.36, 0.7)


def test_mesh_matches_voxel_on_plate() -> None:
    mask = np.zeros((60, 60, 16), dtype=bool)
    mask[5:55, 5:55, 5:10] = True  # 5 slices of 0.7 mm = 3.5 mm
    res = mesh_thickness(mask, SPACING)
    vox = local_thickness(mask, SPACING)
    assert res.vertices.shape[1] == 3 and res.thickness.shape == (len(res.vertices),)
    mesh_med = float(np.nanmedian(res.thickness))
    assert abs(mesh_med - 3.5) < 0.1
    assert abs(mesh_med - float(np.median(vox[mask]))) < 0.7  # within one voxel of the voxel method


def test_mesh_inner_mask_split() -> None:
    mask = np.zeros((90, 90, 20), dtype=bool)
    mask[5:85, 5:85, 8:12] = True  # 4 slices = 2.8 mm; "bone" below; wide, so rims stay a minority
    bone = np.zeros_like(mask)
    bone[:, :, :9] = True  # bone dilated by one voxel so that it holds the cartilage-bone interface
    res = mesh_thickness(mask, SPACING, inner_mask=bone)
    inner = ~np.isnan(res.thickness)
    assert inner.any() and (~inner).any()
    assert abs(float(np.median(res.thickness[inner])) - 2.8) < 0.05


def test_mesh_empty() -> None:
    res = mesh_thickness(np.zeros((5, 5, 5), dtype=bool), SPACING)
    assert res.vertices.shape == (0, 3) and res.thickness.size == 0

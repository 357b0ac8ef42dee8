"""Orientation independence, probability input, empty masks and argument checks of local_thickness."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.thickness import local_thickness
from pipeline.thickness.phantoms import oblique_plate, spherical_shell

SPACING = np.array([0.36, 0.36, 0.7])


@pytest.fixture(scope="module")
def blob() -> np.ndarray:
    """An irregular curved layer: an off-centre spherical shell cut by an oblique slab."""
    shape = (48, 56, 28)
    shell = spherical_shell(shape, SPACING, 6.0, 8.3, centre=(8.5, 9.0, 8.0))
    return shell & oblique_plate(shape, SPACING, (0.3, 0.5, 0.8), 12.0, centre=(8.0, 10.0, 9.0))


@pytest.fixture(scope="module")
def blob_thickness(blob: np.ndarray) -> np.ndarray:
    return local_thickness(blob, SPACING)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_gives_flipped_thickness(blob: np.ndarray, blob_thickness: np.ndarray, axis: int) -> None:
    flipped = np.ascontiguousarray(np.flip(blob, axis=axis))
    got = local_thickness(flipped, SPACING)
    want = np.flip(blob_thickness, axis=axis)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[flipped], want[flipped], atol=1e-5)


@pytest.mark.parametrize("perm", [(2, 0, 1), (1, 0, 2), (0, 2, 1)])
def test_transpose_gives_transposed_thickness(blob: np.ndarray, blob_thickness: np.ndarray, perm) -> None:
    moved = np.ascontiguousarray(blob.transpose(perm))
    got = local_thickness(moved, SPACING[list(perm)])
    want = blob_thickness.transpose(perm)
    np.testing.assert_allclose(got[moved], want[moved], atol=1e-5)


def test_result_varies_on_the_blob(blob: np.ndarray, blob_thickness: np.ndarray) -> None:
    # guards the orientation tests against a trivially constant answer
    values = blob_thickness[blob]
    assert values.max() - values.min() > 0.5
    assert 1.0 < float(np.median(values)) < 3.5


def test_probability_map_matches_binary(blob: np.ndarray, blob_thickness: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    prob = np.where(blob, rng.uniform(0.5, 1.0, blob.shape), rng.uniform(0.0, 0.4999, blob.shape))
    got = local_thickness(prob.astype(np.float32), SPACING)
    np.testing.assert_array_equal(np.isnan(got), ~blob)
    np.testing.assert_allclose(got[blob], blob_thickness[blob], atol=1e-6)
    # a stricter threshold removes voxels, hence changes the answer
    assert np.count_nonzero(~np.isnan(local_thickness(prob, SPACING, threshold=0.8))) < blob.sum()


def test_label_volume_and_outside_value(blob: np.ndarray, blob_thickness: np.ndarray) -> None:
    labels = np.where(blob, 2, 0).astype(np.uint8)
    got = local_thickness(labels, SPACING, outside=0.0)
    assert np.all(got[~blob] == 0.0)
    np.testing.assert_allclose(got[blob], blob_thickness[blob], atol=1e-6)


def test_empty_mask() -> None:
    thick = local_thickness(np.zeros((8, 9, 10), dtype=bool), SPACING)
    assert thick.shape == (8, 9, 10) and thick.dtype == np.float32
    assert np.all(np.isnan(thick))
    assert np.all(local_thickness(np.zeros((4, 4, 4)), SPACING, outside=0.0) == 0.0)


def test_single_voxel_and_full_volume() -> None:
    one = np.zeros((5, 5, 5), dtype=bool)
    one[2, 2, 2] = True
    thick = local_thickness(one, SPACING)
    assert abs(float(thick[2, 2, 2]) - 0.36) < 0.18  # about one thin voxel
    assert np.count_nonzero(~np.isnan(thick)) == 1
    with pytest.raises(ValueError, match="no background"):  # no surface anywhere: undefined
        local_thickness(np.ones((6, 6, 6), dtype=bool), SPACING)


@pytest.mark.parametrize("spacing", [(0.36, 0.36), (0.36, -0.36, 0.7), (0.0, 1.0, 1.0)])
def test_bad_spacing(spacing) -> None:
    with pytest.raises(ValueError):
        local_thickness(np.ones((3, 3, 3), dtype=bool), spacing)


def test_bad_ndim() -> None:
    with pytest.raises(ValueError):
        local_thickness(np.ones((3, 3), dtype=bool), (1.0, 1.0, 1.0))

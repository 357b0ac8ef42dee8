"""Baseline thickness from a surface mesh (closest-point distance), for speed/accuracy comparison only.

This is the straightforward pipeline the reference implementation follows, kept deliberately simple:

1. ``skimage.measure.marching_cubes`` at level 0.5 on the (zero-padded) mask with the voxel spacing:
   vertices in mm, axis order ``(i, j, k)``, outward/inward normals from the volume gradient.
2. Opposite-side search with ``scipy.spatial.cKDTree``:

   * symmetric (default): the thickness at a vertex is the distance to the closest vertex whose normal
     points the opposite way (``dot(n_a, n_b) < 0``), i.e. a vertex of the other surface of the layer;
     candidates are taken from growing k-nearest-neighbour lists (8, 32, 128, 512); vertices without an
     opposite vertex among them get NaN;
   * with ``inner_mask`` (e.g. a dilated bone mask): vertices inside it form the inner (bone-side)
     surface, the others the outer one; thickness at each inner vertex = distance to the closest outer
     vertex; outer vertices get NaN.

No smoothing and no component filtering: the point is the comparison, not a production method.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from ._common import DEFAULT_THRESHOLD, as_binary_mask, check_spacing

__all__ = ["MeshThickness", "mesh_thickness"]

_K_STEPS = (8, 32, 128, 512)


class MeshThickness(NamedTuple):
    """Per-vertex result of :func:`mesh_thickness`.

    ``vertices`` ``(V, 3)`` in mm (axis order ``(i, j, k)``, origin at voxel ``(0, 0, 0)``'s centre),
    ``normals`` ``(V, 3)`` unit vectors, ``faces`` ``(F, 3)`` vertex indices, ``thickness`` ``(V,)`` in mm
    (NaN where no opposite vertex was found or, with ``inner_mask``, at outer vertices).
    """

    vertices: np.ndarray
    normals: np.ndarray
    faces: np.ndarray
    thickness: np.ndarray


def _opposite_closest(vertices: np.ndarray, normals: np.ndarray, workers: int) -> np.ndarray:
    tree = cKDTree(vertices)
    result = np.full(len(vertices), np.nan)
    todo = np.arange(len(vertices))
    for k in _K_STEPS:
        k_eff = min(k, len(vertices))
        dist, idx = tree.query(vertices[todo], k=k_eff, workers=workers)
        dist = dist.reshape(len(todo), k_eff)
        idx = idx.reshape(len(todo), k_eff)
        opposite = np.einsum("vd,vkd->vk", normals[todo], normals[idx]) < 0.0
        found = opposite.any(axis=1)
        first = np.argmax(opposite, axis=1)  # neighbours come sorted by distance
        result[todo[found]] = dist[found, first[found]]
        todo = todo[~found]
        if todo.size == 0 or k_eff == len(vertices):
            break
    return result


def mesh_thickness(mask: np.ndarray, spacing: Sequence[float], *, inner_mask: Optional[np.ndarray] = None,
                   threshold: float = DEFAULT_THRESHOLD, workers: int = -1) -> MeshThickness:
    """Per-vertex thickness (mm) of a 3D mask's marching-cubes surface; see the module docstring.

    ``mask``: 3D ``(i, j, k)`` binary/label/probability array (as in :func:`local_thickness`);
    ``spacing``: ``(s_i, s_j, s_k)`` mm; ``inner_mask``: optional boolean array of the same shape marking
    the inner (bone) side; ``workers``: threads for the k-d tree queries (-1 = all cores).
    An empty mask gives empty arrays.
    """
    m = as_binary_mask(mask, threshold)
    sp = check_spacing(spacing)
    if not m.any():
        return MeshThickness(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), np.zeros(0))
    padded = np.pad(m, 1).astype(np.float32)
    verts, faces, normals, _ = marching_cubes(padded, level=0.5, spacing=tuple(sp))
    verts = verts - sp  # undo the one-voxel pad: coordinates relative to voxel (0, 0, 0)
    normals = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    if inner_mask is None:
        thick = _opposite_closest(verts, normals, workers)
    else:
        inner = np.asarray(inner_mask, dtype=bool)
        if inner.shape != m.shape:
            raise ValueError(f"inner_mask shape {inner.shape} != mask shape {m.shape}")
        vox = np.clip(np.rint(verts / sp).astype(np.int64), 0, np.array(m.shape) - 1)
        is_inner = inner[vox[:, 0], vox[:, 1], vox[:, 2]]
        thick = np.full(len(verts), np.nan)
        if is_inner.any() and (~is_inner).any():
            dist, _ = cKDTree(verts[~is_inner]).query(verts[is_inner], k=1, workers=workers)
            thick[is_inner] = dist
    return MeshThickness(verts, normals, faces, thick)

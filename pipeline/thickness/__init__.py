"""Cartilage thickness from 3D masks (mm, native voxel space).

Public API
----------
* :func:`local_thickness` -- voxel local thickness (largest inscribed ball, half-voxel corrected);
  the method used by the pipeline.
* :func:`mesh_thickness` / :class:`MeshThickness` -- marching-cubes closest-point baseline (comparison only).
* :func:`half_voxel_extent` -- the boundary offset used by the half-voxel correction.
* :mod:`pipeline.thickness.phantoms` -- analytic shapes with known thickness (tests, benchmark).

Axis order is the array's ``(i, j, k)``; spacing ``(s_i, s_j, s_k)`` in mm. See ``docs/thickness.md``.
"""

from .mesh_reference import MeshThickness, mesh_thickness
from .voxel import half_voxel_extent, local_thickness

__all__ = ["local_thickness", "half_voxel_extent", "mesh_thickness", "MeshThickness"]

"""Metrics shared by the map-synthesis methods (MRIS, direct synthesis, the comparison): thickness-map
synthesis error (median / MAD of ``|synth - truth|`` in mm inside the footprint) and its example figure.
Method-specific metrics live with their method (``pipeline.mris.metrics``: retrieval recall@k;
``pipeline.landmarks.metrics``, ``pipeline.segmentation.metrics``, ``pipeline.downstream.metrics``)."""

from pipeline.metrics.synthesis import (
    median_abs_deviation,
    per_map_errors,
    synthesis_error_report,
    synthesis_error_table,
)

__all__ = [
    "median_abs_deviation",
    "per_map_errors",
    "synthesis_error_report",
    "synthesis_error_table",
]

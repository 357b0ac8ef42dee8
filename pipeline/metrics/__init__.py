"""Metrics: retrieval recall@k and thickness-map synthesis error (MRIS)."""

from pipeline.metrics.retrieval import DEFAULT_KS, recall_at_k, target_ranks
from pipeline.metrics.synthesis import (
    median_abs_deviation,
    per_map_errors,
    synthesis_error_report,
    synthesis_error_table,
)

__all__ = [
    "DEFAULT_KS",
    "median_abs_deviation",
    "per_map_errors",
    "recall_at_k",
    "synthesis_error_report",
    "synthesis_error_table",
    "target_ranks",
]

"""Retrieval: k-NN synthesis of thickness maps and the on-disk embedding database (MRIS)."""

from pipeline.retrieval.database import (
    COMBINED_KEY,
    FORMAT_VERSION,
    CheckpointMismatchError,
    DatabaseFormatError,
    EmbeddingDatabase,
    build_database,
    checkpoint_hash,
)
from pipeline.retrieval.knn import (
    KNNResult,
    cosine_topk,
    knn_synthesize,
    knn_synthesize_separate,
    similarity_weights,
    weighted_map_average,
)

__all__ = [
    "COMBINED_KEY",
    "FORMAT_VERSION",
    "CheckpointMismatchError",
    "DatabaseFormatError",
    "EmbeddingDatabase",
    "KNNResult",
    "build_database",
    "checkpoint_hash",
    "cosine_topk",
    "knn_synthesize",
    "knn_synthesize_separate",
    "similarity_weights",
    "weighted_map_average",
]

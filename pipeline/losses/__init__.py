"""Losses: the MRIS longitudinally-aware triplet loss."""

from pipeline.losses.triplet import (
    LongitudinalTripletLoss,
    cosine_distance_matrix,
    groups_to_tensor,
    longitudinal_triplet_loss,
)

__all__ = [
    "LongitudinalTripletLoss",
    "cosine_distance_matrix",
    "groups_to_tensor",
    "longitudinal_triplet_loss",
]

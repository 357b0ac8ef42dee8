"""Longitudinally-aware sampling for MRIS metric learning: one random knee-visit per SUBJECT per epoch.

A subject is a patient: both knees and every visit of a patient share one subject id. Each epoch the
sampler draws, for every subject, one of its items uniformly at random, then shuffles the subjects, so an
epoch (and therefore every batch) never holds two items of one subject. The draw depends only on
``(seed, epoch)``: call :meth:`SubjectVisitSampler.set_epoch` at the start of every epoch, as with
``torch.utils.data.DistributedSampler``.

Distributed use: the epoch's list (identical on every rank) is split ``indices[rank::num_replicas]``. With
``drop_last=False`` it is first padded by repeating its head so every rank gets the same length (a
padded subject then appears on two ranks, never twice on one rank); ``drop_last=True`` drops the tail.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["SubjectVisitSampler"]


class SubjectVisitSampler(Sampler[int]):
    """Yield one dataset index per subject per epoch (random visit / knee), seeded and distributed-aware.

    Args:
        subject_ids: subject id of every dataset item (length = len(dataset)); strings or ints, e.g.
            ``manifest["subject_id"]``.
        shuffle: shuffle the order of subjects (the visit is drawn at random either way).
        seed: base seed; the draw of epoch ``e`` is seeded by the pair ``(seed, e)``.
        num_replicas, rank: distributed split; default from ``torch.distributed`` when initialised,
            else 1 and 0.
        drop_last: drop the tail instead of padding when the number of subjects is not divisible by
            ``num_replicas``.
        draws_per_epoch: independent one-visit-per-subject draws concatenated into one epoch (default 1,
            the paper). More draws give more optimiser steps per epoch on small cohorts; a batch that
            spans two draws may then hold one subject twice, which the triplet loss masks.
    """

    def __init__(
        self,
        subject_ids: Sequence[Hashable] | np.ndarray,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        draws_per_epoch: int = 1,
    ) -> None:
        if int(draws_per_epoch) < 1:
            raise ValueError(f"draws_per_epoch must be >= 1, got {draws_per_epoch}")
        self.draws_per_epoch = int(draws_per_epoch)
        if num_replicas is None or rank is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if dist_on else 1
            if rank is None:
                rank = torch.distributed.get_rank() if dist_on else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        ids = list(subject_ids.tolist() if hasattr(subject_ids, "tolist") else subject_ids)
        if not ids:
            raise ValueError("subject_ids is empty")
        groups: dict[Hashable, list[int]] = {}
        for i, s in enumerate(ids):
            groups.setdefault(s, []).append(i)
        # deterministic subject order, independent of dict/hash ordering: sort by string form
        order = sorted(groups, key=lambda s: (str(type(s)), str(s)))
        self._groups: list[np.ndarray] = [np.asarray(groups[s], dtype=np.int64) for s in order]
        self.subjects: list[Hashable] = order
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        n = len(self._groups) * self.draws_per_epoch
        if self.drop_last:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    @property
    def num_subjects(self) -> int:
        return len(self._groups)

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of ``epoch`` (deterministic given ``seed``)."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        """All ranks' indices of the current epoch before the rank split: one per subject (+ padding)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        out: list[int] = []
        for _ in range(self.draws_per_epoch):
            picks = np.fromiter(
                (grp[rng.integers(len(grp))] for grp in self._groups), dtype=np.int64, count=len(self._groups)
            )
            if self.shuffle:
                picks = picks[rng.permutation(len(picks))]
            out += picks.tolist()
        if self.drop_last:
            return out[: self.total_size]
        pad = self.total_size - len(out)
        while pad > 0:  # more replicas than subjects needs several rounds
            out += out[:pad]
            pad = self.total_size - len(out)
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples

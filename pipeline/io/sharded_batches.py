"""The batches of a batched network pass (evaluation), shared out between the ranks of a sharded run (issue 16).

A network's output for one item can change in its last bits with the batch it is computed in (CPU / GPU kernels
pick their blocking and summation order by batch size), so a sharded evaluation shares out whole BATCHES: the
batches are those of one process (``batch_size`` consecutive items, the last one shorter) and batch ``b`` is run
by rank ``b % world_size`` (:class:`pipeline.io.sharding.RankGroup`). Gathered on rank 0 in batch order
(:meth:`RankGroup.merge`), the outputs are those of a one-process run, bit for bit (same threads per process).

MONAI engines (a ``SupervisedEvaluator`` with metric handlers and ``MetricsSaver``) gather every rank's per-case
results by concatenating them in rank order; :class:`BlockDistributedSampler` gives each rank a consecutive block
of the cases, so that concatenation is the single-process order (``bundles/dess_seg/configs/multi_gpu_evaluate.json``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any, Optional

from monai.data import DataLoader, DistributedSampler

from pipeline.io.sharding import RankGroup

__all__ = ["BlockDistributedSampler", "batch_indices", "my_batches"]


def batch_indices(n: int, batch_size: int) -> list[list[int]]:
    """The item indices of each batch of ``n`` items taken in order, ``batch_size`` at a time (the last one
    shorter): the batches of a one-process run."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + int(batch_size), int(n)))) for s in range(0, int(n), int(batch_size))]


def my_batches(dataset: Sequence, batch_size: int, group: RankGroup | None = None, num_workers: int = 0
               ) -> Iterator[tuple[int, Any]]:
    """``(b, batch)`` for this rank's batches of ``dataset`` (batch ``b`` of :func:`batch_indices` -> rank
    ``b % world_size``), collated by a MONAI :class:`~monai.data.DataLoader`; ``group`` ``None``: one process,
    every batch (those of ``DataLoader(dataset, batch_size, shuffle=False)``)."""
    group = group if group is not None else RankGroup(0, 1)
    batches = batch_indices(len(dataset), batch_size)
    mine = group.indices(len(batches))
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in mine], num_workers=num_workers)
    yield from zip(mine, loader)


class BlockDistributedSampler(DistributedSampler):
    """``monai.data.DistributedSampler(even_divisible=False, shuffle=False)`` (no case repeated or dropped, the
    same number of cases per rank as MONAI's) whose ranks take consecutive blocks: rank ``r`` of ``W`` gets
    ``n // W`` cases, one more when ``r < n % W``, starting where rank ``r - 1``'s block ends.

    Args:
        dataset: the evaluation dataset (at least ``num_replicas`` cases).
        num_replicas, rank: default: those of the initialised ``torch.distributed`` process group.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        super().__init__(dataset=dataset, even_divisible=False, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        n, w = len(self.dataset), self.num_replicas
        start = self.rank * (n // w) + min(self.rank, n % w)
        return iter(range(start, start + self.num_samples))

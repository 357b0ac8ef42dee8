"""The ranks of a sharded run (torchrun / ``torch.distributed``): which items a rank owns, and the few collectives
an inference or evaluation bundle needs (issue 16, item 1).

One rule everywhere: item ``k`` of a run (in the order a single process would take them) is done by rank
``k % world_size``. Every rank builds the same item list (the inputs are listed and sorted the same way on each),
computes its own items, and rank 0 gathers the per-item results and writes the merged summaries in item order, so
the files of a sharded run are those of one process, byte for byte.

:class:`RankGroup` wraps ``torch.distributed`` (any backend: ``gloo`` on CPU, ``nccl`` on GPU); without an
initialised process group it is a single process and every collective is the identity. Object collectives
(``broadcast_object_list`` / ``gather_object``) need a CUDA device per rank under ``nccl``; the bundles' multi-GPU
configs call ``torch.cuda.set_device(LOCAL_RANK)`` first, as model-zoo does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["RankGroup", "flatten", "join_items", "shard_indices"]

T = TypeVar("T")


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The indices ``0..n-1`` owned by ``rank`` of ``world_size``: ``k`` with ``k % world_size == rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 (got rank {rank}, world_size {world_size})")
    return list(range(int(rank), int(n), int(world_size)))


class RankGroup:
    """This process's place in a sharded run.

    Args:
        rank, world_size: given explicitly (checked against ``torch.distributed`` when ``world_size > 1``), or
            ``None`` for both: taken from an initialised ``torch.distributed`` process group, else a single
            process (rank 0 of 1).
        what: the run, in error messages.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None, what: str = "run") -> None:
        dist = _dist()
        if rank is None and world_size is None:
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
        rank, world_size = int(rank or 0), int(world_size or 1)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1 (got rank {rank}, world_size {world_size})")
        if world_size > 1:
            if dist is None:
                raise ValueError(f"a sharded {what} (world_size {world_size}) needs torch.distributed initialised: "
                                 "run it with torchrun and the bundle's multi_gpu_inference.json / "
                                 "multi_gpu_evaluate.json")
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise ValueError(f"rank {rank} / world_size {world_size} differ from torch.distributed's "
                                 f"{dist.get_rank()} / {dist.get_world_size()}")
        self.rank, self.world_size, self.what = rank, world_size, what
        self._dist = dist if world_size > 1 else None

    @classmethod
    def current(cls, what: str = "run") -> RankGroup:
        """The group of the initialised ``torch.distributed`` process group, else a single process."""
        return cls(what=what)

    # -------------------------------------------------------------------------------------- items
    @property
    def sharded(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def label(self) -> str:
        """``" (rank r/W)"`` for a sharded run (progress bars, log lines), ``""`` for one process."""
        return f" (rank {self.rank}/{self.world_size})" if self.sharded else ""

    def indices(self, n: int) -> list[int]:
        """This rank's indices among ``n`` items (:func:`shard_indices`)."""
        return shard_indices(n, self.rank, self.world_size)

    def mine(self, items: Sequence[T]) -> Iterator[tuple[int, T]]:
        """``(index, item)`` for this rank's items, in item order."""
        for i in self.indices(len(items)):
            yield i, items[i]

    # -------------------------------------------------------------------------------- collectives
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self._dist is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (rank order) on rank 0; ``None`` on the others."""
        if self._dist is None:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0)
        return out

    def merge(self, per_item: Mapping[int, T]) -> dict[int, T] | None:
        """Every rank's ``{index: result}`` joined on rank 0, in index order (``None`` on the other ranks). An
        index that two ranks both report is a bug in the caller's sharding: ``ValueError``."""
        parts = self.gather(dict(per_item))
        return None if parts is None else join_items(parts, self.what)



def join_items(parts: Iterable[Mapping[int, T]], what: str = "run") -> dict[int, T]:
    """The ranks' ``{index: result}`` parts as one dict in index order; an index in two parts is a bug in the
    caller's sharding: ``ValueError``."""
    merged: dict[int, T] = {}
    for part in parts:
        twice = sorted(set(part) & set(merged))
        if twice:
            raise ValueError(f"items {twice} of the {what} were done by two ranks")
        merged.update(part)
    return dict(sorted(merged.items()))


def flatten(per_item: Mapping[int, Iterable[T]]) -> list[T]:
    """The lists of ``per_item`` joined in index order."""
    return [x for _, v in sorted(per_item.items()) for x in v]


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    return dist if dist.is_available() and dist.is_initialized() else None

"""k-NN synthesis of thickness maps (MRIS): top-k cosine neighbours, similarity-weighted mean of their maps.

For a query radiograph embedding ``f(x)`` and database map embeddings ``g(y_i)``:

1. ``s_i = cos(f(x), g(y_i))`` for every database item; keep the ``k`` largest (default 20), exactly
   (:func:`cosine_topk`: faiss when installed, but for mid-size query batches, else blocked ``torch.mm`` + ``torch.topk``;
   memory bounded by ``max_block_bytes``);
2. weights ``w_i = s_i / sum_j s_j`` over the k neighbours (no softmax, no temperature). If
   ``sum_j s_j <= 1e-8`` (non-positive or numerically zero; only possible when the best neighbours are
   orthogonal or opposite to the query) the weights of that query fall back to uniform ``1 / k`` and a
   ``RuntimeWarning`` says how many queries were affected. Individual negative ``s_i`` are kept as the
   paper's formula gives them when the sum is positive;
3. synthesized map ``= sum_i w_i * map_i`` in raw mm on the atlas grid, NaN outside the atlas mask.

Shapes: embeddings ``Q x D`` (queries) and ``N x D`` (database); maps ``N x H x W`` float16/32 in mm (NaN or 0
outside the footprint), masks ``H x W`` bool (True = inside the footprint). Embeddings are assumed
L2-normalised but are normalised again here.

Tie rule (every backend): neighbours are ordered by similarity, descending; equal similarities by the lower
database row first, also at the k-th place (of several rows tied for the last places, the lowest-numbered
ones are kept). "Equal" means equal as computed in floating point: exact duplicates of a database row give
equal similarities within one backend, but two backends may differ in the last bit, so near-ties can
resolve differently across backends while the similarities agree to float tolerance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np
import torch

__all__ = [
    "TORCH_QUERY_RANGE",
    "BACKENDS",
    "MAX_BLOCK_BYTES",
    "KNNResult",
    "cosine_topk",
    "faiss_available",
    "resolve_backend",
    "similarity_weights",
    "weighted_map_average",
    "knn_synthesize",
    "knn_synthesize_separate",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
MapsLike = Union[ArrayLike, Mapping[str, ArrayLike]]

#: Weight sums at or below this fall back to uniform weights.
WEIGHT_SUM_EPS = 1e-8
#: Default memory bound (bytes) on each temporary block of :func:`cosine_topk`: the query x database
#: similarity block (torch, numpy) and the normalised database block (all backends).
MAX_BLOCK_BYTES = 256 * 2**20
#: Database rows per torch / faiss block when the bound allows. Measured on 2 shared CPU cores at
#: 1,000 x 100,000 x 512-d: 1,024-row blocks cost ~2x (``torch.topk`` over short rows is slow, ~1.5 s of
#: topk alone, and every parallel call has a fixed cost on a busy machine); 4,096-32,768 rows were within
#: noise of each other and of one plain ``torch.topk(q @ db.T)``. 16,384 keeps the calls few and the
#: similarity block at 64 MiB for 1,000 queries.
DB_BLOCK_ROWS = 16384
#: Most queries per torch block (the similarity block is at most this x ``DB_BLOCK_ROWS``, = 256 MiB).
QUERY_BLOCK_ROWS = 4096
#: Pending per-block candidates are merged into the running top k once they are this many times k wide.
MERGE_FACTOR = 8
#: Accepted ``backend`` values of :func:`cosine_topk`.
BACKENDS = ("auto", "torch", "faiss", "numpy")


@dataclass
class KNNResult:
    """Output of :func:`knn_synthesize`.

    maps: ``Q x H x W`` float32 tensor in mm with NaN outside the mask, or ``{key: Q x H x W}``.
    indices: ``Q x k`` int64 database rows, most similar first.
    similarities: ``Q x k`` cosine similarities (descending).
    weights: ``Q x k`` synthesis weights (each row sums to 1).
    """

    maps: torch.Tensor | dict[str, torch.Tensor]
    indices: torch.Tensor
    similarities: torch.Tensor
    weights: torch.Tensor


def _as_tensor(x: ArrayLike, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.ascontiguousarray(np.asarray(x))
        with warnings.catch_warnings():
            # read-only memory maps are wrapped without a copy; this module never writes into them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(a)
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _row_norms(t: torch.Tensor, what: str) -> torch.Tensor:
    """L2 norm of every row; NaN/inf anywhere in a row makes its norm non-finite, so checking the norms
    validates the data without a full-size temporary (``torch.isfinite`` would allocate several)."""
    norms = torch.linalg.vector_norm(t, dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    return norms


def _as_numpy(x: ArrayLike, dtype: np.dtype) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(a, dtype=dtype)


def _np_normalised(x: ArrayLike, dtype: np.dtype, what: str) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), validated finite, C-contiguous ``dtype``."""
    a = _as_numpy(x, dtype)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.isfinite(norms).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(a / np.maximum(norms, np.asarray(1e-12, dtype=dtype)))  # a new array


def _unit_rows_float32(x: ArrayLike, what: str) -> np.ndarray:
    """Rows scaled to unit L2 norm as a new C-contiguous float32 numpy array, with the torch backend's
    norm (multi-threaded; same rounding as the torch path, so both backends see the same unit vectors)."""
    t = _as_tensor(x, torch.float32, "cpu").detach()
    return torch.div(t, _row_norms(t, what).clamp_min(1e-12)[:, None]).numpy()


def faiss_available() -> bool:
    """True when ``import faiss`` works (the optional ``faiss`` extra: ``pip install faiss-cpu``)."""
    try:
        import faiss  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def _compute_device(queries: Any, database: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for x in (queries, database):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


#: Query counts per call for which ``backend="auto"`` takes torch although faiss is installed. Measured
#: (``python benchmarks/bench_knn.py --mode crossover``; faiss-cpu 1.15.1, 2 cores, 512-d, k = 20, N = 10^4 and
#: 10^5): faiss's exact search scans without BLAS up to 249 queries, which took 1.2-4.0x the torch path's time
#: from 20 queries on; below 20 queries faiss took 0.43-1.09x (about as fast or faster), from 250 on 0.62-0.83x.
TORCH_QUERY_RANGE = range(20, 250)


def resolve_backend(
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    n_queries: int | None = None,
) -> str:
    """The backend :func:`cosine_topk` uses: ``backend`` itself, or for ``"auto"`` the fastest exact one
    installed for the search: ``"faiss"`` when importable, on the CPU in float32 and for a number of queries
    (``n_queries``; ``None``: unknown) outside :data:`TORCH_QUERY_RANGE`, else ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    on_cpu = device is None or torch.device(device).type == "cpu"
    faiss_wins = n_queries is None or int(n_queries) not in TORCH_QUERY_RANGE
    return "faiss" if on_cpu and dtype == torch.float32 and faiss_wins and faiss_available() else "torch"


def _select_topk(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` best ``(sims, idx)`` pairs by the tie rule (similarity descending, then lower
    index), sorted that way. ``idx`` must be distinct within each row."""
    order = torch.argsort(idx, dim=1)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def _block_candidates(sim: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of one ``q x b`` similarity block: ``min(k + 1, b)`` per row that contain the block's
    top ``k`` under the tie rule (the extra one never survives a merge; see below). Indices get ``offset``.

    ``torch.topk`` picks an arbitrary member among equal values. One extra candidate shows whether that
    matters: if the smallest of the ``k + 1`` values occurs once, the other ``k`` are strictly larger and
    are the block's top ``k`` whichever tied row ``topk`` chose last (that row can never be among the final
    ``k``: all ``k`` rows of its own block rank above it). Rows where it occurs twice or more (a tie at the
    k-th place) are redone with a stable sort of the whole row (lower index first).
    """
    n_rows, width = sim.shape
    w = min(k + 1, width)
    if w == width:  # the whole (small) block; the merge orders it
        return sim.clone(), torch.arange(offset, offset + width, device=sim.device).expand(n_rows, width)
    s, i = torch.topk(sim, w, dim=1, largest=True, sorted=False)
    low = s.min(dim=1, keepdim=True).values
    tied = (s == low).sum(dim=1) > 1
    tied_rows = tied.nonzero().flatten()
    step_fix = max(1, n_rows // 4)  # the sort's copies stay below the similarity block's size
    for fs in range(0, len(tied_rows), step_fix):
        rows = tied_rows[fs : fs + step_fix]
        s_fix, i_fix = torch.sort(sim[rows], dim=1, descending=True, stable=True)
        s[rows], i[rows] = s_fix[:, :w], i_fix[:, :w]
    return s, i + offset


class _TopK:
    """Running exact top ``k`` per query over database blocks (merged in batches)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.width = 0

    def add(self, sims: torch.Tensor, idx: torch.Tensor) -> None:
        self.pending.append((sims, idx))
        self.width += sims.shape[1]
        if self.width >= MERGE_FACTOR * (self.k + 1):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.best] if self.best is not None else []) + self.pending
        sims = torch.cat([p[0] for p in parts], dim=1)
        idx = torch.cat([p[1] for p in parts], dim=1)
        self.best = _select_topk(sims, idx, self.k)
        self.pending, self.width = [], 0

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending or self.best is None:
            self._merge()
        assert self.best is not None
        return self.best


def _torch_blocks(
    n_q: int, n: int, d: int, itemsize: int, chunk_size: int | None, db_chunk_size: int | None, bound: int
) -> tuple[int, int]:
    """(queries, database rows) per torch block: up to ``QUERY_BLOCK_ROWS`` x ``DB_BLOCK_ROWS``, the
    database rows shrunk first so that the similarity block and the normalised database block each fit in
    ``bound`` bytes (explicit chunk sizes are taken as given)."""
    q_rows = min(n_q, chunk_size or QUERY_BLOCK_ROWS)
    step_db = db_chunk_size or max(
        1, min(n, DB_BLOCK_ROWS, bound // (itemsize * max(d, 1)), bound // (itemsize * q_rows))
    )
    step_q = chunk_size or max(1, min(n_q, QUERY_BLOCK_ROWS, bound // (itemsize * min(step_db, n))))
    return step_q, step_db


def _cosine_topk_torch(
    queries: ArrayLike,
    database: ArrayLike,
    k: int,
    chunk_size: int | None,
    db_chunk_size: int | None,
    device: torch.device,
    dtype: torch.dtype,
    bound: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    q = _as_tensor(queries, dtype, device)
    q = q / _row_norms(q, "query embeddings").clamp_min(1e-12)[:, None]
    n_q, d = q.shape
    n = int(database.shape[0])
    itemsize = torch.empty((), dtype=dtype).element_size()
    step_q, step_db = _torch_blocks(n_q, n, d, itemsize, chunk_size, db_chunk_size, bound)
    # buffers reused by every block: no repeated large allocations (steady peak memory, no page faults)
    sim_buf = torch.empty(min(step_q, n_q) * min(step_db, n), dtype=dtype, device=device)
    db_buf = torch.empty(min(step_db, n) * d, dtype=dtype, device=device)
    topk = _TopK(k)
    for start in range(0, n, step_db):
        block = _as_tensor(database[start : start + step_db], dtype, device)
        rows = block.shape[0]
        norms = _row_norms(block, f"database embeddings (rows {start}..{start + rows - 1})")
        unit = torch.div(block, norms.clamp_min(1e-12)[:, None], out=db_buf[: rows * d].view(rows, d))
        unit_t = unit.transpose(0, 1)
        s_parts, i_parts = [], []
        for qs in range(0, n_q, step_q):
            q_block = q[qs : qs + step_q]
            sim = sim_buf[: q_block.shape[0] * rows].view(q_block.shape[0], rows)
            torch.mm(q_block, unit_t, out=sim)
            s, i = _block_candidates(sim, k, start)
            s_parts.append(s)
            i_parts.append(i)
        topk.add(torch.cat(s_parts), torch.cat(i_parts))
    s, i = topk.result()
    return s.float().cpu(), i.cpu()


def _faiss_knn(faiss: Any, q: np.ndarray, unit: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``kk`` inner products of float32 ``q`` against ``unit`` rows (faiss), sorted descending."""
    if hasattr(faiss, "knn"):  # faiss >= 1.7.3: no index, no copy of the database block
        return faiss.knn(q, unit, kk, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return index.search(q, kk)


def _cosine_topk_faiss(
    queries: ArrayLike,
    database: ArrayLike,
    k: int,
    chunk_size: int | None,
    db_chunk_size: int | None,
    bound: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            "backend='faiss' needs the optional 'faiss' package (pip install faiss-cpu or faiss-gpu); "
            "use backend='torch' otherwise"
        ) from err

    q = _unit_rows_float32(queries, "query embeddings")
    n_q, d = q.shape
    n = int(database.shape[0])
    step_db = db_chunk_size or max(1, min(n, DB_BLOCK_ROWS, bound // (4 * max(d, 1))))
    step_q = chunk_size or n_q
    unit_buf = torch.empty(min(step_db, n) * d, dtype=torch.float32)  # reused: warm pages, steady memory
    topk = _TopK(k)
    for start in range(0, n, step_db):
        block = _as_tensor(database[start : start + step_db], torch.float32, "cpu").detach()
        rows = block.shape[0]
        norms = _row_norms(block, f"database embeddings (rows {start}..{start + rows - 1})")
        unit_t = unit_buf[: rows * d].view(rows, d)
        unit = torch.div(block, norms.clamp_min(1e-12)[:, None], out=unit_t).numpy()
        w = min(k + 1, rows)
        s_parts, i_parts = [], []
        for qs in range(0, n_q, step_q):
            q_block = q[qs : qs + step_q]
            s_np, i_np = _faiss_knn(faiss, q_block, unit, w)  # sorted descending; any order among ties
            s, i = torch.from_numpy(s_np), torch.from_numpy(i_np.astype(np.int64))
            # a tie at the k-th place (unless the block is taken whole): redo those queries with the whole
            # block row, ordered by the tie rule (see _block_candidates)
            tied = s[:, k - 1] == s[:, k] if w == k + 1 else torch.zeros(len(s), dtype=torch.bool)
            tied_rows = tied.nonzero().flatten()
            step_fix = max(1, bound // (12 * rows))  # full rows of float32 + int64 within the bound
            for fs in range(0, len(tied_rows), step_fix):
                rows_t = tied_rows[fs : fs + step_fix]
                s_all, i_all = _faiss_knn(faiss, q_block[rows_t.numpy()], unit, rows)
                s_all, i_all = torch.from_numpy(s_all), torch.from_numpy(i_all.astype(np.int64))
                s[rows_t], i[rows_t] = _select_topk(s_all, i_all, w)
            s_parts.append(s)
            i_parts.append(i + start)
        topk.add(torch.cat(s_parts), torch.cat(i_parts))
    s, i = topk.result()
    return s.float(), i


def _cosine_topk_numpy(
    queries: ArrayLike,
    database: ArrayLike,
    k: int,
    chunk_size: int | None,
    db_chunk_size: int | None,
    dtype: torch.dtype,
    bound: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force reference: full similarity rows, ``np.argsort(-s, kind="stable")`` (lower index first)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    itemsize = np.dtype(np_dtype).itemsize
    q = _np_normalised(queries, np_dtype, "query embeddings")
    n_q, d = q.shape
    n = int(database.shape[0])
    step_q = chunk_size or max(1, min(n_q, bound // (itemsize * n)))
    step_db = db_chunk_size or max(1, min(n, bound // (itemsize * max(d, 1))))
    out_s = np.empty((n_q, k), dtype=np_dtype)
    out_i = np.empty((n_q, k), dtype=np.int64)
    for qs in range(0, n_q, step_q):
        q_block = q[qs : qs + step_q]
        sims = np.empty((q_block.shape[0], n), dtype=np_dtype)
        for start in range(0, n, step_db):
            block = _np_normalised(database[start : start + step_db], np_dtype, "database embeddings")
            sims[:, start : start + block.shape[0]] = q_block @ block.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out_i[qs : qs + step_q] = order
        out_s[qs : qs + step_q] = np.take_along_axis(sims, order, axis=1)
    return torch.from_numpy(out_s.astype(np.float32)), torch.from_numpy(out_i)


def cosine_topk(
    queries: ArrayLike,
    database: ArrayLike,
    k: int = 20,
    chunk_size: int | None = None,
    db_chunk_size: int | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_block_bytes: int = MAX_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` database rows by cosine similarity for every query.

    Every backend returns the same neighbours, ordered by the module's tie rule (similarity descending,
    equal similarities by lower database row, also at the k-th place), and the same similarities up to float
    rounding (a few 1e-7 in float32).

    Args:
        queries: ``Q x D`` embeddings (numpy or torch).
        database: ``N x D`` embeddings; a memory-mapped ``np.ndarray`` (``np.load(..., mmap_mode="r")``) is
            read block by block, never whole.
        k: neighbours per query (``1 <= k <= N``).
        chunk_size: queries per block; default: from ``max_block_bytes`` (torch: up to 4,096 queries; faiss:
            all queries; numpy: as many full similarity rows as fit).
        db_chunk_size: database rows per block; default: from ``max_block_bytes`` (torch: up to 16,384 rows;
            faiss: up to 16,384 rows; numpy: as many as fit). Blocks are merged exactly, so block sizes
            never change the result.
        backend: ``"auto"`` (default: ``"faiss"`` when installed, the search runs on the CPU in float32 and
            the number of queries is outside :data:`TORCH_QUERY_RANGE`, else ``"torch"``), ``"torch"`` (``torch.mm`` + ``torch.topk`` on ``device``, CPU or CUDA;
            ``torch.get_num_threads()`` threads), ``"faiss"`` (exact inner products of unit vectors,
            ``faiss.knn`` / ``IndexFlatIP``, float32, CPU) or ``"numpy"`` (brute-force full ``argsort``; slow reference for tests and
            benchmarks).
        device: torch device for the torch backend; default: the device of the queries or database if one is
            a non-CPU tensor, else CPU.
        dtype: compute dtype of the torch and numpy backends (``torch.float64`` for exact comparisons in
            tests); faiss computes in float32.
        max_block_bytes: bound on each temporary block (default 256 MiB): torch: the ``q_block x db_block``
            similarity block and the normalised database block (so at most about twice this in all); faiss:
            the normalised float32 database block (``faiss.knn`` searches it without an index; faiss's own
            search buffers are fixed, ~16 MiB); numpy: the ``q_block x N`` similarity rows and the
            normalised database block. The database itself is never copied whole.

    Returns:
        ``(similarities, indices)``, both ``Q x k`` on CPU (float32 / int64), most similar first.
    """
    if database.ndim != 2 or queries.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"expected Q x D queries and N x D database, got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    n = int(database.shape[0])
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N = 1..{n}, got k = {k}")
    if (chunk_size is not None and chunk_size < 1) or (db_chunk_size is not None and db_chunk_size < 1):
        raise ValueError("chunk sizes must be positive")
    if max_block_bytes < 1:
        raise ValueError(f"max_block_bytes must be positive, got {max_block_bytes}")
    dev = _compute_device(queries, database, device)
    backend = resolve_backend(backend, dev, dtype, n_queries=int(queries.shape[0]))
    if backend == "faiss":
        if dtype != torch.float32:
            raise ValueError(f"backend='faiss' computes in float32, got dtype={dtype}")
        return _cosine_topk_faiss(queries, database, k, chunk_size, db_chunk_size, max_block_bytes)
    if backend == "numpy":
        return _cosine_topk_numpy(queries, database, k, chunk_size, db_chunk_size, dtype, max_block_bytes)
    return _cosine_topk_torch(queries, database, k, chunk_size, db_chunk_size, dev, dtype, max_block_bytes)


def similarity_weights(similarities: torch.Tensor) -> torch.Tensor:
    """``w_i = s_i / sum_j s_j`` per row of ``Q x k`` similarities; uniform (with a warning) if the sum <= 1e-8."""
    s = similarities.to(torch.float32)
    sums = s.sum(dim=1, keepdim=True)
    bad = ~(sums > WEIGHT_SUM_EPS)  # also catches NaN
    w = s / torch.where(bad, torch.ones_like(sums), sums)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        warnings.warn(
            f"k-NN weights: the neighbour similarities of {n_bad} of {s.shape[0]} queries sum to <= "
            f"{WEIGHT_SUM_EPS:g}; using uniform weights 1/k for them",
            RuntimeWarning,
            stacklevel=2,
        )
        w = torch.where(bad, torch.full_like(w, 1.0 / s.shape[1]), w)
    return w


def _average_block_numpy(
    maps: np.ndarray, rows: np.ndarray, w: np.ndarray, nan_any: np.ndarray | None
) -> np.ndarray:
    """``sum_i w[:, i] * maps[rows[:, i]]`` for a ``c x k`` block, in numpy (CPU; fast float16 -> float32)."""
    uniq, inverse = np.unique(rows, return_inverse=True)  # each row read once, sorted (memory maps)
    inverse = inverse.reshape(rows.shape)
    block = np.ascontiguousarray(maps[uniq]).reshape(len(uniq), -1)  # stored dtype, e.g. float16
    out = np.zeros((rows.shape[0], block.shape[1]), dtype=np.float32)
    for i in range(rows.shape[1]):
        nb = block[inverse[:, i]].astype(np.float32)
        if nan_any is not None:
            nan_any |= np.isnan(nb)
        np.nan_to_num(nb, copy=False, nan=0.0)
        nb *= w[:, i : i + 1]
        out += nb
    return out


def _average_block_torch(
    maps: torch.Tensor, rows: np.ndarray, w: torch.Tensor, nan_any: torch.Tensor | None
) -> torch.Tensor:
    """Same as :func:`_average_block_numpy` for a torch tensor of maps (any device)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    inv = torch.from_numpy(inverse.reshape(rows.shape)).to(maps.device)
    block = maps[torch.as_tensor(uniq, device=maps.device)].reshape(len(uniq), -1)
    out = torch.zeros((rows.shape[0], block.shape[1]), dtype=torch.float32, device=maps.device)
    for i in range(rows.shape[1]):
        nb = block[inv[:, i]].to(torch.float32)
        if nan_any is not None:
            nan_any |= torch.isnan(nb)
        out.addcmul_(w[:, i : i + 1], nb.nan_to_num_(nan=0.0))
    return out


def weighted_map_average(
    indices: torch.Tensor,
    weights: torch.Tensor,
    maps: ArrayLike,
    mask: ArrayLike | None = None,
    max_elements: int = 1 << 23,
) -> torch.Tensor:
    """Weighted mean of neighbour maps: ``out[q] = sum_i weights[q, i] * maps[indices[q, i]]``.

    Args:
        indices, weights: ``Q x k`` neighbour rows and weights.
        maps: ``N x H x W`` (or ``N x ...``) maps in mm; NaN or 0 outside the footprint; numpy array,
            memory map (only the neighbour rows are read, once each, in sorted order) or torch tensor
            (computed on its device).
        mask: ``H x W`` bool footprint; output pixels outside it are NaN. ``None``: a pixel is NaN where
            any neighbour map is NaN (equivalent when maps carry NaN outside a shared footprint).
        max_elements: bound on ``q_chunk * k * H * W``, the neighbour-map values held per step in the
            stored dtype (memory control); the float32 work arrays are ``q_chunk x H x W``.

    Returns:
        ``Q x H x W`` float32 tensor (on the maps' device; CPU for numpy maps).
    """
    n_q, k = indices.shape
    spatial = tuple(maps.shape[1:])
    hw = int(np.prod(spatial))
    if mask is not None:
        mask_t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
        if tuple(mask_t.shape) != spatial:
            raise ValueError(f"mask shape {tuple(mask_t.shape)} does not match map shape {spatial}")
    step = max(1, int(max_elements) // max(1, k * hw))
    idx_np = indices.detach().cpu().numpy()
    if isinstance(maps, torch.Tensor):
        w_t = weights.detach().to(device=maps.device, dtype=torch.float32)
        result = torch.empty((n_q, hw), dtype=torch.float32, device=maps.device)
        for qs in range(0, n_q, step):
            rows = idx_np[qs : qs + step]
            nan_any = (
                None
                if mask is not None
                else torch.zeros((len(rows), hw), dtype=torch.bool, device=maps.device)
            )
            result[qs : qs + step] = _average_block_torch(maps, rows, w_t[qs : qs + step], nan_any)
            if nan_any is not None:
                result[qs : qs + step].masked_fill_(nan_any, float("nan"))
    else:
        maps_np = np.asarray(maps) if not isinstance(maps, np.ndarray) else maps
        w_np = weights.detach().cpu().numpy().astype(np.float32)
        res_np = np.empty((n_q, hw), dtype=np.float32)
        for qs in range(0, n_q, step):
            rows = idx_np[qs : qs + step]
            nan_any = None if mask is not None else np.zeros((len(rows), hw), dtype=bool)
            res_np[qs : qs + step] = _average_block_numpy(maps_np, rows, w_np[qs : qs + step], nan_any)
            if nan_any is not None:
                res_np[qs : qs + step][nan_any] = np.nan
        result = torch.from_numpy(res_np)
    result = result.reshape((n_q, *spatial))
    if mask is not None:
        result = result.masked_fill_(~mask_t.to(result.device), float("nan"))
    return result


def knn_synthesize(
    query_emb: ArrayLike,
    db_emb: ArrayLike,
    db_maps: MapsLike,
    k: int = 20,
    masks: ArrayLike | Mapping[str, ArrayLike] | None = None,
    chunk_size: int | None = None,
    db_chunk_size: int | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    max_block_bytes: int = MAX_BLOCK_BYTES,
) -> KNNResult:
    """MRIS(-C) synthesis: neighbours from ONE embedding space, every map stack averaged with them.

    Args:
        query_emb: ``Q x D`` radiograph embeddings.
        db_emb: ``N x D`` database map embeddings.
        db_maps: ``N x H x W`` maps (mm), or ``{key: N x H x W}`` (e.g. ``{"fc": ..., "tc": ...}``; the
            key maps may have different grids).
        k: neighbours (paper: 20).
        masks: ``H x W`` bool atlas footprint, or ``{key: H x W}``; ``None`` -> NaN pattern of the maps.
        chunk_size, db_chunk_size, backend, device, max_block_bytes: see :func:`cosine_topk`.

    Returns:
        :class:`KNNResult`; ``maps`` is a tensor or a dict following ``db_maps``.
    """
    n = int(db_emb.shape[0])
    stacks = db_maps if isinstance(db_maps, Mapping) else {"": db_maps}
    for key, m in stacks.items():
        if int(m.shape[0]) != n:
            raise ValueError(
                f"maps{'[' + key + ']' if key else ''} have {m.shape[0]} rows, embeddings have {n}"
            )
    sims, idx = cosine_topk(
        query_emb, db_emb, k, chunk_size, db_chunk_size, backend, device, max_block_bytes=max_block_bytes
    )
    weights = similarity_weights(sims)
    out: dict[str, torch.Tensor] = {}
    for key, m in stacks.items():
        if isinstance(masks, Mapping):
            mk = masks.get(key)
        else:
            mk = masks
        out[key] = weighted_map_average(idx, weights, m, mk)
    maps = out if isinstance(db_maps, Mapping) else out[""]
    return KNNResult(maps=maps, indices=idx, similarities=sims, weights=weights)


def knn_synthesize_separate(
    query_emb: Mapping[str, ArrayLike],
    db_emb: Mapping[str, ArrayLike],
    db_maps: Mapping[str, ArrayLike],
    k: int = 20,
    masks: Mapping[str, ArrayLike] | None = None,
    **kwargs,
) -> dict[str, KNNResult]:
    """MRIS-S synthesis: the ``fc`` map from the FC networks' neighbours, ``tc`` from the TC networks'.

    Every key of ``db_maps`` needs a query embedding (``Q x D_key``) and a database embedding
    (``N x D_key``) under the same key. Extra keyword arguments go to :func:`knn_synthesize`.

    Returns:
        ``{key: KNNResult}`` with ``maps`` a ``Q x H x W`` tensor per key.
    """
    missing = [key for key in db_maps if key not in query_emb or key not in db_emb]
    if missing:
        raise KeyError(f"no query/database embeddings for map keys {missing}")
    return {
        key: knn_synthesize(
            query_emb[key],
            db_emb[key],
            db_maps[key],
            k=k,
            masks=None if masks is None else masks.get(key),
            **kwargs,
        )
        for key in db_maps
    }

"""k-NN synthesis of thickness maps (MRIS): top-k cosine neighbours, similarity-weighted mean of their maps.

For a query radiograph embedding ``f(x)`` and database map embeddings ``g(y_i)``:

1. ``s_i = cos(f(x), g(y_i))`` for every database item; keep the ``k`` largest (default 20) with
   ``torch.topk`` (queries processed in chunks; optionally the database too, so memory stays bounded);
2. weights ``w_i = s_i / sum_j s_j`` over the k neighbours (no softmax, no temperature). If
   ``sum_j s_j <= 1e-8`` (non-positive or numerically zero; only possible when the best neighbours are
   orthogonal or opposite to the query) the weights of that query fall back to uniform ``1 / k`` and a
   ``RuntimeWarning`` says how many queries were affected. Individual negative ``s_i`` are kept as the
   paper's formula gives them when the sum is positive;
3. synthesized map ``= sum_i w_i * map_i`` in raw mm on the atlas grid, NaN outside the atlas mask.

Shapes: embeddings ``Q x D`` (queries) and ``N x D`` (database); maps ``N x H x W`` float16/32 in mm (NaN or 0
outside the footprint), masks ``H x W`` bool (True = inside the footprint). Embeddings are assumed
L2-normalised but are normalised again here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import torch

__all__ = [
    "KNNResult",
    "cosine_topk",
    "similarity_weights",
    "weighted_map_average",
    "knn_synthesize",
    "knn_synthesize_separate",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
MapsLike = Union[ArrayLike, Mapping[str, ArrayLike]]

#: Weight sums at or below this fall back to uniform weights.
WEIGHT_SUM_EPS = 1e-8
#: Default bound on the values of one query x database similarity block (32 MB in float32).
BLOCK_ELEMENTS = 1 << 23
#: Smallest automatic query chunk (matrix products with fewer rows are inefficient).
MIN_QUERY_CHUNK = 64


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


def cosine_topk(
    queries: ArrayLike,
    database: ArrayLike,
    k: int = 20,
    chunk_size: int | None = None,
    db_chunk_size: int | None = None,
    backend: str = "torch",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database rows by cosine similarity for every query.

    Args:
        queries: ``Q x D`` embeddings.
        database: ``N x D`` embeddings (may be a memory-mapped ``np.ndarray``).
        k: neighbours per query (``1 <= k <= N``).
        chunk_size: queries per similarity block (the block is ``chunk_size x db_chunk``); default:
            ``max(64, BLOCK_ELEMENTS // N)`` (``BLOCK_ELEMENTS`` = 8 M values = 32 MB in float32).
        db_chunk_size: database rows per block; default: the whole database, unless the block would
            exceed ``2 * BLOCK_ELEMENTS``, then ``BLOCK_ELEMENTS // chunk_size`` rows. Blocks are merged
            exactly, so chunking never changes the result (up to the order of exact ties).
        backend: ``"torch"`` (CPU or CUDA, per ``device``) or ``"faiss"`` (exact inner-product index).
        device: torch device for the computation; default: the queries' device (CPU for numpy).
        dtype: compute dtype of the torch backend (``torch.float64`` for exact comparisons in tests).

    Returns:
        ``(similarities, indices)``, both ``Q x k`` on CPU (float32 / int64), most similar first.
    """
    n = int(database.shape[0])
    if database.ndim != 2 or queries.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"expected Q x D queries and N x D database, got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N = 1..{n}, got k = {k}")
    if (chunk_size is not None and chunk_size < 1) or (db_chunk_size is not None and db_chunk_size < 1):
        raise ValueError("chunk sizes must be positive")
    if backend == "faiss":
        return _cosine_topk_faiss(queries, database, k, db_chunk_size)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")

    if device is None:
        device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    q = _as_tensor(queries, dtype, device)
    q = q / _row_norms(q, "query embeddings").clamp_min(1e-12)[:, None]
    n_q = q.shape[0]
    if chunk_size is not None:
        step_q = int(chunk_size)
    else:
        step_q = max(1, min(n_q, max(MIN_QUERY_CHUNK, BLOCK_ELEMENTS // (db_chunk_size or n))))
    if db_chunk_size is not None:
        step_db = int(db_chunk_size)
    else:
        step_db = n if step_q * n <= 2 * BLOCK_ELEMENTS else max(k, BLOCK_ELEMENTS // step_q)

    best_s = torch.empty((n_q, 0), dtype=dtype, device=device)
    best_i = torch.empty((n_q, 0), dtype=torch.long, device=device)
    # one similarity buffer reused by every block (no repeated large allocations -> steady peak memory)
    sim_buf = torch.empty(min(step_q, n_q) * min(step_db, n), dtype=dtype, device=device)
    for start in range(0, n, step_db):
        block = _as_tensor(database[start : start + step_db], dtype, device)
        # cosine = (q . y) / |y|: scale the similarity columns instead of copying a normalised database
        norms = _row_norms(block, f"database embeddings (rows {start}..{start + block.shape[0] - 1})")
        inv_norm = 1.0 / norms.clamp_min(1e-12)
        block_t = block.transpose(0, 1)
        kk = min(k, block.shape[0])
        s_parts, i_parts = [], []
        for qs in range(0, n_q, step_q):
            q_block = q[qs : qs + step_q]
            sim = sim_buf[: q_block.shape[0] * block_t.shape[1]].view(q_block.shape[0], block_t.shape[1])
            torch.mm(q_block, block_t, out=sim).mul_(inv_norm)
            s, i = torch.topk(sim, kk, dim=1, largest=True, sorted=True)
            s_parts.append(s)
            i_parts.append(i + start)
        new_s, new_i = torch.cat(s_parts), torch.cat(i_parts)
        if best_s.shape[1] == 0:
            best_s, best_i = new_s, new_i
        else:
            cat_s, cat_i = torch.cat([best_s, new_s], 1), torch.cat([best_i, new_i], 1)
            best_s, pos = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1, largest=True, sorted=True)
            best_i = torch.gather(cat_i, 1, pos)
    return best_s.float().cpu(), best_i.cpu()


def _cosine_topk_faiss(
    queries: ArrayLike, database: ArrayLike, k: int, db_chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            "backend='faiss' needs the optional 'faiss' package (pip install faiss-cpu or faiss-gpu); "
            "use backend='torch' otherwise"
        ) from err

    def _np_normed(x: ArrayLike) -> np.ndarray:
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("embeddings contain NaN or infinite values")
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)

    d = int(database.shape[1])
    index = faiss.IndexFlatIP(d)
    n = int(database.shape[0])
    step = n if db_chunk_size is None else int(db_chunk_size)
    for start in range(0, n, step):
        index.add(_np_normed(database[start : start + step]))
    s, i = index.search(_np_normed(queries), k)
    return torch.from_numpy(s.astype(np.float32)), torch.from_numpy(i.astype(np.int64))


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
    backend: str = "torch",
    device: torch.device | str | None = None,
) -> KNNResult:
    """MRIS(-C) synthesis: neighbours from ONE embedding space, every map stack averaged with them.

    Args:
        query_emb: ``Q x D`` radiograph embeddings.
        db_emb: ``N x D`` database map embeddings.
        db_maps: ``N x H x W`` maps (mm), or ``{key: N x H x W}`` (e.g. ``{"fc": ..., "tc": ...}``; the
            key maps may have different grids).
        k: neighbours (paper: 20).
        masks: ``H x W`` bool atlas footprint, or ``{key: H x W}``; ``None`` -> NaN pattern of the maps.
        chunk_size, db_chunk_size, backend, device: see :func:`cosine_topk`.

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
    sims, idx = cosine_topk(query_emb, db_emb, k, chunk_size, db_chunk_size, backend, device)
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

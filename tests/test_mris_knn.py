"""k-NN synthesis against an independent numpy brute force (full argsort, as the reference code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mris.knn import (
    cosine_topk,
    faiss_available,
    knn_synthesize,
    knn_synthesize_separate,
    resolve_backend,
    similarity_weights,
    weighted_map_average,
)


def _data(n=300, q=17, d=16, h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(n, d))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    # queries correlated with some database rows, so similarities are mostly positive
    queries = db[rng.integers(0, n, q)] + 0.5 * rng.normal(size=(q, d))
    mask = np.zeros((h, w), dtype=bool)
    mask[2:10, 1:8] = True
    maps = rng.uniform(0.0, 4.0, size=(n, h, w))
    maps[:, ~mask] = np.nan
    return queries, db, maps, mask


def _brute_force(queries, db, maps, k):
    """Reference: normalise, dot, full argsort per query, s / sum(s), weighted sum of neighbour maps."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    out_idx, out_s, out_maps = [], [], []
    for qv in qn:
        sims = dn @ qv
        order = np.argsort(-sims, kind="stable")[:k]
        s = sims[order]
        w = s / s.sum()
        out_idx.append(order)
        out_s.append(s)
        out_maps.append(np.tensordot(w, maps[order], axes=(0, 0)))  # NaN outside the footprint propagates
    return np.array(out_idx), np.array(out_s), np.array(out_maps)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_numpy_brute_force(k):
    queries, db, maps, mask = _data()
    ref_idx, ref_s, ref_maps = _brute_force(queries, db, maps, k)
    res = knn_synthesize(
        torch.from_numpy(queries).float(), db.astype(np.float32), maps.astype(np.float32), k=k, masks=mask
    )
    assert res.indices.shape == res.similarities.shape == res.weights.shape == (17, k)
    np.testing.assert_array_equal(res.indices.numpy(), ref_idx)
    np.testing.assert_allclose(res.similarities.numpy(), ref_s, atol=1e-5)
    np.testing.assert_allclose(res.weights.sum(1).numpy(), 1.0, atol=1e-5)
    got = res.maps.numpy()
    assert got.shape == (17, 12, 10) and got.dtype == np.float32
    assert np.isnan(got[:, ~mask]).all() and np.isfinite(got[:, mask]).all()
    np.testing.assert_allclose(got[:, mask], ref_maps[:, mask], rtol=1e-4, atol=1e-4)


def test_float64_topk_is_exact_and_chunking_does_not_change_results():
    queries, db, _, _ = _data(n=257, q=33)
    ref_idx, ref_s, _ = _brute_force(queries, db, np.zeros((257, 1, 1)), 20)
    s64, i64 = cosine_topk(queries, db, k=20, dtype=torch.float64)
    np.testing.assert_array_equal(i64.numpy(), ref_idx)
    full_s, full_i = cosine_topk(queries, db, k=20)
    for chunk, db_chunk in [(1, None), (5, 7), (64, 16), (4, 300)]:
        s, i = cosine_topk(queries, db, k=20, chunk_size=chunk, db_chunk_size=db_chunk)
        np.testing.assert_array_equal(i.numpy(), full_i.numpy())
        torch.testing.assert_close(s, full_s)
    # db chunks smaller than k still merge to the exact top k
    s, i = cosine_topk(queries, db, k=20, db_chunk_size=3)
    np.testing.assert_array_equal(i.numpy(), ref_idx)


def test_defensive_normalisation_and_memmap_maps(tmp_path):
    queries, db, maps, mask = _data(n=120, q=6)
    stored = np.where(mask, maps, 0.0).astype(np.float16)  # database storage: 0 outside the mask
    np.save(tmp_path / "maps.npy", stored)
    mm = np.load(tmp_path / "maps.npy", mmap_mode="r")
    scaled = knn_synthesize(queries * 7.0, db * 3.0, mm, k=8, masks=mask)
    plain = knn_synthesize(queries, db, stored.astype(np.float32), k=8, masks=torch.from_numpy(mask))
    torch.testing.assert_close(scaled.indices, plain.indices)
    torch.testing.assert_close(scaled.maps, plain.maps, equal_nan=True)
    assert torch.isnan(scaled.maps[:, ~torch.from_numpy(mask)]).all()
    # without a mask, NaN comes from the maps' own NaN pattern
    nomask = knn_synthesize(queries, db, maps, k=8)
    assert torch.equal(torch.isnan(nomask.maps[0]), torch.from_numpy(~mask))


def test_weights_formula_and_nonpositive_fallback():
    s = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.1, -0.2], [-0.1, -0.2, -0.3], [0.0, 0.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="2 of 4 queries"):
        w = similarity_weights(s)
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(w[1], torch.tensor([0.9, 0.1, -0.2]) / 0.8)  # no softmax, no temperature
    torch.testing.assert_close(w[2:], torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(w.sum(1), torch.ones(4))


def test_weighted_map_average_by_hand():
    maps = torch.tensor([[[1.0, float("nan")]], [[3.0, float("nan")]], [[10.0, float("nan")]]])  # N=3, 1x2
    out = weighted_map_average(torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]]), maps)
    assert out.shape == (2, 1, 2)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([2.5, 5.5]))
    assert torch.isnan(out[:, 0, 1]).all()


def test_multi_key_and_separate_synthesis():
    q, db, maps, mask = _data(n=80, q=4, seed=1)
    q2, db2, maps2, mask2 = _data(n=80, q=4, h=6, w=6, seed=2)
    combined = knn_synthesize(q, db, {"fc": maps, "tc": maps2}, k=5, masks={"fc": mask, "tc": mask2})
    assert set(combined.maps) == {"fc", "tc"} and combined.maps["tc"].shape == (4, 6, 6)
    sep = knn_synthesize_separate(
        {"fc": q, "tc": q2},
        {"fc": db, "tc": db2},
        {"fc": maps, "tc": maps2},
        k=5,
        masks={"fc": mask, "tc": mask2},
    )
    torch.testing.assert_close(sep["fc"].maps, combined.maps["fc"], equal_nan=True)
    ref_idx, _, _ = _brute_force(q2, db2, maps2, 5)
    np.testing.assert_array_equal(sep["tc"].indices.numpy(), ref_idx)  # TC neighbours from TC embeddings
    assert not torch.equal(sep["tc"].indices, combined.indices)
    with pytest.raises(KeyError, match="tc"):
        knn_synthesize_separate({"fc": q}, {"fc": db}, {"fc": maps, "tc": maps2})


def test_errors():
    q, db, maps, mask = _data(n=10, q=2)
    with pytest.raises(ValueError, match="k must be in 1..N = 1..10"):
        knn_synthesize(q, db, maps, k=11)
    with pytest.raises(ValueError, match="rows"):
        knn_synthesize(q, db, maps[:9], k=3)
    with pytest.raises(ValueError, match="N x D"):
        cosine_topk(q[:, :3], db, k=3)
    bad = q.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cosine_topk(bad, db, k=3)
    with pytest.raises(ValueError, match="mask shape"):
        knn_synthesize(q, db, maps, k=3, masks=mask[:-1])
    with pytest.raises(ValueError, match="backend"):
        cosine_topk(q, db, k=3, backend="annoy")


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    q, db, _, _ = _data(n=200, q=9)
    s_t, i_t = cosine_topk(q, db, k=10)
    s_f, i_f = cosine_topk(q, db, k=10, backend="faiss")
    np.testing.assert_array_equal(i_f.numpy(), i_t.numpy())
    torch.testing.assert_close(s_f, s_t, atol=1e-5, rtol=1e-5)


def test_faiss_missing_gives_clear_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    q, db, _, _ = _data(n=10, q=2)
    with pytest.raises(ImportError, match="backend='faiss' needs the optional 'faiss' package"):
        cosine_topk(q, db, k=3, backend="faiss")


@pytest.mark.parametrize("use_mask", [True, False])
def test_torch_and_numpy_map_paths_agree(use_mask):
    _, _, maps, mask = _data(n=50, q=1, seed=3)
    rng = np.random.default_rng(4)
    idx = torch.from_numpy(rng.integers(0, 50, (9, 6)))
    w = similarity_weights(torch.from_numpy(rng.uniform(0.1, 1.0, (9, 6))).float())
    m = mask if use_mask else None
    # small max_elements forces several query chunks
    a = weighted_map_average(idx, w, maps.astype(np.float16), m, max_elements=6 * 12 * 10 * 2)
    b = weighted_map_average(idx, w, torch.from_numpy(maps.astype(np.float16)), m)
    torch.testing.assert_close(a, b, equal_nan=True)
    ref = np.einsum(
        "qk,qkhw->qhw", w.numpy().astype(np.float64), maps.astype(np.float16).astype(np.float64)[idx.numpy()]
    )
    np.testing.assert_allclose(a.numpy(), ref, rtol=1e-5, atol=1e-5)


HAVE_FAISS = faiss_available()
BACKENDS = [
    "torch",
    "numpy",
    pytest.param("faiss", marks=pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")),
]


def _tie_data(n=300, q=40, d=8, pool=60, seed=0):
    """Embeddings whose cosine similarities are exact in any float order: every row has four entries
    +-0.5 (unit norm exactly), so dot products are multiples of 0.25 -> many exact ties; the database draws
    its rows from a small pool, so it also holds many duplicate rows."""
    rng = np.random.default_rng(seed)

    def rows(m):
        out = np.zeros((m, d))
        for r in range(m):
            out[r, rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return out

    db = rows(pool)[rng.integers(0, pool, n)]
    return rows(q), db


def test_tie_rule_by_hand():
    a, b, c = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]
    db = np.array([b, a, c, a, b, a], dtype=np.float32)
    for backend in ["torch", "numpy"] + (["faiss"] if HAVE_FAISS else []):
        s, i = cosine_topk(np.array([a], dtype=np.float32), db, k=3, backend=backend)
        assert i.tolist() == [[1, 3, 5]], backend  # three exact ties: lower row first
        s, i = cosine_topk(np.array([a], dtype=np.float32), db, k=5, backend=backend)
        assert i.tolist() == [[1, 3, 5, 2, 0]], backend  # 1, 1, 1, 0.6, then the tie 0/0 at k: row 0
        torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 1.0, 0.6, 0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 20])
def test_backends_match_numpy_reference_with_exact_ties(backend, k):
    queries, db = _tie_data()
    ref_idx, ref_s, _ = _brute_force(queries, db, np.zeros((len(db), 1, 1)), k + 1)
    assert (ref_s[:, k - 1] == ref_s[:, k]).mean() > 0.5  # the data really has ties at the k-th place
    ref_idx, ref_s = ref_idx[:, :k], ref_s[:, :k]
    s, i = cosine_topk(queries.astype(np.float32), db.astype(np.float32), k=k, backend=backend)
    np.testing.assert_array_equal(i.numpy(), ref_idx)
    np.testing.assert_array_equal(s.numpy(), ref_s.astype(np.float32))  # exact: multiples of 1/4


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_random_data(backend):
    queries, db, _, _ = _data(n=400, q=25, d=32, seed=5)
    db = np.concatenate([db, db[:50]])  # duplicate rows: their similarities tie within a backend
    ref_idx, ref_s, _ = _brute_force(queries, db, np.zeros((len(db), 1, 1)), 20)
    s, i = cosine_topk(queries.astype(np.float32), db.astype(np.float32), k=20, backend=backend)
    np.testing.assert_array_equal(np.sort(i.numpy() % 400, axis=1), np.sort(ref_idx % 400, axis=1))
    # float32 backends agree exactly, duplicates included (each ties exactly with its original)
    np.testing.assert_array_equal(i.numpy(), cosine_topk(queries, db, k=20, backend="numpy")[1].numpy())
    assert (i.numpy() >= 400).sum() > 10  # some duplicates are among the neighbours
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-5)
    for row_s, row_i in zip(s.numpy(), i.numpy()):  # the documented order, as computed by this backend
        assert all(
            (a > b) or (a == b and ia < ib) for a, b, ia, ib in zip(row_s, row_s[1:], row_i, row_i[1:])
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_block_bound_gives_identical_results(backend, monkeypatch):
    import pipeline.mris.knn as knn_module

    queries, db = _tie_data(n=257, q=70, d=8, seed=3)
    queries, db = queries.astype(np.float32), db.astype(np.float32)
    ref_s, ref_i = cosine_topk(queries, db, k=20, backend="numpy")
    blocks = []
    real = knn_module._block_candidates

    def spy(sim, k, offset):
        blocks.append((sim.shape, offset))
        return real(sim, k, offset)

    monkeypatch.setattr(knn_module, "_block_candidates", spy)
    monkeypatch.setattr(knn_module, "QUERY_BLOCK_ROWS", 16)
    bound = 2048  # bytes: torch blocks of 16 queries x 32 database rows (float32)
    s, i = cosine_topk(queries, db, k=20, backend=backend, max_block_bytes=bound)
    np.testing.assert_array_equal(i.numpy(), ref_i.numpy())
    np.testing.assert_array_equal(s.numpy(), ref_s.numpy())
    if backend == "torch":
        assert sorted({off for _, off in blocks}) == list(range(0, 257, 32))  # 9 database blocks
        assert sorted({shape for shape, _ in blocks}) == [
            (6, 1),
            (6, 32),
            (16, 1),
            (16, 32),
        ]  # 5 query blocks
        assert len(blocks) == 45 and all(shape[0] * shape[1] * 4 <= bound for shape, _ in blocks)
    chunks = [(16, 40), (70, 64), (None, 300), (70, 3)]  # 3 < k: whole blocks still merge exactly
    chunks += [(1, None), (5, 7)] if backend != "faiss" else []  # many tiny faiss calls are slow
    for chunk, db_chunk in chunks:
        s, i = cosine_topk(queries, db, k=20, chunk_size=chunk, db_chunk_size=db_chunk, backend=backend)
        np.testing.assert_array_equal(i.numpy(), ref_i.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_memmap_database(backend, tmp_path):
    queries, db, _, _ = _data(n=500, q=30, d=24, seed=6)
    ref_s, ref_i = cosine_topk(queries, db, k=20, dtype=torch.float64, backend="numpy")
    np.save(tmp_path / "emb.npy", db.astype(np.float32))
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")  # read-only memory map
    s, i = cosine_topk(queries, mm, k=20, backend=backend, max_block_bytes=24 * 4 * 60)  # 60-row blocks
    np.testing.assert_array_equal(i.numpy(), ref_i.numpy())
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_database_is_an_error(backend):
    q, db = _tie_data(n=10, q=2)
    with pytest.raises(ValueError, match="k must be in 1..N = 1..10, got k = 11"):
        cosine_topk(q, db, k=11, backend=backend)
    s, i = cosine_topk(q, db, k=10, backend=backend)  # k = N: every row, in the tie-rule order
    np.testing.assert_array_equal(i.numpy(), _brute_force(q, db, np.zeros((10, 1, 1)), 10)[0])


def test_auto_backend_choice(monkeypatch):
    import pipeline.mris.knn as knn_module

    assert resolve_backend("auto") == ("faiss" if HAVE_FAISS else "torch")
    mid = knn_module.TORCH_QUERY_RANGE
    for n in (1, mid.start - 1, mid.stop, 10_000):  # where faiss was measured faster
        assert resolve_backend("auto", n_queries=n) == resolve_backend("auto")
    assert resolve_backend("auto", n_queries=mid.start) == resolve_backend("auto", n_queries=mid.stop - 1) == "torch"
    assert resolve_backend("auto", dtype=torch.float64) == "torch"
    assert resolve_backend("auto", device="cuda") == "torch"
    assert resolve_backend("numpy") == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("annoy")
    monkeypatch.setattr(knn_module, "faiss_available", lambda: False)
    assert resolve_backend("auto") == "torch"
    q, db, _, _ = _data(n=60, q=3)
    s, i = cosine_topk(q, db, k=4)  # default backend without faiss
    np.testing.assert_array_equal(i.numpy(), _brute_force(q, db, np.zeros((60, 1, 1)), 4)[0])


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
def test_faiss_rejects_float64():
    q, db = _tie_data(n=10, q=2)
    with pytest.raises(ValueError, match="float32"):
        cosine_topk(q, db, k=3, backend="faiss", dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    queries, db, maps, mask = _data(n=400, q=30)
    cpu = knn_synthesize(queries, db, maps.astype(np.float32), k=20, masks=mask)
    gpu = knn_synthesize(
        torch.from_numpy(queries).cuda(),
        torch.from_numpy(db).float().cuda(),
        torch.from_numpy(maps).float().cuda(),
        k=20,
        masks=mask,
    )
    torch.testing.assert_close(gpu.indices, cpu.indices)
    torch.testing.assert_close(gpu.maps.cpu(), cpu.maps, equal_nan=True, rtol=1e-4, atol=1e-4)

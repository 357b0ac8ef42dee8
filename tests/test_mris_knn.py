"""k-NN synthesis against an independent numpy brute force (full argsort, as the reference code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mris.knn import (
    cosine_topk,
    knn_synthesize,
    knn_synthesize_separate,
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


def test_automatic_database_chunking(monkeypatch, tmp_path):
    import pipeline.mris.knn as knn_module

    queries, db, _, _ = _data(n=500, q=70)
    ref_s, ref_i = cosine_topk(queries, db, k=20, dtype=torch.float64)
    np.save(tmp_path / "emb.npy", db.astype(np.float32))
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")  # read-only memory map
    monkeypatch.setattr(knn_module, "BLOCK_ELEMENTS", 1000)  # forces 64-query x 15-row blocks
    s, i = cosine_topk(queries, mm, k=20)
    np.testing.assert_array_equal(i.numpy(), ref_i.numpy())
    torch.testing.assert_close(s, ref_s.float())


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

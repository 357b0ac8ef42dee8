"""Embedding database: round trip, atomic write, checkpoint hash guard, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.mris.database import (
    CheckpointMismatchError,
    DatabaseFormatError,
    EmbeddingDatabase,
    build_database,
    checkpoint_hash,
)
from pipeline.mris.knn import knn_synthesize

H, W = 8, 6


def _masks():
    fc = np.zeros((H, W), dtype=bool)
    fc[1:7, 1:5] = True
    tc = np.zeros((H, W), dtype=bool)
    tc[2:6, :] = True
    return {"fc": fc, "tc": tc}


def _items(n=13, seed=0):
    rng = np.random.default_rng(seed)
    masks = _masks()
    out = []
    for i in range(n):
        fc = rng.uniform(0.5, 3.5, (H, W))
        tc = rng.uniform(0.5, 3.5, (H, W))
        fc[~masks["fc"]] = np.nan
        tc[~masks["tc"]] = np.nan
        row = {
            "subject_id": f"9{i // 2:06d}",
            "side": "RL"[i % 2],
            "visit_month": 12 * (i % 3),
            "klg": i % 5,
            "source": f"maps/{i}.npz",
        }
        out.append((row, fc, tc))
    return out


PROJ = torch.Generator().manual_seed(0)
W_FC = torch.randn(H * W, 4, generator=PROJ)
W_TC = torch.randn(H * W, 4, generator=PROJ)


def embed_combined(batch):
    x = torch.cat([torch.nan_to_num(batch["fc"]).flatten(1), torch.nan_to_num(batch["tc"]).flatten(1)], 1)
    return torch.nn.functional.normalize(x @ torch.cat([W_FC, W_TC]), dim=1)


def embed_separate(batch):
    return {
        "fc": torch.nan_to_num(batch["fc"]).flatten(1) @ W_FC,
        "tc": torch.nan_to_num(batch["tc"]).flatten(1) @ W_TC,
    }


@pytest.mark.parametrize("map_dtype", ["float16", "float32"])
def test_round_trip_and_synthesis(tmp_path, map_dtype):
    items = _items()
    folder = tmp_path / "db"
    calls = []

    def embed(batch):
        calls.append(batch["fc"].shape[0])
        return embed_combined(batch)

    db = build_database(
        folder,
        items,
        embed,
        checkpoint_hash="abc123",
        batch_size=5,
        map_dtype=map_dtype,
        progress=False,
        info={"split": "metric-learning"},
    )
    assert calls == [5, 5, 3]
    assert sorted(os.listdir(tmp_path)) == ["db"]  # no temporary folder left
    assert sorted(os.listdir(folder)) == sorted(
        [
            "database.json",
            "embeddings.npy",
            "maps_fc.npy",
            "maps_tc.npy",
            "mask_fc.npy",
            "mask_tc.npy",
            "rows.csv",
        ]
    )
    meta = json.loads((folder / "database.json").read_text())
    assert meta["format_version"] == 1 and meta["embedding_dims"] == {"combined": 4} and meta["n_items"] == 13
    assert meta["info"] == {"split": "metric-learning"} and meta["map_dtype"] == map_dtype

    db = EmbeddingDatabase.load(folder, expected_checkpoint_hash="abc123")
    assert len(db) == 13 and not db.separate
    assert isinstance(db.embedding(), np.memmap) and db.embedding().dtype == np.float32
    assert db.maps["fc"].dtype == np.dtype(map_dtype)
    assert db.rows["subject_id"].tolist()[:3] == ["9000000", "9000000", "9000001"]  # kept as strings
    assert db.rows["klg"].tolist() == [i % 5 for i in range(13)]
    np.testing.assert_array_equal(db.masks["tc"], _masks()["tc"])
    tol = 2e-3 if map_dtype == "float16" else 1e-6
    for i in (0, 12):
        got = db.get_map(i, "fc")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(items[i][1]))
        np.testing.assert_allclose(got, items[i][1], atol=tol, rtol=0)
    assert np.all(np.asarray(db.maps["fc"])[:, ~_masks()["fc"]] == 0)  # NaN -> 0 in storage
    ref = embed_combined(
        {
            k: torch.from_numpy(np.stack([it[j + 1] for it in items])).float()
            for j, k in enumerate(("fc", "tc"))
        }
    )
    np.testing.assert_allclose(db.embedding(), ref.numpy(), rtol=1e-6)

    q = ref[:3] + 0.01
    res = db.synthesize(q, k=4)
    direct = knn_synthesize(
        q,
        ref,
        {"fc": np.stack([it[1] for it in items]), "tc": np.stack([it[2] for it in items])},
        k=4,
        masks=_masks(),
    )
    torch.testing.assert_close(res.indices, direct.indices)
    for key in ("fc", "tc"):
        torch.testing.assert_close(res.maps[key], direct.maps[key], equal_nan=True, atol=tol + 1e-6, rtol=0)


def test_separate_embeddings(tmp_path):
    db = build_database(tmp_path / "db", iter(_items()), embed_separate, "h", progress=False, batch_size=4)
    assert db.separate and db.embedding_keys == ["fc", "tc"]
    assert (tmp_path / "db" / "embeddings_fc.npy").is_file()
    with pytest.raises(KeyError, match="name one"):
        db.embedding()
    q = {key: torch.tensor(np.array(db.embeddings[key][:2])) for key in ("fc", "tc")}
    res = db.synthesize(q, k=3)
    assert set(res) == {"fc", "tc"}
    assert res["fc"].indices[:, 0].tolist() == [0, 1]  # exact match is the nearest neighbour
    with pytest.raises(TypeError, match="key"):
        db.synthesize(q["fc"], k=3)


def test_checkpoint_hash_guard(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    h_file = checkpoint_hash(path)
    h_sd = checkpoint_hash(model.state_dict())
    assert len(h_file) == 64 and h_file != h_sd
    assert checkpoint_hash(model) == h_sd == checkpoint_hash(torch.load(path, weights_only=True))
    with torch.no_grad():
        model.weight[0, 0] += 1.0
    assert checkpoint_hash(model) != h_sd

    folder = tmp_path / "db"
    build_database(folder, _items(4), embed_combined, h_file, progress=False)
    assert EmbeddingDatabase.load(folder, expected_checkpoint_hash=h_file).checkpoint_hash == h_file
    with pytest.raises(CheckpointMismatchError) as err:
        EmbeddingDatabase.load(folder, expected_checkpoint_hash=h_sd)
    assert str(folder) in str(err.value) and h_file in str(err.value) and h_sd in str(err.value)


def test_overwrite_is_explicit_and_atomic(tmp_path):
    folder = tmp_path / "db"
    build_database(folder, _items(4), embed_combined, "old", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_database(folder, _items(4), embed_combined, "new", progress=False)

    def exploding(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_database(folder, _items(4), exploding, "new", progress=False, overwrite=True)
    assert EmbeddingDatabase.load(folder).checkpoint_hash == "old"  # untouched by the failed build
    assert sorted(os.listdir(tmp_path)) == ["db"]
    build_database(folder, _items(5), embed_combined, "new", progress=False, overwrite=True)
    db = EmbeddingDatabase.load(folder)
    assert db.checkpoint_hash == "new" and len(db) == 5
    assert sorted(os.listdir(tmp_path)) == ["db"]


def test_build_errors(tmp_path):
    items = _items(6)
    items[4][2][:] = np.nan
    with pytest.raises(DatabaseFormatError, match=r"row 4 \(subject_id='9000002'\): the tc map is all NaN"):
        build_database(tmp_path / "a", items, embed_combined, "h", progress=False)
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []

    items = _items(3)
    items[1] = (items[1][0], items[1][1][:, :-1], items[1][2])
    with pytest.raises(DatabaseFormatError, match="row 1.*fc map shape"):
        build_database(tmp_path / "b", items, embed_combined, "h", progress=False)

    with pytest.raises(DatabaseFormatError, match="subject_id"):
        build_database(
            tmp_path / "c", [({"side": "R"}, *_items(1)[0][1:])], embed_combined, "h", progress=False
        )
    with pytest.raises(DatabaseFormatError, match="B x D"):
        build_database(tmp_path / "d", _items(3), lambda b: torch.zeros(2, 4), "h", progress=False)
    with pytest.raises(DatabaseFormatError, match="no items"):
        build_database(tmp_path / "e", [], embed_combined, "h", progress=False)
    with pytest.raises(ValueError, match="map_dtype"):
        build_database(tmp_path / "f", _items(2), embed_combined, "h", map_dtype="int8", progress=False)
    assert os.listdir(tmp_path) == []


def test_load_errors(tmp_path):
    folder = tmp_path / "db"
    build_database(folder, _items(4), embed_combined, "h", progress=False)
    (folder / "maps_tc.npy").unlink()
    (folder / "rows.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing files \['maps_tc.npy', 'rows.csv'\]"):
        EmbeddingDatabase.load(folder)
    with pytest.raises(FileNotFoundError, match="not found"):
        EmbeddingDatabase.load(tmp_path / "nope")

    folder2 = tmp_path / "db2"
    build_database(folder2, _items(4), embed_combined, "h", progress=False)
    np.save(folder2 / "embeddings.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(DatabaseFormatError, match=r"embeddings.npy has shape \(3, 4\), expected \(4, 4\)"):
        EmbeddingDatabase.load(folder2)
    meta = json.loads((folder2 / "database.json").read_text())
    meta["format_version"] = 99
    (folder2 / "database.json").write_text(json.dumps(meta))
    with pytest.raises(DatabaseFormatError, match="version 99"):
        EmbeddingDatabase.load(folder2)

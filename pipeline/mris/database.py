"""Embedding database of MRIS: map embeddings + thickness maps + metadata in ONE versioned folder.

Layout (``FORMAT_VERSION`` 1)::

    <folder>/
      database.json          format name + version, creation info, N, embedding keys/dims, map keys/shapes,
                             map dtype, checkpoint hash (sha256) of the model that made the embeddings
      embeddings.npy         float32 N x D (MRIS-C: key "combined"), or
      embeddings_fc.npy ...  float32 N x D per key (MRIS-S: keys "fc", "tc")
      maps_fc.npy            N x H x W thickness in mm, float16 (default) or float32, 0 outside the mask
      maps_tc.npy
      mask_fc.npy            H x W bool atlas footprint (True = cartilage grid point)
      mask_tc.npy
      rows.csv               one row per item: subject_id (required), side, visit_month, klg, source, ...

Arrays are opened memory-mapped. The folder is written atomically: everything goes to a temporary sibling
folder that is renamed into place at the end, so a crash never leaves a half-written database.
``EmbeddingDatabase.load(folder, expected_checkpoint_hash=..., expected_info=...)`` refuses a database built by
another checkpoint, or with other creation info (e.g. the MRIS image size and variant). float16 storage rounds a thickness to a relative 2**-11 (<= 0.002 mm below 4 mm).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import checkpoint_hash
from pipeline.mris.knn import KNNResult, knn_synthesize, knn_synthesize_separate
from pipeline.user_errors import MissingInputError, UserInputError

#: What to run when an embedding database is missing or incomplete.
BUILD_HINT = ("Build it with `python -m monai.bundle run evaluating --config_file bundles/mris/configs/evaluate.json` "
              "(same checkpoint), or pass --database_dir DIR.")

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "COMBINED_KEY",
    "DatabaseFormatError",
    "CheckpointMismatchError",
    "EmbeddingDatabase",
    "build_database",
    "checkpoint_hash",
]

FORMAT_NAME = "mris-embedding-database"
FORMAT_VERSION = 1
#: Embedding key of a single (MRIS-C) embedding space, stored as ``embeddings.npy``.
COMBINED_KEY = "combined"
MAP_DTYPES = ("float16", "float32")

EmbedFn = Callable[[dict[str, torch.Tensor]], Union[torch.Tensor, Mapping[str, torch.Tensor]]]


class DatabaseFormatError(UserInputError):
    """The database folder, or the data given to build one, is malformed."""


class CheckpointMismatchError(UserInputError):
    """A database was built with another model checkpoint (or image size, variant) than the one it is used with."""


# --------------------------------------------------------------------------------------------- file names
def embedding_file(key: str) -> str:
    return "embeddings.npy" if key == COMBINED_KEY else f"embeddings_{key}.npy"


def maps_file(key: str) -> str:
    return f"maps_{key}.npy"


def mask_file(key: str) -> str:
    return f"mask_{key}.npy"


# --------------------------------------------------------------------------------------------- the database
class EmbeddingDatabase:
    """A loaded database (see the module docstring for the layout).

    Attributes:
        folder: database folder.
        info: contents of ``database.json``.
        rows: metadata table, one row per item (``subject_id`` as str).
        embeddings: ``{key: N x D}`` float32 (memory-mapped); key ``"combined"`` or the map keys.
        maps: ``{map_key: N x H x W}`` mm (memory-mapped, 0 outside the mask).
        masks: ``{map_key: H x W}`` bool footprints.
    """

    def __init__(
        self,
        folder: Path,
        info: dict,
        rows: pd.DataFrame,
        embeddings: dict[str, np.ndarray],
        maps: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
    ) -> None:
        self.folder = Path(folder)
        self.info = info
        self.rows = rows
        self.embeddings = embeddings
        self.maps = maps
        self.masks = masks

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, folder: str | os.PathLike, expected_checkpoint_hash: str | None = None, mmap: bool = True,
        expected_info: Mapping[str, Any] | None = None,
    ) -> EmbeddingDatabase:
        """Open a database folder (arrays memory-mapped unless ``mmap=False``).

        ``expected_info``: values the creation info (``info`` of :func:`build_database`) must hold, e.g.
        ``{"image_size": 128, "variant": "combined"}``; keys an older database does not record are not checked.

        Raises:
            FileNotFoundError: the folder or some of its files are missing (all missing files are named).
            DatabaseFormatError: unknown format/version, or inconsistent shapes.
            CheckpointMismatchError: ``expected_checkpoint_hash`` differs from the stored hash, or a value of
                ``expected_info`` from the stored one (one line naming both).
        """
        folder = Path(folder)
        meta_path = folder / "database.json"
        if not folder.is_dir():
            raise MissingInputError(f"embedding database folder not found: {folder}. {BUILD_HINT}")
        if not meta_path.is_file():
            raise MissingInputError(f"embedding database {folder}: missing file database.json. {BUILD_HINT}")
        info = json.loads(meta_path.read_text())
        if info.get("format") != FORMAT_NAME or info.get("format_version") != FORMAT_VERSION:
            raise DatabaseFormatError(
                f"{meta_path}: format {info.get('format')!r} version {info.get('format_version')!r}; "
                f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        stored = info.get("checkpoint_hash")
        if expected_checkpoint_hash is not None and stored != expected_checkpoint_hash:
            raise CheckpointMismatchError(
                f"embedding database {folder} was built with checkpoint sha256 {stored}, but the model in "
                f"use has {expected_checkpoint_hash}; rebuild the database with this model"
            )
        stored_info = info.get("info", {})
        clash = {k: v for k, v in (expected_info or {}).items() if k in stored_info and stored_info[k] != v}
        if clash:
            built = ", ".join(f"{k} {stored_info[k]!r}" for k in clash)
            wanted = ", ".join(f"{k} {v!r}" for k, v in clash.items())
            raise CheckpointMismatchError(
                f"embedding database {folder} was built for {built}, but the model in use expects {wanted}; "
                "rebuild the database with this model"
            )
        emb_keys, map_keys = list(info["embedding_keys"]), list(info["map_keys"])
        names = (
            [embedding_file(k) for k in emb_keys]
            + [maps_file(k) for k in map_keys]
            + [mask_file(k) for k in map_keys]
            + ["rows.csv"]
        )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MissingInputError(f"embedding database {folder}: missing files {missing}. {BUILD_HINT}")

        mode = "r" if mmap else None
        embeddings = {k: np.load(folder / embedding_file(k), mmap_mode=mode) for k in emb_keys}
        maps = {k: np.load(folder / maps_file(k), mmap_mode=mode) for k in map_keys}
        masks = {k: np.load(folder / mask_file(k)).astype(bool) for k in map_keys}
        rows = pd.read_csv(folder / "rows.csv", dtype={"subject_id": str})

        n = int(info["n_items"])
        problems = []
        for k, e in embeddings.items():
            if e.ndim != 2 or e.shape[0] != n or e.shape[1] != int(info["embedding_dims"][k]):
                problems.append(
                    f"{embedding_file(k)} has shape {e.shape}, expected ({n}, {info['embedding_dims'][k]})"
                )
        for k in map_keys:
            want = (n, *info["map_shapes"][k])
            if tuple(maps[k].shape) != want:
                problems.append(f"{maps_file(k)} has shape {maps[k].shape}, expected {want}")
            if tuple(masks[k].shape) != tuple(want[1:]):
                problems.append(f"{mask_file(k)} has shape {masks[k].shape}, expected {want[1:]}")
        if len(rows) != n:
            problems.append(f"rows.csv has {len(rows)} rows, expected {n}")
        if problems:
            raise DatabaseFormatError(f"embedding database {folder} is inconsistent: " + "; ".join(problems))
        return cls(folder, info, rows, embeddings, maps, masks)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.info["n_items"])

    def __repr__(self) -> str:
        return (
            f"EmbeddingDatabase({str(self.folder)!r}, n={len(self)}, embeddings={self.embedding_keys}, "
            f"maps={self.map_keys}, checkpoint={self.checkpoint_hash[:12]})"
        )

    @property
    def checkpoint_hash(self) -> str:
        return str(self.info["checkpoint_hash"])

    @property
    def embedding_keys(self) -> list[str]:
        return list(self.info["embedding_keys"])

    @property
    def map_keys(self) -> list[str]:
        return list(self.info["map_keys"])

    @property
    def separate(self) -> bool:
        """True for an MRIS-S database (one embedding space per map key)."""
        return self.embedding_keys != [COMBINED_KEY]

    def embedding(self, key: str | None = None) -> np.ndarray:
        """``N x D`` embeddings of ``key`` (default: the only key)."""
        if key is None:
            if len(self.embeddings) != 1:
                raise KeyError(f"several embedding keys {self.embedding_keys}: name one")
            key = self.embedding_keys[0]
        return self.embeddings[key]

    def get_map(self, index: int, key: str) -> np.ndarray:
        """Item ``index``'s ``key`` map as float32 ``H x W`` in mm, NaN outside the mask."""
        out = np.asarray(self.maps[key][index], dtype=np.float32).copy()
        out[~self.masks[key]] = np.nan
        return out

    def synthesize(
        self, query_emb: torch.Tensor | np.ndarray | Mapping[str, Any], k: int = 20, **kwargs
    ) -> KNNResult | dict[str, KNNResult]:
        """k-NN synthesis against this database.

        MRIS-C (one ``"combined"`` embedding): ``query_emb`` is ``Q x D``; returns one :class:`KNNResult`
        whose ``maps`` is ``{map_key: Q x H x W}``. MRIS-S: ``query_emb`` is ``{map_key: Q x D}``; returns
        ``{map_key: KNNResult}``. Keyword arguments go to :func:`knn_synthesize`.
        """
        if not self.separate:
            if isinstance(query_emb, Mapping):
                raise TypeError("this database has one (combined) embedding space: pass a Q x D tensor")
            return knn_synthesize(query_emb, self.embedding(), self.maps, k=k, masks=self.masks, **kwargs)
        if not isinstance(query_emb, Mapping):
            raise TypeError(f"this database has embedding keys {self.embedding_keys}: pass {{key: Q x D}}")
        return knn_synthesize_separate(query_emb, self.embeddings, self.maps, k=k, masks=self.masks, **kwargs)


# --------------------------------------------------------------------------------------------- building
class _RawArrayWriter:
    """Append rows of a fixed dtype/row shape to a raw file; turn it into ``.npy`` at the end."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.dtype = np.dtype(dtype)
        self.row_shape: tuple[int, ...] | None = None
        self.n = 0
        self._f = open(self.part, "wb")  # noqa: SIM115 - closed in finish()/close()

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = tuple(block.shape[1:])
        elif tuple(block.shape[1:]) != self.row_shape:
            raise DatabaseFormatError(f"{self.path.name}: row shape {block.shape[1:]} != {self.row_shape}")
        self._f.write(block.tobytes())
        self.n += block.shape[0]

    def finish(self) -> None:
        self._f.close()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n, *(self.row_shape or ())),
        }
        with open(self.path, "wb") as out, open(self.part, "rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, 1 << 24)
        self.part.unlink()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _to_numpy_2d(a: Any) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = np.squeeze(arr, axis=0) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    return arr.astype(np.float32, copy=False)


def build_database(
    folder: str | os.PathLike,
    items: Iterable[tuple],
    embed_fn: EmbedFn,
    checkpoint_hash: str,
    map_keys: Sequence[str] = MAP_KEYS,
    masks: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 64,
    map_dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> EmbeddingDatabase:
    """Embed every item and write the database folder atomically.

    Args:
        folder: target folder (must not exist unless ``overwrite``).
        items: iterable of ``(row, map_1, ..., map_K)`` with ``row`` a metadata mapping (``subject_id``
            required; e.g. ``side``, ``visit_month``, ``klg``, ``source``) and one ``H x W`` map in mm
            (NaN outside the footprint) per key of ``map_keys`` (default ``fc``, ``tc``).
        embed_fn: ``{key: B x H x W float32 mm, NaN outside} -> B x D`` tensor (MRIS-C; stored as
            ``"combined"``) or ``{key: B x D}`` (MRIS-S). It does its own network preprocessing
            (NaN -> 0, / 3 mm, resize, stacking); it is called under ``torch.inference_mode``.
        checkpoint_hash: :func:`checkpoint_hash` of the model behind ``embed_fn``.
        masks: ``{key: H x W}`` bool footprints; default: the finite pixels of the first item's maps.
        batch_size: items per ``embed_fn`` call.
        map_dtype: ``"float16"`` (default, half the disk) or ``"float32"``.
        overwrite: replace an existing folder (the old one is removed only after the new one is in place).
        progress: show a tqdm bar; ``total`` sizes it.
        info: extra JSON-serialisable creation info (stored under ``"info"``).

    Raises:
        DatabaseFormatError: a map that is all NaN (names the row), shape mismatches, missing subject_id,
            embeddings with the wrong batch size or non-finite values, no items.
    """
    folder = Path(folder)
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map_dtype must be one of {MAP_DTYPES}, got {map_dtype!r}")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"embedding database folder already exists: {folder} (pass overwrite=True)")
    map_keys = tuple(map_keys)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers: dict[str, _RawArrayWriter] = {}
    try:
        mask_np = {k: np.asarray(v, dtype=bool) for k, v in masks.items()} if masks is not None else None
        map_w = {k: _RawArrayWriter(tmp / maps_file(k), np.dtype(map_dtype)) for k in map_keys}
        writers.update({f"map:{k}": w for k, w in map_w.items()})
        emb_w: dict[str, _RawArrayWriter] = {}
        rows: list[dict] = []
        stats = {"nan_inside": 0, "finite_outside": 0}
        batch: list[tuple[dict, dict[str, np.ndarray]]] = []

        def flush() -> None:
            if not batch:
                return
            stacked = {k: torch.from_numpy(np.stack([m[k] for _, m in batch])) for k in map_keys}
            with torch.inference_mode():
                out = embed_fn(stacked)
            out_map = dict(out) if isinstance(out, Mapping) else {COMBINED_KEY: out}
            if emb_w and set(out_map) != set(emb_w):
                raise DatabaseFormatError(
                    f"embed_fn returned keys {sorted(out_map)}, earlier {sorted(emb_w)}"
                )
            first = len(rows) - len(batch)
            for key, e in out_map.items():
                e_np = (e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)).astype(
                    np.float32
                )
                if e_np.ndim != 2 or e_np.shape[0] != len(batch):
                    raise DatabaseFormatError(
                        f"embed_fn returned shape {e_np.shape} for key {key!r} on a batch of {len(batch)} (rows "
                        f"{first}..{len(rows) - 1}); expected B x D"
                    )
                if not np.isfinite(e_np).all():
                    raise DatabaseFormatError(
                        f"embed_fn returned non-finite embeddings in rows {first}..{len(rows) - 1}"
                    )
                if key not in emb_w:
                    emb_w[key] = _RawArrayWriter(tmp / embedding_file(key), np.float32)
                    writers[f"emb:{key}"] = emb_w[key]
                emb_w[key].append(e_np)
            for k in map_keys:
                block = np.stack([m[k] for _, m in batch])
                block = np.where(mask_np[k][None], np.nan_to_num(block, nan=0.0), 0.0)
                map_w[k].append(block)
            batch.clear()

        bar = tqdm(items, total=total, disable=not progress, desc="embedding database", unit="map")
        for item in bar:
            if len(item) != 1 + len(map_keys):
                raise DatabaseFormatError(
                    f"row {len(rows)}: expected (row, {', '.join(map_keys)}), got a tuple of {len(item)}"
                )
            meta = dict(item[0])
            where = f"row {len(rows)} (subject_id={meta.get('subject_id')!r})"
            if "subject_id" not in meta:
                raise DatabaseFormatError(f"row {len(rows)}: metadata has no 'subject_id' ({sorted(meta)})")
            maps_i = {k: _to_numpy_2d(m) for k, m in zip(map_keys, item[1:])}
            if mask_np is None:
                mask_np = {k: np.isfinite(m) for k, m in maps_i.items()}
            for k, m in maps_i.items():
                if m.shape != mask_np[k].shape:
                    raise DatabaseFormatError(
                        f"{where}: {k} map shape {m.shape} != mask shape {mask_np[k].shape}"
                    )
                finite = np.isfinite(m)
                if not finite.any():
                    raise DatabaseFormatError(f"{where}: the {k} map is all NaN")
                stats["nan_inside"] += int((~finite & mask_np[k]).any())
                stats["finite_outside"] += int((finite & ~mask_np[k]).any())
            rows.append(meta)
            batch.append((meta, maps_i))
            if len(batch) >= batch_size:
                flush()
        flush()
        bar.close()
        if not rows:
            raise DatabaseFormatError("no items given: refusing to write an empty database")
        if stats["nan_inside"] or stats["finite_outside"]:
            warnings.warn(
                f"building {folder}: {stats['nan_inside']} maps had NaN inside the mask (stored as 0 mm) and "
                f"{stats['finite_outside']} had values outside the mask (dropped)",
                RuntimeWarning,
                stacklevel=2,
            )
        for w in writers.values():
            w.finish()
        for k in map_keys:
            np.save(tmp / mask_file(k), mask_np[k])
        pd.DataFrame(rows).to_csv(tmp / "rows.csv", index=False)
        emb_keys = sorted(emb_w) if COMBINED_KEY not in emb_w else [COMBINED_KEY]
        meta_json = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "created_by": _creator(),
            "n_items": len(rows),
            "checkpoint_hash": str(checkpoint_hash),
            "embedding_keys": emb_keys,
            "embedding_dims": {k: int(emb_w[k].row_shape[0]) for k in emb_keys},  # type: ignore[index]
            "map_keys": list(map_keys),
            "map_shapes": {k: list(mask_np[k].shape) for k in map_keys},
            "map_dtype": map_dtype,
            "map_unit": "mm",
            "files": {
                "embeddings": {k: embedding_file(k) for k in emb_keys},
                "maps": {k: maps_file(k) for k in map_keys},
                "masks": {k: mask_file(k) for k in map_keys},
                "rows": "rows.csv",
            },
            "info": dict(info or {}),
        }
        (tmp / "database.json").write_text(json.dumps(meta_json, indent=2, default=str))
        _move_into_place(tmp, folder, overwrite)
    except BaseException:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingDatabase.load(folder)


def _creator() -> str:
    try:
        import pipeline

        return f"pipeline {getattr(pipeline, '__version__', '?')}"
    except Exception:  # pragma: no cover - defensive
        return "pipeline"


def _move_into_place(tmp: Path, folder: Path, overwrite: bool) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    if not overwrite:
        raise FileExistsError(f"embedding database folder already exists: {folder}")
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)

"""Re-runs, concurrency and interruption of an inference run into an output folder (issue 12, item 2).

One :class:`RunState` per run, shared by the MRIS / direct-synthesis front end
(:func:`pipeline.knee_inference.run_knees`), KNEEL (:func:`pipeline.landmarks.infer.run_folder`) and dess_seg
(:class:`pipeline.segmentation.inference.SafeInferenceRunner`). In the output folder it keeps:

* ``run_settings.json``: the run's settings (checkpoint digest, model and writer settings, ...) and their
  digest (:func:`settings_digest`). A run into a folder whose settings file has the same digest **resumes**;
  other settings (or outputs of an earlier run without a settings file: its manifest or journal) stop the run
  with :class:`RunSettingsError` -- a message naming ``--overwrite True`` -- unless ``overwrite=True``, which
  first deletes every output file the earlier run listed (and its manifest, journal and settings).
* ``run_items.jsonl``: the journal, one JSON line appended (and flushed) per COMPLETE item: its key, the stamp
  of its input (:func:`file_stamp`: size and modification time, plus whatever else decides the result, e.g.
  the landmark), its output files (relative paths) and the bundle's record for the manifest / summary. On
  resume an item is skipped when its last line has the same stamp and every listed output is still there
  (:meth:`RunState.previous`); a failed or missing item, or one whose input changed, is redone (its earlier
  files removed first: :meth:`RunState.forget`). Lines survive a killed process, so even after SIGKILL the
  re-run resumes.
* ``run.lock``: :func:`pipeline.io.paths.output_lock` for the length of the run: a second run into the same
  folder stops with :class:`pipeline.io.paths.OutputLockedError` (a stale lock is taken over).

While the run holds the state, SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C (the previous handler is put
back afterwards), so both stop cleanly: the bundle removes the item in progress and writes the outputs
manifest of the complete items (those of this run and the unreached complete items of the earlier one,
:meth:`RunState.unreached`); the same command resumes.

Sharded runs (torchrun, issue 16; :class:`pipeline.io.sharding.RankGroup`, taken from an initialised
``torch.distributed`` by default): rank 0 alone takes the lock and checks the settings; its outcome (an error, or
the earlier run's complete items) is broadcast, so every rank stops before writing when the folder is locked or
holds other settings. Each rank loops over its own items (:meth:`RunState.mine`: item ``k`` is rank
``k % world_size``'s), journals them in ``run_items.rank<r>.jsonl`` and shows its progress
(:meth:`RunState.progress`); at the end :meth:`RunState.merge` gathers the per-item results on rank 0, which
writes the summaries in item order (the bytes of a single-process run) and joins the journals into one
``run_items.jsonl``. An interrupted sharded run leaves the ranks' journals; the next run (any number of ranks)
reads them all and resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import signal
import threading
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import pandas as pd

from pipeline.io.atomic import remove_partials, write_text_atomic
from pipeline.io.paths import contained_path, output_lock
from pipeline.io.progress import RunProgress
from pipeline.io.results import OUTPUTS_MANIFEST
from pipeline.io.sharding import RankGroup, join_items
from pipeline.user_errors import UserInputError

__all__ = ["JOURNAL_FILE", "LOCK_FILE", "SETTINGS_FILE", "RunSettingsError", "RunState", "describe", "file_stamp",
           "settings_digest", "sigterm_as_interrupt", "weights_digest"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

#: The settings of the run that wrote an output folder.
SETTINGS_FILE = "run_settings.json"
#: One JSON line per complete item.
JOURNAL_FILE = "run_items.jsonl"
#: Held while a run writes into the folder.
LOCK_FILE = "run.lock"


class RunSettingsError(UserInputError):
    """The output folder holds outputs of a run with other settings (``--overwrite True`` replaces them)."""


# ------------------------------------------------------------------------------------------ digests
def describe(obj: Any, depth: int = 4) -> Any:
    """A JSON-able, stable description of a setting or a component (a transform chain, a writer): primitives as
    they are, paths / devices / dtypes as text, arrays as values (or their shape when large), mappings and
    sequences item by item, a component with a ``settings()`` method as what it returns, other objects as their
    class and public attributes (``depth`` levels; no memory addresses, so equal settings describe equally)."""
    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj else "nan"
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        a = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)
        return describe(a.tolist(), depth) if a.size <= 64 else f"<array {tuple(a.shape)} {a.dtype}>"
    if isinstance(obj, (torch.device, torch.dtype, np.dtype, type)):
        return str(obj)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    settings = getattr(obj, "settings", None)
    if callable(settings):
        with contextlib.suppress(TypeError):
            return describe(settings(), depth)
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth - 1) for k, v in obj.items()} if depth > 0 else f"<{len(obj)} entries>"
    if isinstance(obj, (list, tuple, set, frozenset)):
        seq = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [describe(v, depth - 1) for v in seq] if depth > 0 else f"<{len(obj)} items>"
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    attrs = getattr(obj, "__dict__", None)
    if not attrs or depth <= 0:
        return cls
    return {"class": cls, **{k: describe(v, depth - 1) for k, v in sorted(attrs.items())
                             if not k.startswith("_") and k not in _NOT_SETTINGS}}


#: Attributes that hold state, not settings (random generators, what a writer has written so far).
_NOT_SETTINGS = frozenset({"R", "notes", "written", "successes", "failures"})


def settings_digest(settings: Mapping[str, Any]) -> str:
    """sha256 (hex, first 16 digits) of the canonical JSON of ``describe(settings)``."""
    text = json.dumps(describe(settings, depth=8), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def weights_digest(module: Any) -> str:
    """sha256 (hex, first 16 digits) of a network's state dict (names, shapes, values; extra state such as a
    network's description by :func:`describe`): the same checkpoint gives the same digest whatever file it came
    from."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode("utf-8"))
        if not hasattr(v, "detach"):  # extra state, e.g. a network's own description
            h.update(json.dumps(describe(v, depth=8), sort_keys=True, default=str).encode("utf-8"))
            continue
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode("ascii"))
        try:
            h.update(t.numpy().tobytes())
        except TypeError:  # e.g. bfloat16
            h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def file_stamp(path: PathLike | None, *extra: Any) -> str:
    """``size:mtime_ns`` of a file (of every file of a folder, summed / latest), then ``extra`` joined by ``:``;
    ``""`` for a path that cannot be read (such an item is never taken as unchanged)."""
    if path is None or str(path) == "":
        return ""
    try:
        p = Path(path)
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        stats = [f.stat() for f in files]
    except OSError:
        return ""
    base = f"{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"
    return ":".join([base, *(str(x) for x in extra)])


# ------------------------------------------------------------------------------------------- SIGTERM
@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises ``KeyboardInterrupt`` (a clean stop, like Ctrl-C); the previous
    handler is restored afterwards. Outside the main thread (no signal handlers there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------------ run state
class RunState:
    """Resume / refuse / overwrite, lock and SIGTERM handling of one run into ``folder`` (module docstring).

    Args:
        folder: the output folder.
        settings: everything that decides the outputs (JSON-able after :func:`describe`); compared by digest.
        what: the run, in messages (``"MRIS inference"``).
        overwrite: replace the outputs of an earlier run with other settings instead of refusing.
        manifest: the bundle's outputs manifest (its ``outputs`` column lists an older run's files).

    Use as a context manager around the loop over items::

        with RunState(out, settings, "KNEEL inference", overwrite) as state:
            for key, item in ...:
                prev = state.previous(key, stamp)      # None: (re)do it
                if prev is None:
                    state.forget(key)                  # files of an earlier, failed / stale attempt
                    ... write ...
                    state.record(key, stamp, files, record)
    """

    def __init__(self, folder: PathLike, settings: Mapping[str, Any], what: str = "run", overwrite: bool = False,
                 manifest: str = OUTPUTS_MANIFEST, group: RankGroup | None = None) -> None:
        self.folder = Path(folder)
        self.settings = _folder_neutral(describe(dict(settings), depth=8), self.folder)
        self.digest = settings_digest(self.settings)
        self.what = what
        self.overwrite = bool(overwrite)
        self.manifest = manifest
        self.done: dict[str, dict] = {}  # complete items of the earlier run (last journal line per key)
        self.reached: set[str] = set()
        self.group = group if group is not None else RankGroup.current(what)
        self._index: dict[str, int] = {}  # key -> item index (the merged journal's order)
        self._at: int | None = None  # index of the item being done (set by :meth:`mine`)
        self._stack: contextlib.ExitStack | None = None
        self._journal = None

    # ----------------------------------------------------------------------------------- context
    def __enter__(self) -> RunState:
        self.folder.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        group = self.group
        try:
            error = None
            try:  # rank 0 alone takes the lock and decides resume / refuse / overwrite; the others learn the outcome
                if group.rank == 0:
                    stack.enter_context(output_lock(self.folder, LOCK_FILE, what=self.what))
                    remove_partials(self.folder)
                    self._previous_run()
                    write_text_atomic(self.folder / SETTINGS_FILE, json.dumps(
                        {"what": self.what, "digest": self.digest, "settings": self.settings}, indent=1, default=str))
                    if group.sharded or self._rank_journals():  # one journal (an interrupted sharded run's joined)
                        self._write_merged_journal(self.done)
            except Exception as e:
                if not group.sharded:
                    raise
                error = e
            if group.sharded:
                told, self.done = group.broadcast((_picklable(error), self.done))
                if told is not None:
                    raise error if error is not None else told  # rank 0 its own error, the others rank 0's
            self._journal = stack.enter_context(open(self._journal_path(), "a", encoding="utf-8"))
            stack.enter_context(sigterm_as_interrupt())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack, self._journal = self._stack, None, None
        if stack is not None:
            stack.close()

    # ------------------------------------------------------------------------------------- items
    def mine(self, items: Sequence[T]) -> Iterator[tuple[int, T]]:
        """``(index, item)`` for the items of this rank (:meth:`pipeline.io.sharding.RankGroup.mine`: item ``k``
        is rank ``k % world_size``'s); all of them in a single process."""
        for i, item in self.group.mine(items):
            self._at = i
            yield i, item
        self._at = None

    def progress(self, total: int, desc: str | None = None, unit: str = "item", enabled: bool = True
                 ) -> RunProgress:
        """A :class:`pipeline.io.progress.RunProgress` for this rank's ``total`` items (bar + progress file in the
        output folder; rank 0 shows the total of every rank)."""
        return RunProgress(self.folder, total, desc or self.what, unit=unit, rank=self.group.rank,
                           world_size=self.group.world_size, enabled=enabled)

    def merge(self, per_item: Mapping[int, T]) -> dict[int, T] | None:
        """At the end of a run: every rank's ``{item index: result}`` joined on rank 0 in item order (``None`` on
        the other ranks), the items every rank reached joined too (so :meth:`unreached` is the run's), and the
        ranks' journals joined into one ``run_items.jsonl`` in item order (the journal a single process writes).
        A single process gets ``per_item`` back in item order."""
        group = self.group
        if not group.sharded:
            return dict(sorted(per_item.items()))
        parts = group.gather((dict(per_item), sorted(self.reached), self._index))
        if parts is None:
            return None
        for _, reached, index in parts:
            self.reached.update(reached)
            self._index.update(index)
        self._write_merged_journal(self._read_journal())
        return join_items((part for part, _, _ in parts), self.what)

    def previous(self, key: str, stamp: str = "") -> dict | None:
        """The earlier run's journal entry of ``key`` (``item, stamp, outputs, record``) when it can be kept: same
        ``stamp`` (non-empty) and every output present inside the folder; else ``None``. Marks ``key`` reached."""
        self._reach(key)
        prev = self.done.get(key)
        if prev is None or not stamp or prev.get("stamp") != stamp or not self._present(prev):
            return None
        return prev

    def forget(self, key: str) -> None:
        """Remove the files of an earlier attempt of ``key`` (it is being redone, or failed this time)."""
        self._reach(key)
        prev = self.done.pop(key, None)
        if prev is not None:
            self._remove(prev.get("outputs", ()))
            self._write({"item": key, "removed": True})

    def record(self, key: str, stamp: str, outputs: Iterable[PathLike], record: Mapping[str, Any] | None = None
               ) -> dict:
        """Journal ``key`` as complete (call after all its outputs are written); returns the entry."""
        self._reach(key)
        entry = {"item": key, "stamp": stamp, "outputs": [self._rel(p) for p in outputs if p],
                 "record": dict(record or {})}
        self._write(entry)
        return entry

    def unreached(self) -> list[dict]:
        """Complete entries of the earlier run not (yet) reached by this one, whose outputs are all present (their
        files stay, so the manifest lists them)."""
        return [e for k, e in self.done.items() if k not in self.reached and self._present(e)]

    def path(self, rel: str) -> Path:
        """``rel`` (as journalled) inside the folder (:func:`pipeline.io.paths.contained_path`)."""
        return contained_path(self.folder, *Path(rel).parts)

    def remove(self, paths: Iterable[PathLike]) -> None:
        """Delete files (absolute, or relative to the folder) that lie inside the folder; empty folders they leave
        inside it go too."""
        self._remove([self._rel(p) for p in paths if p])

    # ----------------------------------------------------------------------------------- helpers
    def _reach(self, key: str) -> None:
        self.reached.add(key)
        if self._at is not None:
            self._index.setdefault(key, self._at)

    def _rel(self, p: PathLike) -> str:
        p = Path(p)
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.resolve().relative_to(self.folder.resolve()).as_posix()
        except ValueError:
            return str(p)

    def _present(self, entry: Mapping[str, Any]) -> bool:
        try:
            return all(self.path(r).is_file() for r in entry.get("outputs", ()))
        except UserInputError:
            return False

    def _remove(self, rels: Iterable[str]) -> None:
        for r in rels:
            with contextlib.suppress(UserInputError, OSError):
                p = self.path(r)
                p.unlink(missing_ok=True)
                parent = p.parent
                while parent != self.folder.resolve() and parent.is_relative_to(self.folder.resolve()):
                    if any(parent.iterdir()):
                        break
                    parent.rmdir()
                    parent = parent.parent

    def _write(self, entry: Mapping[str, Any]) -> None:
        if self._journal is None:
            raise RuntimeError("RunState is used outside its 'with' block")
        self._journal.write(json.dumps(entry, default=str) + "\n")
        self._journal.flush()

    def _journal_path(self) -> Path:
        """This process's journal: ``run_items.jsonl``, or ``run_items.rank<r>.jsonl`` for a rank of a sharded run
        (joined into the first by :meth:`merge`, or by the next run)."""
        if not self.group.sharded:
            return self.folder / JOURNAL_FILE
        return self.folder / JOURNAL_FILE.replace(".jsonl", f".rank{self.group.rank}.jsonl")

    def _rank_journals(self) -> list[Path]:
        """The ranks' journals of a sharded run in the folder (rank order)."""
        def rank(p: Path) -> int:
            digits = p.name[len("run_items.rank"):-len(".jsonl")]
            return int(digits) if digits.isdigit() else -1

        return sorted((p for p in self.folder.glob("run_items.rank*.jsonl") if rank(p) >= 0), key=rank)

    def _journals(self) -> list[Path]:
        """The journal, then the ranks' journals of a sharded run (a later file's line wins)."""
        main = self.folder / JOURNAL_FILE
        return ([main] if main.is_file() else []) + self._rank_journals()

    def _write_merged_journal(self, entries: Mapping[str, dict]) -> None:
        """One ``run_items.jsonl`` of ``entries`` (item order where known, then the others as they were); the
        ranks' journals go."""
        order = sorted(entries, key=lambda k: self._index.get(k, len(self._index)))
        write_text_atomic(self.folder / JOURNAL_FILE, "".join(json.dumps(entries[k], default=str) + "\n"
                                                              for k in order))
        for p in self._rank_journals():
            p.unlink(missing_ok=True)

    def _read_journal(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for path in self._journals():
            self._read_one_journal(path, out)
        return out

    def _read_one_journal(self, path: Path, out: dict[str, dict]) -> None:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed process
            if not isinstance(e, dict) or not e.get("item"):
                continue
            if e.get("removed"):
                out.pop(e["item"], None)
            else:
                out[e["item"]] = e

    def _manifest_outputs(self) -> list[str]:
        path = self.folder / self.manifest
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            return []
        return [p for v in df.get("outputs", pd.Series(dtype=str)) for p in str(v).split(";") if p]

    def _previous_run(self) -> None:
        settings_file = self.folder / SETTINGS_FILE
        used = [f for f in (settings_file, *self._journals(), self.folder / self.manifest) if f.exists()]
        if not used:
            return
        try:
            old = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        same = isinstance(old, dict) and old.get("digest") == self.digest
        if same and not self.overwrite:
            self.done = self._read_journal()
            logger.info("%s: resuming the run in %s (%d complete item(s) found)", self.what, self.folder,
                        len(self.done))
            return
        if not self.overwrite:
            if not isinstance(old, dict):
                why = f"an earlier run without a readable {SETTINGS_FILE} ({', '.join(f.name for f in used)})"
            else:
                before = old.get("settings", {}) if isinstance(old.get("settings"), dict) else {}
                diff = [k for k in sorted(set(before) | set(self.settings)) if before.get(k) != self.settings.get(k)]
                shown = ", ".join(f"{k}: {_short(before.get(k))} -> {_short(self.settings.get(k))}" for k in diff[:4])
                why = f"a {old.get('what', 'run')} with other settings ({shown or 'digest ' + str(old.get('digest'))})"
            raise RunSettingsError(
                f"{self.folder} holds the outputs of {why}; pass --overwrite True to replace them, or choose another "
                f"--output_dir (a run with the same settings and checkpoint resumes)")
        rels = {r for e in self._read_journal().values() for r in e.get("outputs", ())}
        rels |= set(self._manifest_outputs())
        self._remove(sorted(rels))
        for f in used:
            f.unlink(missing_ok=True)
        logger.warning("--overwrite: removed %d output file(s) of the earlier run in %s", len(rels), self.folder)


def _picklable(error: BaseException | None) -> BaseException | None:
    """``error`` itself when it can be sent to the other ranks (pickled), else a ``RuntimeError`` saying it."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - e.g. an exception holding an open file
        return RuntimeError(f"rank 0 stopped: {type(error).__name__}: {error}")


def _folder_neutral(obj: Any, folder: Path) -> Any:
    """``obj`` (a :func:`describe` result) with the output folder's own path written ``<output_dir>``: the folder
    may be moved or renamed (or be another rank's view of the same folder) and still resume."""
    roots = sorted({os.fspath(folder), os.fspath(folder.absolute()), os.fspath(folder.resolve())}, key=len,
                   reverse=True)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            for r in roots:
                if v == r or v.startswith(r + os.sep):
                    return "<output_dir>" + v[len(r):]
            return v
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(obj)


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= n else text[: n - 3] + "..."

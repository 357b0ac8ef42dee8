"""Output containment: every output path is built from a sanitised item name and stays inside its folder.

Bundles name their per-item outputs after an identifier that comes from the user's data (a manifest's
``subject_id``, a file name, a path below an input folder). This module turns such identifiers into safe,
unique file-name stems and refuses, with a message that says what to change, anything that could write
outside the output folder or overwrite another item's files:

* :func:`safe_name` checks one identifier: not empty, no ``/`` or ``\\``, not ``.`` / ``..``, not absolute, no
  control characters, not starting with ``.`` (hidden / temporary files), at most :data:`MAX_NAME_LEN`
  characters. It raises :class:`UnsafeNameError` (a :class:`~pipeline.user_errors.UserInputError`) otherwise;
  it never silently rewrites a name (two rewritten names could collide).
* :func:`name_from_path` names an input by its FULL path below the input folder (parts joined by ``_``), with
  only a known data extension removed (``.nii.gz``, ``.nii``, ``.dcm``, ...): ``knee_L.nii.gz`` -> ``knee_L``,
  ``knee_L.v3.nii.gz`` -> ``knee_L.v3`` (never the stem cut at the first dot).
* :func:`contained_path` joins a folder and a file name and resolves the result (symlinks included); a path
  that does not lie inside the folder raises :class:`OutsideOutputError`.
* :func:`find_collisions` groups names that would write the same files (compared case-insensitively, as on
  macOS / Windows file systems) so that a bundle can record each of them as a failed row.
* :func:`output_lock` holds a lock file in the output folder for the length of a run, so that a second run
  into the same folder stops with :class:`OutputLockedError` (naming the process that holds it) instead of
  mixing its files with the first one's. A lock left by a process that no longer runs (same host) is stale and
  taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Union

from pipeline.user_errors import UserInputError

__all__ = ["DATA_EXTENSIONS", "MAX_NAME_LEN", "OutputLockedError", "OutsideOutputError", "UnsafeNameError",
           "contained_path", "find_collisions", "name_from_path", "name_problems", "output_lock", "safe_name",
           "strip_data_extension"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Longest accepted item name (file systems allow 255 bytes per name; suffixes such as ``_grid.json`` are added).
MAX_NAME_LEN = 200
#: Extensions removed from input file names by :func:`name_from_path` (longest first).
DATA_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm", ".npy", ".png")


class UnsafeNameError(UserInputError):
    """An item identifier cannot be used as an output file name (the message says why and what to change)."""


class OutsideOutputError(UserInputError):
    """An output path would lie outside the output folder."""


class OutputLockedError(UserInputError):
    """Another run is writing into the same output folder."""


def safe_name(ident: object, what: str = "item name") -> str:
    """``ident`` as a file-name stem, checked; raises :class:`UnsafeNameError` with the reason otherwise."""
    name = "" if ident is None else str(ident)
    hint = f"; change the {what} in the input (letters, digits, '_', '-', '.' only are safe)"
    if not name.strip():
        raise UnsafeNameError(f"empty {what}{hint}")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise UnsafeNameError(f"{what} {name!r} contains control characters{hint}")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise UnsafeNameError(f"{what} {name!r} is an absolute path, not a name{hint}")
    if "/" in name or "\\" in name:
        raise UnsafeNameError(f"{what} {name!r} contains a path separator (would write into another folder){hint}")
    if name in (".", ".."):
        raise UnsafeNameError(f"{what} {name!r} is a relative folder reference{hint}")
    if name.startswith("."):
        raise UnsafeNameError(f"{what} {name!r} starts with '.' (hidden / temporary file names are reserved){hint}")
    if len(name) > MAX_NAME_LEN:
        raise UnsafeNameError(f"{what} {name[:40]!r}... is {len(name)} characters long (at most {MAX_NAME_LEN}){hint}")
    return name


def strip_data_extension(file_name: str) -> str:
    """``file_name`` without one known data extension (:data:`DATA_EXTENSIONS`, case-insensitive)."""
    low = file_name.lower()
    for ext in DATA_EXTENSIONS:
        if low.endswith(ext) and len(file_name) > len(ext):
            return file_name[: -len(ext)]
    return file_name


def name_from_path(path: PathLike, root: PathLike | None = None) -> str:
    """Output name of an input file or series folder: its path below ``root`` (its file name when ``root`` is
    ``None`` or does not contain it), parts joined by ``_``, the data extension of the last part removed."""
    p = Path(path)
    parts: tuple[str, ...] = (p.name,)
    if root is not None:
        try:
            parts = p.relative_to(Path(root)).parts or (p.name,)
        except ValueError:
            pass
    return "_".join([*parts[:-1], strip_data_extension(parts[-1])])


def contained_path(folder: PathLike, *names: str) -> Path:
    """``folder / names...``, refused with :class:`OutsideOutputError` unless it resolves inside ``folder``
    (``..``, absolute names and symlinks that point elsewhere are all caught)."""
    base = Path(folder).resolve()
    target = base.joinpath(*names)
    resolved = target.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise OutsideOutputError(f"output {'/'.join(names)!r} would be written to {resolved}, outside the output "
                                 f"folder {base}; rename the item")
    return target


def find_collisions(names: Iterable[str]) -> dict[str, list[int]]:
    """``{name: [indices]}`` for every name given more than once (case-insensitive): those items would write
    the same files."""
    groups: dict[str, list[int]] = defaultdict(list)
    first: dict[str, str] = {}
    for i, n in enumerate(names):
        key = unicodedata.normalize("NFC", str(n)).casefold()
        first.setdefault(key, str(n))
        groups[key].append(i)
    return {first[k]: v for k, v in groups.items() if len(v) > 1}


def name_problems(names: Iterable[str], sources: Iterable[object] | None = None, what: str = "item name"
                  ) -> dict[int, str]:
    """``{index: reason}`` for every output name that cannot be used: unsafe (:func:`safe_name`) or shared with
    another input (:func:`find_collisions`; ``sources`` name the inputs in the message). The others are fine."""
    names = [str(n) for n in names]
    srcs = [str(s) for s in sources] if sources is not None else names
    problems: dict[int, str] = {}
    for i, n in enumerate(names):
        try:
            safe_name(n, what)
        except UnsafeNameError as e:
            problems[i] = f"unsafe output name: {e}"
    ok = [i for i in range(len(names)) if i not in problems]
    for name, idx in find_collisions([names[i] for i in ok]).items():
        group = [ok[j] for j in idx]
        shared = ", ".join(srcs[j] for j in group)
        for j in group:
            problems[j] = (f"output name {name!r} is shared by {len(group)} inputs ({shared}); their outputs would "
                           "overwrite each other, so none is written: rename the inputs")
    return problems


#: Seconds a lock file without readable contents counts as "being written" (not stale).
_LOCK_GRACE_S = 60.0


def _lock_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _holder_alive(holder: dict | None, path: Path) -> bool:
    if not holder or not isinstance(holder.get("pid"), int):
        try:  # a lock being written right now has no contents yet
            return time.time() - path.stat().st_mtime < _LOCK_GRACE_S
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot check a process on another machine
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: PathLike, name: str = "run.lock", what: str = "run") -> Iterator[Path]:
    """Hold ``folder/name`` (created exclusively, holding pid / host / start time) while the block runs.

    Raises :class:`OutputLockedError` when a live process holds it (a process of another host is assumed
    alive; the message says how to remove the lock by hand). A stale lock (its process is gone) is replaced.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if _holder_alive(holder, path):
                who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                       if holder else "another process")
                raise OutputLockedError(
                    f"{folder} is in use by another {what} ({who}; lock file {path}). Wait for it to finish or "
                    f"choose another output folder; if no such run is active, delete {path}.") from None
            logger.warning("removing stale lock %s (%s is no longer running)", path, holder)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise OutputLockedError(f"could not take the lock {path}; another {what} keeps taking it")
    try:
        yield path
    finally:
        if _lock_holder(path) == me:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

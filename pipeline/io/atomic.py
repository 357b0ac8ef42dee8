"""Atomic file and folder writes: a reader never sees a half-written output.

Everything is written under a temporary name in the same folder and renamed into place when complete
(``os.replace`` is atomic on POSIX within one filesystem). Leftover temporaries from an interrupted run
carry the ``.partial`` marker in their name and are never mistaken for results.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool = False) -> None:
    """Give a ``mkstemp`` / ``mkdtemp`` temporary (created 0600 / 0700) the mode a plain ``open`` / ``mkdir``
    would give (0666 / 0777 less the umask), so that results stay readable by colleagues and PACS tools."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it to ``target``.

    On error the temporary is removed and ``target`` is left untouched. Use for files whose writer wants a
    path (nibabel, pydicom, numpy): the temporary keeps ``suffix`` (e.g. ``".nii.gz"``) so that writers
    choosing the format by extension still work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL + suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            _default_mode(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` as a whole.

    An existing ``target`` is replaced only after the new folder is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent))
    try:
        yield tmp
        _default_mode(tmp, directory=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old{PARTIAL}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_partials(folder: str | os.PathLike) -> int:
    """Delete leftover temporaries of interrupted runs directly inside ``folder``; return how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(".") and PARTIAL in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n

"""Errors a user can fix, and the one-line report of them in bundle runs.

:class:`UserInputError` is the base of every error whose message already says which file is wrong and what
to run or pass instead (missing manifest or checkpoint, a checkpoint that does not fit the settings, ...).
Bundle configs call :func:`friendly_errors` first in their ``initialize`` list, then the ``require_*``
checks, so that a run with no data or no model stops before any folder is created, with one line on
stderr and exit code 1; the full traceback goes to :func:`error_log_path` (or to the terminal with
``--debug True``). Other exceptions keep Python's usual traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = [
    "UserInputError", "MissingInputError", "CheckpointError", "CheckpointNotFoundError", "CheckpointReadError",
    "NoStateDictError", "NoDescriptionError", "WeightsMismatchError", "SettingsMismatchError", "error_log_path", "find_user_error", "friendly_errors",
    "require_checkpoint", "require_input", "require_manifest", "require_path",
]


class UserInputError(ValueError):
    """Bad or missing input the user can fix; the message names the file and what to do."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


# ------------------------------------------------------------------ checkpoints (raised by pipeline.io.checkpoints)
class CheckpointError(UserInputError):
    """A model checkpoint cannot be used; the message names the file. Base of the classes below."""


class CheckpointNotFoundError(CheckpointError, MissingInputError):
    """The checkpoint file does not exist."""


class CheckpointReadError(CheckpointError):
    """The file is not a readable torch checkpoint (truncated, or not written by ``torch.save``)."""


class NoStateDictError(CheckpointError):
    """The checkpoint holds no network state dict (bare, or under ``model`` / ``network`` / ``state_dict``)."""


class NoDescriptionError(CheckpointError):
    """The checkpoint does not describe its network (written before checkpoints did) and no settings were given."""


class WeightsMismatchError(CheckpointError):
    """The checkpoint's weights do not fit the network (missing / unexpected keys, other shapes)."""


class SettingsMismatchError(CheckpointError):
    """Settings given by the user, or the network a checkpoint is loaded into, contradict the checkpoint's own
    description of its network (architecture or expected preprocessing)."""


def error_log_path() -> Path:
    """Where the last bundle run's full traceback of a user error is written (outside any output folder)."""
    return Path(tempfile.gettempdir()) / "kneeoa-pipeline-last-error.log"


def find_user_error(exc: Optional[BaseException]) -> Optional[UserInputError]:
    """The first :class:`UserInputError` in ``exc``'s cause / context chain (MONAI wraps config errors in
    ``RuntimeError("Failed to evaluate ...")``), or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_previous_hook: Optional[Callable[..., Any]] = None


def friendly_errors(debug: bool = False) -> bool:
    """Report uncaught :class:`UserInputError` as ``error: <message>`` (one line) from now on.

    Installs a ``sys.excepthook`` that handles only user errors (anywhere in the exception chain) and hands
    everything else to the previous hook. ``debug=True`` (config ``--debug True`` or ``KNEEOA_DEBUG=1``)
    keeps the full traceback. Returns whether the hook is active; calling it again is harmless.
    """
    global _previous_hook
    debug = bool(debug) or os.environ.get("KNEEOA_DEBUG", "") not in ("", "0")
    if debug:
        if sys.excepthook is _hook:
            sys.excepthook = _previous_hook or sys.__excepthook__
        return False
    if sys.excepthook is not _hook:
        _previous_hook, sys.excepthook = sys.excepthook, _hook
    return True


def _hook(exc_type: type, exc: BaseException, tb: Any) -> None:
    err = find_user_error(exc)
    if err is None:
        (_previous_hook or sys.__excepthook__)(exc_type, exc, tb)
        return
    log = error_log_path()
    try:
        log.write_text("".join(traceback.format_exception(exc_type, exc, tb)))
        where = f" (traceback: {log}; --debug True prints it)"
    except OSError:
        where = " (--debug True prints the traceback)"
    first, *rest = str(err).strip().splitlines() or [type(err).__name__]
    print("\n".join([f"error: {first}{where}", *rest]), file=sys.stderr, flush=True)


def _given(value: Any) -> bool:
    return not (value is None or str(value).strip() in ("", "None", "none", "null"))


def require_path(path: Any, what: str, hint: str, kind: str = "any") -> str:
    """Raise :class:`MissingInputError` ``"<what> not found: <path>. <hint>"`` unless ``path`` exists
    (``kind``: ``"file"``, ``"dir"`` or ``"any"``). Returns ``str(path)``."""
    p = Path(str(path)) if _given(path) else None
    ok = p is not None and {"file": p.is_file, "dir": p.is_dir}.get(kind, p.exists)()
    if not ok:
        raise MissingInputError(f"{what} not found: {path}. {hint}")
    return str(path)


def require_manifest(path: Any, make: str = "python -m pipeline cohort --out demo_output/cohort -n 40") -> str:
    """:func:`require_path` for a manifest CSV; ``make`` is the command that writes a suitable one."""
    return require_path(path, "manifest", f"Make a synthetic cohort with `{make}` (or `make demo`), or pass "
                        "--manifest PATH/manifest.csv.",
                        "file")


def require_checkpoint(path: Any, train: str, what: str = "checkpoint", option: str = "--checkpoint") -> str:
    """:func:`require_path` for a model file; ``train`` is the command that writes it."""
    return require_path(path, what, f"Train one with `{train}`, or pass {option} PATH.", "file")


def require_input(path: Any, what: str = "input", option: str = "--input") -> str:
    """:func:`require_path` for a DICOM file / folder (or a manifest, where the bundle takes one)."""
    return require_path(path, what, f"Pass {option} PATH (a DICOM file or a folder of DICOM files, or a "
                        "manifest CSV where the bundle takes one).")

"""Knee-visit manifests: schema-checked loading with row-precise errors, and subject-level splits.

The schema lives in ``data_manifests/knee_visit.schema.json`` (one entry per column: type, required,
allowed values or range, description). :func:`load_manifest` reports every problem it finds as
``row N (subject S, side X, month M): column C: what is wrong`` in one :class:`ManifestError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.bundle_paths import manifest_schema_path
from pipeline.user_errors import UserInputError

#: ``data_manifests/knee_visit.schema.json`` of the repository or of the installed package.
SCHEMA_PATH = manifest_schema_path()
MAX_REPORTED = 20


class ManifestError(UserInputError):
    """A manifest does not satisfy its schema; the message lists the offending rows and columns."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return json.loads(Path(path).read_text())


def _row_label(df: pd.DataFrame, i: int) -> str:
    parts = [f"row {i + 2}"]  # +2: header line and 1-based numbering, as a spreadsheet shows it
    ident = [f"{c}={df.at[i, c]}" for c in ("subject_id", "side", "visit_month") if c in df.columns]
    return parts[0] + (f" ({', '.join(ident)})" if ident else "")


def validate_manifest(df: pd.DataFrame, root: Optional[str | Path] = None, schema: Optional[dict] = None,
                      check_paths: Iterable[str] = (), name: str = "manifest") -> list[str]:
    """Return a list of problems (empty if valid). ``check_paths``: path columns whose files must exist."""
    schema = schema or load_schema()
    cols = schema["columns"]
    problems: list[str] = []
    missing = [c for c, spec in cols.items() if spec.get("required") and c not in df.columns]
    if missing:
        return [f"{name}: missing required column(s) {missing}; present: {list(df.columns)}"]
    df = df.reset_index(drop=True)
    for c, spec in cols.items():
        if c not in df.columns:
            continue
        kind = spec["type"]
        for i, val in enumerate(df[c].tolist()):
            empty = val is None or (isinstance(val, float) and np.isnan(val)) or (isinstance(val, str) and val == "")
            if empty:
                if spec.get("required"):
                    problems.append(f"{_row_label(df, i)}: column '{c}' is empty but required")
                continue
            err = _check_value(val, kind, spec, root, c in check_paths)
            if err:
                problems.append(f"{_row_label(df, i)}: column '{c}': {err}")
    key = schema.get("unique")
    if key and all(k in df.columns for k in key):
        dup = df.duplicated(subset=key, keep=False)
        for i in np.nonzero(dup.to_numpy())[0][:MAX_REPORTED]:
            problems.append(f"{_row_label(df, int(i))}: duplicate {tuple(key)}")
    return problems


def _check_value(val, kind: str, spec: dict, root, check_path: bool) -> Optional[str]:
    try:
        if kind == "int":
            f = float(val)
            if f != int(f):
                return f"expected an integer, got {val!r}"
            val = int(f)
        elif kind == "float":
            val = float(val)
            if not np.isfinite(val):
                return f"expected a finite number, got {val!r}"
        elif kind == "str":
            val = str(val)
        elif kind == "points":
            pts = np.asarray(json.loads(val) if isinstance(val, str) else val, dtype=float)
            if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
                return f"expected a JSON list of [x, y] pairs, got {str(val)[:60]!r}"
            return None
        elif kind == "path":
            if check_path:
                p = Path(val)
                p = p if p.is_absolute() or root is None else Path(root) / p
                if not p.exists():
                    return f"file not found: {p}"
            return None
    except (TypeError, ValueError) as e:
        return f"cannot read {val!r} as {kind} ({e})"
    if "allowed" in spec and val not in spec["allowed"]:
        return f"{val!r} is not one of {spec['allowed']}"
    if "min" in spec and val < spec["min"]:
        return f"{val} is below the minimum {spec['min']}"
    if "max" in spec and val > spec["max"]:
        return f"{val} is above the maximum {spec['max']}"
    return None


def load_manifest(path: str | Path, check_paths: Sequence[str] = (), schema: Optional[dict] = None,
                  require_columns: Sequence[str] = (), allow_empty: bool = False) -> pd.DataFrame:
    """Read and validate a knee-visit CSV manifest; raise :class:`ManifestError` listing every problem.

    Relative paths are resolved against the manifest's folder; the returned frame carries that folder in
    ``df.attrs["root"]``. ``check_paths`` names path columns whose files must exist (e.g. ``["fc_map"]``).
    ``require_columns``: columns the caller needs although the schema makes them optional (e.g.
    ``["labels_nifti"]`` for thickness maps). An empty file (no header) is always an error; a file with a header
    and no rows is one unless ``allow_empty``.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"subject_id": str, "side": str, "study_date": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: the file is empty (no header line, no rows); a manifest is a CSV with a "
                            f"header line (subject_id, side, visit_month, ...) and one row per knee-visit") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable CSV ({e})") from None
    problems = validate_manifest(df, root=path.parent, schema=schema, check_paths=check_paths, name=str(path))
    absent = [c for c in require_columns if c not in df.columns]
    if absent and not problems:
        problems = [f"{path}: missing column(s) {absent} needed here; present: {list(df.columns)}"]
    if not problems and len(df) == 0 and not allow_empty:
        problems = [f"{path}: a header line but no rows (row 2 is missing); add one row per knee-visit"]
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ManifestError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)
    df.attrs["root"] = str(path.parent.resolve())
    return df


def resolve(df: pd.DataFrame, value: str) -> Path:
    """Absolute path of a manifest path value (relative to the manifest's folder)."""
    p = Path(value)
    return p if p.is_absolute() else Path(df.attrs.get("root", ".")) / p


def split_subjects(subject_ids: Iterable[str], fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """Assign SUBJECTS (never knees or visits) to named sets, e.g. ``{"database": .45, "downstream": .35,
    "test": .2}`` (MRIS's metric-learning/database, downstream-training and test sets).

    Deterministic for a seed and independent of input order. Returns ``{subject_id: set name}``; every
    set with a positive fraction gets at least one subject when there are enough subjects.
    """
    subjects = sorted(set(map(str, subject_ids)))
    if not subjects:
        raise ValueError("no subjects to split")
    names = list(fractions)
    f = np.array([fractions[n] for n in names], dtype=float)
    if (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {fractions}")
    f = f / f.sum()
    order = np.random.default_rng(seed).permutation(len(subjects))
    counts = np.floor(f * len(subjects)).astype(int)
    for i in np.argsort(-(f * len(subjects) - counts))[: len(subjects) - counts.sum()]:
        counts[i] += 1
    # guarantee non-empty sets where possible
    for i in range(len(names)):
        if f[i] > 0 and counts[i] == 0 and counts.max() > 1:
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    out, start = {}, 0
    for name, n in zip(names, counts):
        for j in order[start:start + n]:
            out[subjects[j]] = name
        start += n
    return out

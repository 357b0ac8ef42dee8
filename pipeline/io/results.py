"""Per-item results of every inference bundle: one status vocabulary, one map PNG style, one outputs manifest.

Every inference bundle (``mris``, ``direct_synthesis``, ``thickness``, ``kneel``, ``dess_seg``) writes its
per-knee / per-file outputs through this module, so that they look and read the same:

* **Statuses** (:data:`STATUSES`): ``ok`` (the item's result was written), ``low_confidence`` (written, but
  flagged: the ``reason`` says why, e.g. a KNEEL heat map without a clear knee), ``failed`` (nothing usable
  was written for the item; ``reason`` holds the error). :func:`status_of` maps older spellings
  (``error`` in a KNEEL ``landmarks.csv``) onto these three. There is no fourth status: a note on an ``ok``
  item (e.g. a DICOM output that could not be made for a NIfTI input) goes into its ``reason``.
* **Outputs manifest** (:func:`write_manifest`, default name :data:`OUTPUTS_MANIFEST`): a CSV with one row
  per item and the columns :data:`MANIFEST_COLUMNS` first (``item, status, reason, outputs, dicom``;
  ``outputs`` / ``dicom``: ``;``-separated paths relative to the manifest's folder, ``dicom`` the DICOM
  subset of ``outputs``), then the bundle's own columns. Written atomically, last, after every output.
* **Map PNGs** (:func:`save_map_png`): viridis, a fixed 0-4 mm scale by default (:data:`DEFAULT_VMAX_MM`;
  the colour bar is extended where a map goes beyond it), a colour bar labelled ``thickness (mm)``, NaN
  (outside the cartilage footprint) left blank, atlas axes labelled (rows anterior -> posterior, columns
  medial -> lateral, left-knee convention); one panel per map, side by side with one colour bar.
* **Atomic files** (:func:`save_npy`, :func:`save_csv`, :func:`save_figure`): written under a temporary
  name and renamed into place (:mod:`pipeline.io.atomic`).
* **Maps of one knee** (:class:`MapResultWriter`): ``.npy`` per map, the PNG(s), and with ``dicom=True`` a
  DICOM Parametric Map per map (:mod:`pipeline.io.dicom_out`); used by
  :class:`pipeline.knee_inference.KneeMapWriter` (MRIS, direct synthesis) and
  :func:`pipeline.thickness.maps_io.knee_maps`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from pipeline.io.atomic import atomic_path

__all__ = ["DEFAULT_VMAX_MM", "FAILED", "LOW_CONFIDENCE", "MANIFEST_COLUMNS", "MapResultWriter", "OK", "item_name",
           "OUTPUTS_MANIFEST", "STATUSES", "manifest_row", "relative_paths", "save_csv", "save_figure",
           "save_map_png", "save_npy", "status_counts", "status_of", "write_manifest"]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: The item's result was written.
OK = "ok"
#: The result was written but is flagged (``reason`` says why).
LOW_CONFIDENCE = "low_confidence"
#: Nothing usable was written for the item (``reason`` holds the error).
FAILED = "failed"
STATUSES: tuple[str, ...] = (OK, LOW_CONFIDENCE, FAILED)
_STATUS_ALIASES = {"error": FAILED, "flagged": LOW_CONFIDENCE, "low-confidence": LOW_CONFIDENCE}

#: File name of the outputs manifest (the thickness bundle keeps its ``maps_manifest.csv``).
OUTPUTS_MANIFEST = "outputs.csv"
#: The columns every outputs manifest starts with.
MANIFEST_COLUMNS: tuple[str, ...] = ("item", "status", "reason", "outputs", "dicom")

#: Upper end of the fixed colour scale of every thickness-map PNG (mm).
DEFAULT_VMAX_MM = 4.0
#: Colour map and colour-bar label of every thickness-map PNG.
MAP_CMAP = "viridis"
MAP_UNIT_LABEL = "thickness (mm)"
#: Panel titles of the maps in a combined PNG.
MAP_TITLES = {"fc": "femoral (FC)", "tc": "tibial (TC)"}


def status_of(value: Any) -> str:
    """One of :data:`STATUSES` for ``value`` (``"error"`` -> ``"failed"``); anything else raises ``ValueError``."""
    s = str(value).strip().lower()
    s = _STATUS_ALIASES.get(s, s)
    if s not in STATUSES:
        raise ValueError(f"unknown status {value!r}; expected one of {STATUSES}")
    return s


# ----------------------------------------------------------------------------------------- atomic files
def status_counts(table: pd.DataFrame) -> dict[str, int]:
    """``{status: count}`` over :data:`STATUSES` of an outputs manifest (or any table with a ``status`` column)."""
    return {st: int((table["status"] == st).sum()) for st in STATUSES}


def save_npy(path: PathLike, array: np.ndarray) -> Path:
    """``np.save`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return path


def save_csv(path: PathLike, table: pd.DataFrame | Sequence[Mapping[str, Any]],
             columns: Sequence[str] | None = None) -> Path:
    """A DataFrame (or a list of row dicts, ``columns`` fixing the header) as CSV, atomically."""
    path = Path(path)
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table), columns=columns)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    return path


def save_figure(fig: Any, path: PathLike, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- PNGs
def save_map_png(path: PathLike, maps: np.ndarray | Mapping[str, np.ndarray], title: str = "",
                 vmax: float | None = DEFAULT_VMAX_MM) -> Path:
    """PNG of one thickness map (a 2D array, mm) or of several side by side (``{panel title: map}``), in the
    one style of the module docstring; ``vmax=None`` scales to the largest value instead of 4 mm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dict(maps) if isinstance(maps, Mapping) else {"": maps}
    arrays = [np.asarray(m, dtype=np.float32) for m in panels.values()]
    finite = [a[np.isfinite(a)] for a in arrays]
    top = max((float(f.max()) for f in finite if f.size), default=0.0)
    vmax = float(vmax) if vmax is not None else (top if top > 0 else 1.0)
    n = len(arrays)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 3.2 * n, 3.4), squeeze=False, layout="constrained")
    im = None
    for ax, (name, a) in zip(axes[0], zip(panels, arrays)):
        im = ax.imshow(a, cmap=MAP_CMAP, vmin=0.0, vmax=vmax)
        if name:
            ax.set_title(name, fontsize=9)
        ax.set_xlabel("medial  ->  lateral", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_ylabel("anterior -> posterior", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.05 if n == 1 else 0.025, pad=0.02, label=MAP_UNIT_LABEL,
                 extend="max" if top > vmax else "neither")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- manifest
def item_name(path: PathLike, root: PathLike, side: str = "") -> str:
    """Name of an item's outputs: ``path`` below ``root`` with ``/`` -> ``_`` (its file name when outside
    ``root``), then ``_<side>`` when a side is given (``a/b.dcm``, ``R`` -> ``a_b.dcm_R``)."""
    path, root = Path(path), Path(root)
    name = path.relative_to(root).as_posix().replace("/", "_") if path.is_relative_to(root) else path.name
    return f"{name}_{side}" if side else name


def relative_paths(paths: Iterable[PathLike], root: PathLike) -> str:
    """``;``-joined paths relative to ``root`` (absolute where a path is outside it); empty entries dropped."""
    root = Path(root).resolve()
    out = []
    for p in paths:
        if not p:
            continue
        p = Path(p)
        try:
            out.append(p.resolve().relative_to(root).as_posix())
        except ValueError:
            out.append(str(p))
    return ";".join(out)


def manifest_row(item: str, status: str, reason: str = "", outputs: Iterable[PathLike] = (),
                 root: PathLike | None = None, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One outputs-manifest row: ``outputs`` (paths) relative to ``root``, the ``.dcm`` ones listed again under
    ``dicom``, then ``fields`` (the bundle's own columns; they never override the manifest columns)."""
    outputs = [Path(p) for p in outputs if p]
    rel = (lambda ps: relative_paths(ps, root)) if root is not None else (lambda ps: ";".join(map(str, ps)))
    row = {"item": str(item), "status": status_of(status), "reason": str(reason or ""), "outputs": rel(outputs),
           "dicom": rel([p for p in outputs if p.suffix.lower() == ".dcm"])}
    return {**row, **{k: v for k, v in dict(fields or {}).items() if k not in row}}


def write_manifest(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Write the outputs manifest (columns :data:`MANIFEST_COLUMNS` first, then the others in the order they
    first appear) atomically; statuses are checked against :data:`STATUSES`. Returns it as a DataFrame."""
    cols = list(MANIFEST_COLUMNS)
    for r in rows:
        cols += [k for k in r if k not in cols]
    df = pd.DataFrame([{**r, "status": status_of(r.get("status", ""))} for r in rows], columns=cols)
    for c in ("reason", "outputs", "dicom"):
        df[c] = df[c].fillna("")
    save_csv(path, df)
    return df


# ------------------------------------------------------------------------------------------- map files
class MapResultWriter:
    """Writes the thickness maps of one knee: ``<prefix><key>.npy`` (float32 mm, NaN outside the footprint),
    the PNG(s) (:func:`save_map_png`; ``png_layout`` ``"per_map"``: ``<prefix><key>.png`` each, ``"combined"``:
    one ``<png_name>`` with every map side by side), and with ``dicom`` one DICOM Parametric Map per map
    (``<prefix><key>.dcm``, :func:`pipeline.io.dicom_out.write_parametric_maps`: values in mm, identifiers of
    the source DICOM).

    Args:
        png: write PNGs.
        dicom: write DICOM Parametric Maps.
        vmax: top of the PNG colour scale (mm); ``None``: each figure's largest value.
        label: what the maps are (``"synthesized"``, ``"from DESS labels"``); goes into titles and DICOM
            descriptions.
        model: the producing model / bundle, recorded as the DICOM ManufacturerModelName.

    A DICOM output that cannot be made does not fail the knee (its maps are written): the reason is logged and
    kept in :attr:`notes` (``{name: note}``) for the outputs manifest.
    """

    def __init__(self, png: bool = True, dicom: bool = False, vmax: float | None = DEFAULT_VMAX_MM,
                 label: str = "", model: str = "kneeoa-pipeline") -> None:
        self.png = bool(png)
        self.dicom = bool(dicom)
        self.vmax = vmax
        self.label = label
        self.model = model
        self.notes: dict[str, str] = {}

    def write_maps(self, folder: PathLike, name: str, maps: Mapping[str, np.ndarray], prefix: str = "",
                   png_layout: str = "per_map", png_name: str | None = None, title: str | None = None,
                   source: Any = None, study: Mapping[str, Any] | None = None) -> list[Path]:
        """Write ``maps`` (``{key: 2D mm}``) of knee ``name`` into ``folder``; returns the written files.

        ``source``: the DICOM the maps derive from (a file, a series folder, or a pydicom header), whose
        patient / study identifiers the DICOM outputs carry; ``None`` or a non-DICOM path: a generated study
        (``study``: ``{"patient_id", "study_key"}`` to name it; see :mod:`pipeline.io.dicom_out`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in maps.items()}
        written = [save_npy(folder / f"{prefix}{k}.npy", a) for k, a in arrays.items()]
        head = title if title is not None else " ".join(x for x in (name, self.label) if x)
        if self.png and png_layout == "per_map":
            written += [save_map_png(folder / f"{prefix}{k}.png", a, f"{head} {k.upper()} (mm)", vmax=self.vmax)
                        for k, a in arrays.items()]
        elif self.png:
            panels = {MAP_TITLES.get(k, k.upper()): a for k, a in arrays.items()}
            written.append(save_map_png(folder / (png_name or f"{name}.png"), panels, head, vmax=self.vmax))
        if self.dicom:
            from pipeline.io.dicom_out import DicomOutputUnavailable, read_source, write_parametric_maps

            try:
                written += write_parametric_maps(folder, name, arrays, source, prefix=prefix, label=self.label,
                                                 model=self.model, study=study)
                if not read_source(source):
                    self.notes[name] = "DICOM maps in a generated study (no DICOM source)"
            except DicomOutputUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - the maps stand; the manifest says why there is no DICOM
                logger.warning("DICOM maps failed for %s: %s", name, e)
                self.notes[name] = f"no DICOM maps: {type(e).__name__}: {e}".splitlines()[0]
        return written

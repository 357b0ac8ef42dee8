"""Generate the synthetic knee cohort: an OAI-like folder tree plus manifests.

Layout under ``out``::

    cohort.json                      generator config, seed, version
    manifest.csv                     one row per knee-visit (schema: data_manifests/knee_visit.schema.json)
    subjects.csv                     one row per subject
    subjects/<id>/<MM>_MONTH/XRAY/PA_BILATERAL/001                     bilateral PA radiograph (DICOM)
    subjects/<id>/<MM>_MONTH/MR_SAG_3D_DESS/<RIGHT|LEFT>_KNEE/dicom/001..  DESS series (DICOM)
    subjects/<id>/<MM>_MONTH/MR_SAG_3D_DESS/<RIGHT|LEFT>_KNEE/{dess,labels}.nii.gz
    subjects/<id>/<MM>_MONTH/MR_SAG_3D_DESS/<RIGHT|LEFT>_KNEE/{fc,tc}_thickness.npy  analytic maps (mm)
    subjects/<id>/00_MONTH/XRAY/PA_BILATERAL/labels.nii.gz            radiograph bone labels (scoring only)
    subjects/<id>/00_MONTH/XRAY/PA_BILATERAL/<RIGHT|LEFT>_KNEE/{xray_crop,xray_crop_labels}.nii.gz
    subjects/<id>/00_MONTH/DXA/<RIGHT|LEFT>_KNEE/{dxa,dxa_labels}.nii.gz  baseline DXA in its own pose
    subjects/<id>/00_MONTH/DXA/<RIGHT|LEFT>_KNEE/{dxa_crop,dxa_crop_labels}.nii.gz  256 x 256 pair-ready crops
    subjects/<id>/00_MONTH/DXA/<RIGHT|LEFT>_KNEE/dxa_pose.json   DXA pose, DXA landmarks, crop matrices
    subjects/<id>/subject.json       every parameter of the subject (analytic ground truth)

The baseline (DXA) visit's files -- the DXA in its own supine pose, the bone label maps of both modalities and
the per-knee 256 x 256 crops pre-aligned on the tibial landmarks -- are described in :mod:`pipeline.cohort.dxa`.
They draw from their own random streams, so the radiographs and MR volumes do not depend on ``write_dxa``.
Each subject folder is written under a temporary name and renamed when complete; manifests are written
last. An interrupted run leaves only ``*.partial`` temporaries, which the next run removes; complete
subjects with the same configuration are reused. ``shard=(i, n)`` (CLI ``--shard i/n``, or RANK / WORLD_SIZE
under torchrun) generates only the subjects with ``index % n == i``; the manifests are written from the subjects'
``rows.json`` once every subject is complete (:func:`merge_cohort`, CLI ``--merge``), byte-identical to one run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline.conventions import SIDE_NAMES, SIDES, VISITS, visit_folder
from pipeline.io.atomic import PARTIAL, atomic_dir, remove_partials, write_text_atomic
from pipeline.io.progress import RunProgress

from .anatomy import knee_at_visit
from .disease import progression_labels
from .dxa import nifti_affine_2d, radiograph_labels, radiograph_pixel_matrix, write_knee_pair
from .mr import MRGrid, dess_signal, label_volume, pir_affine_lps, tissue_sdfs, to_pir
from .mr_markers import MARKER_COLUMNS, marker_signal_values, sample_knee_markers
from .radiograph import DetectorGeometry, KneePlacement, expose, line_integrals, to_detector_values
from .subject import Subject, sample_subject, subject_rng, visit_date
from .writers import uid, write_mr_series, write_nifti, write_npy, write_radiograph_dicom

FORMAT_VERSION = 6  # bump when the generator's output changes for the same config


@dataclass(frozen=True)
class CohortConfig:
    """Generator settings. Units: mm; visits in months."""

    n_subjects: int = 40
    seed: int = 0
    visits: tuple[int, ...] = (0, 12, 24, 48)
    missing_rate: float = 0.15
    xray_spacing_mm: float = 0.3
    xray_bits: int = 12
    monochrome1_fraction: float = 0.3
    #: (medial-lateral = slice, AP, SI) in mm. SI is sampled finely (like the OAI's 0.36 mm in-plane) so
    #: that 1-3 mm cartilage layers are not quantised to whole 0.7 mm voxels across their thickness.
    mr_spacing_mm: tuple[float, float, float] = (0.7, 0.7, 0.35)
    mr_half_extent_mm: tuple[float, float, float] = (47.0, 45.0, 40.0)
    map_size: int = 128
    write_mr: bool = True  #: False: no MR volumes or labels at all (radiographs + analytic maps, fast)
    write_mr_dicom: bool = True
    write_dxa: bool = True
    #: months with an MR volume (None: every visit); radiographs and analytic maps are written at every visit
    mr_visits: Optional[tuple[int, ...]] = None
    #: MR-visible progression markers (BML, effusion, meniscal extrusion / damage, cartilage signal; see
    #: pipeline.cohort.mr_markers). False: healthy menisci, no markers, empty marker columns.
    mr_markers: bool = True
    workers: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if self.n_subjects < 1:
            problems.append(f"n_subjects must be >= 1 (got {self.n_subjects})")
        if not self.visits or any(v not in VISITS for v in self.visits) or list(self.visits) != sorted(set(self.visits)):
            problems.append(f"visits must be increasing months from {VISITS} (got {list(self.visits)})")
        elif self.visits[0] != 0:
            problems.append("visits must start with the baseline visit 0")
        if not 0.0 <= self.missing_rate < 1.0:
            problems.append(f"missing_rate must be in [0, 1) (got {self.missing_rate})")
        if not 0.05 <= self.xray_spacing_mm <= 2.0:
            problems.append(f"xray_spacing_mm must be in [0.05, 2] mm (got {self.xray_spacing_mm})")
        if not 8 <= self.xray_bits <= 16:
            problems.append(f"xray_bits must be 8..16 (got {self.xray_bits})")
        if len(self.mr_spacing_mm) != 3 or not all(0.2 <= s <= 3.0 for s in self.mr_spacing_mm):
            problems.append(f"mr_spacing_mm needs 3 values in [0.2, 3] mm (got {self.mr_spacing_mm})")
        if not 16 <= self.map_size <= 1024:
            problems.append(f"map_size must be 16..1024 (got {self.map_size})")
        if not 0.0 <= self.monochrome1_fraction <= 1.0:
            problems.append(f"monochrome1_fraction must be in [0, 1] (got {self.monochrome1_fraction})")
        if self.workers < 1:
            problems.append(f"workers must be >= 1 (got {self.workers})")
        if self.mr_visits is not None and (any(v not in VISITS for v in self.mr_visits)
                                           or list(self.mr_visits) != sorted(set(self.mr_visits))):
            problems.append(f"mr_visits must be None or increasing months from {VISITS} (got {self.mr_visits})")
        if problems:
            raise ValueError("invalid cohort configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("workers")  # does not change the output
        return d

    def digest(self) -> str:
        """Hash of everything that determines the bytes of one subject's files."""
        d = self.to_dict()
        d.pop("n_subjects")
        d["format_version"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: manifest columns of the DXA visit's files, written by :func:`pipeline.cohort.dxa.write_knee_pair`
PAIR_COLUMNS = ("dxa_nifti", "dxa_labels_nifti", "xray_crop", "xray_crop_labels", "dxa_crop", "dxa_crop_labels")

TINY = dict(xray_spacing_mm=1.0, mr_spacing_mm=(1.6, 1.6, 1.6), map_size=32, visits=(0, 24, 48), missing_rate=0.0)
#: Fast MR mode (``--mr-fast``): a sagittal 160 x 160 x 64 grid (AP x SI x ML: 0.6 mm in-plane, 1.5 mm slices,
#: 96 mm field of view; what Panfilov et al. feed their model), NIfTI only, MR at the baseline visit only.
MR_FAST = dict(mr_spacing_mm=(1.5, 0.6, 0.6), mr_half_extent_mm=(48.0, 48.0, 48.0), write_mr_dicom=False,
               mr_visits=(0,))


def _patient(sub: Subject, month: int, study_uid: str) -> dict:
    return {"PatientID": sub.subject_id, "PatientSex": sub.sex, "PatientAge": sub.age + month / 12.0,
            "StudyDate": visit_date(sub.baseline_date, month), "StudyInstanceUID": study_uid, "Site": sub.site}


def _klg_all_months(sub: Subject) -> dict[str, dict[int, int]]:
    return {side: {m: knee_at_visit(spec, m).klg for m in VISITS} for side, spec in sub.knees.items()}


def generate_subject(cfg: CohortConfig, index: int, root: Path) -> list[dict]:
    """Write one subject (all visits) atomically under ``root/subjects/<id>``; return its manifest rows."""
    sub = sample_subject(cfg.seed, index, cfg.visits, cfg.missing_rate)
    final = root / "subjects" / sub.subject_id
    done = final / "rows.json"
    digest = cfg.digest()
    if done.exists():
        cached = json.loads(done.read_text())
        if cached.get("config_digest") == digest:
            return cached["rows"]
    rng = subject_rng(cfg.seed, index, 10)
    geom = DetectorGeometry(cfg.xray_spacing_mm)
    klg_months = _klg_all_months(sub)
    labels = {side: progression_labels(klg_months[side]) for side in SIDES}
    rows: list[dict] = []
    with atomic_dir(final) as tmp:
        for month in sub.visits:
            vdir = Path(visit_folder(month))
            study_uid = uid(cfg.seed, sub.subject_id, month, "study")
            patient = _patient(sub, month, study_uid)
            knees = {side: knee_at_visit(sub.knees[side], month) for side in SIDES}
            # --- bilateral radiograph: both knees projected together
            places = {}
            for side in SIDES:
                sign = 1.0 if side == "L" else -1.0
                places[side] = KneePlacement(side, (sign * sub.knee_distance_mm / 2.0 + rng.normal(0, 3.0),
                                                    rng.normal(0, 4.0)),
                                             sub.knees[side].leg_angle + rng.normal(0, np.deg2rad(1.0)))
            P = line_integrals([(knees[s], places[s]) for s in SIDES], geom)
            values = to_detector_values(expose(P, cfg.xray_spacing_mm, rng), cfg.xray_bits)
            mono1 = bool(rng.random() < cfg.monochrome1_fraction)
            rescale = (2.0, -1000.0) if rng.random() < 0.2 else (1.0, 0.0)
            xray_rel = vdir / "XRAY" / "PA_BILATERAL" / "001"
            write_radiograph_dicom(tmp / xray_rel, values, cfg.xray_spacing_mm, patient,
                                   series_uid=uid(study_uid, "xray"), sop_uid=uid(study_uid, "xray", 1),
                                   monochrome1=mono1, bits_stored=cfg.xray_bits,
                                   rescale=rescale if cfg.xray_bits <= 13 else (1.0, 0.0))
            # --- DXA visit: radiograph bone labels (both knees, scoring only); no draws from rng (stream 10)
            pair_visit = cfg.write_dxa and month == cfg.visits[0]
            xlab_rel, xlab = "", None
            if pair_visit:
                xlab = radiograph_labels([(knees[s], places[s]) for s in SIDES], geom)
                xlab_rel = str(xray_rel.parent / "labels.nii.gz")
                write_nifti(tmp / xlab_rel, xlab.T, nifti_affine_2d(radiograph_pixel_matrix(geom)), dtype=np.uint8)
            for side in SIDES:
                kv = knees[side]
                place = places[side]
                lm_knee = kv.landmark_positions()
                X, Z = place.to_world(lm_knee[:, 0], lm_knee[:, 1])
                col, row = geom.world_to_pixel(X, Z)
                pts = np.stack([col, row], axis=1)
                if side == "R":  # order each group left -> right in the image
                    pts = np.concatenate([pts[:9][::-1], pts[9:][::-1]])
                kdir = vdir / "MR_SAG_3D_DESS" / f"{SIDE_NAMES[side]}_KNEE"
                # --- DESS MR + labels + analytic thickness maps. MR draws come from their own stream per
                # (visit, knee) and the markers from theirs (stream 30 + side index), so the radiographs do
                # not depend on any MR setting (write_mr, spacing, mr_visits, mr_markers).
                mr_here = cfg.write_mr and (cfg.mr_visits is None or month in cfg.mr_visits)
                markers = (sample_knee_markers(cfg.seed, index, SIDES.index(side), sub.knees[side].disease, month)
                           if cfg.mr_markers else None)
                if mr_here:
                    mr_rng = subject_rng(cfg.seed, index, 1000 + 10 * month + SIDES.index(side))
                    grid = MRGrid.around_knee(cfg.mr_spacing_mm, cfg.mr_half_extent_mm,
                                              offset=tuple(mr_rng.normal(0, 1.5, 3)))
                    sdfs = tissue_sdfs(kv, grid, markers)
                    lab = to_pir(label_volume(sdfs, grid.shape), side)
                    mr = to_pir(dess_signal(sdfs, grid.shape, grid.spacing, mr_rng,
                                            values=marker_signal_values(sdfs, grid, kv, markers)), side)
                    centre = ((1.0 if side == "L" else -1.0) * 95.0 + mr_rng.normal(0, 5), mr_rng.normal(0, 5),
                              mr_rng.normal(0, 5))
                    aff = pir_affine_lps(grid, side, centre)
                    mr_u16 = np.round(np.clip(mr * 1500.0, 0, 65535)).astype(np.uint16)
                    if cfg.write_mr_dicom:
                        write_mr_series(tmp / kdir / "dicom", mr_u16, aff, patient,
                                        series_uid=uid(study_uid, side, "dess"), laterality=side)
                    write_nifti(tmp / kdir / "dess.nii.gz", mr_u16, aff, dtype=np.uint16)
                    write_nifti(tmp / kdir / "labels.nii.gz", lab, aff, dtype=np.uint8)
                maps = kv.thickness_maps((cfg.map_size, cfg.map_size))
                write_npy(tmp / kdir / "fc_thickness.npy", maps["fc"])
                write_npy(tmp / kdir / "tc_thickness.npy", maps["tc"])
                # --- DXA in its own pose (own rng stream per knee) + pair-ready crops of both modalities
                pair = dict.fromkeys(PAIR_COLUMNS, "")
                if pair_visit:
                    folders = {"dxa": vdir / "DXA" / f"{SIDE_NAMES[side]}_KNEE",
                               "xray": xray_rel.parent / f"{SIDE_NAMES[side]}_KNEE"}
                    pair.update(write_knee_pair(tmp, folders, kv, side, values, xlab, pts, geom,
                                                subject_rng(cfg.seed, index, 20 + SIDES.index(side)),
                                                writer=write_nifti))
                jsw_m, jsw_l = kv.radiographic_jsw()
                base = Path("subjects") / sub.subject_id
                rows.append({
                    "subject_id": sub.subject_id, "side": side, "visit_month": int(month),
                    "xray_dicom": str(base / xray_rel),
                    "dess_dicom_dir": str(base / kdir / "dicom") if mr_here and cfg.write_mr_dicom else "",
                    "dess_nifti": str(base / kdir / "dess.nii.gz") if mr_here else "",
                    "labels_nifti": str(base / kdir / "labels.nii.gz") if mr_here else "",
                    "fc_map": str(base / kdir / "fc_thickness.npy"),
                    "tc_map": str(base / kdir / "tc_thickness.npy"),
                    "dxa_nifti": str(base / pair["dxa_nifti"]) if pair["dxa_nifti"] else "",
                    "dxa_labels_nifti": str(base / pair["dxa_labels_nifti"]) if pair["dxa_labels_nifti"] else "",
                    "xray_labels": str(base / xlab_rel) if xlab_rel else "",
                    **{c: str(base / pair[c]) if pair[c] else "" for c in PAIR_COLUMNS[2:]},
                    "landmarks": json.dumps(np.round(pts, 3).tolist()),
                    "joint_centre_x": round(float(pts[4, 0]), 3), "joint_centre_y": round(float(pts[4, 1]), 3),
                    "xray_spacing_mm": cfg.xray_spacing_mm, "xray_monochrome1": int(mono1),
                    "klg": kv.klg, "jsn_grade": kv.jsn, "osteophyte_grade": kv.ost,
                    "jsw_medial_mm": round(jsw_m, 4), "jsw_lateral_mm": round(jsw_l, 4),
                    "cartilage_medial_mm": round(kv.contact_jsw_mm[0], 4),
                    "cartilage_lateral_mm": round(kv.contact_jsw_mm[1], 4),
                    "severity": round(kv.severity, 4), "phenotype": kv.spec.disease.phenotype,
                    "progression_72m": labels[side][0], "progression_3class": labels[side][1],
                    "age": round(sub.age + month / 12.0, 1), "sex": sub.sex, "bmi": sub.bmi, "site": sub.site,
                    "study_date": patient["StudyDate"],
                    # MR ground truth (pipeline.cohort.mr_markers): never model inputs
                    **(markers.row() if markers is not None else dict.fromkeys(MARKER_COLUMNS, "")),
                })
        info = {"subject": _jsonable(dataclasses.asdict(sub)), "klg_by_month": klg_months}
        write_text_atomic(tmp / "subject.json", json.dumps(info, indent=1, sort_keys=True))
        write_text_atomic(tmp / "rows.json", json.dumps({"config_digest": digest, "rows": rows}, indent=1))
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _work(args):
    cfg, index, root = args
    return generate_subject(cfg, index, Path(root))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; raises ``ValueError`` with a clear message otherwise."""
    parts = str(text).strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--shard must be i/n with whole numbers, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs n >= 1 and 0 <= i < n (got {text!r}; shards of 4 are 0/4 .. 3/4)")
    return i, n


def shard_from_env(env: Optional[dict] = None) -> Optional[tuple[int, int]]:
    """The shard of a ``torchrun`` process: ``(RANK, WORLD_SIZE)`` when both are set, else ``None``."""
    env = os.environ if env is None else env
    if env.get("RANK") is None or env.get("WORLD_SIZE") is None:
        return None
    return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")


def _subject_id(cfg: CohortConfig, index: int) -> str:
    return sample_subject(cfg.seed, index, cfg.visits, cfg.missing_rate).subject_id


def _complete_rows(cfg: CohortConfig, index: int, root: Path, digest: str) -> Optional[list[dict]]:
    """The manifest rows of subject ``index`` when it is complete with this configuration, else ``None``."""
    done = root / "subjects" / _subject_id(cfg, index) / "rows.json"
    try:
        cached = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    return cached["rows"] if cached.get("config_digest") == digest else None


def _write_cohort_files(root: Path, cfg: CohortConfig, rows: list[dict]) -> pd.DataFrame:
    """manifest.csv, subjects.csv and cohort.json from every subject's rows (in subject order)."""
    manifest = pd.DataFrame(rows)
    subjects = (manifest.groupby("subject_id", sort=True)
                .agg(sex=("sex", "first"), bmi=("bmi", "first"), site=("site", "first"),
                     age_baseline=("age", "min"), n_visits=("visit_month", "nunique")).reset_index())
    write_text_atomic(root / "manifest.csv", manifest.to_csv(index=False))
    write_text_atomic(root / "subjects.csv", subjects.to_csv(index=False))
    meta = {"format_version": FORMAT_VERSION, "generator": f"kneeoa-pipeline {__version__}",
            "config": cfg.to_dict(), "config_digest": cfg.digest(), "n_rows": len(manifest)}
    write_text_atomic(root / "cohort.json", json.dumps(meta, indent=1, sort_keys=True))
    return manifest


def merge_cohort(out: str | os.PathLike, cfg: CohortConfig, require_complete: bool = True) -> Optional[pd.DataFrame]:
    """Write the cohort's manifest.csv / subjects.csv / cohort.json from the subjects' ``rows.json`` (subject
    order; byte-identical to an unsharded run) once every subject of ``cfg`` is complete with this
    configuration. Incomplete subjects: ``ValueError`` naming how many and which shard command completes them
    (``require_complete=False``: return ``None`` and write nothing)."""
    root = Path(out)
    digest = cfg.digest()
    rows: list[dict] = []
    missing: list[int] = []
    for i in range(cfg.n_subjects):
        r = _complete_rows(cfg, i, root, digest)
        if r is None:
            missing.append(i)
        else:
            rows += r
    if missing:
        if not require_complete:
            return None
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"cannot merge the cohort in '{root}': {len(missing)} of {cfg.n_subjects} subjects are "
                         f"missing or were written with other settings (indices {shown}); run the missing shards "
                         "(--shard i/n with the same options) first")
    return _write_cohort_files(root, cfg, rows)


def generate_cohort(out: str | os.PathLike, cfg: CohortConfig, progress: bool = True,
                    shard: Optional[tuple[int, int]] = None) -> pd.DataFrame:
    """Generate (or complete) the cohort under ``out``; returns the manifest as a DataFrame.

    ``shard=(i, n)``: generate only the subjects with ``index % n == i`` (so that ``n`` processes or machines
    write one cohort into a shared folder). Such a run removes only its own subjects' temporaries and writes
    manifest.csv / subjects.csv / cohort.json only when every subject of the cohort is complete (the last shard
    to finish writes them; :func:`merge_cohort` does it later); it returns the rows of its own subjects then
    too, or the whole manifest when it wrote it. The files are the same bytes as those of an unsharded run.
    """
    root = Path(out)
    if shard is not None:
        k, n = shard
        if not (isinstance(k, int) and isinstance(n, int) and n >= 1 and 0 <= k < n):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n (got {shard!r})")
    try:
        (root / "subjects").mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test{os.getpid()}.partial"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write the cohort to '{root}': {e.strerror or e}. "
                              "Choose a writable folder with --out.") from None
    indices = list(range(cfg.n_subjects)) if shard is None else list(range(shard[0], cfg.n_subjects, shard[1]))
    if shard is None:
        remove_partials(root)
        remove_partials(root / "subjects")
    else:  # other shards may be writing into the same folder: only this shard's own leftovers go
        for i in indices:
            sid = _subject_id(cfg, i)
            for p in (root / "subjects").glob(f".{sid}.*{PARTIAL}"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    jobs = [(cfg, i, str(root)) for i in indices]
    rows: list[dict] = []
    rank, world = (0, 1) if shard is None else shard
    digest = cfg.digest()
    kept = [_complete_rows(cfg, i, root, digest) is not None for i in indices]  # resumed: written before
    with RunProgress(root, len(jobs), "cohort subjects", unit="subj", rank=rank, world_size=world,
                     enabled=progress) as bar:
        if cfg.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=cfg.workers) as ex:
                for r, was_kept in zip(ex.map(_work, jobs), kept):
                    rows += r
                    bar.update("kept" if was_kept else "done")
        else:
            for j, was_kept in zip(jobs, kept):
                rows += _work(j)
                bar.update("kept" if was_kept else "done")
    if shard is None:
        return _write_cohort_files(root, cfg, rows)
    merged = merge_cohort(root, cfg, require_complete=False)
    return merged if merged is not None else pd.DataFrame(rows)

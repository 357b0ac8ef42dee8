"""Configuration of the comparison report (``python -m pipeline compare``).

The synthesis methods share ONE training budget so the comparison is fair: ``image_size``, ``batch_size``,
``epochs``, ``draws_per_epoch`` (one visit per subject per draw, :class:`pipeline.sampling.SubjectVisitSampler`),
``lr_step_epochs``, the split (``split_fractions``, ``split_seed``), ``val_fraction`` and ``seed``. By default
these :data:`SHARED_KEYS` are read from the MRIS bundle configs (``bundles/mris/configs/train.json`` merged
with ``train_demo.json`` for the demo preset), so a model trained by ``make demo`` is reused with the
settings it was trained with; ``shared`` overrides them for every method at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bundle_paths import bundle_configs
from pipeline.downstream.run import DownstreamSettings

__all__ = ["BASELINE_METHODS", "CompareConfig", "DS_CONFIG_DIR", "LABELS", "MRIS_CONFIG_DIR", "MRIS_METHODS",
           "PRESETS", "SHARED_KEYS", "SYNTH_METHODS", "downstream_settings", "read_bundle_config"]

MRIS_CONFIG_DIR = bundle_configs("mris")
DS_CONFIG_DIR = bundle_configs("direct_synthesis")

MRIS_METHODS: tuple[str, ...] = ("mris-c", "mris-s")
BASELINE_METHODS: tuple[str, ...] = ("unet", "pix2pix", "transformer")
SYNTH_METHODS: tuple[str, ...] = MRIS_METHODS + BASELINE_METHODS
#: Display names (``mr`` = the MR-extracted maps of the manifest).
LABELS: dict[str, str] = {"mr": "MR-extracted", "mris-c": "MRIS-C", "mris-s": "MRIS-S", "unet": "U-Net",
                          "pix2pix": "pix2pix", "transformer": "TransUNet-like"}
#: Training settings shared by every synthesis method (the budget of the comparison).
SHARED_KEYS: tuple[str, ...] = ("image_size", "batch_size", "epochs", "draws_per_epoch", "lr_step_epochs",
                                "split_fractions", "split_seed", "val_fraction")
#: Network settings of the MRIS models (needed to load their checkpoints).
MRIS_NET_KEYS: tuple[str, ...] = ("widen_factor", "stem_stride")
#: Network settings of the baselines (needed to load their checkpoints).
BASELINE_NET_KEYS: tuple[str, ...] = ("base_channels", "hidden_size", "num_layers", "num_heads", "mlp_dim")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: the bundles' *_demo.json settings; small, fast classifiers
    "demo": {
        "mris_configs": ["train.json", "train_demo.json"],
        "baseline_configs": ["train.json", "train_demo.json"],
        "downstream": {"image_size": 64, "progression_visits": "first",
                       "klg": {"epochs": 30, "batch_size": 32, "lr": 1e-3, "lr_step_epochs": 10, "widen_factor": 0.5},
                       "progression": {"epochs": 30, "batch_size": 32, "lr": 1e-3, "lr_step_epochs": 10,
                                       "widen_factor": 0.5}},
    },
    # the paper's settings (GPU)
    "paper": {
        "mris_configs": ["train.json"],
        "baseline_configs": ["train.json"],
        "downstream": {"image_size": 256, "progression_visits": "first",
                       "klg": {"epochs": 30, "batch_size": 64, "lr": 1e-5, "lr_step_epochs": 10},
                       "progression": {"epochs": 30, "batch_size": 64, "lr": 1e-4, "lr_step_epochs": 10}},
    },
}


def _set_nested(d: dict, key: str, value: Any) -> None:
    parts = key.split("#")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def read_bundle_config(files: Sequence[str | Path], config_dir: str | Path | None = None) -> dict[str, Any]:
    """Merge bundle JSON configs like ``monai.bundle`` does for a list of files (later files replace top-level
    keys; ``a#b`` keys patch nested ones). Relative names are looked up in ``config_dir``."""
    merged: dict[str, Any] = {}
    for f in files:
        p = Path(f)
        if not p.is_absolute() and config_dir is not None:
            p = Path(config_dir) / p
        if not p.is_file():
            raise FileNotFoundError(f"bundle config not found: {p}")
        for k, v in json.loads(p.read_text()).items():
            _set_nested(merged, k, v)
    return merged


def _literal(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise KeyError(f"{where}: no key {key!r}")
    v = cfg[key]
    if isinstance(v, str) and v.startswith("$"):
        raise ValueError(f"{where}: {key!r} is an expression ({v!r}); give it explicitly in 'shared'")
    return v


@dataclass
class CompareConfig:
    """Everything the comparison needs; :meth:`resolve` fills the defaults and returns the exact settings
    that are saved as ``config.json`` in the output folder.

    Args:
        manifest: knee-visit manifest (``fc_map``/``tc_map`` = MR-extracted maps, ``klg``, ``progression_72m``).
        out: output folder.
        methods: synthesis methods among :data:`SYNTH_METHODS` (MR-extracted maps are always a source).
        seed: seed of every training (MRIS and baselines ``seed``, the classifiers' ``set_determinism``).
        preset: ``"demo"`` (CPU) or ``"paper"``: default config files and classifier settings.
        shared: overrides of :data:`SHARED_KEYS` for every method.
        mris_overrides, baseline_overrides: extra bundle keys (e.g. ``{"base_channels": 32}``).
        epochs_override: ``{method: epochs}`` for a deliberately shorter run (the short report); the report
            then flags the budget as UNEQUAL.
        mris_c_root, mris_s_root: already-trained MRIS bundle roots (``models/model.pt``); trained here if None.
        k: MRIS neighbours. downstream: overrides of the classifier settings (:class:`DownstreamSettings` dict).
        device: torch device of the in-process work (synthesis, classifiers); the bundles pick their own.
        threads: CPU threads per process (``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` for the bundle
            subprocesses); None keeps PyTorch's default. 1 is faster on a machine shared with other jobs.
        resume: reuse the models an earlier run trained in ``out`` when its ``config.json`` has the same
            training settings (manifest, seed, shared budget, bundle files and overrides, epochs override).
    """

    manifest: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(SYNTH_METHODS))
    seed: int = 0
    preset: str = "demo"
    mris_configs: list[str] | None = None
    baseline_configs: list[str] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    mris_overrides: dict[str, Any] = field(default_factory=dict)
    baseline_overrides: dict[str, Any] = field(default_factory=dict)
    epochs_override: dict[str, int] = field(default_factory=dict)
    mris_c_root: str | None = None
    mris_s_root: str | None = None
    k: int = 20
    downstream: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    threads: int | None = None
    resume: bool = False
    figures: bool = True
    title: str = "MRIS vs direct synthesis: retrieval, synthesis error, downstream tasks"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in SYNTH_METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {list(SYNTH_METHODS)}")
        if not any(m in MRIS_METHODS for m in self.methods):
            raise ValueError("the comparison needs at least one MRIS method (mris-c or mris-s)")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        bad_shared = [k for k in self.shared if k not in SHARED_KEYS]
        if bad_shared:
            raise ValueError(f"unknown shared keys {bad_shared}; allowed: {list(SHARED_KEYS)}")

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> CompareConfig:
        """Load a config JSON (the keys of this class; ``resolved`` is ignored) with keyword overrides."""
        d = json.loads(Path(path).read_text())
        d.pop("resolved", None)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def resolve(self) -> dict[str, Any]:
        """The exact settings used: ``shared`` (budget), ``mris`` (bundle files, overrides, network keys),
        ``baselines`` (bundle files, overrides, network keys), ``downstream`` (classifier settings)."""
        preset = PRESETS[self.preset]
        mris_files = list(self.mris_configs or preset["mris_configs"])
        ds_files = list(self.baseline_configs or preset["baseline_configs"])
        mris_cfg = read_bundle_config(mris_files, MRIS_CONFIG_DIR)
        mris_cfg.update(self.mris_overrides)
        where = f"MRIS configs {mris_files}"
        shared = {k: self.shared.get(k, None) for k in SHARED_KEYS}
        for k in SHARED_KEYS:
            if shared[k] is None:
                shared[k] = _literal(mris_cfg, k, where)
        shared["split_fractions"] = {str(k): float(v) for k, v in dict(shared["split_fractions"]).items()}
        ds_cfg = read_bundle_config(ds_files, DS_CONFIG_DIR)
        ds_cfg.update(self.baseline_overrides)
        down = dict(preset["downstream"])
        for key, val in self.downstream.items():
            if key in ("klg", "progression") and isinstance(val, Mapping):
                down[key] = {**down.get(key, {}), **val}
            else:
                down[key] = val
        for task in ("klg", "progression"):
            down[task] = {**down[task], "seed": int(self.seed), "device": self.device}
        settings = DownstreamSettings.from_dict(down)
        return {
            "manifest": str(Path(self.manifest).resolve()), "out": str(Path(self.out).resolve()),
            "methods": list(self.methods), "seed": int(self.seed), "preset": self.preset, "k": int(self.k),
            "device": self.device, "threads": self.threads, "shared": shared,
            "mris": {"config_files": mris_files, "overrides": dict(self.mris_overrides),
                     "net": {k: _literal(mris_cfg, k, where) for k in MRIS_NET_KEYS},
                     "roots": {"mris-c": self.mris_c_root, "mris-s": self.mris_s_root}},
            "baselines": {"config_files": ds_files, "overrides": dict(self.baseline_overrides),
                          "net": {k: _literal(ds_cfg, k, f"direct-synthesis configs {ds_files}")
                                  for k in BASELINE_NET_KEYS}},
            "epochs_override": {str(k): int(v) for k, v in self.epochs_override.items()},
            "downstream": settings.to_dict(), "figures": bool(self.figures), "title": self.title,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def downstream_settings(resolved: Mapping[str, Any]) -> DownstreamSettings:
    """The :class:`DownstreamSettings` of a resolved config."""
    return DownstreamSettings.from_dict(resolved["downstream"])


"""``large_files.yml`` of the bundles (MONAI model-zoo format) for locally trained weights.

Model-zoo bundles list their weights in ``<bundle>/large_files.yml``::

    large_files:
      - path: "models/model.pt"
        url: "https://..."
        hash_val: "<sha256>"
        hash_type: "sha256"

and ``python -m monai.bundle download_large_files --bundle_path <bundle>`` fetches each missing file and checks
the hash of each present one. Our weights are trained here, not downloaded, so ``url`` is ``""``: MONAI then
verifies the files that exist (an empty ``hash_val`` skips the check) and stops with ``ValueError: unknown url
type: ''`` at a missing one (``url`` cannot be left out: ``download_url`` requires it). :func:`write_large_files`
fills in ``hash_val`` (sha256) for the files that exist after training.

The files listed are those the bundle's configs load: the ``path`` entries already in ``large_files.yml``
plus every ``models/**/*.pt`` found, except training-state checkpoints (``checkpoint*.pt``: optimiser and
scheduler state for resuming, not needed to evaluate or run the model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import yaml

from pipeline.io.atomic import write_text_atomic
from pipeline.io.checkpoints import checkpoint_hash

__all__ = ["HASH_TYPE", "LARGE_FILES_NAME", "large_files_manifest", "listed_paths", "sha256_file", "write_large_files"]

#: File name MONAI's ``download_large_files`` looks for (``large_files*.yml|yaml|json``).
LARGE_FILES_NAME = "large_files.yml"
HASH_TYPE = "sha256"
#: Extra ``monai.bundle run training`` arguments of bundles trained in several runs.
_TRAIN_RUNS = {"kneel": ("--stage global", "--stage local")}
#: Bundles trained by several configs in order: the command that runs them all.
_TRAIN_COMMANDS = {"segreg": ("python -m pipeline.registration.demo --out demo_output   (every stage in order; "
                              "docs/README.md lists each stage's config)",)}

PathLike = Union[str, Path]


def sha256_file(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes (:func:`pipeline.io.checkpoints.checkpoint_hash` of a path)."""
    return checkpoint_hash(Path(path))


def listed_paths(bundle_dir: PathLike) -> list[str]:
    """The ``path`` entries of ``<bundle_dir>/large_files.yml`` (``[]`` when there is no such file)."""
    f = Path(bundle_dir) / LARGE_FILES_NAME
    if not f.is_file():
        return []
    data = yaml.safe_load(f.read_text()) or {}
    return [str(e["path"]) for e in data.get("large_files") or []]


def _model_files(bundle_dir: Path) -> list[str]:
    models = bundle_dir / "models"
    if not models.is_dir():
        return []
    return [p.relative_to(bundle_dir).as_posix() for p in models.rglob("*.pt")
            if p.is_file() and not p.name.startswith("checkpoint")]


def large_files_manifest(bundle_dir: PathLike, paths: Optional[list[str]] = None) -> str:
    """YAML text of ``<bundle_dir>/large_files.yml``: one entry per model file (``paths``, default: those already
    listed plus the ``models/**/*.pt`` found, see the module docstring), ``url: ""``, ``hash_val`` = sha256 of
    the file where it exists, else ``""``."""
    bundle_dir = Path(bundle_dir)
    name = bundle_dir.resolve().name
    if paths is None:
        paths = listed_paths(bundle_dir) + _model_files(bundle_dir)
    paths = sorted(dict.fromkeys(Path(p).as_posix() for p in paths))
    if not paths:
        raise ValueError(f"{bundle_dir}: no model files listed in {LARGE_FILES_NAME} or found under models/")
    config = f"bundles/{name}/configs/train.json"
    runs = _TRAIN_RUNS.get(name, ("",))
    train = [f"#   python -m monai.bundle run training --config_file {config}{' ' + r if r else ''}" for r in runs]
    if name in _TRAIN_COMMANDS:
        train = [f"#   {c}" for c in _TRAIN_COMMANDS[name]]
    lines = [
        f"# Large files of the {name} bundle (MONAI model-zoo format). The weights are trained locally by this",
        "# bundle's training (outputs under bundle_root/models; see docs/README.md for the data options):",
        *train,
        "# and are not downloadable: url is empty, so `python -m monai.bundle download_large_files --bundle_path",
        f"# bundles/{name}` verifies the files that exist and stops with \"unknown url type: ''\" at a missing one",
        "# (train it first). hash_val is the sha256 of a trained file, written by",
        f"#   python -c \"from pipeline.bundle_files import write_large_files; write_large_files('bundles/{name}')\"",
        "# (empty: not recorded yet, the check is skipped).",
        "large_files:",
    ]
    for p in paths:
        f = bundle_dir / p
        lines += [f"  - path: {json.dumps(p)}", '    url: ""',
                  f"    hash_val: {json.dumps(sha256_file(f) if f.is_file() else '')}",
                  f"    hash_type: {json.dumps(HASH_TYPE)}"]
    return "\n".join(lines) + "\n"


def write_large_files(bundle_dir: PathLike, paths: Optional[list[str]] = None) -> Path:
    """Write :func:`large_files_manifest` to ``<bundle_dir>/large_files.yml`` (real sha256 for the files that
    exist, ``""`` for the others); returns the file's path."""
    out = Path(bundle_dir) / LARGE_FILES_NAME
    text = large_files_manifest(bundle_dir, paths)
    write_text_atomic(out, text)
    return out

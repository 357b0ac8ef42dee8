"""Where bundles read their defaults and write their outputs: one convention for every bundle.

* ``bundle_root`` of bundle ``name`` is the bundle's own folder, ``<repository>/bundles/<name>``, whatever the
  current directory (``$KNEEOA_BUNDLES/<name>`` when that variable is set, ``./bundles/<name>`` when the
  package is installed without the repository). Every config defines ``"bundle_root"`` with
  :func:`bundle_root`; ``--bundle_root DIR`` moves a whole run elsewhere (the demo does).
* Under it: ``models/`` (checkpoints), ``eval/`` (evaluation reports), ``runs/`` (TensorBoard), ``inference/``
  (inference outputs), ``database/`` (MRIS embedding database); all git-ignored. Nothing is ever written to
  the current directory by default.
* Data defaults: :data:`DEFAULT_MANIFEST` (the cohort written by ``make demo``), relative to the current
  directory like any path a user types; ``--manifest`` or ``--dataset_dir`` override it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_MANIFEST", "bundle_root", "bundles_dir"]

#: The default knee-visit manifest of every training / evaluation config (written by ``make demo``).
DEFAULT_MANIFEST = "demo_output/cohort/manifest.csv"

_REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def bundles_dir() -> Path:
    """The folder holding the bundles: ``$KNEEOA_BUNDLES``, else the repository's ``bundles/``, else
    ``./bundles``."""
    env = os.environ.get("KNEEOA_BUNDLES", "").strip()
    if env:
        return Path(env)
    return _REPO_BUNDLES if _REPO_BUNDLES.is_dir() else Path.cwd() / "bundles"


def bundle_root(name: str) -> str:
    """The default ``bundle_root`` of bundle ``name`` (e.g. ``"mris"``) as a string for configs."""
    return str(bundles_dir() / name)

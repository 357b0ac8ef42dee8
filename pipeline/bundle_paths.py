"""Where bundles read their configs and write their outputs, and where the project's data files are:
one convention for every bundle, from a repository checkout and from an installed package alike.

Two questions, two helpers:

* **Where are the configs** of bundle ``name`` (read-only package data): :func:`bundle_configs`, i.e.
  ``bundles_dir() / name / "configs"``. :func:`bundles_dir` is, in this order, ``$KNEEOA_BUNDLES`` (for the
  bundles it holds), the repository's ``bundles/`` (a checkout, also with ``pip install -e``), the bundles
  shipped with an installed wheel (``<prefix>/share/kneeoa-pipeline/bundles``, :func:`installed_data_dir`),
  else ``./bundles``. ``python -m pipeline bundles`` prints it.
* **Where do a bundle's outputs go**: :func:`bundle_root` (every config defines ``"bundle_root"`` with it):
  ``$KNEEOA_BUNDLES/<name>`` when that variable is set, else the bundle's own folder
  ``<repository>/bundles/<name>`` in a checkout (whatever the current directory), else, for an installed
  package, ``./bundles/<name>`` under the CURRENT directory: outputs never go into site-packages or
  ``<prefix>/share``. ``--bundle_root DIR`` moves a whole run elsewhere (the demo does).
* Under ``bundle_root``: ``models/`` (checkpoints), ``eval/`` (evaluation reports), ``runs/`` (TensorBoard),
  ``inference/`` (inference outputs; dess_seg ``predictions/``, thickness ``maps/``), ``database/`` (MRIS embedding database); all git-ignored.
* Data files (``data_manifests/``: the manifest schema, an example manifest): :func:`data_manifests_dir`,
  the repository's folder or the installed copy; :func:`manifest_schema_path` for the schema.
* Data defaults: :data:`DEFAULT_MANIFESTS` (the cohorts ``make demo`` writes: the MR cohort for kneel and
  dess_seg, the 160-subject radiograph + map cohort for MRIS and direct synthesis; the cohorts of
  ``python -m pipeline.registration.demo`` and ``python -m pipeline.progression.demo --out demo_output`` for
  segreg and progression_mr), relative to the current
  directory like any path a user types; ``--manifest`` (or ``--dataset_dir`` for inference) overrides them.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_MANIFESTS", "DIST_NAME", "bundle_configs", "bundle_names", "bundle_root", "bundles_dir",
           "data_manifests_dir", "installed_data_dir", "manifest_schema_path", "repository_root"]

#: The default knee-visit manifest of each bundle's training / evaluation configs (``make demo`` writes both
#: cohorts; tests/test_bundle_user_errors.py checks the configs against this table).
DEFAULT_MANIFESTS = {
    "dess_seg": "demo_output/cohort/manifest.csv",
    "kneel": "demo_output/cohort/manifest.csv",
    "mris": "demo_output/mris_cohort/manifest.csv",
    "direct_synthesis": "demo_output/mris_cohort/manifest.csv",
    "segreg": "demo_output/segreg_cohort/manifest.csv",
    "progression_mr": "demo_output/progression_cohort/manifest.csv",
}
#: The distribution name; an installed wheel puts ``bundles/`` and ``data_manifests/`` under
#: ``<prefix>/share/<DIST_NAME>/`` (setup.cfg ``[options.data_files]``).
DIST_NAME = "kneeoa-pipeline"
ENV_BUNDLES = "KNEEOA_BUNDLES"

#: The folder holding the ``pipeline`` package: the repository root in a checkout, site-packages when installed.
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def repository_root() -> Optional[Path]:
    """The repository checkout this package runs from (``setup.cfg`` and ``bundles/`` next to ``pipeline/``),
    or None for an installed package."""
    root = _PACKAGE_PARENT
    return root if (root / "setup.cfg").is_file() and (root / "bundles").is_dir() else None


def _install_prefixes() -> list[Path]:
    """Prefixes an installed wheel may have put its data files under: the running environment (a venv or the
    system), the user base (``pip install --user``), then the prefix recorded in the installed distribution
    (any other scheme, e.g. ``pip install --prefix``)."""
    out = [Path(sys.prefix)]
    user_base = getattr(site, "USER_BASE", None)
    if user_base:
        out.append(Path(user_base))
    try:
        from importlib import metadata

        dist = metadata.distribution(DIST_NAME)
        for f in dist.files or ():
            parts = Path(f).parts  # e.g. ../../../share/kneeoa-pipeline/bundles/mris/configs/train.json
            if "share" in parts and parts[parts.index("share") + 1:][:1] == (DIST_NAME,):
                located = Path(dist.locate_file(f)).resolve()
                out.append(located.parents[len(parts) - parts.index("share") - 1])
                break
    except Exception:  # not installed (a bare checkout), or unreadable metadata: nothing to add
        pass
    return out


def installed_data_dir() -> Optional[Path]:
    """``<prefix>/share/kneeoa-pipeline`` of an installed wheel (holding ``bundles/`` and ``data_manifests/``),
    or None when no installed copy is found."""
    for prefix in _install_prefixes():
        d = prefix / "share" / DIST_NAME
        if (d / "bundles").is_dir():
            return d
    return None


def _data_root() -> Optional[Path]:
    """The folder holding ``bundles/`` and ``data_manifests/``: the repository, else the installed copy."""
    return repository_root() or installed_data_dir()


def bundles_dir(name: Optional[str] = None) -> Path:
    """The folder holding the bundle definitions (``<name>/configs``, ``<name>/docs``): ``$KNEEOA_BUNDLES``
    (when it holds bundle ``name``'s configs, or always when no ``name`` is given), else the repository's
    ``bundles/``, else the installed ``<prefix>/share/kneeoa-pipeline/bundles``, else ``./bundles``."""
    env = os.environ.get(ENV_BUNDLES, "").strip()
    if env and (name is None or (Path(env) / name / "configs").is_dir()):
        return Path(env)
    root = _data_root()
    return root / "bundles" if root is not None else Path.cwd() / "bundles"


def bundle_configs(name: str) -> Path:
    """The (read-only) ``configs`` folder of bundle ``name`` (e.g. ``"mris"``): ``bundles_dir(name)/name/configs``.
    Use it for every config file a program passes to ``monai.bundle``; never write into it."""
    return bundles_dir(name) / name / "configs"


def bundle_names() -> list[str]:
    """Names of the bundles whose configs are found (``$KNEEOA_BUNDLES``'s and the shipped ones)."""
    folders = [bundles_dir(), _data_root() / "bundles" if _data_root() is not None else None]
    return sorted({d.name for f in folders if f is not None and f.is_dir() for d in f.iterdir()
                   if (d / "configs").is_dir()})


def bundle_root(name: str) -> str:
    """The default ``bundle_root`` (where outputs go) of bundle ``name``, as a string for configs:
    ``$KNEEOA_BUNDLES/<name>``, else ``<repository>/bundles/<name>``, else ``./bundles/<name>`` (installed)."""
    env = os.environ.get(ENV_BUNDLES, "").strip()
    if env:
        return str(Path(env) / name)
    repo = repository_root()
    return str((repo if repo is not None else Path.cwd()) / "bundles" / name)


def data_manifests_dir() -> Path:
    """The ``data_manifests`` folder (schema, example manifest): the repository's or the installed copy."""
    root = _data_root()
    return (root if root is not None else _PACKAGE_PARENT) / "data_manifests"


def manifest_schema_path() -> Path:
    """The knee-visit manifest schema, ``data_manifests/knee_visit.schema.json``."""
    return data_manifests_dir() / "knee_visit.schema.json"

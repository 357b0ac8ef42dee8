"""Packaging: bundle configs and data files are found from a checkout, an installed prefix and $KNEEOA_BUNDLES;
outputs never go into the installed package; every module is a package member (so ``packages = find:``
ships it); setup.cfg's data_files list every bundle file; the wheel holds what it should (no network:
``pip wheel --no-build-isolation``). The install itself is checked by ``.ci/wheel_check.sh``."""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pipeline
import transforms
from pipeline import bundle_paths as bp

REPO = Path(__file__).resolve().parents[1]
SHARE = "share/kneeoa-pipeline"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(bp.ENV_BUNDLES, raising=False)


def _fake_install(tmp_path: Path, monkeypatch, bundles=("thickness",)) -> Path:
    """A prefix laid out as a wheel installs it, with this package seen as installed (no checkout next to it)."""
    prefix = tmp_path / "prefix"
    share = prefix / SHARE
    for name in bundles:
        (share / "bundles" / name / "configs").mkdir(parents=True)
        (share / "bundles" / name / "configs" / "inference.json").write_text("{}")
    (share / "data_manifests").mkdir(parents=True)
    (share / "data_manifests" / "knee_visit.schema.json").write_text("{}")
    site_packages = tmp_path / "prefix" / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    monkeypatch.setattr(bp, "_PACKAGE_PARENT", site_packages)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    return share


def test_repository_checkout_paths_from_any_directory(no_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bp.repository_root() == REPO
    assert bp.bundles_dir() == REPO / "bundles"
    assert bp.bundle_configs("mris") == REPO / "bundles" / "mris" / "configs"
    assert (bp.bundle_configs("thickness") / "inference.json").is_file()
    assert bp.bundle_root("mris") == str(REPO / "bundles" / "mris")
    assert bp.manifest_schema_path() == REPO / "data_manifests" / "knee_visit.schema.json"
    assert bp.manifest_schema_path().is_file()
    assert set(bp.bundle_names()) >= {"dess_seg", "direct_synthesis", "kneel", "mris", "thickness"}


def test_installed_prefix_configs_from_share_outputs_in_current_directory(no_env, tmp_path, monkeypatch):
    share = _fake_install(tmp_path, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert bp.repository_root() is None
    assert bp.installed_data_dir() == share
    assert bp.bundles_dir() == share / "bundles"
    assert bp.bundle_configs("thickness") == share / "bundles" / "thickness" / "configs"
    assert bp.bundle_names() == ["thickness"]
    assert bp.manifest_schema_path() == share / "data_manifests" / "knee_visit.schema.json"
    # outputs: the current directory, never the installed (read-only) prefix
    assert bp.bundle_root("thickness") == str(work / "bundles" / "thickness")


def test_installed_with_user_scheme(no_env, tmp_path, monkeypatch):
    share = _fake_install(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr("site.USER_BASE", str(tmp_path / "prefix"))
    assert bp.bundle_configs("thickness") == share / "bundles" / "thickness" / "configs"


def test_nothing_installed_falls_back_to_current_directory(no_env, tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr("site.USER_BASE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(bp, "_install_prefixes", lambda: [tmp_path / "elsewhere"])
    monkeypatch.chdir(tmp_path)
    assert bp.installed_data_dir() is None
    assert bp.bundle_configs("thickness") == tmp_path / "bundles" / "thickness" / "configs"
    assert bp.bundle_root("thickness") == str(tmp_path / "bundles" / "thickness")


def test_env_bundles_holds_outputs_and_overrides_configs_it_has(tmp_path, monkeypatch):
    env = tmp_path / "my_bundles"
    shutil.copytree(REPO / "bundles" / "thickness" / "configs", env / "thickness" / "configs")
    monkeypatch.setenv(bp.ENV_BUNDLES, str(env))
    assert bp.bundle_configs("thickness") == env / "thickness" / "configs"
    assert bp.bundle_root("thickness") == str(env / "thickness")
    # a bundle it does not hold: configs from the checkout, outputs still under $KNEEOA_BUNDLES
    assert bp.bundle_configs("mris") == REPO / "bundles" / "mris" / "configs"
    assert bp.bundle_root("mris") == str(env / "mris")
    # the same over an installed prefix
    share = _fake_install(tmp_path, monkeypatch, bundles=("thickness", "mris"))
    assert bp.bundle_configs("mris") == share / "bundles" / "mris" / "configs"
    assert bp.bundle_configs("thickness") == env / "thickness" / "configs"


def test_cli_prints_the_configs_folder(no_env, capsys):
    from pipeline.__main__ import main

    assert main(["bundles", "--configs", "thickness"]) == 0
    assert capsys.readouterr().out.strip() == str(REPO / "bundles" / "thickness" / "configs")
    assert main(["bundles"]) == 0
    out = capsys.readouterr().out
    assert "repository checkout" in out and str(REPO / "bundles" / "mris") in out
    assert main(["bundles", "--configs", "no_such_bundle"]) == 2


def test_every_module_is_a_package_member():
    """Each .py file under pipeline/ and transforms/ is reachable by pkgutil.walk_packages, i.e. no folder
    holding modules lacks an __init__.py (setuptools' ``packages = find:`` would leave it out of a wheel)."""
    for pkg in (pipeline, transforms):
        root = Path(pkg.__file__).parent
        on_disk = {".".join((pkg.__name__,) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                   for p in root.rglob("*.py") if "__pycache__" not in p.parts}
        walked = {pkg.__name__} | {m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
        assert on_disk == walked, f"not package members: {sorted(on_disk - walked)}"


def test_test_helpers_are_not_in_the_runtime_package():
    assert importlib.util.find_spec("transforms.testing") is None


def _data_files() -> dict[str, list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {k: [g.strip() for g in v.replace("\n", ",").split(",") if g.strip()]
            for k, v in cfg["options.data_files"].items()}


def _shipped_files() -> list[Path]:
    """What a wheel must carry of bundles/ and data_manifests/ (their configs, docs, LICENSE, file lists)."""
    out = [p for p in (REPO / "data_manifests").iterdir() if p.is_file()]
    for b in (REPO / "bundles").iterdir():
        if (b / "configs").is_dir():
            out += [p for p in b.iterdir() if p.is_file()]
            out += [p for sub in ("configs", "docs") if (b / sub).is_dir() for p in (b / sub).iterdir() if p.is_file()]
    return out


def test_setup_cfg_data_files_list_every_bundle_file():
    entries = _data_files()
    missing = []
    for p in _shipped_files():
        rel = p.relative_to(REPO)
        target = f"{SHARE}/{rel.parent.as_posix()}"
        if not any(fnmatch.fnmatch(rel.as_posix(), g) for g in entries.get(target, [])):
            missing.append(f"{rel} (needs `{target} = {rel.parent.as_posix()}/...` in setup.cfg [options.data_files])")
    assert not missing, "\n".join(missing)


def test_wheel_contents(tmp_path):
    """Build the wheel offline from a copy of the source tree and check what it holds."""
    st = pytest.importorskip("setuptools")
    version = tuple(int(v) for v in st.__version__.split(".")[:2])
    if version < (64, 0) or (version < (70, 1) and importlib.util.find_spec("wheel") is None):
        pytest.skip("an offline build needs setuptools>=64 (and wheel, before setuptools 70.1) in this environment")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("pipeline", "transforms", "data_manifests"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for p in _shipped_files():
        (src / p.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.relative_to(REPO))
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("kneeoa_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for d in ("pipeline", "transforms")
               for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert "pipeline/cohort/__init__.py" in names and "pipeline/cohort/generate.py" in names
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    data = {n.split(f"/data/{SHARE}/", 1)[1] for n in names if f".data/data/{SHARE}/" in n}
    expected = {p.relative_to(REPO).as_posix() for p in _shipped_files()}
    assert data == expected
    assert not any(n.startswith(("tests/", "benchmarks/", "bundles/")) or n.endswith("transforms/testing.py")
                   for n in names)

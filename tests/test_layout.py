"""The package layering (README "Package layout"), checked on the source with ``ast``:

* the shared layer imports no method package;
* method packages never import the top level (``pipeline.compare``, ``pipeline.__main__``);
* a method imports another method only where listed in ``ALLOWED_CROSS_METHOD`` (a new one fails here).
"""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"

#: One subpackage per method.
METHODS = ("mris", "landmarks", "thickness", "segmentation", "baselines", "downstream", "cohort",
           "registration", "progression")
#: The shared layer under them (packages and modules of ``pipeline``).
SHARED = ("io", "nets", "metrics", "handlers", "conventions", "user_errors", "bundle_paths", "bundle_files",
          "geometry", "sampling", "jsw")
#: The top level: may import anything, imported by no method.
TOP = ("compare", "__main__")
#: (importing method, imported module) pairs that are allowed; a module prefix covers its submodules.
ALLOWED_CROSS_METHOD = {
    ("baselines", "pipeline.mris.data"),  # same manifest items and radiograph transforms as MRIS
    ("baselines", "pipeline.mris.synthesize"),  # mean-map baseline and true maps of the same test items
    ("baselines", "pipeline.thickness.grid"),  # atlas footprints
    ("cohort", "pipeline.thickness.grid"),  # the cohort's maps are on the thickness atlas grid
    ("landmarks", "pipeline.cohort.generate"),  # landmarks demo builds its cohort
    ("mris", "pipeline.cohort.generate"),  # MRIS demo builds its cohort
    ("progression", "pipeline.cohort.disease"),  # the 3-class label rule's one home
    ("registration", "pipeline.cohort.generate"),  # segreg demo builds its cohort
    ("progression", "pipeline.cohort.generate"),  # progression demo builds its cohort
}
#: Shared-layer modules that run a method for the user (inference front ends); everything else in the
#: shared layer must import no method.
ALLOWED_SHARED = {
    ("knee_inference", "pipeline.landmarks.infer"),  # knee finding for every radiograph-input bundle
}


def _part(path: Path) -> str:
    rel = path.relative_to(PIPELINE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = ".".join(("pipeline",) + path.relative_to(PIPELINE).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names if mod in ("pipeline",) + tuple(
                f"pipeline.{m}" for m in METHODS + SHARED + TOP))
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")}


def _target(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _allowed(pairs: set[tuple[str, str]], who: str, module: str) -> bool:
    return any(who == w and (module == m or module.startswith(m + ".")) for w, m in pairs)


def _violations() -> list[str]:
    bad = []
    for path in sorted(PIPELINE.rglob("*.py")):
        who = _part(path)
        rel = path.relative_to(PIPELINE.parent)
        for module in sorted(_imports(path)):
            target = _target(module)
            if target is None or target == who:
                continue
            if who in SHARED or who == "knee_inference":
                if target in METHODS + TOP and not _allowed(ALLOWED_SHARED, who, module):
                    bad.append(f"{rel}: shared layer imports {module}")
            elif who in METHODS:
                if target in TOP:
                    bad.append(f"{rel}: method imports the top level {module}")
                elif target in METHODS and not _allowed(ALLOWED_CROSS_METHOD, who, module):
                    bad.append(f"{rel}: cross-method import {module} (not in ALLOWED_CROSS_METHOD)")
    return bad


def test_every_package_has_a_layer():
    parts = {_part(p) for p in PIPELINE.rglob("*.py")} - {"__init__"}
    unknown = parts - set(METHODS + SHARED + TOP + ("knee_inference",))
    assert not unknown, f"place these in METHODS / SHARED / TOP of tests/test_layout.py: {sorted(unknown)}"


def test_no_upward_or_unlisted_cross_method_imports():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "pipeline"
    (fake / "io").mkdir(parents=True)
    (fake / "io" / "x.py").write_text("from pipeline.mris.engine import make_network\n")
    (fake / "baselines").mkdir()
    (fake / "baselines" / "y.py").write_text("def f():\n    from pipeline.compare.figures import roc_pr_figure\n")
    (fake / "landmarks").mkdir()
    (fake / "landmarks" / "z.py").write_text("from ..mris import knn\n")
    monkeypatch.setitem(globals(), "PIPELINE", fake)
    assert {line.split(":")[0] for line in _violations()} == {
        "pipeline/io/x.py", "pipeline/baselines/y.py", "pipeline/landmarks/z.py"}

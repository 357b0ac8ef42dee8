"""Regenerate the "verified" column of docs/reliability.md by running every case's test.

    python tests/reliability_table.py            # runs the tests named in the tables, rewrites the page
    python tests/reliability_table.py --check    # only checks that every named test exists (no run)

Every table row names its test(s) in the last column (backticked function names, parametrised ids allowed:
``test_x[...]`` matches every parametrisation of ``test_x``). The script finds each test in ``tests/``, runs
them all in one pytest process and writes, per row, ``pass`` / ``FAIL`` / ``missing`` into the ``verified``
column, with a footer saying when and how many. Cases are exercised against the bundles' own code paths
(bundle configs through ``monai.bundle.run`` or the functions they call) on tiny inputs made by the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PAGE = TESTS.parent / "docs" / "reliability.md"
FOOTER = "_Verified "


def _test_names(cell: str) -> list[str]:
    return [re.sub(r"\[.*$", "", n) for n in re.findall(r"`(test_[^`]+)`", cell)]


def _index() -> dict[str, str]:
    """test function name -> test file (relative), over tests/test_*.py."""
    out: dict[str, str] = {}
    for f in sorted(TESTS.glob("test_*.py")):
        for name in re.findall(r"^def (test_\w+)", f.read_text(), flags=re.M):
            out.setdefault(name, f"tests/{f.name}")
    return out


def _rows(lines: list[str]):
    """(line index, cells) of every table body row."""
    for i, line in enumerate(lines):
        if line.startswith("|") and not line.startswith("|---") and "outcome before" not in line:
            yield i, [c.strip() for c in line.strip().strip("|").split("|")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that every named test exists")
    a = ap.parse_args(argv)
    lines = PAGE.read_text().splitlines()
    index = _index()
    rows = list(_rows(lines))
    missing = sorted({n for _, cells in rows for n in _test_names(cells[4]) if n not in index})
    if a.check:
        print(f"{len(rows)} cases, {len(missing)} missing test(s): {missing}" if missing else f"{len(rows)} cases, all tests found")
        return 1 if missing else 0
    names = sorted({n for _, cells in rows for n in _test_names(cells[4]) if n in index})
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        files = sorted({index[n] for n in names})
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        "-k", " or ".join(names), *files], cwd=TESTS.parent)
        seen: dict[str, set[str]] = {}
        for case in ET.parse(xml).iter("testcase"):
            base = re.sub(r"\[.*$", "", case.get("name", ""))
            bad = case.find("failure") is not None or case.find("error") is not None
            seen.setdefault(base, set()).add("FAIL" if bad else ("skip" if case.find("skipped") is not None else "pass"))
    # per test: FAIL if any parametrisation failed, else pass if any passed, else skip
    outcome = {n: next(v for v in ("FAIL", "pass", "skip") if v in st) for n, st in seen.items()}
    n_pass = 0
    header_done = set()
    for i, line in enumerate(lines):
        if line.startswith("| component |") and "verified" not in line:
            lines[i] = line.rstrip() + " verified |"
            header_done.add(i)
        elif line.startswith("|---") and i - 1 in header_done:
            lines[i] = line.rstrip() + "---|"
    for i, cells in rows:
        status = [outcome.get(n, "missing") for n in _test_names(cells[4])] or ["missing"]
        verdict = next(v for v in ("FAIL", "missing", "skip", "pass") if v in status)
        n_pass += verdict == "pass"
        cells = cells[:5] + [verdict]
        lines[i] = "| " + " | ".join(cells) + " |"
    lines = [ln for ln in lines if not ln.startswith(FOOTER)]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"{FOOTER}{stamp} by `python tests/reliability_table.py`: {n_pass}/{len(rows)} cases pass._")
    PAGE.write_text("\n".join(lines) + "\n")
    print(f"{n_pass}/{len(rows)} cases pass; {PAGE} rewritten")
    return 0 if n_pass == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

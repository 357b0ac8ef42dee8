"""Helpers for the tests that run bundles under torchrun (2 CPU processes, gloo) and compare with one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The torchrun command next to this interpreter (``python -m torch.distributed.run`` when absent)."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", f"--nproc_per_node={int(nproc)}"]


def bundle_args(workflow: str, configs: list[Path], **overrides: Any) -> list[str]:
    """``-m monai.bundle run WORKFLOW --config_file [...] --key value ...`` (values as JSON unless text)."""
    files = ",".join(f"'{c}'" for c in configs)
    args = ["-m", "monai.bundle", "run", workflow, "--config_file", f"[{files}]"]
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def run_one_and_two(workflow: str, configs: list[Path], multi: Path, one: Path, two: Path, timeout: int = 300,
                    **overrides: Any) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The bundle run once in one process into ``one`` and once under torchrun (2 processes, ``multi`` added to
    the configs) into ``two``; both must succeed (their logs are in the assertion message otherwise).

    Both runs use one CPU thread per process (torchrun's default for several processes): torch's CPU kernels sum in
    an order that depends on the thread count, so the last bits of a network's output do too -- the sharding must
    not change a byte, the thread count may."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, *bundle_args(workflow, configs, output_dir=str(one), **overrides)],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r1.returncode == 0, (r1.stdout + r1.stderr)[-4000:]
    r2 = subprocess.run(torchrun() + bundle_args(workflow, [*configs, multi], output_dir=str(two), **overrides),
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    return r1, r2


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative POSIX path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_same_files(one: Path, two: Path) -> dict[str, bytes]:
    """The two folders hold the same files with the same bytes (a summary that names its own output folder may
    differ by that path only); returns the first's."""
    a, b = folder_files(one), folder_files(two)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))  # nothing extra left (parts, journals, progress)
    for k in a:
        assert a[k] == b[k].replace(str(two).encode(), str(one).encode()), k
    return a


def assert_same_files_masked(one: Path, two: Path, patterns: list[str]) -> dict[str, bytes]:
    """:func:`assert_same_files` with the matches of ``patterns`` (regular expressions, e.g. a timing's value in a
    report: ``'"seconds": [0-9.]+'``) masked in both folders' files first; returns the first's (unmasked) files.
    Every other byte must be equal (a file that names its own output folder may differ by that path only)."""
    import re

    a, b = folder_files(one), folder_files(two)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))  # nothing extra left (parts, journals, progress)

    def masked(data: bytes) -> bytes:
        for p in patterns:
            data = re.sub(p.encode(), b"<masked>", data)
        return data

    for k in a:
        assert masked(a[k]) == masked(b[k].replace(str(two).encode(), str(one).encode())), k
    return a

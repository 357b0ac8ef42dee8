"""Atomic writes keep the permissions a plain write would give (mkstemp / mkdtemp create 0600 / 0700)."""

from __future__ import annotations

import os
import stat

from pipeline.io.atomic import atomic_dir, write_text_atomic


def test_atomic_files_and_folders_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "sub") as t:
            (t / "f").write_text("y")
        plain = tmp_path / "plain.txt"
        plain.write_text("z")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(plain) == 0o644
    assert mode(tmp_path / "sub") == mode(tmp_path / "plain_dir") == 0o755
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "sub" / "f").read_text() == "y"

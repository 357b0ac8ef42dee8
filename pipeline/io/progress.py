"""Progress a person can follow on long runs: items done / failed / left and an ETA, per rank and in total
(issue 16, item 3).

Each rank of a run shows a tqdm bar of its own items (``done``, ``failed``, ``kept`` from an earlier run) and,
every few seconds, writes its counts atomically to ``run_progress.rank<r>.json`` in the output folder. Rank 0's bar
adds the total of every rank (read from those files, so no rank ever waits for another to report), and anyone can
follow a run from another terminal::

    python -m pipeline.io.progress OUTPUT_DIR

prints one line per rank and the total (items done / failed / left, items per second, ETA). The ETA of a rank is
``left / rate`` with ``rate`` the items it computed per second since it started (items kept from an earlier run
take no time and do not count in the rate); the total's ETA is the largest of the ranks' (they run side by side).
The files go when the run completes (an interrupted run leaves them, marked ``stopped``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from pipeline.io.atomic import write_text_atomic

__all__ = ["PROGRESS_GLOB", "RunProgress", "combine", "format_eta", "format_progress", "progress_file",
           "read_progress"]

#: The progress files of every rank in an output folder.
PROGRESS_GLOB = "run_progress.rank*.json"


def progress_file(folder: str | os.PathLike, rank: int) -> Path:
    """Rank ``rank``'s progress file in ``folder``."""
    return Path(folder) / f"run_progress.rank{int(rank)}.json"


def format_eta(seconds: float | None) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _eta(rec: Mapping[str, Any]) -> float | None:
    left = int(rec.get("total", 0)) - int(rec.get("done", 0)) - int(rec.get("failed", 0))
    if left <= 0:
        return 0.0
    rate = float(rec.get("rate") or 0.0)
    return left / rate if rate > 0 else None


def combine(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The total of several ranks' progress records: summed counts and rate, ETA = the slowest rank's (``None``
    when a rank with items left has no rate yet)."""
    total = {k: sum(int(r.get(k, 0)) for r in records) for k in ("total", "done", "failed", "kept")}
    total["left"] = total["total"] - total["done"] - total["failed"]
    total["rate"] = sum(float(r.get("rate") or 0.0) for r in records)
    etas = [_eta(r) for r in records]
    total["eta_s"] = None if any(e is None for e in etas) else max(etas, default=0.0)
    return total


def read_progress(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The progress records of every rank in ``folder`` (rank order; unreadable files skipped)."""
    out = []
    for p in sorted(Path(folder).glob(PROGRESS_GLOB)):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return sorted(out, key=lambda r: int(r.get("rank", 0)))


def format_progress(records: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """A small table: one line per rank, then the total."""
    if not records:
        return "no progress files (run_progress.rank*.json) here: no run is writing into this folder"
    now = time.time() if now is None else now
    lines = [f"{'rank':>6} {'done':>7} {'failed':>7} {'left':>7} {'items/s':>8} {'ETA':>9}  state"]
    for r in records:
        left = int(r["total"]) - int(r["done"]) - int(r["failed"])
        state = r.get("state", "running")
        age = now - float(r.get("updated", now))
        if state == "running" and age > 120:
            state = f"no update for {format_eta(age)}"
        lines.append(f"{r.get('rank', 0)!s:>6} {r['done']:>7} {r['failed']:>7} {left:>7} "
                     f"{float(r.get('rate') or 0):>8.2f} {format_eta(_eta(r)):>9}  {state}")
    t = combine(records)
    lines.append(f"{'all':>6} {t['done']:>7} {t['failed']:>7} {t['left']:>7} {t['rate']:>8.2f} "
                 f"{format_eta(t['eta_s']):>9}  {records[0].get('what', '')}")
    return "\n".join(lines)


class RunProgress:
    """The progress of one rank over its ``total`` items (module docstring).

    Args:
        folder: the output folder (where the progress files go); ``None``: only the bar.
        total: this rank's items.
        desc, unit: the bar's label and unit.
        rank, world_size: this process's place in the run (:class:`pipeline.io.sharding.RankGroup`).
        enabled: show the bar (the files are written either way).
        every_s: at most one progress-file write (and one read of the other ranks' files on rank 0) per
            ``every_s`` seconds.

    Call :meth:`update` once per finished item, :meth:`close` at the end (``completed=True`` removes the file).
    """

    def __init__(self, folder: str | os.PathLike | None, total: int, desc: str, unit: str = "item", rank: int = 0,
                 world_size: int = 1, enabled: bool = True, every_s: float = 2.0) -> None:
        self.folder = None if folder is None else Path(folder)
        self.rank, self.world_size = int(rank), int(world_size)
        self.what = desc
        self.every_s = float(every_s)
        self.counts = {"done": 0, "failed": 0, "kept": 0}
        self.total = int(total)
        self.started = time.time()
        self._last = 0.0
        self._total = ""  # rank 0 of a sharded run: the last total of every rank, for the bar
        label = desc + (f" (rank {self.rank}/{self.world_size})" if self.world_size > 1 else "")
        self.bar = tqdm(total=self.total, desc=label, unit=unit, disable=not enabled, file=sys.stderr)
        self._write("running", force=True)

    def update(self, status: str = "done") -> None:
        """One item finished: ``done`` (computed), ``kept`` (from an earlier run; counts as done) or ``failed``."""
        if status == "kept":
            self.counts["kept"] += 1
            self.counts["done"] += 1
        elif status == "failed":
            self.counts["failed"] += 1
        else:
            self.counts["done"] += 1
        self.bar.update(1)
        self._write("running")

    def record(self, state: str = "running") -> dict[str, Any]:
        """This rank's progress record."""
        now = time.time()
        computed = self.counts["done"] - self.counts["kept"] + self.counts["failed"]
        elapsed = max(now - self.started, 1e-9)
        return {"what": self.what, "rank": self.rank, "world_size": self.world_size, "total": self.total,
                **self.counts, "rate": computed / elapsed if computed else 0.0, "started": self.started,
                "updated": now, "state": state}

    def _write(self, state: str, force: bool = False) -> None:
        """Update the bar's counts (every call) and, at most every ``every_s`` seconds (or when ``force``d), write
        the progress file and, on rank 0 of a sharded run, read the other ranks' files for the total."""
        now = time.monotonic()
        due = force or now - self._last >= self.every_s
        rec = self.record(state)
        if due:
            self._last = now
            if self.folder is not None:
                try:
                    write_text_atomic(progress_file(self.folder, self.rank), json.dumps(rec))
                except OSError:  # progress must never stop a run
                    pass
            if self.world_size > 1 and self.rank == 0 and self.folder is not None:
                others = [r for r in read_progress(self.folder) if int(r.get("rank", -1)) != self.rank]
                t = combine([rec, *others])
                self._total = f"{t['done']}/{t['total']} done, {t['failed']} failed, ETA {format_eta(t['eta_s'])}"
        post = {"failed": rec["failed"], "left": self.total - rec["done"] - rec["failed"]}
        if self._total:
            post["all"] = self._total
        self.bar.set_postfix(post, refresh=False)

    def close(self, completed: bool = True) -> None:
        """End the bar; remove this rank's progress file when the run completed, else mark it ``stopped``."""
        self.bar.close()
        if self.folder is None:
            return
        if completed:
            progress_file(self.folder, self.rank).unlink(missing_ok=True)
        else:
            self._write("stopped", force=True)

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        self.close(completed=exc_type is None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.io.progress OUTPUT_DIR``: the progress of the run writing into ``OUTPUT_DIR``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.io.progress", description=main.__doc__)
    ap.add_argument("output_dir", help="the run's output folder")
    args = ap.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        print(f"{args.output_dir}: not a folder", file=sys.stderr)
        return 2
    print(format_progress(read_progress(args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

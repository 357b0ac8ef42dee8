"""benchmarks/bench_scaling.py's pure helpers on made-up numbers: log-log slope, steady rate, markdown table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)  # imports numpy only; the measurements import their libraries when run
    yield mod
    sys.modules.pop(spec.name, None)


def test_loglog_slope_recovers_the_exponent(bench):
    x = [1e3, 1e4, 1e5, 1e6]
    assert bench.loglog_slope(x, [3.0 * v**2 for v in x]) == pytest.approx(2.0)
    assert bench.loglog_slope(x, [0.5 * v**0.5 for v in x]) == pytest.approx(0.5)
    assert bench.loglog_slope([2, 4, 8], [5.0, 5.0, 5.0]) == pytest.approx(0.0, abs=1e-12)


def test_loglog_slope_ignores_unusable_points(bench):
    assert bench.loglog_slope([1, 10, 100, 0], [1, 10, 100, 7]) == pytest.approx(1.0)  # x = 0 dropped
    assert math.isnan(bench.loglog_slope([10], [1.0]))
    assert math.isnan(bench.loglog_slope([10, 10], [1.0, 2.0]))


def test_steady_rate_counts_gaps_not_items(bench):
    assert bench.steady_rate([100.0, 100.5, 101.0, 101.5, 102.0]) == pytest.approx(2.0)  # 4 gaps in 2 s
    assert bench.steady_rate([5.0, 4.0, 3.0]) == pytest.approx(1.0)  # order does not matter
    assert math.isnan(bench.steady_rate([1.0]))


def test_markdown_table_formats_numbers(bench):
    md = bench.markdown_table(["N", "seconds", "note"], [[1000, 0.012345, None], [1_000_000, 12345.6, "x"]])
    lines = md.splitlines()
    assert lines[0] == "| N | seconds | note |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| 1000 | 0.0123 | – |"
    assert lines[3] == "| 1000000 | 12346 | x |"
    assert "n/a" in bench.markdown_table(["a"], [[float("nan")]])


def test_tick_labels_are_short(bench):
    assert [bench._short(v) for v in (0.5, 1500, 391950, 1_321_600, 2e6)] == ["0.5", "1.5k", "392k", "1.3M", "2M"]

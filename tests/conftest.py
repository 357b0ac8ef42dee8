"""Shared fixtures: one tiny synthetic cohort per test session (a few seconds on 2 cores)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:  # tests that start torchrun (their name says so) carry the torchrun marker
        if "torchrun" in item.name:
            item.add_marker(pytest.mark.torchrun)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A 3-subject tiny cohort (1 mm radiographs, 1.6 mm MR, visits 0/24/48). Returns (root, manifest)."""
    from pipeline.cohort.generate import TINY, CohortConfig, generate_cohort

    root = tmp_path_factory.mktemp("tiny_cohort")
    cfg = CohortConfig(n_subjects=3, seed=7, workers=2, **TINY)
    manifest = generate_cohort(root, cfg, progress=False)
    return root, manifest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks (faster than two, also on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_excepthook():
    """In-process bundle runs install pipeline.user_errors' excepthook; keep it from leaking between tests."""
    import sys

    hook = sys.excepthook
    yield
    sys.excepthook = hook


@pytest.fixture
def fast_maps(monkeypatch):
    """The thickness atlas flattening replaced by plausible constant maps (FC 2.0 mm, TC 1.5 mm); returns the list
    of sides it was called for (thickness bundle tests of re-runs, interrupts and safety)."""
    import numpy as np

    import pipeline.thickness.maps_io as maps_io
    from pipeline.thickness.atlas import FlattenResult

    calls: list = []

    def fake(labels, affine, side, size=(16, 16), method="volume"):
        calls.append(side)
        return FlattenResult(np.full(size, 2.0, np.float32), np.full(size, 1.5, np.float32),
                             {"fc": 1.0, "tc": 1.0}, {})

    monkeypatch.setattr(maps_io, "labels_to_maps", fake)
    return calls

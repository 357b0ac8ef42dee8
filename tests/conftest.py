"""Shared fixtures: one tiny synthetic cohort per test session (a few seconds on 2 cores)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

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

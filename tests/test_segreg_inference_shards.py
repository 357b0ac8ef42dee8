"""bundles/segreg inference re-runs and sharding (issue 16) on tiny untrained networks and 64 px ``.npy`` pairs (no
training needed): a re-run resumes (only a pair whose files went is redone), other networks are refused unless
``overwrite``, Ctrl-C leaves no half-written pair, and two torchrun processes write what one process writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.io.run_state import RunSettingsError
from pipeline.registration.infer import PAIR_FILES, run_inference

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "segreg" / "configs"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny DXA / radiograph segmenters and a stage-3 (label map) registration network at 64 px."""
    from pipeline.registration.network import make_registration_network
    from pipeline.registration.segmenters import make_segmenter

    folder = tmp_path_factory.mktemp("segreg_tiny_models")
    torch.manual_seed(0)
    nets = {"segmenter_dxa": make_segmenter(channels=(4, 8), num_res_units=1),
            "segmenter_xray": make_segmenter(channels=(4, 8), num_res_units=1),
            "registration": make_registration_network(input_channels=4, levels=2, width=0.125, image_size=64)}
    paths = {}
    for k, net in nets.items():
        paths[k] = str(folder / f"{k}.pt")
        torch.save(net.state_dict(), paths[k])
    torch.manual_seed(1)
    other = make_registration_network(input_channels=4, levels=2, width=0.125, image_size=64)
    paths["other_registration"] = str(folder / "other.pt")
    torch.save(other.state_dict(), paths["other_registration"])
    return paths


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    """Three good 64 px pairs and a constant moving image (a failed row, pair index 1)."""
    d = tmp_path_factory.mktemp("segreg_tiny_pairs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64] / 63.0
    rows = []
    for k in range(3):
        for role in ("moving", "fixed"):
            img = np.sin(3 * xx + k) * np.cos(2 * yy + 0.5 * k) + 0.1 * rng.random((64, 64))
            np.save(d / f"{role}{k}.npy", img.astype(np.float32))
        rows.append({"pair_id": f"p{k}", "moving": f"moving{k}.npy", "fixed": f"fixed{k}.npy"})
    np.save(d / "blank.npy", np.zeros((64, 64), np.float32))
    rows.insert(1, {"pair_id": "blank", "moving": "blank.npy", "fixed": "fixed0.npy"})
    pd.DataFrame(rows).to_csv(d / "pairs.csv", index=False)
    return d / "pairs.csv"


def _run(models: dict[str, str], pairs: Path, out: Path, registration: str | None = None, **kw) -> pd.DataFrame:
    return run_inference(out, models["segmenter_dxa"], models["segmenter_xray"], registration or models["registration"],
                         pairs=str(pairs), progress=False, **kw)


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.glob("p*/*")}


def test_rerun_redoes_only_the_pair_whose_file_went_and_other_networks_are_refused(tiny_models, pairs_csv, tmp_path,
                                                                                    one_torch_thread):
    out = tmp_path / "out"
    df = _run(tiny_models, pairs_csv, out)
    assert list(df["item"]) == ["p0", "blank", "p1", "p2"]
    assert df.set_index("item").loc["blank", "status"] == "failed"
    assert not (out / "blank").exists() and (out / "run_items.jsonl").is_file()
    first = {p: (out / p).read_bytes() for p in ("outputs.csv", *(f"p{k}/{f}" for k in range(3) for f in PAIR_FILES))}
    before = _mtimes(out)
    (out / "p1" / "warped.nii.gz").unlink()
    _run(tiny_models, pairs_csv, out)
    after = _mtimes(out)
    changed = sorted(k for k in before if after[k] != before[k])
    assert changed == sorted(f"p1/{f}" for f in PAIR_FILES)  # p1 written again, p0 and p2 kept
    assert {p: (out / p).read_bytes() for p in first} == first  # the same files, the same manifest

    with pytest.raises(RunSettingsError, match="--overwrite True"):
        _run(tiny_models, pairs_csv, out, tiny_models["other_registration"])
    assert _mtimes(out) == after  # refused before writing anything
    _run(tiny_models, pairs_csv, out, tiny_models["other_registration"], overwrite=True)
    assert all(v != after[k] for k, v in _mtimes(out).items())  # every pair redone with the other network


def test_interrupt_removes_the_pair_being_written_and_the_rerun_resumes(tiny_models, pairs_csv, tmp_path,
                                                                         monkeypatch, one_torch_thread):
    import pipeline.registration.overlay as overlay

    full = tmp_path / "full"
    _run(tiny_models, pairs_csv, full)
    save = overlay.save_registration_overlay
    calls = []

    def stop_at_second(path, *args, **kwargs):
        calls.append(Path(path).parent.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while p1 is being written
        return save(path, *args, **kwargs)

    monkeypatch.setattr(overlay, "save_registration_overlay", stop_at_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_models, pairs_csv, out)
    assert not (out / "p1").exists() and not (out / "run.lock").exists()  # no half-written pair, lock released
    df = pd.read_csv(out / "outputs.csv", keep_default_na=False)
    assert list(df["item"]) == ["p0", "blank"]  # the pairs done when it stopped
    calls.clear()
    monkeypatch.setattr(overlay, "save_registration_overlay", save)
    _run(tiny_models, pairs_csv, out)
    assert (out / "outputs.csv").read_bytes() == (full / "outputs.csv").read_bytes()
    for k in range(3):
        for f in PAIR_FILES:
            assert (out / f"p{k}" / f).read_bytes() == (full / f"p{k}" / f).read_bytes(), f"p{k}/{f}"


def test_two_ranks_under_torchrun_write_what_one_process_writes(tiny_models, pairs_csv, tmp_path):
    """multi_gpu_inference.json: 2 CPU processes (gloo) share the pairs (pair k -> rank k % 2), rank 0 writes
    outputs.csv: every file byte for byte as one process, every pair once in the manifest, the bad one failed."""
    from dist_helpers import assert_same_files, run_one_and_two

    one, two = tmp_path / "one", tmp_path / "two"
    _, r2 = run_one_and_two("inference", [CONFIGS / "inference.json"], CONFIGS / "multi_gpu_inference.json", one, two,
                            segmenter_dxa=tiny_models["segmenter_dxa"], segmenter_xray=tiny_models["segmenter_xray"],
                            registration=tiny_models["registration"], pairs=str(pairs_csv), progress_bar=True)
    assert "rank 0/2" in r2.stderr and "rank 1/2" in r2.stderr  # both ranks worked
    files = assert_same_files(one, two)
    assert "run_items.jsonl" in files and not [f for f in files if "rank" in f]  # journals joined, progress gone
    df = pd.read_csv(two / "outputs.csv", dtype=str, keep_default_na=False)
    assert list(df["item"]) == ["p0", "blank", "p1", "p2"]  # every pair once, in pair order
    assert (df["status"] == "failed").sum() == 1 and df.set_index("item").loc["blank", "status"] == "failed"
    assert os.path.isfile(two / "p1" / "warped.nii.gz")  # a rank-1 pair

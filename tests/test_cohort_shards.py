"""Cohort generation in shards (issue 16): shards 0/2 and 1/2 write the same files as one unsharded run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.__main__ import build_parser
from pipeline.cohort.generate import CohortConfig, generate_cohort, merge_cohort, parse_shard, shard_from_env

CFG = dict(n_subjects=4, seed=3, write_mr=False, visits=(0,), xray_spacing_mm=1.0, map_size=16, workers=1)
FINAL = ("manifest.csv", "subjects.csv", "cohort.json")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    generate_cohort(root, CohortConfig(**CFG), progress=False)
    return root


def test_two_shards_equal_one_run(single, tmp_path):
    cfg = CohortConfig(**CFG)
    m0 = generate_cohort(tmp_path, cfg, progress=False, shard=(0, 2))
    assert not any((tmp_path / f).exists() for f in FINAL)  # half the subjects: no manifest yet
    assert sorted(m0.subject_id.unique()) == sorted(p.name for p in (tmp_path / "subjects").iterdir())
    assert m0.subject_id.nunique() == 2
    generate_cohort(tmp_path, cfg, progress=False, shard=(1, 2))  # the last shard writes the manifests
    assert _files(tmp_path) == _files(single)  # every subject file and manifest.csv / subjects.csv / cohort.json


def test_merge_writes_the_manifest_and_refuses_an_incomplete_cohort(single, tmp_path):
    cfg = CohortConfig(**CFG)
    generate_cohort(tmp_path, cfg, progress=False, shard=(1, 2))
    with pytest.raises(ValueError, match="2 of 4 subjects are missing.*indices 0, 2"):
        merge_cohort(tmp_path, cfg)
    generate_cohort(tmp_path, cfg, progress=False, shard=(0, 2))
    (tmp_path / "manifest.csv").unlink()
    merge_cohort(tmp_path, cfg)
    assert (tmp_path / "manifest.csv").read_bytes() == (single / "manifest.csv").read_bytes()


def test_a_shard_keeps_the_temporaries_of_other_shards(tmp_path):
    cfg = CohortConfig(**CFG)
    other = tmp_path / "subjects" / ".9030001.abc.partial"  # subject 1 of seed 3 belongs to shard 1/2
    mine = tmp_path / "subjects" / ".9030000.abc.partial"
    for p in (other, mine):
        p.mkdir(parents=True)
    generate_cohort(tmp_path, cfg, progress=False, shard=(0, 2))
    assert other.exists() and not mine.exists()


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "0/0", "x/y", "1", "1/2/3", ""])
def test_bad_shard_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(bad)


def test_shard_parsing_and_torchrun_environment():
    assert parse_shard(" 3/4 ") == (3, 4)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_from_env({"RANK": "1"}) is None
    with pytest.raises(ValueError):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_cli_options_parse(capsys):
    a = build_parser().parse_args(["cohort", "--out", "x", "--shard", "1/3"])
    assert a.shard == (1, 3) and not a.merge
    assert build_parser().parse_args(["cohort", "--out", "x", "--merge"]).merge
    assert build_parser().parse_args(["cohort", "--out", "x"]).shard is None
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["cohort", "--out", "x", "--shard", "3/3"])
    assert e.value.code == 2
    assert "0 <= i < n" in capsys.readouterr().err


def test_cli_shard_run(tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["cohort", "--out", str(tmp_path), "-n", "2", "--seed", "3", "--no-mr", "--visits", "0",
            "--xray-spacing", "1.0", "--map-size", "16", "--workers", "1"]
    assert main(args + ["--shard", "0/2"]) == 0
    assert "shard 0/2" in capsys.readouterr().out and not (tmp_path / "manifest.csv").exists()
    assert main(args + ["--merge"]) == 2  # subject 1 is missing
    assert "1 of 2 subjects are missing" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0  # the torchrun environment picks shard 1/2, the last one: manifest written
    assert (tmp_path / "manifest.csv").exists()


def test_an_interrupted_shard_resumes_without_redoing_finished_subjects(single, tmp_path, monkeypatch):
    """Ctrl-C during shard 0/2's second subject: its first subject stays complete; the other shard runs; the re-run
    of shard 0/2 generates only the interrupted subject, and the cohort equals an uninterrupted run byte for byte."""
    import pipeline.cohort.generate as gen

    cfg = CohortConfig(**CFG)
    real = gen.generate_subject
    made: list[int] = []

    def stop_at_second(cfg_, index, root):
        if made:
            raise KeyboardInterrupt
        made.append(index)
        return real(cfg_, index, root)

    monkeypatch.setattr(gen, "generate_subject", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path, cfg, progress=False, shard=(0, 2))
    assert made == [0]
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "subjects").rglob("*") if p.is_file()}
    assert first and all("9030000" in str(p) for p in first)  # subject 0 complete, nothing of subject 2 left
    stopped = json.loads((tmp_path / "run_progress.rank0.json").read_text())
    assert stopped["state"] == "stopped" and stopped["done"] == 1 and stopped["total"] == 2

    redone: list[int] = []

    def counting(cfg_, index, root):
        if gen._complete_rows(cfg_, index, root, cfg_.digest()) is None:
            redone.append(index)
        return real(cfg_, index, root)

    monkeypatch.setattr(gen, "generate_subject", counting)
    generate_cohort(tmp_path, cfg, progress=False, shard=(1, 2))
    generate_cohort(tmp_path, cfg, progress=False, shard=(0, 2))  # the re-run of the interrupted shard
    assert redone == [1, 3, 2]  # shard 1's two subjects, then only the interrupted subject of shard 0
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # subject 0 was not rewritten
    assert _files(tmp_path) == _files(single)  # and no progress file or temporary is left

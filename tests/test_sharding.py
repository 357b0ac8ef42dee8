"""The shared layer of sharded runs (issue 16): item split, progress / ETA across ranks, and the run state's
folder-neutral settings and joined journals."""

from __future__ import annotations

import json

import pytest

from pipeline.io.progress import (
    RunProgress,
    combine,
    format_eta,
    format_progress,
    main,
    progress_file,
    read_progress,
)
from pipeline.io.run_state import JOURNAL_FILE, RunState
from pipeline.io.sharding import RankGroup, flatten, shard_indices


@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (7, 2), (10, 4)])
def test_every_item_goes_to_exactly_one_rank(n, world):
    parts = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert all(i % world == r for r, p in enumerate(parts) for i in p)


def test_a_single_process_group_is_the_identity():
    g = RankGroup()
    assert (g.rank, g.world_size, g.sharded, g.label) == (0, 1, False, "")
    assert list(g.mine(["a", "b"])) == [(0, "a"), (1, "b")]
    assert g.broadcast(5) == 5 and g.gather(5) == [5]
    assert list(g.merge({2: "c", 0: "a"})) == [0, 2]
    assert flatten({1: ["b"], 0: ["a", "a2"]}) == ["a", "a2", "b"]


def test_a_sharded_group_without_torch_distributed_says_how_to_run_it():
    with pytest.raises(ValueError, match="torchrun"):
        RankGroup(0, 2)
    with pytest.raises(ValueError, match="rank must be"):
        RankGroup(2, 2)


def test_total_progress_and_eta_by_hand():
    r0 = {"rank": 0, "total": 10, "done": 4, "failed": 1, "kept": 0, "rate": 0.5}  # 5 left at 0.5/s: 10 s
    r1 = {"rank": 1, "total": 10, "done": 8, "failed": 0, "kept": 2, "rate": 1.0}  # 2 left at 1/s: 2 s
    t = combine([r0, r1])
    assert (t["total"], t["done"], t["failed"], t["left"], t["kept"]) == (20, 12, 1, 7, 2)
    assert t["rate"] == pytest.approx(1.5) and t["eta_s"] == pytest.approx(10.0)  # the slowest rank decides
    assert combine([r0, {**r1, "rate": 0.0}])["eta_s"] is None  # a rank with work left and no rate yet
    assert format_eta(3725) == "1:02:05" and format_eta(None) == "?"
    table = format_progress([r0, r1], now=0.0)
    assert table.splitlines()[-1].split()[:4] == ["all", "12", "1", "7"] and "0:00:10" in table


def test_progress_files_for_other_terminals(tmp_path, capsys):
    bar = RunProgress(tmp_path, 3, "demo run", rank=1, world_size=2, enabled=False, every_s=0.0)
    bar.update("done")
    bar.update("kept")
    bar.update("failed")
    rec = read_progress(tmp_path)[0]
    assert (rec["rank"], rec["done"], rec["kept"], rec["failed"], rec["total"]) == (1, 2, 1, 1, 3)
    assert main([str(tmp_path)]) == 0 and "demo run" in capsys.readouterr().out
    bar.close(completed=False)
    assert read_progress(tmp_path)[0]["state"] == "stopped"  # an interrupted run leaves its counts
    RunProgress(tmp_path, 0, "demo run", rank=1, world_size=2, enabled=False).close()
    assert not progress_file(tmp_path, 1).exists()  # a completed run leaves nothing


def test_a_moved_output_folder_still_resumes(tmp_path):
    """The settings may name the output folder (e.g. a writer's target): they are compared with that path
    written ``<output_dir>``, so a moved folder resumes instead of being refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    with RunState(a, {"writer": {"folder": str(a / "maps")}, "k": 1}, "demo") as state:
        (a / "x.txt").write_text("x")
        state.record("x", "stamp1", [a / "x.txt"])
    a.rename(b)
    with RunState(b, {"writer": {"folder": str(b / "maps")}, "k": 1}, "demo") as state:
        assert state.previous("x", "stamp1") is not None  # resumed, not refused
    settings = json.loads((b / "run_settings.json").read_text())["settings"]
    assert settings["writer"]["folder"] == "<output_dir>/maps"


def test_journals_of_an_interrupted_sharded_run_are_joined(tmp_path):
    """Rank journals left by an interrupted torchrun run count as complete items for the next run (any number of
    ranks), and are joined into one journal when it starts."""
    with RunState(tmp_path, {"k": 1}, "demo") as state:
        pass
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(name)
    (tmp_path / "run_items.rank0.jsonl").write_text(json.dumps({"item": "a", "stamp": "s", "outputs": ["a.txt"]})
                                                    + "\n")
    (tmp_path / "run_items.rank1.jsonl").write_text(json.dumps({"item": "b", "stamp": "s", "outputs": ["b.txt"]})
                                                    + "\n" + '{"item": "b", "sta')  # a line cut by SIGKILL
    with RunState(tmp_path, {"k": 1}, "demo") as state:
        assert state.previous("a", "s") and state.previous("b", "s")
        assert not list(tmp_path.glob("run_items.rank*.jsonl"))
        state.forget("a")
    lines = [json.loads(x) for x in (tmp_path / JOURNAL_FILE).read_text().splitlines()]
    assert [e["item"] for e in lines] == ["a", "b", "a"] and lines[-1]["removed"]
    assert not (tmp_path / "a.txt").exists() and (tmp_path / "b.txt").exists()


@pytest.mark.parametrize("n, world", [(2, 2), (5, 2), (7, 3), (11, 4)])
def test_block_sampler_ranks_concatenate_to_the_single_process_order(n, world):
    """MONAI's handlers join the ranks' per-case results in rank order: consecutive blocks keep the case order, and
    each rank gets as many cases as MONAI's own DistributedSampler(even_divisible=False) gives it."""
    from monai.data import DistributedSampler

    from pipeline.io.sharded_batches import BlockDistributedSampler, batch_indices

    data = list(range(n))
    shares = [list(BlockDistributedSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    assert [i for s in shares for i in s] == data
    assert [len(s) for s in shares] == [len(DistributedSampler(data, even_divisible=False, num_replicas=world,
                                                               rank=r, shuffle=False)) for r in range(world)]
    assert [i for b in batch_indices(n, 3) for i in b] == data and all(len(b) <= 3 for b in batch_indices(n, 3))


RANK_SCRIPT = '''
import sys
import torch.distributed as dist
from pipeline.io.run_state import RunState

dist.init_process_group("gloo")
out = sys.argv[1]
try:
    with RunState(out, {"k": 1}, "demo run") as state:
        done = {i: f"item{i}" for i, _ in state.mine(list(range(5)))}
        merged = state.merge(done)
        print(f"rank {dist.get_rank()} merged {merged}", flush=True)
except Exception as e:
    print(f"rank {dist.get_rank()} stopped: {type(e).__name__}: {e}", flush=True)
dist.destroy_process_group()
'''


def test_under_torchrun_every_rank_learns_rank_0s_decision(tmp_path):
    """Under torchrun (2 processes, gloo): rank 0 alone locks and decides; with the folder locked by another live
    run both ranks stop with the lock error before writing; unlocked, rank 0 merges every item once in order."""
    import subprocess

    from dist_helpers import ROOT, torchrun

    from pipeline.io.paths import output_lock
    from pipeline.io.run_state import LOCK_FILE

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    with output_lock(out, LOCK_FILE, what="demo run"):  # this live process holds the folder
        r = subprocess.run(torchrun() + [str(script), str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # neither rank wrote anything
    assert r.stdout.count("stopped: OutputLockedError") == 2, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run(torchrun() + [str(script), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "rank 0 merged {0: 'item0', 1: 'item1', 2: 'item2', 3: 'item3', 4: 'item4'}" in r.stdout, r.stdout
    assert "rank 1 merged None" in r.stdout


def test_the_bar_counts_every_item_even_between_progress_file_writes(tmp_path):
    bar = RunProgress(tmp_path, 3, "demo run", enabled=False, every_s=3600.0)  # the file is written once, at start
    for status in ("done", "failed", "kept"):
        bar.update(status)
    assert bar.bar.postfix == "failed=1, left=0"
    assert read_progress(tmp_path)[0]["done"] == 0  # (the file waits for its interval)
    bar.close()

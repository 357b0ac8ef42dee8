"""One random visit per subject per epoch: uniqueness, determinism, coverage, distributed split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.sampling import SubjectVisitSampler


def _manifest(n_subjects: int = 12, seed: int = 0) -> list[str]:
    """Subject id per item: each subject has 1..6 knee-visits (both knees, several visits)."""
    rng = np.random.default_rng(seed)
    ids = [f"9{s:06d}" for s in range(n_subjects) for _ in range(rng.integers(1, 7))]
    rng.shuffle(ids)
    return ids


def test_one_item_per_subject_per_epoch():
    ids = _manifest()
    sampler = SubjectVisitSampler(ids, seed=3)
    assert len(sampler) == sampler.num_subjects == len(set(ids))
    for epoch in range(5):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        subjects = [ids[i] for i in idx]
        assert len(idx) == len(set(ids))
        assert sorted(subjects) == sorted(set(ids))  # every subject exactly once


def test_deterministic_per_seed_and_epoch():
    ids = _manifest()
    a, b = SubjectVisitSampler(ids, seed=7), SubjectVisitSampler(ids, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice in one epoch gives the same draw
    draws = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        draws.add(tuple(a))
    assert len(draws) == 4  # epochs differ
    c = SubjectVisitSampler(ids, seed=8)
    c.set_epoch(0)
    a.set_epoch(0)
    assert list(c) != list(a)
    # without shuffling, the subject order is fixed but visits are still drawn
    d = SubjectVisitSampler(ids, seed=7, shuffle=False)
    d.set_epoch(0)
    order0 = [ids[i] for i in d]
    d.set_epoch(1)
    assert [ids[i] for i in d] == order0


def test_every_visit_is_covered_over_epochs():
    ids = _manifest()
    sampler = SubjectVisitSampler(np.array(ids), seed=0)
    seen: Counter = Counter()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        seen.update(sampler)
    assert set(seen) == set(range(len(ids)))
    # roughly uniform over a subject's visits: subject with m items -> each drawn about 200/m times
    sizes = Counter(ids)
    for i, count in seen.items():
        expected = 200 / sizes[ids[i]]
        assert 0.4 * expected < count < 1.8 * expected


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_split(drop_last):
    ids = _manifest(n_subjects=11)
    parts = []
    for rank in range(3):
        s = SubjectVisitSampler(ids, seed=5, num_replicas=3, rank=rank, drop_last=drop_last)
        s.set_epoch(2)
        parts.append(list(s))
    lengths = {len(p) for p in parts}
    assert lengths == ({3} if drop_last else {4})
    for p in parts:  # no subject twice on one rank
        assert len({ids[i] for i in p}) == len(p)
    union = [i for p in parts for i in p]
    if drop_last:
        assert len({ids[i] for i in union}) == 9
    else:
        assert {ids[i] for i in union} == set(ids)  # all 11 subjects covered (1 padded duplicate)
    single = SubjectVisitSampler(ids, seed=5)
    single.set_epoch(2)
    full = single.epoch_indices()  # same draw, unpadded (one replica)
    padded = full + full[: 3 * len(parts[0]) - len(full)]
    assert union == [i for r in range(3) for i in padded[r : len(parts[0]) * 3 : 3]]
    with pytest.raises(ValueError, match="rank"):
        SubjectVisitSampler(ids, num_replicas=2, rank=2)


def test_works_with_dataloader_batches():
    ids = _manifest(n_subjects=20)
    data = torch.arange(len(ids))
    sampler = SubjectVisitSampler(ids, seed=1)
    loader = DataLoader(data, batch_size=6, sampler=sampler)
    batches = [b.tolist() for b in loader]
    flat = [i for b in batches for i in b]
    assert len(flat) == 20
    for b in batches:
        assert len({ids[i] for i in b}) == len(b)


def test_draws_per_epoch_concatenates_independent_subject_draws():
    subjects = [f"s{i // 3}" for i in range(30)]  # 10 subjects x 3 visits
    one = SubjectVisitSampler(subjects, seed=1)
    three = SubjectVisitSampler(subjects, seed=1, draws_per_epoch=3)
    idx = list(three)
    assert len(three) == 3 * len(one) == 30 and len(idx) == 30
    for d in range(3):  # every block of one draw holds each subject exactly once
        block = [subjects[i] for i in idx[10 * d:10 * (d + 1)]]
        assert sorted(block) == sorted(set(subjects))
    assert idx[:10] != idx[10:20]
    with pytest.raises(ValueError):
        SubjectVisitSampler(subjects, draws_per_epoch=0)

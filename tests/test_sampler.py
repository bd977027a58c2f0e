"""ResizableBatchSampler: every index once per epoch on all ranks together, whatever the resizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gns.sampler import ResizableBatchSampler, split_batch_size


def _ranks(size, batch_size, world, **kwargs):
    return [ResizableBatchSampler(size, batch_size, num_replicas=world, rank=r, seed=3, **kwargs) for r in range(world)]


def _run_epoch(samplers, resizes):
    """Iterate all ranks in lock-step, applying ``resizes`` {after batch: new size} on every rank alike."""
    iterators = [iter(s) for s in samplers]
    served = [[] for _ in samplers]
    batch = 0
    while True:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            break
        assert all(b is not None for b in batches), "ranks disagree on the number of batches (DDP would hang)"
        assert all(len(b) > 0 for b in batches), "a rank got an empty batch"
        for rank, b in enumerate(batches):
            served[rank].append(b)
        batch += 1
        if batch in resizes:
            at = max(s.next_batch for s in samplers)
            for s in samplers:
                s.resize(resizes[batch], at_batch=at)
    return served


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(2, 120),
    batch_size=st.integers(1, 9),
    world=st.integers(1, 4),
    resizes=st.dictionaries(st.integers(1, 40), st.integers(1, 17), max_size=4),
    shuffle=st.booleans(),
)
def test_every_index_once_per_epoch_on_all_ranks(size, batch_size, world, resizes, shuffle):
    if size < world:
        return
    samplers = _ranks(size, batch_size, world, shuffle=shuffle)
    for epoch in range(2):
        for s in samplers:
            s.set_epoch(epoch)
        served = _run_epoch(samplers, resizes)
        flat = [i for rank in served for b in rank for i in b]
        assert sorted(flat) == list(range(size))
        assert len(served[0]) == len(samplers[0])  # the length Lightning is told is the number of batches served


def test_batch_sizes_follow_the_resize_from_the_next_undrawn_batch():
    (sampler,) = _ranks(40, 4, 1, shuffle=False)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    assert [len(b) for b in first] == [4, 4, 4]
    assert sampler.resize(6) == 3
    rest = list(it)
    assert [len(b) for b in rest] == [6, 6, 6, 6, 4]
    assert [i for batch in first + rest for i in batch] == list(range(40))


def test_resize_past_the_end_of_the_epoch_starts_the_next_one():
    (sampler,) = _ranks(12, 4, 1, shuffle=False)
    assert len(sampler) == 3
    assert sampler.resize(6, at_batch=3) == 3
    assert [len(b) for b in sampler] == [4, 4, 4]
    sampler.set_epoch(1)
    assert [len(b) for b in sampler] == [6, 6]


def test_a_drawn_batch_cannot_be_resized():
    (sampler,) = _ranks(12, 4, 1)
    it = iter(sampler)
    next(it), next(it)
    with pytest.raises(ValueError, match="already drawn"):
        sampler.resize(2, at_batch=1)


def test_shuffle_is_a_permutation_per_epoch_shared_by_ranks():
    a, b = _ranks(30, 3, 2, shuffle=True)
    first = [i for batch in a for i in batch] + [i for batch in b for i in batch]
    a.set_epoch(1), b.set_epoch(1)
    second = [i for batch in a for i in batch] + [i for batch in b for i in batch]
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second


def test_resume_starts_at_the_saved_batch():
    (sampler,) = _ranks(50, 5, 1, shuffle=True)
    it = iter(sampler)
    served = [next(it) for _ in range(4)]
    sampler.resize(7)
    served += [next(it)]
    state = sampler.state_dict()
    uninterrupted = list(it)
    (resumed,) = _ranks(50, 5, 1, shuffle=True)
    resumed.load_state_dict(state)
    resumed.start_at(5)
    assert list(resumed) == uninterrupted


def test_drop_last_drops_only_the_short_tail():
    (sampler,) = _ranks(23, 5, 1, shuffle=False, drop_last=True)
    assert [len(b) for b in sampler] == [5, 5, 5, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset_size": 0, "batch_size": 2}, "dataset_size"),
        ({"dataset_size": 5, "batch_size": 0}, "batch_size"),
        ({"dataset_size": 5, "batch_size": 2, "num_replicas": 2, "rank": 2}, "rank"),
        ({"dataset_size": 1, "batch_size": 2, "num_replicas": 2, "rank": 0}, "fewer than the 2 ranks"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResizableBatchSampler(**kwargs)


@pytest.mark.parametrize(
    ("effective", "world", "cap", "expected"),
    [
        (512, 2, 64, (64, 4)),
        (48, 1, None, (48, 1)),
        (96, 2, 16, (16, 3)),
        (100, 1, 32, (25, 4)),
        (40, 1, 16, (10, 4)),  # 3 × 14 = 42 would pass the scheduler's bound and multiple
        (37, 1, 16, (12, 3)),  # prime: no exact split with few micro-batches, the largest that fits
    ],
)
def test_split_batch_size(effective, world, cap, expected):
    micro, accumulate = split_batch_size(effective, world, cap)
    assert (micro, accumulate) == expected
    assert micro * accumulate * world <= effective  # never above what the scheduler allowed
    assert cap is None or micro <= cap

"""BatchSizeScheduler policies: bounds, hysteresis, no growth while uncertain, rounding to the multiple."""

from __future__ import annotations

import math

import pytest

from lightning_gns import BatchSizeScheduler


def _read(scheduler, b, lower=None, upper=None, examples=1e9):
    lower = b * 0.9 if lower is None else lower
    upper = b * 1.1 if upper is None else upper
    return scheduler.update(b, lower, upper, examples)


def test_b_crit_grows_towards_the_target_capped_per_change_and_rounded():
    scheduler = BatchSizeScheduler(32, multiple=8, max_growth_factor=2.0)
    change = _read(scheduler, 1000.0)
    assert change is not None
    assert (change.previous, change.batch_size) == (32, 64)  # capped at 2× per change
    change = _read(scheduler, 100.0)
    assert change.batch_size == 96  # 100 rounded down to the multiple of 8 (towards the current size)
    assert _read(scheduler, 100.0) is None  # 104 would be < 10% more: hysteresis
    assert scheduler.num_changes == 2


def test_no_growth_while_uncertain():
    scheduler = BatchSizeScheduler(32)
    # B_simple far above the batch, but the interval reaches below it: wait.
    assert scheduler.update(500.0, 20.0, 2000.0, 1e6) is None
    # |G|² unresolved: the lower end is what matters, the open upper end does not block growth.
    assert scheduler.update(500.0, 100.0, math.inf, 1e6) is not None
    # Undefined estimate (NaN while |G|² <= 0): nothing.
    assert BatchSizeScheduler(32).update(math.nan, math.nan, math.inf, 1e6) is None


def test_bounds_and_multiple():
    scheduler = BatchSizeScheduler(30, max_batch_size=100, multiple=16, max_growth_factor=10)
    assert _read(scheduler, 5000.0).batch_size == 96  # the largest multiple of 16 within max_batch_size
    assert _read(scheduler, 5000.0) is None  # at the bound
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchSizeScheduler(64, max_batch_size=32)


def test_wait_between_changes_in_examples():
    scheduler = BatchSizeScheduler(16, min_examples_between_changes=1000, max_growth_factor=2)
    assert _read(scheduler, 500.0, examples=999) is None  # the first change waits too
    assert _read(scheduler, 500.0, examples=1000).batch_size == 32
    assert _read(scheduler, 500.0, examples=1999) is None
    assert _read(scheduler, 500.0, examples=2000).batch_size == 64


def test_a_change_accepted_from_another_rank_starts_the_wait_as_its_own_would():
    # Two ranks' schedulers: one decides, the other accepts; from then on both decide alike.
    decided = BatchSizeScheduler(16, min_examples_between_changes=1000, max_growth_factor=2)
    accepting = BatchSizeScheduler(16, min_examples_between_changes=1000, max_growth_factor=2)
    change = _read(decided, 500.0, examples=1000)
    accepting.accept(change.batch_size, 1000.0)
    assert accepting.state_dict() == decided.state_dict()
    assert _read(accepting, 500.0, examples=1999) is None  # waits from the accepted change
    assert _read(accepting, 500.0, examples=2000).batch_size == 64


def test_never_shrinks_unless_asked():
    keep = BatchSizeScheduler(256, min_batch_size=16)
    assert _read(keep, 20.0) is None
    shrink = BatchSizeScheduler(256, min_batch_size=16, allow_shrink=True)
    change = _read(shrink, 20.0)
    assert change.batch_size == 128  # at most a factor 2 per change
    # Shrinking also needs the whole interval (its upper end) below the batch.
    assert BatchSizeScheduler(256, min_batch_size=16, allow_shrink=True).update(20.0, 5.0, math.inf, 1e9) is None


def test_sqrt_policy_follows_the_square_root_of_the_noise_scale():
    scheduler = BatchSizeScheduler(64, policy="sqrt", multiple=1, max_growth_factor=100)
    assert _read(scheduler, 100.0) is None  # the first confident reading is the reference
    change = _read(scheduler, 400.0, lower=399.0, upper=401.0)
    assert change.target == pytest.approx(64 * math.sqrt(400 / 100))
    assert change.batch_size == 128


def test_goodput_policy_uses_the_fitted_step_time_model():
    scheduler = BatchSizeScheduler(32, policy="goodput", multiple=1, max_growth_factor=100)
    # Step time 10 ms + 0.1 ms per example: alpha/beta = 100 examples of fixed overhead per step.
    scheduler.observe_step_time(32, (10 + 0.1 * 32) * 1e-3 * 5, steps=5)
    scheduler.observe_step_time(64, (10 + 0.1 * 64) * 1e-3 * 5, steps=5)
    assert scheduler.overhead_examples() == pytest.approx(100.0)
    change = _read(scheduler, 400.0, lower=399.0, upper=401.0)
    # Time to a target ∝ (1 + B_noise/B)(alpha + beta B) is least at sqrt(alpha/beta · B_noise).
    assert change.target == pytest.approx(math.sqrt(100 * 400))
    best = min(range(1, 2000), key=lambda b: (1 + 400 / b) * (10 + 0.1 * b))
    assert change.batch_size == best == 200


def test_state_dict_round_trip_decides_alike():
    a = BatchSizeScheduler(16, policy="sqrt", min_examples_between_changes=100)
    _read(a, 50.0, examples=10)
    _read(a, 300.0, examples=200)
    b = BatchSizeScheduler(16, policy="sqrt", min_examples_between_changes=100)
    b.load_state_dict(a.state_dict())
    assert a.batch_size == b.batch_size == 32
    for examples in (250, 300, 400, 1000):
        assert _read(a, 900.0, examples=examples) == _read(b, 900.0, examples=examples)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_batch_size": 0}, "initial_batch_size"),
        ({"initial_batch_size": 8, "policy": "linear"}, "policy"),
        ({"initial_batch_size": 8, "multiple": 0}, "multiple"),
        ({"initial_batch_size": 8, "max_growth_factor": 1.0}, "max_growth_factor"),
        ({"initial_batch_size": 8, "factor": -1}, "factor"),
        ({"initial_batch_size": 8, "min_batch_size": 64, "max_batch_size": 32}, "min_batch_size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeScheduler(**kwargs)

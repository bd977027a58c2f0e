"""The analysis of ``benchmarks/bench_growth.py``: the McCandlish fit that gives the sweep's critical batch size."""

from __future__ import annotations

import pytest

from tests.helpers.bench import loaded_bench

pytest.importorskip("scipy")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def bench():
    with loaded_bench("bench_growth") as module:
        yield module


SIZES = [8, 16, 32, 64, 128, 256]


def test_fit_recovers_the_pareto_front(bench):
    s_min, e_min = 12.0, 900.0  # B_crit = 75
    steps = [s_min + e_min / b for b in SIZES]
    fit = bench.fit_pareto(SIZES, steps)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-6)
    assert fit["e_min"] == pytest.approx(e_min, rel=1e-6)
    assert fit["b_crit"] == pytest.approx(75.0, rel=1e-6)
    assert fit["rms_log_residual"] < 1e-6
    # The fitted front holds the relation it stands for at every point: S/S_min - 1 = (E/E_min - 1)^-1, E = B S.
    for b, s in zip(SIZES, steps, strict=True):
        assert s / fit["s_min"] - 1 == pytest.approx(1 / (b * s / fit["e_min"] - 1), rel=1e-5)


def test_finite_data_fit_takes_out_the_without_replacement_bonus(bench):
    s_min, e_min, population = 5.0, 2000.0, 1000
    steps = [s_min + e_min * (1 / b - 1 / population) for b in SIZES]
    exact = bench.fit_pareto(SIZES, steps, population=population)
    assert exact["b_crit"] == pytest.approx(e_min / s_min, rel=1e-6)
    # Ignoring that big batches are a sizeable share of the data inflates the critical batch size.
    naive = bench.fit_pareto(SIZES, steps)
    assert naive["b_crit"] > exact["b_crit"]


def test_fit_needs_three_sizes(bench):
    fit = bench.fit_pareto([8, 16], [100.0, 60.0])
    assert all(v != v for v in fit.values())  # NaN

"""The estimator core against closed-form truths: synthetic Gaussian gradients and finite populations."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_gns.functional import (
    b_simple,
    ema_compute,
    ema_init,
    ema_update,
    gns_estimates,
    gradient_noise_scale,
    ratio_interval,
    relative_examples,
    relative_steps,
    suggested_batch_size,
)
from tests.helpers.synthetic import GaussianGradients, finite_population, population_truth, z_score

# Statistical tests: a true null fails with probability 1e-3 (two-sided z test); the seeds are fixed, so a
# failure is reproducible rather than flaky.
Z_CRIT = NormalDist().inv_cdf(1 - 1e-3 / 2)


def test_estimates_by_hand():
    # E|G_B|² = |G|² + tr Σ / B with |G|² = 2, tr Σ = 64: B=4 gives 18, B=16 gives 6.
    grad_sq_norm, trace_sigma = gns_estimates(torch.tensor(18.0), torch.tensor(6.0), 4, 16)
    torch.testing.assert_close(grad_sq_norm, torch.tensor(2.0))
    torch.testing.assert_close(trace_sigma, torch.tensor(64.0))
    torch.testing.assert_close(b_simple(trace_sigma, grad_sq_norm), torch.tensor(32.0))


def test_estimates_are_batched_over_leading_dims_and_per_step_batch_sizes():
    small = torch.tensor([[18.0, 10.0], [34.0, 6.0]], dtype=torch.float64)
    big = torch.tensor([[6.0, 4.0], [10.0, 3.0]], dtype=torch.float64)
    batch_small = torch.tensor([[4.0], [2.0]], dtype=torch.float64)
    grad_sq_norm, trace_sigma = gns_estimates(small, big, batch_small, 16)
    for i in range(2):
        for j in range(2):
            g, t = gns_estimates(small[i, j], big[i, j], float(batch_small[i, 0]), 16)
            torch.testing.assert_close(grad_sq_norm[i, j], g)
            torch.testing.assert_close(trace_sigma[i, j], t)
    assert grad_sq_norm.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype(dtype):
    out = gradient_noise_scale(torch.tensor([18.0, 18.0], dtype=dtype), torch.tensor([6.0, 6.0], dtype=dtype), 4, 16)
    assert out["b_simple"].dtype == dtype
    assert float(out["b_simple"]) == pytest.approx(32.0, rel=1e-2)


def test_averaged_estimates_recover_truth_ddp_style():
    truth = GaussianGradients.anisotropic(grad_sq_norm=1.0, trace_sigma=200.0, spread=100.0)
    gen = torch.Generator().manual_seed(0)
    small, big = truth.step_norms(batch_per_rank=16, world_size=4, shape=(20_000,), generator=gen)
    out = gradient_noise_scale(small, big, 16, 64)
    assert float(out["grad_sq_norm"]) == pytest.approx(truth.grad_sq_norm, rel=0.03)
    assert float(out["trace_sigma"]) == pytest.approx(truth.trace_sigma, rel=0.03)
    assert float(out["b_simple"]) == pytest.approx(truth.b_simple, rel=0.03)
    assert float(out["num_steps"]) == 20_000


@pytest.mark.parametrize(("batch_per_rank", "world_size"), [(1, 8), (8, 2), (32, 4)])
def test_single_step_estimates_are_unbiased(batch_per_rank, world_size):
    truth = GaussianGradients.anisotropic(grad_sq_norm=0.5, trace_sigma=50.0)
    gen = torch.Generator().manual_seed(batch_per_rank)
    small, big = truth.step_norms(batch_per_rank, world_size, (50_000,), gen)
    grad_sq_norm, trace_sigma = gns_estimates(small, big, batch_per_rank, batch_per_rank * world_size)
    assert abs(z_score(grad_sq_norm, truth.grad_sq_norm)) < Z_CRIT
    assert abs(z_score(trace_sigma, truth.trace_sigma)) < Z_CRIT


def test_the_unbiasedness_test_can_fail():
    # Dropping the 1/B term (the mistake of using |G_big|² as |G|²) is biased, and the same test sees it.
    truth = GaussianGradients.anisotropic(grad_sq_norm=0.5, trace_sigma=50.0)
    _, big = truth.step_norms(8, 2, (50_000,), torch.Generator().manual_seed(8))
    assert abs(z_score(big, truth.grad_sq_norm)) > Z_CRIT


@settings(deadline=None, max_examples=50)
@given(
    scale=st.floats(1e-3, 1e3),
    sq_small=st.floats(1e-3, 1e3),
    ratio=st.floats(0.01, 0.99),
    batch_small=st.integers(1, 64),
    factor=st.integers(2, 16),
)
def test_scaling_gradients_scales_estimates_by_c_squared(scale, sq_small, ratio, batch_small, factor):
    small = torch.tensor(sq_small, dtype=torch.float64)
    big = small * ratio
    g, t = gns_estimates(small, big, batch_small, batch_small * factor)
    g_scaled, t_scaled = gns_estimates(small * scale**2, big * scale**2, batch_small, batch_small * factor)
    # Where |G|² cancels to about zero, what is left is rounding of the size of the inputs (×scale²).
    rounding = 1e-12 * sq_small * scale**2
    torch.testing.assert_close(g_scaled, g * scale**2, rtol=1e-9, atol=rounding)
    torch.testing.assert_close(t_scaled, t * scale**2, rtol=1e-9, atol=rounding)
    # B_simple is compared where |G|² is not zero up to rounding (there its sign, and so NaN or not, is noise).
    assume(abs(float(g)) > 1e-9 * sq_small)
    torch.testing.assert_close(b_simple(t_scaled, g_scaled), b_simple(t, g), rtol=1e-9, atol=0, equal_nan=True)


def _population_steps(per_example: torch.Tensor, num_steps: int, batch_per_rank: int, world: int, replace: bool):
    """Squared norms of `num_steps` steps drawn from a finite population, DDP style (disjoint rank slices)."""
    gen = torch.Generator().manual_seed(7)
    n = per_example.shape[0]
    big = batch_per_rank * world
    if replace:
        index = torch.randint(n, (num_steps, big), generator=gen)
    else:
        index = torch.rand(num_steps, n, generator=gen).argsort(dim=1)[:, :big]
    ranks = per_example[index].reshape(num_steps, world, batch_per_rank, -1).mean(2)
    return ranks.pow(2).sum(-1).mean(-1), ranks.mean(1).pow(2).sum(-1)


@pytest.mark.parametrize("replace", [False, True], ids=["without-replacement", "with-replacement"])
def test_finite_population_expectations(replace):
    per_example = finite_population(num_examples=48, dim=16)
    grad_sq_norm_true, trace_s2 = population_truth(per_example)
    n = per_example.shape[0]
    small, big = _population_steps(per_example, 200_000, batch_per_rank=4, world=4, replace=replace)
    grad_sq_norm, trace_sigma = gns_estimates(small, big, 4, 16)
    if replace:  # i.i.d. draws: unbiased for |G|² and tr(Σ_N) = (N-1)/N tr(S²)
        expected_g, expected_t = grad_sq_norm_true, trace_s2 * (n - 1) / n
    else:  # DESIGN.md: E[trace] = tr(S²), E[|G|²] = |G|² - tr(S²)/N
        expected_g, expected_t = grad_sq_norm_true - trace_s2 / n, trace_s2
    assert abs(z_score(grad_sq_norm, expected_g)) < Z_CRIT
    assert abs(z_score(trace_sigma, expected_t)) < Z_CRIT
    # The two cases are told apart: the finite-population term is far from a rounding error here.
    other_g = grad_sq_norm_true if not replace else grad_sq_norm_true - trace_s2 / n
    assert abs(z_score(grad_sq_norm, other_g)) > 5 * Z_CRIT
    if not replace:  # adding back tr/N makes the estimate unbiased for the full-data |G|²
        corrected, _ = gns_estimates(small, big, 4, 16, population_size=n)
        assert abs(z_score(corrected, grad_sq_norm_true)) < Z_CRIT


def _coverage(out: dict[str, torch.Tensor], truth: float) -> float:
    covered = (out["b_simple_lower"] <= truth) & (truth <= out["b_simple_upper"])
    return float(covered.double().mean())


@pytest.mark.parametrize(
    ("grad_sq_norm", "trace_sigma", "batch", "world", "confidence"),
    [
        (1.0, 100.0, 8, 4, 0.9),  # |G|² well resolved: a bounded interval
        (1.0, 100.0, 8, 4, 0.5),
        (0.05, 100.0, 4, 2, 0.9),  # |G|² barely resolved: mostly an open-ended interval
    ],
)
def test_interval_covers_truth_at_nominal_rate(grad_sq_norm, trace_sigma, batch, world, confidence):
    truth = GaussianGradients.anisotropic(grad_sq_norm=grad_sq_norm, trace_sigma=trace_sigma)
    trials, steps = 3000, 100
    small, big = truth.step_norms(batch, world, (steps, trials), torch.Generator().manual_seed(3))
    # One group per independent trial: the whole experiment is one vectorised call.
    out = gradient_noise_scale(small, big, batch, batch * world, group_shape=(trials,), confidence=confidence)
    # ±3 points is more than 5 standard errors of a coverage measured on 3000 trials.
    assert _coverage(out, truth.b_simple) == pytest.approx(confidence, abs=0.03)


def test_delta_method_std_matches_the_spread_when_resolved():
    truth = GaussianGradients.anisotropic(grad_sq_norm=1.0, trace_sigma=100.0)
    trials, steps = 3000, 200
    small, big = truth.step_norms(8, 4, (steps, trials), torch.Generator().manual_seed(4))
    out = gradient_noise_scale(small, big, 8, 32, group_shape=(trials,))
    assert float(out["b_simple_std"].median()) == pytest.approx(float(out["b_simple"].std()), rel=0.1)


def test_ema_interval_covers_truth_at_nominal_rate():
    truth = GaussianGradients.anisotropic(grad_sq_norm=1.0, trace_sigma=100.0)
    trials, steps = 3000, 150
    small, big = truth.step_norms(8, 4, (steps, trials), torch.Generator().manual_seed(5))
    state = ema_init((trials,), dtype=torch.float64)
    for step in range(steps):
        state, _ = ema_update(state, small[step], big[step], 8, 32, horizon=30 * 32, elapsed=32)
    out = ema_compute(state)
    assert float(out["effective_steps"][0]) == pytest.approx(59.0, rel=0.05)  # (1+β)/(1-β) for β = e^{-1/30}
    assert _coverage(out, truth.b_simple) == pytest.approx(0.9, abs=0.03)


def test_ema_matches_explicit_exponential_weights_with_changing_batch_size():
    gen = torch.Generator().manual_seed(0)
    batch_big = torch.tensor([16] * 10 + [32] * 10 + [128] * 5, dtype=torch.float64)
    small = 5.0 + torch.rand(25, generator=gen, dtype=torch.float64)
    big = 1.0 + torch.rand(25, generator=gen, dtype=torch.float64)
    horizon = 500.0
    state = ema_init(dtype=torch.float64)
    for i in range(25):
        state, _ = ema_update(state, small[i], big[i], 4, batch_big[i], horizon=horizon, elapsed=batch_big[i])
    # Independent computation: step i covers examples (E_{i-1}, E_i]; its weight is the exponential kernel's
    # mass over that span, seen from the last example.
    ends = batch_big.cumsum(0)
    total = ends[-1]
    weights = torch.exp(-(total - ends) / horizon) - torch.exp(-(total - ends + batch_big) / horizon)
    g, t = gns_estimates(small, big, 4, batch_big)
    expected_g = (weights * g).sum() / weights.sum()
    expected_t = (weights * t).sum() / weights.sum()
    out = ema_compute(state)
    torch.testing.assert_close(out["grad_sq_norm"], expected_g)
    torch.testing.assert_close(out["trace_sigma"], expected_t)
    torch.testing.assert_close(state.weight, 1 - torch.exp(-total / horizon))
    torch.testing.assert_close(out["effective_steps"], weights.sum() ** 2 / (weights**2).sum())


def test_ema_history_in_examples_does_not_depend_on_batch_size():
    # 3200 examples as 100 steps of 32 or as 50 steps of 64, all with the same estimate: same mass remembered.
    horizon = 1000.0
    states = []
    for batch, steps in [(32, 100), (64, 50)]:
        state = ema_init(dtype=torch.float64)
        for _ in range(steps):
            state, _ = ema_update(state, torch.tensor(3.0, dtype=torch.float64), 1.5, 8, batch, horizon, batch)
        states.append(state)
    torch.testing.assert_close(states[0].weight, states[1].weight)
    torch.testing.assert_close(states[0].weight, torch.tensor(1 - math.exp(-3.2), dtype=torch.float64))


def test_non_finite_steps_are_skipped_and_counted():
    small = torch.tensor([18.0, float("inf"), 18.0, float("nan")])
    big = torch.tensor([6.0, 6.0, 6.0, 6.0])
    out = gradient_noise_scale(small, big, 4, 16)
    assert float(out["num_steps"]) == 2
    assert float(out["num_skipped"]) == 2
    assert float(out["b_simple"]) == pytest.approx(32.0)

    state = ema_init()
    state, skipped = ema_update(state, torch.tensor(18.0), torch.tensor(6.0), 4, 16, horizon=10.0)
    after, skipped = ema_update(state, torch.tensor(float("inf")), torch.tensor(6.0), 4, 16, horizon=10.0)
    assert bool(skipped)
    for old, new in zip(state, after, strict=True):
        torch.testing.assert_close(old, new)


def test_negative_smoothed_estimate_is_nan_and_flagged_not_clamped():
    # |G_big|² above what |G_small|² allows: the |G|² estimate is fine, tr Σ negative.
    out = gradient_noise_scale(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 4, 16)
    assert float(out["trace_sigma"]) < 0
    assert math.isnan(float(out["b_simple"]))
    assert not bool(out["b_simple_valid"])
    # |G|² estimate ≤ 0: undefined, and the interval still says the noise scale is large, open-ended.
    out = gradient_noise_scale(torch.tensor([20.0, 19.0, 21.0]), torch.tensor([4.8, 5.1, 4.6]), 4, 16)
    assert float(out["grad_sq_norm"]) <= 0
    assert math.isnan(float(out["b_simple"]))
    assert float(out["b_simple_upper"]) == math.inf
    # Negative single steps are legal noise and stay in the sums.
    out = gradient_noise_scale(torch.tensor([18.0, 1.0]), torch.tensor([6.0, 2.0]), 4, 16)
    assert float(out["num_steps"]) == 2


def test_single_step_has_no_interval():
    out = gradient_noise_scale(torch.tensor(18.0), torch.tensor(6.0), 4, 16)
    assert float(out["b_simple"]) == pytest.approx(32.0)
    assert math.isnan(float(out["b_simple_lower"]))
    assert math.isnan(float(out["b_simple_std"]))


def test_fieller_interval_reduces_to_the_normal_interval_with_exact_denominator():
    lower, upper = ratio_interval(
        torch.tensor(50.0), torch.tensor(2.0), torch.tensor(16.0), torch.tensor(0.0), torch.tensor(0.0), 0.9
    )
    z = NormalDist().inv_cdf(0.95)
    torch.testing.assert_close(lower, torch.tensor(25.0 - z * 2.0))
    torch.testing.assert_close(upper, torch.tensor(25.0 + z * 2.0))


def test_trade_off_predictions():
    b_noise = torch.tensor(100.0)
    batch = torch.tensor([10.0, 100.0, 1000.0])
    torch.testing.assert_close(relative_steps(batch, b_noise), torch.tensor([11.0, 2.0, 1.1]))
    torch.testing.assert_close(relative_examples(batch, b_noise), torch.tensor([1.1, 2.0, 11.0]))
    # On the curve (S/S_min - 1)(E/E_min - 1) = 1 for every batch size.
    torch.testing.assert_close(
        (relative_steps(batch, b_noise) - 1) * (relative_examples(batch, b_noise) - 1), torch.ones(3)
    )


def test_no_host_sync_on_the_per_step_path():
    # A meta tensor has no values: any .item(), bool() or Python branch on a value would raise.
    small = torch.empty(3, device="meta")
    big = torch.empty(3, device="meta")
    grad_sq_norm, _trace_sigma = gns_estimates(small, big, torch.tensor(4.0, device="meta"), 16)
    assert grad_sq_norm.device.type == "meta"
    state = ema_init((3,), device="meta")
    state, _skipped = ema_update(state, small, big, 4, 16, horizon=100.0)
    assert state.weight.device.type == "meta"
    assert ema_compute(state)["b_simple_lower"].device.type == "meta"


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.tensor(1.0), torch.tensor(1.0), 16, 16), ValueError, r"`batch_small` < `batch_big`.*swap"),
        ((torch.tensor(1.0), torch.tensor(1.0), 32, 16), ValueError, r"`batch_small` < `batch_big`"),
        ((torch.tensor(1.0), torch.tensor(1.0), 0, 16), ValueError, r"`batch_small` to be positive"),
        ((torch.tensor(1.0), torch.tensor(1.0), 4, -16), ValueError, r"`batch_big` to be positive"),
        ((torch.tensor(1.0), torch.tensor(1.0), torch.tensor([4.0, 0.0]), 16), ValueError, r"`batch_small`"),
        ((torch.ones(3), torch.ones(2), 4, 16), ValueError, r"same shape.*\(3,\) and \(2,\)"),
        ((torch.tensor(1), torch.tensor(1.0), 4, 16), TypeError, r"`sq_norm_small`.*floating.*\.float\(\)"),
        ((torch.tensor(1.0), torch.tensor([1, 2]), 4, 16), TypeError, r"`sq_norm_big`.*torch.int64"),
        ((torch.tensor(1.0), "1.0", 4, 16), TypeError, r"`sq_norm_big`.*str"),
        ((torch.tensor(1.0), torch.tensor(1.0), None, 16), TypeError, r"`batch_small`.*NoneType"),
        ((torch.tensor(2.0), torch.tensor(1.0), 4, 16, 1), ValueError, r"`population_size`.*int >= 2"),
    ],
)
def test_bad_input_errors(args, error, match):
    with pytest.raises(error, match=match):
        gns_estimates(*args)


def test_bad_options_errors():
    with pytest.raises(ValueError, match=r"`confidence` in \(0, 1\)"):
        gradient_noise_scale(torch.ones(2), torch.ones(2) * 0.5, 4, 16, confidence=90)
    with pytest.raises(ValueError, match=r"group_shape=\(3,\)"):
        gradient_noise_scale(torch.ones(2, 2), torch.ones(2, 2) * 0.5, 4, 16, group_shape=(3,))
    with pytest.raises(ValueError, match=r"`horizon` to be a positive"):
        ema_update(ema_init(), torch.tensor(1.0), torch.tensor(0.5), 4, 16, horizon=0)
    with pytest.raises(ValueError, match=r"`elapsed` to be positive"):
        ema_update(ema_init(), torch.tensor(1.0), torch.tensor(0.5), 4, 16, horizon=10.0, elapsed=0)


def test_confidently_negative_ratio_gives_no_interval():
    # |G|² confidently below zero (finite-population bias near convergence): no band, not a false [0, 0].
    lower, upper = ratio_interval(
        torch.tensor(10.0), torch.tensor(-1.0), torch.tensor(0.1), torch.tensor(0.01), torch.tensor(0.0)
    )
    assert math.isnan(float(lower))
    assert math.isnan(float(upper))


@pytest.mark.parametrize(
    ("b_crit", "lower", "expected"),
    [
        (100.0, math.nan, 128),  # log2 100 = 6.64
        (90.0, math.nan, 64),  # log2 90 = 6.49: nearest in log scale is 64
        (90.0, 100.0, 128),  # never below the interval's lower end
        (90.0, 20.0, 64),
        (0.3, math.nan, 1),
        (math.nan, 5.0, None),  # undefined while |G|² is not resolved
        (-4.0, math.nan, None),
    ],
)
def test_suggested_batch_size_by_hand(b_crit, lower, expected):
    assert suggested_batch_size(b_crit, lower) == expected

"""GradientNoiseScale: torchmetrics conventions, and the synced metric equal to one fed all ranks' updates."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gns import GradientNoiseScale
from lightning_gns.functional import gns_estimates, gradient_noise_scale
from tests.conftest import NUM_PROCESSES, free_port, setup_ddp
from tests.helpers.ground_truth import exact_truth, make_dataset, make_net, per_example_flat_grads, pretrain
from tests.helpers.synthetic import GaussianGradients


def _steps(num_steps: int, seed: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    truth = GaussianGradients.anisotropic(grad_sq_norm=1.0, trace_sigma=100.0)
    shape = (num_steps,) if group is None else (num_steps, group)
    small, big = truth.step_norms(8, 4, shape, torch.Generator().manual_seed(seed))
    return small.float(), big.float()


def _assert_same(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert out.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], equal_nan=True, msg=key)


def test_metric_equals_functional_on_all_updates():
    small, big = _steps(60, seed=0)
    metric = GradientNoiseScale()
    for i in range(0, 60, 7):  # uneven chunks of steps, scalars and vectors alike
        metric.update(small[i : i + 7], big[i : i + 7], 8, 32)
    expected = gradient_noise_scale(small, big, 8, 32)
    _assert_same(metric.compute(), expected)
    assert {"b_simple", "trace_sigma", "grad_sq_norm", "num_steps", "num_skipped"} <= metric.compute().keys()


def test_steps_weighted_by_their_examples_by_hand():
    # B_small = 1 and B_big = 2, 4, 10; the norms are those of the estimates (|G|², tr Σ) = (1, 4), (1, 8), (2, 10).
    metric = GradientNoiseScale()
    metric.update(torch.tensor(5.0), torch.tensor(3.0), 1, 2)
    metric.update(torch.tensor([9.0, 12.0]), torch.tensor([3.0, 3.0]), 1, torch.tensor([4.0, 10.0]))
    metric.update(torch.tensor(float("nan")), torch.tensor(3.0), 1, 100)  # skipped: weighs nothing
    out = metric.compute()
    weights, grads, traces = [2.0, 4.0, 10.0], [1.0, 1.0, 2.0], [4.0, 8.0, 10.0]
    total, total_sq = sum(weights), sum(w * w for w in weights)  # 16 and 120
    mean_g = sum(w * g for w, g in zip(weights, grads, strict=True)) / total  # 26/16 (equal weights would give 4/3)
    mean_t = sum(w * t for w, t in zip(weights, traces, strict=True)) / total  # 140/16 (equal weights: 22/3)
    n_eff = total**2 / total_sq
    spread_t = sum(w * t * t for w, t in zip(weights, traces, strict=True)) / total - mean_t**2
    var_t = spread_t * n_eff / (n_eff - 1) / n_eff
    assert float(out["grad_sq_norm"]) == pytest.approx(1.625)
    assert float(out["trace_sigma"]) == pytest.approx(8.75)
    assert float(out["b_simple"]) == pytest.approx(8.75 / 1.625)
    assert float(out["grad_sq_norm"]) == pytest.approx(mean_g)
    assert float(out["trace_sigma"]) == pytest.approx(mean_t)
    assert float(out["effective_steps"]) == pytest.approx(256 / 120)
    assert float(out["trace_sigma_std"]) == pytest.approx(var_t**0.5)
    assert (float(out["num_steps"]), float(out["num_skipped"])) == (3.0, 1.0)
    assert (float(metric.sum_weight), float(metric.sum_weight_sq)) == (total, total_sq)
    # A constant batch is the plain average: weights of 32 change nothing against weights of 1.
    small, big = _steps(20, seed=4)
    plain = gns_estimates(small, big, 8, 32)
    constant = gradient_noise_scale(small, big, 8, 32)
    torch.testing.assert_close(constant["grad_sq_norm"], plain[0].mean())
    torch.testing.assert_close(constant["trace_sigma"], plain[1].mean())
    assert float(constant["effective_steps"]) == pytest.approx(20.0)


def _epochs_with_a_short_last_batch(flat: torch.Tensor, batch: int, epochs: int, seed: int):
    """Per-example (B_small = 1) squared norms of every step of `epochs` shuffled epochs, the last batch short."""
    n = flat.shape[0]
    gen = torch.Generator().manual_seed(seed)
    small, big, sizes = [], [], []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for chunk in order.split(batch):
            grads = flat[chunk]
            small.append(grads.pow(2).sum(1).mean())
            big.append(grads.mean(0).pow(2).sum())
            sizes.append(float(len(chunk)))
    return torch.stack(small), torch.stack(big), torch.tensor(sizes, dtype=torch.float64)


def test_short_last_batch_weighs_its_examples_against_exact_truth():
    """258 examples in batches of 32: every epoch ends on a batch of 2, whose estimates are ~30x noisier.

    Against the exact finite-population truth over independent seeds, the example-weighted run average is
    unbiased and its spread is that of the full batches; one step per epoch weighted like a full one made the
    spread of B_simple 16% (measured here: 16.4% with equal weights, 2.2% weighted, 2.4% for 256 examples and
    no short batch).
    """
    torch.manual_seed(0)
    dataset = make_dataset(num_examples=258)
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    truth = exact_truth(net, dataset)
    flat = per_example_flat_grads(net, dataset)
    weighted, equal = [], []
    for seed in range(30):
        small, big, sizes = _epochs_with_a_short_last_batch(flat, 32, epochs=10, seed=seed)
        metric = GradientNoiseScale().set_dtype(torch.float64)
        metric.update(small, big, 1, sizes, population_size=258)
        weighted.append(float(metric.compute()["b_simple"]))
        # The former weighting, one per step, computed here by hand.
        grad_sq_norm, trace_sigma = gns_estimates(small, big, 1, sizes, population_size=258)
        equal.append(float(trace_sigma.mean() / grad_sq_norm.mean()))
    weighted_t, equal_t = torch.tensor(weighted) / truth["b_simple"], torch.tensor(equal) / truth["b_simple"]
    spread = float(weighted_t.std())
    assert abs(float(weighted_t.mean()) - 1.0) < 4 * spread / 30**0.5
    assert spread < 0.03
    assert spread < 0.3 * float(equal_t.std())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_state_dict_from_before_example_weights_still_loads():
    """A state dict without the weight sums holds unit-weighted sums: it loads, and later steps weigh in alike."""
    small, big = _steps(30, seed=5)
    reference = GradientNoiseScale()
    reference.update(small, big, 8, 32)
    old = GradientNoiseScale()
    old.update(small[:20], big[:20], 8, 32)
    state = old.state_dict()
    del state["sum_weight"], state["sum_weight_sq"]
    for name in ("sum_grad_sq_norm", "sum_trace_sigma", "sum_grad_sq_norm_sq", "sum_trace_sigma_sq", "sum_cross"):
        state[name] = state[name] / 32  # what a metric of one weight per step summed
    restored = GradientNoiseScale()
    restored.load_state_dict(state)
    _assert_same(restored.compute(), gradient_noise_scale(small[:20], big[:20], 8, 32))
    restored.update(small[20:], big[20:], 8, 32)
    _assert_same(restored.compute(), reference.compute())


def test_metric_with_groups_keeps_each_layer_apart():
    small, big = _steps(40, seed=1, group=3)
    metric = GradientNoiseScale(group_shape=(3,))
    for step in range(40):
        metric.update(small[step], big[step], 8, 32)
    out = metric.compute()
    for layer in range(3):
        single = gradient_noise_scale(small[:, layer], big[:, layer], 8, 32)
        torch.testing.assert_close(out["b_simple"][layer], single["b_simple"])


def test_metric_skips_and_counts_non_finite_steps():
    metric = GradientNoiseScale()
    metric.update(torch.tensor(18.0), torch.tensor(6.0), 4, 16)
    metric.update(torch.tensor(float("inf")), torch.tensor(6.0), 4, 16)
    out = metric.compute()
    assert float(out["num_steps"]) == 1
    assert float(out["num_skipped"]) == 1
    assert float(out["b_simple"]) == pytest.approx(32.0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_reset_state_dict_merge_and_pickle():
    small, big = _steps(30, seed=2)
    metric = GradientNoiseScale()
    metric.update(small, big, 8, 32)
    expected = metric.compute()

    restored = GradientNoiseScale()
    restored.load_state_dict(metric.state_dict())
    _assert_same(restored.compute(), expected)
    _assert_same(pickle.loads(pickle.dumps(metric)).compute(), expected)
    _assert_same(metric.clone().compute(), expected)

    first, second = GradientNoiseScale(), GradientNoiseScale()
    first.update(small[:11], big[:11], 8, 32)
    second.update(small[11:], big[11:], 8, 32)
    first.merge_state(second)
    _assert_same(first.compute(), expected)

    metric.reset()
    assert float(metric.num_steps) == 0
    metric.update(small[:5], big[:5], 8, 32)
    _assert_same(metric.compute(), gradient_noise_scale(small[:5], big[:5], 8, 32))


def test_metric_errors():
    with pytest.raises(ValueError, match=r"`group_shape` to be a tuple of positive ints"):
        GradientNoiseScale(group_shape=(0,))
    with pytest.raises(ValueError, match=r"`confidence` in \(0, 1\)"):
        GradientNoiseScale(confidence=1.5)
    metric = GradientNoiseScale(group_shape=(2,))
    with pytest.raises(ValueError, match=r"`group_shape=\(2,\)`"):
        metric.update(torch.ones(3), torch.ones(3), 4, 16)
    with pytest.raises(ValueError, match=r"`batch_small` < `batch_big`"):
        metric.update(torch.ones(2), torch.ones(2), 16, 4)


def _ddp_worker(rank: int, world_size: int, port: int, small: torch.Tensor, big: torch.Tensor, out_dir) -> None:
    setup_ddp(rank, world_size, port)
    try:
        metric = GradientNoiseScale(group_shape=(2,))
        # Each rank folds in its own, differently sized share of the steps.
        bounds = [0, 13, small.shape[0]]
        for step in range(bounds[rank], bounds[rank + 1]):
            metric.update(small[step], big[step], 8, 32)
        out = metric.compute()
        torch.save(out, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_metric_synced_across_two_gloo_ranks_equals_union(tmp_path):
    small, big = _steps(30, seed=3, group=2)
    mp.start_processes(
        _ddp_worker, args=(NUM_PROCESSES, free_port(), small, big, tmp_path), nprocs=NUM_PROCESSES, start_method="spawn"
    )
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(NUM_PROCESSES)}
    reference = GradientNoiseScale(group_shape=(2,))
    reference.update(small, big, 8, 32)
    expected = reference.compute()
    for rank in range(NUM_PROCESSES):
        _assert_same(results[rank], expected)

"""GradientNoiseScale: torchmetrics conventions, and the synced metric equal to one fed all ranks' updates."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gns import GradientNoiseScale
from lightning_gns.functional import gradient_noise_scale
from tests.conftest import NUM_PROCESSES, free_port, setup_ddp
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

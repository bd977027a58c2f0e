"""The sources on their own: loss reductions, steps with nothing to measure, DDP buckets never reduced."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gns.sources.accumulation import AccumulationSource
from lightning_gns.sources.ddp import DDPSource, IncompleteReductionWarning
from lightning_gns.sources.per_example import PerExampleSource
from tests.helpers.per_example import MLP


def _flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("source_cls", [AccumulationSource, PerExampleSource])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uneven_micro_batches_in_the_mean_convention(source_cls, reduction):
    """Micro-batches of 4 and 2 examples (loss divided by 2, as Lightning does), against torch.autograd by hand."""
    torch.manual_seed(0)
    model = MLP()
    batches = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (4, 2)]
    source = source_cls(loss_divisor=2, loss_reduction=reduction)
    source.attach(model)
    for x, y in batches:
        source.batch_start()
        (nn.functional.cross_entropy(model(x), y, reduction=reduction) / 2).backward()
        source.micro_batch_done(len(x))
    norms = source.step_norms()
    source.detach()

    x_all, y_all = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    if reduction == "sum":  # the step's gradient is the mean over its 6 examples
        big = _flat_grad(model, nn.functional.cross_entropy(model(x_all), y_all)).square().sum()
    else:  # the plain average of the two micro-batch means (what `.grad` holds, times 2 / 2)
        means = [_flat_grad(model, nn.functional.cross_entropy(model(x), y)) for x, y in batches]
        big = ((means[0] + means[1]) / 2).square().sum()
    torch.testing.assert_close(norms.sq_norm_big, big, rtol=1e-5, atol=0)
    if source_cls is AccumulationSource:
        micro = [_flat_grad(model, nn.functional.cross_entropy(model(x), y)).square().sum() for x, y in batches]
        torch.testing.assert_close(norms.sq_norm_small, sum(micro) / 2, rtol=1e-5, atol=0)
        # Sum-reduced, the estimators need the harmonic mean; mean-reduced, the arithmetic one (see the source).
        expected_small = 2 / (1 / 4 + 1 / 2) if reduction == "sum" else 3.0
        assert float(norms.batch_small) == pytest.approx(expected_small)
    else:
        per_example = [
            _flat_grad(model, nn.functional.cross_entropy(model(x_all[i : i + 1]), y_all[i : i + 1])).square().sum()
            for i in range(6)
        ]
        torch.testing.assert_close(norms.sq_norm_small, sum(per_example) / 6, rtol=1e-4, atol=0)
        assert float(norms.batch_small) == 1
    assert float(norms.batch_big) == 6


def _assert_no_data(norms) -> None:
    assert math.isnan(float(norms.sq_norm_small))
    assert math.isnan(float(norms.sq_norm_big))
    assert float(norms.batch_big) == 0


@pytest.mark.parametrize("source_cls", [AccumulationSource, PerExampleSource])
def test_a_step_without_backward_has_no_data_and_the_next_step_is_whole(source_cls):
    torch.manual_seed(0)
    model = MLP()
    source = source_cls(loss_divisor=1)
    source.attach(model)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    source.batch_start()
    model(x)  # training_step returned None: a forward, no backward
    _assert_no_data(source.step_norms())
    source.batch_start()
    nn.functional.cross_entropy(model(x), y).backward()
    source.micro_batch_done(4)
    norms = source.step_norms()
    source.detach()
    big = _flat_grad(model, nn.functional.cross_entropy(model(x), y)).square().sum()
    torch.testing.assert_close(norms.sq_norm_big, big, rtol=1e-5, atol=0)
    assert float(norms.batch_big) == 4


class _Bucket:
    """What the DDP source reads of a `dist.GradBucket`."""

    def __init__(self, buffer: torch.Tensor, last: bool) -> None:
        self._buffer, self._last = buffer, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def is_last(self) -> bool:
        return self._last


def _no_allreduce(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ddp_source_skips_a_step_whose_last_bucket_was_not_reduced(reduction):
    model = nn.Linear(3, 1, bias=False)
    source = DDPSource(world_size=2, inner_hook=_no_allreduce, loss_reduction=reduction)
    source.attach(model)
    # DDP reduced the first bucket, never the last (a parameter without gradient, no find_unused_parameters).
    source.comm_hook(None, _Bucket(torch.ones(3), last=False))
    source.micro_batch_done(5)
    with pytest.warns(IncompleteReductionWarning, match=r"find_unused_parameters=True"):
        _assert_no_data(source.step_norms())
    # Every bucket: the local and the all-reduced norm, in the mean convention.
    local = torch.tensor([3.0, 4.0])
    model.weight.grad = torch.tensor([[1.0, 2.0, 2.0]])
    source.comm_hook(None, _Bucket(local[:1], last=False))
    source.comm_hook(None, _Bucket(local[1:], last=True))
    source.micro_batch_done(5)
    norms = source.step_norms()
    per_example = 1 / 25 if reduction == "sum" else 1.0  # a sum over the rank's 5 examples
    assert float(norms.sq_norm_small) == pytest.approx(25.0 * per_example)
    assert float(norms.sq_norm_big) == pytest.approx(9.0 * per_example)
    assert (float(norms.batch_small), float(norms.batch_big)) == (5, 10)
    # A step without backward (training_step returned None) says nothing more and is skipped too.
    _assert_no_data(source.step_norms())

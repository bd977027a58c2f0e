"""Reading a loss's reduction over examples off its autograd graph (the monitor's `loss_reduction="auto"`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_gns.sources.loss_reduction import check_loss_reduction, infer_loss_reduction, reduction_in_graph


@pytest.fixture
def batch():
    logits = torch.randn(6, 3, requires_grad=True)
    return logits, torch.randint(3, (6,))


@pytest.mark.parametrize(("reduction", "expected"), [("mean", "mean"), ("sum", "sum"), ("none", None)])
def test_torch_losses_are_read_from_their_saved_reduction(batch, reduction, expected):
    logits, labels = batch
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    if reduction == "none":
        loss = loss[0]  # a scalar that reduces over nothing: not a reduction over the examples
    assert reduction_in_graph(loss).reduction == expected
    target = torch.zeros_like(logits)
    for other in (F.mse_loss, F.smooth_l1_loss, F.binary_cross_entropy_with_logits):
        if reduction != "none":
            assert reduction_in_graph(other(logits, target, reduction=reduction)).reduction == expected


def test_sum_and_mean_of_a_per_example_loss(batch):
    logits, labels = batch
    per_example = F.cross_entropy(logits, labels, reduction="none")
    assert reduction_in_graph(per_example.sum()) == ("sum", 1.0, "SumBackward0")
    assert reduction_in_graph(per_example.mean()) == ("mean", 1.0, "MeanBackward0")
    assert reduction_in_graph(per_example.sum(dim=0)).reduction == "sum"


def test_constant_factors_on_top_are_walked_through_and_multiplied(batch):
    logits, labels = batch
    loss = F.cross_entropy(logits, labels, reduction="sum")
    # Lightning's division by accumulate_grad_batches, then AMP's loss scale (a tensor), a cast and a negation.
    scaled = -((loss / 4).float() * torch.tensor(2.0**16))
    found = reduction_in_graph(scaled)
    assert found.reduction == "sum"
    assert found.factor == pytest.approx(-(2.0**16) / 4)
    assert reduction_in_graph(0.5 * F.cross_entropy(logits, labels) / 4).factor == pytest.approx(0.125)


def test_unknown_graphs_are_undecided(batch):
    logits, labels = batch
    ce = F.cross_entropy(logits, labels)
    assert reduction_in_graph(ce + logits.square().mean()).reduction is None  # a regularised loss: Add
    assert reduction_in_graph(ce * ce).reduction is None  # not a constant factor
    assert reduction_in_graph(1.0 / logits.sum()).reduction is None  # c / x
    assert reduction_in_graph(logits.logsumexp(dim=(0, 1))).reduction is None
    assert reduction_in_graph(torch.tensor(1.0)).reduction is None  # no graph at all


def test_inference_undoes_lightning_and_amp_factors_and_spots_a_sum_divided_by_the_batch(batch):
    logits, labels = batch
    n = logits.shape[0]
    summed = F.cross_entropy(logits, labels, reduction="sum")
    # What Lightning hands `on_before_backward` with accumulate_grad_batches=4 and a GradScaler at 2**10.
    assert infer_loss_reduction(summed / 4 * 2.0**10, loss_divisor=4, num_examples=n, loss_scale=2.0**10)[0] == "sum"
    assert infer_loss_reduction(-summed / 4, loss_divisor=4, num_examples=n)[0] == "sum"  # a negated sum
    # A sum divided by the micro-batch's examples is a mean (`kl_div(reduction="batchmean")`, `.sum() / len(x)`).
    target = torch.full_like(logits, 1 / 3)
    batchmean = F.kl_div(logits.log_softmax(-1), target, reduction="batchmean")
    assert infer_loss_reduction(batchmean / 2, loss_divisor=2, num_examples=n)[0] == "mean"
    assert infer_loss_reduction(summed / n, num_examples=n)[0] == "mean"
    # A sum under a factor the graph cannot explain (a token count, 0.5 of a squared error) stays undecided.
    assert infer_loss_reduction(summed / 37, num_examples=n)[0] is None
    assert infer_loss_reduction(0.5 * summed, num_examples=n)[0] is None
    # A mean is a mean under any factor.
    assert infer_loss_reduction(F.cross_entropy(logits, labels) / 4 * 3.0, loss_divisor=4)[0] == "mean"


def test_check_loss_reduction():
    assert check_loss_reduction("sum") == "sum"
    with pytest.raises(ValueError, match=r"'mean' .* or 'sum'"):
        check_loss_reduction("batchmean")

"""A sum-reduced loss: detected from its graph (or declared), and tr Σ, |G|² reported in the mean-loss convention."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from lightning_gns._compat.autograd import loss_reduction_of
from tests.helpers.ground_truth import (
    Classifier,
    copy_net,
    exact_truth,
    make_dataset,
    make_net,
    pretrain,
    quiet_trainer,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:NoiseScaleMonitor has no logger:RuntimeWarning"
)


def test_reduction_is_read_off_the_loss_graph():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    assert loss_reduction_of(F.cross_entropy(logits, labels)) == "mean"
    assert loss_reduction_of(F.cross_entropy(logits, labels, reduction="sum") / 4) == "sum"
    assert loss_reduction_of(F.mse_loss(logits, torch.zeros(4, 3), reduction="sum") * 0.5) == "sum"
    assert loss_reduction_of(F.cross_entropy(logits, labels, reduction="none").sum()) == "sum"
    assert loss_reduction_of(logits.square().sum(1).mean()) == "mean"
    # Not a rescaling by a constant, or no recognisable reduction: unknown.
    assert loss_reduction_of(logits.sum() + logits.mean()) is None
    assert loss_reduction_of(logits.sum() * logits.mean()) is None
    assert loss_reduction_of(torch.tensor(1.0)) is None


class SumLoss(Classifier):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(self.net(inputs), labels, reduction="sum")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    return net, dataset, exact_truth(net, dataset)


@pytest.mark.parametrize(("source", "accumulate"), [("per_example", 1), ("accumulation", 4)])
def test_sum_loss_reports_the_mean_loss_convention_against_the_truth(problem, source, accumulate):
    """Batches of 24 from 256 examples: every epoch ends on a short batch (16), where a sum weighs differently."""
    net, dataset, truth = problem
    results = {}
    for module in (Classifier, SumLoss):
        monitor = NoiseScaleMonitor(source=source)
        trainer = quiet_trainer(max_epochs=40, accumulate_grad_batches=accumulate, callbacks=[monitor])
        torch.manual_seed(3)
        trainer.fit(module(copy_net(net)), DataLoader(dataset, batch_size=24, shuffle=True))
        assert monitor.source is not None
        assert monitor.source.loss_reduction == ("sum" if module is SumLoss else "mean")
        results[module] = monitor.metric.compute()
    out = results[SumLoss]
    assert float(out["trace_sigma"]) == pytest.approx(truth["expected_trace_sigma"], rel=0.06)
    assert float(out["grad_sq_norm"]) == pytest.approx(truth["expected_grad_sq_norm"], rel=0.06)
    assert float(out["b_simple"]) == pytest.approx(truth["b_simple"], rel=0.08)
    if source == "per_example":  # the same batches, and per-example norms are exact either way
        for key in ("trace_sigma", "grad_sq_norm", "b_simple"):
            torch.testing.assert_close(out[key], results[Classifier][key], rtol=1e-4, atol=0)


def test_declared_reduction_is_used_and_a_contradiction_warns(problem):
    net, dataset, truth = problem
    monitor = NoiseScaleMonitor(loss_reduction="mean")
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match=r"`loss_reduction='mean'` was declared.*sum over the examples"):
        trainer.fit(SumLoss(copy_net(net)), DataLoader(dataset, batch_size=32))
    assert monitor.source.loss_reduction == "mean"  # declared values are trusted

    class Opaque(Classifier):  # a reduction the graph does not show: declared as a sum
        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            per_example = F.cross_entropy(self.net(inputs), labels, reduction="none")
            return torch.einsum("i->", per_example)

    monitor = NoiseScaleMonitor(loss_reduction="sum")
    quiet_trainer(max_epochs=20, callbacks=[monitor]).fit(
        Opaque(copy_net(net)), DataLoader(dataset, batch_size=32, shuffle=True)
    )
    assert float(monitor.metric.compute()["trace_sigma"]) == pytest.approx(truth["expected_trace_sigma"], rel=0.06)


def test_unknown_option_is_refused():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=r"`loss_reduction` to be 'auto', 'mean' or 'sum'"):
        NoiseScaleMonitor(loss_reduction="none")  # type: ignore[arg-type]

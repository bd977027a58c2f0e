"""Several training dataloaders (a dict of loaders, one batch of each per step) against the exact truth."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_gns import NoiseScaleMonitor
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


@pytest.fixture(scope="module")
def problem():
    """256 examples split into two halves (one loader each) and the exact truth of all 256."""
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    halves = {"a": Subset(dataset, range(0, 128)), "b": Subset(dataset, range(128, 256))}
    return net, dataset, halves, exact_truth(net, dataset)


class TwoLoaders(Classifier):
    """The mean loss over both loaders' examples: one forward per loader, or one on the concatenated batch."""

    def __init__(self, net: nn.Module, concatenate: bool) -> None:
        super().__init__(net, lr=0.0)
        self.concatenate = concatenate

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        (xa, ya), (xb, yb) = batch["a"], batch["b"]
        if self.concatenate:
            return nn.functional.cross_entropy(self.net(torch.cat([xa, xb])), torch.cat([ya, yb]))
        loss_a = nn.functional.cross_entropy(self.net(xa), ya)
        loss_b = nn.functional.cross_entropy(self.net(xb), yb)
        return (loss_a * len(ya) + loss_b * len(yb)) / (len(ya) + len(yb))


def _fit(net, halves, monitor, concatenate, epochs, batch_size=16, **trainer_kwargs):
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[monitor], **trainer_kwargs)
    loaders = {name: DataLoader(part, batch_size=batch_size, shuffle=True) for name, part in halves.items()}
    trainer.fit(TwoLoaders(copy_net(net), concatenate), train_dataloaders=loaders)
    return trainer


@pytest.mark.parametrize(
    ("source", "accumulate", "concatenate"),
    [("per_example", 1, True), ("accumulation", 4, False), ("accumulation", 4, True)],
)
def test_two_loaders_match_the_truth_of_their_union(problem, source, accumulate, concatenate):
    net, _, halves, truth = problem
    monitor = NoiseScaleMonitor(source=source)
    _fit(
        net,
        halves,
        monitor,
        concatenate,
        epochs=60 if source == "per_example" else 100,
        accumulate_grad_batches=accumulate,
    )
    out = monitor.metric.compute()
    # Each step holds a batch of each loader: 16 + 16 examples per micro-batch.
    assert float(monitor.estimates["batch_size"]) == 32 * accumulate
    assert float(out["trace_sigma"]) == pytest.approx(truth["expected_trace_sigma"], rel=0.06)
    assert float(out["grad_sq_norm"]) == pytest.approx(truth["expected_grad_sq_norm"], rel=0.06)
    assert float(out["b_simple"]) == pytest.approx(truth["b_simple"], rel=0.06)


def test_per_example_refuses_one_forward_per_loader(problem):
    """Its norms would add example i of one loader to example i of the other: refused at the first step."""
    net, _, halves, _ = problem
    trainer = quiet_trainer(max_steps=3, callbacks=[NoiseScaleMonitor()])
    loaders = {name: DataLoader(part, batch_size=16) for name, part in halves.items()}
    with pytest.raises(MisconfigurationException, match=r"2 training dataloaders.*16 examples of 32.*concatenate"):
        trainer.fit(TwoLoaders(copy_net(net), concatenate=False), train_dataloaders=loaders)
    assert trainer.global_step == 0


@pytest.mark.parametrize(("sizes", "batches", "expected"), [((128, 64), (16, 8), 192), ((128, 64), (16, 16), None)])
def test_population_is_the_union_when_each_loader_takes_its_share(problem, sizes, batches, expected):
    """Batches drawn in proportion to the data sets sample their union; otherwise no correction is claimed."""
    net, dataset, _, _ = problem
    parts = {"a": Subset(dataset, range(sizes[0])), "b": Subset(dataset, range(128, 128 + sizes[1]))}
    monitor = NoiseScaleMonitor(source="accumulation")
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[monitor])
    loaders = {name: DataLoader(part, batch_size=b) for (name, part), b in zip(parts.items(), batches, strict=True)}
    trainer.fit(TwoLoaders(copy_net(net), concatenate=False), train_dataloaders=loaders)
    assert monitor.population_size == expected
    assert float(monitor.estimates["batch_size"]) == 2 * sum(batches)

"""torch.compile: the per_example source refuses a compiled model; the accumulation source measures it exactly."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from lightning_gns._compat.dynamo import compiled_parts
from tests.helpers.ground_truth import Classifier, copy_net, make_dataset, make_net, quiet_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:NoiseScaleMonitor has no logger:RuntimeWarning"
)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(nn.Sequential(nn.Linear(12, 16), nn.Tanh()), backend="eager")
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_compiled_parts_are_found_however_they_were_compiled():
    net = nn.Sequential(nn.Linear(2, 2), torch.compile(nn.Linear(2, 2), backend="eager"), nn.Linear(2, 2))
    net[2].compile(backend="eager")
    assert compiled_parts(net) == ["1", "2"]
    plain = nn.Sequential(nn.Linear(2, 2))
    assert compiled_parts(plain) == []
    plain.forward = torch.compile(plain.forward, backend="eager")  # type: ignore[method-assign]
    assert compiled_parts(plain) == ["(model)"]
    assert compiled_parts(torch.compile(nn.Linear(2, 2), backend="eager")) == ["(model)"]


@pytest.mark.parametrize("source", ["auto", "per_example"])
def test_per_example_refuses_a_compiled_sub_block_before_training(source):
    trainer = quiet_trainer(max_steps=2, callbacks=[NoiseScaleMonitor(source=source)])
    model = Classifier(_Head())
    with pytest.raises(MisconfigurationException, match=r"torch.compile \(compiled: net.body\).*accumulate_grad"):
        trainer.fit(model, DataLoader(make_dataset(), batch_size=16))
    assert trainer.global_step == 0


def test_per_example_refuses_a_lightning_module_compiled_whole():
    trainer = quiet_trainer(max_steps=2, callbacks=[NoiseScaleMonitor()])
    compiled = torch.compile(Classifier(make_net()), backend="eager")
    with pytest.raises(MisconfigurationException, match=r"compiled: \(model\).*`ddp` source"):
        trainer.fit(compiled, DataLoader(make_dataset(), batch_size=16))  # type: ignore[arg-type]
    assert trainer.global_step == 0


def test_accumulation_measures_a_compiled_model_as_the_eager_one():
    """The accumulation source reads parameter gradients, which compiled code hands to autograd as usual."""
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    results = {}
    for compiled in (False, True):
        monitor = NoiseScaleMonitor()
        trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=4, callbacks=[monitor])
        model = Classifier(copy_net(net))
        if compiled:
            model.net = torch.compile(model.net, backend="aot_eager")  # type: ignore[assignment]
        torch.manual_seed(1)
        trainer.fit(model, DataLoader(dataset, batch_size=8, shuffle=True))
        assert monitor.source is not None
        assert monitor.source.name == "accumulation"
        results[compiled] = monitor.metric.compute()
    for key in ("trace_sigma", "grad_sq_norm", "b_simple"):
        torch.testing.assert_close(results[True][key], results[False][key], rtol=1e-4, atol=0)

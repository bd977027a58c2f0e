"""The monitor in real 2-process DDP fits (CPU, gloo): exact truth, every rank the same, no hang."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_gns import NoiseScaleMonitor
from tests.helpers.ground_truth import Classifier, SaveMonitorResults, exact_truth, make_dataset, make_net, pretrain

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:NoiseScaleMonitor has no logger"),
]


class _WithUnused(Classifier):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, lr=0.0)
        self.unused = nn.Linear(3, 3)


class _SumReduced(Classifier):
    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels, reduction="sum")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    return net, dataset, exact_truth(net, dataset)


@pytest.mark.parametrize(
    ("source", "accumulate", "per_rank_batch", "strategy", "expected_source", "reduction"),
    [
        ("auto", 1, 16, "ddp_spawn", "ddp", "mean"),
        ("ddp", 2, 8, "ddp_spawn_find_unused_parameters_true", "ddp", "mean"),
        ("auto", 2, 8, "ddp_spawn", "accumulation", "mean"),
        # A sum-reduced loss, measured in the mean convention. 128 examples per rank: in batches of 10 the last
        # step of an epoch holds one micro-batch of 8 (ddp), in batches of 6 two of 6 and 2 (accumulation).
        ("auto", 1, 16, "ddp_spawn", "ddp", "sum"),
        ("ddp", 2, 10, "ddp_spawn", "ddp", "sum"),
        ("auto", 2, 6, "ddp_spawn", "accumulation", "sum"),
    ],
)
def test_ddp_sources_match_exact_truth_on_every_rank(
    problem, tmp_path, source, accumulate, per_rank_batch, strategy, expected_source, reduction
):
    net, dataset, truth = problem
    model_net = make_net()
    model_net.load_state_dict(net.state_dict())
    model_cls = _SumReduced if reduction == "sum" else Classifier
    model = _WithUnused(model_net) if "unused" in strategy else model_cls(model_net, lr=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=40,
        accumulate_grad_batches=accumulate,
        callbacks=[NoiseScaleMonitor(source=source), SaveMonitorResults(tmp_path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(dataset, batch_size=per_rank_batch, shuffle=True))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, value in results[0]["run"].items():  # every rank holds (and would log) the same numbers
        torch.testing.assert_close(results[1]["run"][key], value, equal_nan=True, msg=key)
    for key, value in results[0]["smoothed"].items():
        torch.testing.assert_close(results[1]["smoothed"][key], value, equal_nan=True, msg=key)
    assert results[0]["source"] == expected_source
    assert results[0]["loss_reduction"] == results[1]["loss_reduction"] == reduction  # "auto" read it off the graph
    out = results[0]["run"]
    batches_per_epoch = math.ceil(128 / per_rank_batch)
    assert float(out["num_steps"]) == 40 * math.ceil(batches_per_epoch / accumulate)
    assert float(out["trace_sigma"]) == pytest.approx(truth["expected_trace_sigma"], rel=0.05)
    assert float(out["grad_sq_norm"]) == pytest.approx(truth["expected_grad_sq_norm"], rel=0.05)
    expected_ratio = truth["expected_trace_sigma"] / truth["expected_grad_sq_norm"]
    assert float(out["b_simple"]) == pytest.approx(expected_ratio, rel=0.05)


class _SaveServed(Callback):
    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor))
        torch.save(
            {
                "served": pl_module.served,
                "changes": monitor.growth.changes,
                "accumulate": trainer.accumulate_grad_batches,
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_growth_under_ddp_serves_every_example_once_on_all_ranks(tmp_path, num_workers):
    from tests.helpers.growth import IndexedDataset, Recorder, ScriptedScheduler

    size = 90
    monitor = NoiseScaleMonitor(
        source="ddp",
        grow_batch_size=True,
        batch_size_scheduler=ScriptedScheduler(8, [(24, 16), (80, 48)]),
        max_micro_batch_size=12,
        log_every_n_steps=2,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        callbacks=[monitor, _SaveServed(tmp_path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        IndexedDataset(size), batch_size=4, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    trainer.fit(Recorder(), loader)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["changes"] == ranks[1]["changes"]
    assert [c["batch_size"] for c in ranks[0]["changes"]] == [16, 48]
    assert ranks[0]["changes"][0]["epoch"] == 0  # mid-epoch
    assert [(c["micro_batch_size"], c["accumulate_grad_batches"]) for c in ranks[0]["changes"]] == [(8, 1), (12, 2)]
    assert ranks[0]["accumulate"] == ranks[1]["accumulate"] == 2
    for epoch in range(2):
        per_rank = [[i for e, _, batch in r["served"] if e == epoch for i in batch] for r in ranks]
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(size)), f"epoch {epoch}"
        # Both ranks took the same number of batches (DDP would hang otherwise).
        assert len([1 for e, *_ in ranks[0]["served"] if e == epoch]) == len(
            [1 for e, *_ in ranks[1]["served"] if e == epoch]
        )


def test_unused_parameter_without_find_unused_parameters_surfaces_ddp_s_own_error(problem, tmp_path):
    """The ddp source skips the step whose last bucket DDP never reduced and lets DDP name the cause."""
    net, dataset, _ = problem
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[NoiseScaleMonitor(source="ddp")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model_net = make_net()
    model_net.load_state_dict(net.state_dict())
    with pytest.raises(Exception, match="parameters that were not used in producing the loss") as raised:
        trainer.fit(_WithUnused(model_net), DataLoader(dataset, batch_size=16))
    assert "find_unused_parameters=True" in str(raised.value)
    assert "gradient bucket" not in str(raised.value)  # not the source's own error

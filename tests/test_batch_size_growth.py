"""Batch-size growth inside real Lightning fits: sample accounting, LR rules, resume, errors, a real policy."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, WeightedRandomSampler

from lightning_gns import NoiseScaleMonitor
from tests.helpers.ground_truth import Classifier, make_dataset, make_net, pretrain
from tests.helpers.growth import IndexedDataset, Recorder, ScriptedScheduler

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:NoiseScaleMonitor has no logger:RuntimeWarning",
    "ignore:.*the number of training batches.*",
)

SIZE = 90


def _trainer(monitor, **kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [monitor],
    }
    return pl.Trainer(**{**defaults, **kwargs})


def _monitor(script, initial=4, **kwargs) -> NoiseScaleMonitor:
    options = {"source": "per_example", "log_every_n_steps": 2, "max_micro_batch_size": 16}
    return NoiseScaleMonitor(
        grow_batch_size=True, batch_size_scheduler=ScriptedScheduler(initial, script), **{**options, **kwargs}
    )


def _served_per_epoch(model):
    epochs = sorted({epoch for epoch, _, _ in model.served})
    return {e: [i for epoch, _, batch in model.served if epoch == e for i in batch] for e in epochs}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_growth_mid_epoch_serves_every_example_exactly_once(num_workers):
    model = Recorder()
    monitor = _monitor([(20, 8), (60, 24), (150, 48)])
    trainer = _trainer(monitor, max_epochs=3)
    loader = DataLoader(
        IndexedDataset(SIZE), batch_size=4, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    trainer.fit(model, loader)

    for epoch, served in _served_per_epoch(model).items():
        assert sorted(served) == list(range(SIZE)), f"epoch {epoch}"
    changes = monitor.growth.changes
    assert [c["batch_size"] for c in changes] == [8, 24, 48]
    # The first change lands inside the first epoch (workers prefetch batches, which pushes it a little later).
    assert changes[0]["epoch"] == 0
    assert 0 < changes[0]["batch"] < len([b for e, b, _ in model.served if e == 0]) - 1
    if num_workers == 0:
        assert changes[1]["epoch"] == 0
    # 24 = micro-batch 12 × accumulation 2 and 48 = 16 × 3: the micro-batch stops at its cap, accumulation grows.
    assert [(c["micro_batch_size"], c["accumulate_grad_batches"]) for c in changes] == [(8, 1), (12, 2), (16, 3)]
    assert trainer.accumulate_grad_batches == 3
    # Each change lands on a step boundary of both the old and the new accumulation.
    assert changes[1]["batch"] % 2 == 0
    sizes = [len(batch) for epoch, b, batch in model.served if epoch == 0]
    assert sizes[: changes[0]["batch"]] == [4] * changes[0]["batch"]
    if num_workers == 0:
        assert set(sizes[changes[0]["batch"] : changes[1]["batch"]]) == {8}
        assert sizes[changes[1]["batch"]] == 12


class _Validated(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.validations: list[tuple[int, int]] = []

    def validation_step(self, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.validations.append((self.current_epoch, self.trainer.global_step))


class _DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(IndexedDataset(20, seed=1), batch_size=10)


def test_lightning_counts_the_new_number_of_batches():
    """From a LightningDataModule: the epoch ends where the data ends, steps on its last batch, validates there."""
    model = _Validated()
    monitor = _monitor([(12, 16)])
    trainer = _trainer(monitor, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=_DataModule())
    per_epoch = _served_per_epoch(model)
    assert all(sorted(v) == list(range(SIZE)) for v in per_epoch.values())
    assert trainer.num_training_batches == math.ceil(SIZE / 16)
    # Every batch went into an optimizer step: steps = batches (no accumulation).
    assert trainer.global_step == len(model.served)
    # One validation per epoch, after the epoch's last step.
    ends = [sum(1 for e, *_ in model.served if e <= epoch) for epoch in range(3)]
    assert model.validations == [(epoch, ends[epoch]) for epoch in range(3)]


@pytest.mark.parametrize(
    ("optimizer", "schedule", "rule"),
    [("sgd", None, "linear"), ("adam", None, "sqrt"), ("sgd", "step", "linear"), ("adam", "cosine", "sqrt")],
)
def test_learning_rate_rule_scales_the_schedulers_output(optimizer, schedule, rule):
    model = Recorder(optimizer=optimizer, lr_schedule=schedule, lr=0.01)
    monitor = _monitor([(16, 8), (48, 32)], max_micro_batch_size=None)
    trainer = _trainer(monitor, max_steps=30)
    trainer.fit(model, DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=True))
    assert monitor.growth.rule == rule

    changes = monitor.growth.changes
    assert [c["batch_size"] for c in changes] == [8, 32]
    assert len(model.step_lrs) == 30
    for step, (inside, scheduled) in enumerate(model.step_lrs):
        in_force = max([4] + [c["batch_size"] for c in changes if c["global_step"] <= step])
        ratio = in_force / 4
        expected = scheduled * (ratio if rule == "linear" else math.sqrt(ratio))
        assert inside == pytest.approx(expected, rel=1e-12), f"step {step}"
    # The schedulers were not fought: the optimizer holds their closed-form value after 30 steps (what they and
    # checkpoints see), the scale having been applied inside the optimizer step only.
    closed_form = {None: 0.01, "step": 0.01 * 0.5 ** (30 // 3), "cosine": 0.01 * (1 + math.cos(math.pi * 30 / 40)) / 2}
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(closed_form[schedule], rel=1e-9)


def test_lr_warmup_reaches_the_new_scale_linearly():
    model = Recorder(lr=0.01)
    monitor = _monitor([(16, 16)], max_micro_batch_size=None, lr_warmup_steps=3)
    trainer = _trainer(monitor, max_steps=14)
    trainer.fit(model, DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=False))
    change = monitor.growth.changes[0]["global_step"]
    scales = [inside / 0.01 for inside, _ in model.step_lrs]
    assert scales[:change] == pytest.approx([1.0] * change)
    assert scales[change : change + 4] == pytest.approx([1.75, 2.5, 3.25, 4.0])


@pytest.mark.parametrize(("stop", "pending"), [(14, False), (16, True)])
def test_resume_after_growth_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, stop, pending):
    script = [(20, 8), (60, 24), (150, 48)]

    def run(max_steps, ckpt_path=None, checkpoint_every=None):
        model = Recorder()
        callbacks = [_monitor(script)]
        if checkpoint_every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=checkpoint_every, save_top_k=-1))
        trainer = _trainer(
            callbacks[0], callbacks=callbacks, max_steps=max_steps, enable_checkpointing=bool(checkpoint_every)
        )
        loader = DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=True)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model, callbacks[0], trainer

    full, full_monitor, _ = run(max_steps=24)
    # Both stops are mid-epoch after growth events (the second epoch); at step 16 the third change has been
    # decided but has not landed yet: the checkpoint holds it pending.
    first, _, _ = run(max_steps=stop, checkpoint_every=stop)
    ckpt = next(tmp_path.glob(f"*step={stop}.ckpt"))
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "NoiseScaleMonitor" in k)
    assert (saved["growth"]["pending"] is not None) == pending
    resumed, resumed_monitor, trainer = run(max_steps=24, ckpt_path=str(ckpt))

    assert full_monitor.growth.changes[0]["global_step"] < 14
    assert first.served + resumed.served == full.served
    assert first.losses + resumed.losses == full.losses  # bit for bit (float equality)
    assert trainer.accumulate_grad_batches == 3
    assert resumed_monitor.growth.changes == full_monitor.growth.changes
    assert resumed_monitor.growth.current_lr_scale == full_monitor.growth.current_lr_scale


def test_growth_logs_its_quantities(tmp_path):
    model = Recorder()
    monitor = _monitor([(16, 8)])
    trainer = _trainer(monitor, max_steps=20, logger=CSVLogger(tmp_path, name="run"))
    trainer.fit(model, DataLoader(IndexedDataset(SIZE), batch_size=4, shuffle=True))
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in ("gns/lr", "gns/lr_scale", "gns/accumulate_grad_batches", "gns/batch_size", "gns/batch_size_changes"):
        assert key in header
    rows = [dict(zip(header, line.split(","), strict=True)) for line in text.splitlines()[1:]]
    last = [r for r in rows if r["gns/batch_size_changes"]][-1]
    assert float(last["gns/batch_size_changes"]) == 1
    assert float(last["gns/lr"]) == pytest.approx(0.05 * 2)
    assert float(last["gns/batch_size"]) == 8


def test_real_policy_grows_to_the_noise_scale_and_stops():
    """Fixed weights (lr 0) with B_simple ≈ 17: from 4, the b_crit policy doubles up to 16 and stays there."""
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    monitor = NoiseScaleMonitor(source="per_example", grow_batch_size=True, log_every_n_steps=5)
    trainer = _trainer(monitor, max_epochs=25)
    trainer.fit(Classifier(net, lr=0.0), DataLoader(dataset, batch_size=4, shuffle=True))
    sizes = [c["batch_size"] for c in monitor.growth.changes]
    assert sizes == [8, 16]
    assert float(monitor.estimates["b_simple"]) == pytest.approx(17, rel=0.35)


@pytest.mark.parametrize(
    ("loader_kwargs", "trainer_kwargs", "match"),
    [
        ({"sampler": "weighted"}, {}, "WeightedRandomSampler"),
        ({}, {"reload_dataloaders_every_n_epochs": 1}, "reload_dataloaders_every_n_epochs"),
        ({}, {"limit_train_batches": 5}, "limit_train_batches"),
    ],
)
def test_unresizable_runs_are_refused_with_the_fix(loader_kwargs, trainer_kwargs, match):
    dataset = IndexedDataset(SIZE)
    if loader_kwargs.get("sampler") == "weighted":
        loader = DataLoader(dataset, batch_size=4, sampler=WeightedRandomSampler([1.0] * SIZE, SIZE))
    else:
        loader = DataLoader(dataset, batch_size=4)
    trainer = _trainer(_monitor([]), max_steps=3, **trainer_kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(Recorder(), loader)


def test_options_without_growth_are_refused():
    with pytest.raises(MisconfigurationException, match="grow_batch_size=True"):
        NoiseScaleMonitor(max_batch_size=512)
    with pytest.raises(MisconfigurationException, match="lr_scaling"):
        NoiseScaleMonitor(grow_batch_size=True, lr_scaling="cubic")


def test_unknown_optimizer_needs_a_declared_lr_rule():
    class Odd(Recorder):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    trainer = _trainer(_monitor([]), max_steps=2)
    with pytest.raises(MisconfigurationException, match="lr_scaling='linear'"):
        trainer.fit(Odd(), DataLoader(IndexedDataset(SIZE), batch_size=4))


def test_default_lr_rule_by_optimizer_kind():
    from lightning_gns.callbacks.batch_size_growth import default_lr_scaling

    class ThirdPartyAdam(torch.optim.Optimizer):  # what the preconditioned noise scale also takes for Adam
        def __init__(self, params) -> None:
            super().__init__(params, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8})

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert default_lr_scaling([torch.optim.SGD(params, lr=0.1)]) == "linear"
    assert default_lr_scaling([torch.optim.AdamW(params)]) == "sqrt"
    assert default_lr_scaling([torch.optim.Adamax(params)]) == "sqrt"
    assert default_lr_scaling([ThirdPartyAdam(params)]) == "sqrt"
    with pytest.raises(MisconfigurationException, match="mix SGD and adaptive"):
        default_lr_scaling([torch.optim.SGD(params, lr=0.1), torch.optim.Adam(params)])


class _ValidatedByExamples(Recorder):
    """Records, at each validation, the examples of the current epoch trained on so far."""

    def __init__(self) -> None:
        super().__init__()
        self.validations: list[tuple[int, int]] = []

    def validation_step(self, batch, batch_idx) -> None:
        if batch_idx == 0:
            seen = sum(len(index) for epoch, _, index in self.served if epoch == self.current_epoch)
            self.validations.append((self.current_epoch, seen))


@pytest.mark.parametrize("interval", [0.5, 0.25])
def test_fractional_val_check_interval_follows_the_epochs_examples_across_changes(interval):
    """val_check_interval=f validates after each f of the epoch's examples, with changes landing mid-epoch."""
    model = _ValidatedByExamples()
    monitor = _monitor([(12, 8), (40, 16)])
    trainer = _trainer(monitor, max_epochs=3, num_sanity_val_steps=0, val_check_interval=interval)
    data = _DataModule()
    trainer.fit(model, datamodule=data)
    assert [c["batch_size"] for c in monitor.growth.changes] == [8, 16]
    assert any(c["batch"] > 0 for c in monitor.growth.changes), "a change must land mid-epoch"
    expected = []
    for epoch in range(3):
        sizes = [len(index) for e, _, index in model.served if e == epoch]
        cumulative = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        period = interval * SIZE
        # the first batch that completes each fraction k of the epoch's examples
        for k in range(1, round(1 / interval) + 1):
            expected.append((epoch, next(c for c in cumulative if c >= k * period - 1e-9)))
    assert model.validations == expected


def _record_planned(monitor) -> list[int]:
    """Every batch size the growth plans (pending) or holds after each decision."""
    growth, planned = monitor.growth, []
    decide = growth.decide

    def recording(trainer, estimates):
        decide(trainer, estimates)
        planned.append(growth.batch_size if growth.pending is None else growth.pending.batch_size)
        planned.append(growth.scheduler.batch_size)

    growth.decide = recording
    return planned


@pytest.mark.parametrize("scheduler", ["built", "given"])
def test_growth_stops_at_what_one_epoch_of_data_can_fill(scheduler):
    """N=128 and a noise scale asking for far more: no planned or landed batch above 128, and the LR inside
    each step follows the linear rule at the batch the step actually held (lr × B/16, at most × 8)."""
    n, lr = 128, 0.01
    model = Recorder(lr=lr)
    options = {"source": "per_example", "log_every_n_steps": 1, "max_micro_batch_size": None}
    if scheduler == "built":  # the real b_crit policy, B_simple × 1000 asks for thousands
        monitor = NoiseScaleMonitor(
            grow_batch_size=True, min_examples_between_changes=0, b_crit_factor=1000.0, **options
        )
    else:  # a given scheduler without a bound, asking for 256 then 1024
        script = [(16, 64), (96, 256), (400, 1024)]
        monitor = NoiseScaleMonitor(grow_batch_size=True, batch_size_scheduler=ScriptedScheduler(16, script), **options)
    planned = _record_planned(monitor)
    trainer = _trainer(monitor, max_epochs=8)
    trainer.fit(model, DataLoader(IndexedDataset(n), batch_size=16, shuffle=True))

    landed = [c["batch_size"] for c in monitor.growth.changes]
    assert landed[-1] == n
    assert max(planned) == n
    assert max(landed) == n
    assert monitor.growth.batch_size == monitor.growth.scheduler.batch_size == n
    assert monitor.growth.scheduler.max_batch_size == n
    assert monitor.growth.current_lr_scale == 8.0
    # No accumulation (no micro-batch cap): one batch per optimizer step, at the linear rule of the batch in force.
    assert len(model.step_lrs) == len(model.served)
    last_of_epoch = {epoch: max(b for e, b, _ in model.served if e == epoch) for epoch, _, _ in model.served}
    for step, ((inside, _), (epoch, batch, index)) in enumerate(zip(model.step_lrs, model.served, strict=True)):
        in_force = max([16] + [c["batch_size"] for c in monitor.growth.changes if c["global_step"] <= step])
        assert inside == pytest.approx(lr * in_force / 16, rel=1e-12), f"step {step}"
        # Each step holds the batch its LR was scaled for (an epoch's last batch may hold only what is left).
        if batch != last_of_epoch[epoch]:
            assert len(index) == in_force, f"step {step}"
        assert len(index) <= in_force <= n
    # Once at the cap: every step holds all 128 examples, at lr × 128/16 = lr × 8 (was × 16 and more).
    final = monitor.growth.changes[-1]["global_step"]
    assert final < len(model.served) - 3
    assert {len(index) for _, _, index in model.served[final:]} == {n}
    assert [inside for inside, _ in model.step_lrs[final:]] == pytest.approx([lr * 8] * (len(model.served) - final))

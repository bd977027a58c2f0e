"""NoiseScaleMonitor in real Lightning fits, against exact per-example gradients of a finite data set."""

from __future__ import annotations

import csv
import logging
import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

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
    """A classifier trained a little (B_simple ≈ 17, far from 1) on 256 fixed examples, and its exact truth."""
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    return net, dataset, exact_truth(net, dataset)


def _fit_fixed_weights(net, dataset, monitor, epochs, batch_size, **trainer_kwargs):
    """Learning rate 0: the weights stay put while many batches (drawn without replacement) are measured."""
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[monitor], **trainer_kwargs)
    model = Classifier(copy_net(net), lr=0.0)
    trainer.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=True))
    return trainer, model


def _assert_matches_truth(out, truth, rel=0.05, corrected=True):
    expected_grad = truth["expected_grad_sq_norm" if corrected else "expected_grad_sq_norm_uncorrected"]
    assert float(out["trace_sigma"]) == pytest.approx(truth["expected_trace_sigma"], rel=rel)
    assert float(out["grad_sq_norm"]) == pytest.approx(expected_grad, rel=rel)
    assert float(out["b_simple"]) == pytest.approx(truth["expected_trace_sigma"] / expected_grad, rel=rel)


@pytest.mark.parametrize(
    ("source", "accumulate", "batch_size"),
    [("per_example", 1, 32), ("accumulation", 4, 8), ("per_example", 2, 16)],
)
def test_source_matches_exact_per_example_truth(problem, source, accumulate, batch_size):
    net, dataset, truth = problem
    monitor = NoiseScaleMonitor(source=source)
    _fit_fixed_weights(net, dataset, monitor, epochs=60, batch_size=batch_size, accumulate_grad_batches=accumulate)
    out = monitor.metric.compute()
    assert float(out["num_steps"]) == 60 * 256 / (batch_size * accumulate)
    _assert_matches_truth(out, truth)
    # The smoothed estimate (what is logged) agrees with the run average within its own uncertainty.
    smoothed = monitor.estimates
    assert float(smoothed["b_simple_lower"]) <= float(out["b_simple"]) <= float(smoothed["b_simple_upper"])


def test_without_finite_population_correction_the_grad_estimate_carries_its_bias(problem):
    net, dataset, truth = problem
    runs = {}
    for correct in (False, True):
        torch.manual_seed(11)  # the same batches for both runs
        monitor = NoiseScaleMonitor(source="per_example", finite_population=correct)
        _fit_fixed_weights(net, dataset, monitor, epochs=60, batch_size=32)
        runs[correct] = monitor.metric.compute()
    _assert_matches_truth(runs[False], truth, corrected=False)
    _assert_matches_truth(runs[True], truth, corrected=True)
    # Step by step the correction adds tr(Σ)/N to the |G|² estimate, N being the training set's size.
    torch.testing.assert_close(
        runs[True]["grad_sq_norm"], runs[False]["grad_sq_norm"] + runs[False]["trace_sigma"] / len(dataset)
    )


def test_auto_picks_per_example_on_one_device_and_accumulation_when_accumulating(problem):
    net, dataset, _ = problem
    for accumulate, expected in [(1, "per_example"), (2, "accumulation")]:
        monitor = NoiseScaleMonitor()
        _fit_fixed_weights(net, dataset, monitor, epochs=1, batch_size=32, accumulate_grad_batches=accumulate)
        assert monitor.source is not None
        assert monitor.source.name == expected


def test_measured_before_gradient_clipping(problem):
    net, dataset, _ = problem
    results = []
    for clip in (None, 1e-4):
        torch.manual_seed(3)
        monitor = NoiseScaleMonitor(source="per_example")
        _fit_fixed_weights(net, dataset, monitor, epochs=2, batch_size=32, gradient_clip_val=clip)
        results.append(monitor.metric.compute())
    for key in ("grad_sq_norm", "trace_sigma"):
        torch.testing.assert_close(results[0][key], results[1][key])


def test_loss_scale_is_undone_and_overflow_steps_are_skipped(problem):
    net, dataset, truth = problem
    # A GradScaler on CPU with an absurd initial scale: the first steps overflow in float16 and are skipped,
    # the scale comes down, and the later steps must be unscaled to match the exact truth.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=10_000)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    monitor = NoiseScaleMonitor(source="per_example")
    _fit_fixed_weights(net, dataset, monitor, epochs=40, batch_size=32, plugins=[plugin])
    out = monitor.metric.compute()
    assert float(out["num_skipped"]) > 0
    assert float(out["num_steps"]) + float(out["num_skipped"]) == 40 * 8
    _assert_matches_truth(out, truth, rel=0.08)  # float16 autocast adds its own rounding


class _PartlyFrozen(Classifier):
    """A frozen first layer and a branch that is never used: neither may contribute."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, lr=0.0)
        self.unused = nn.Linear(3, 3)
        net[0].requires_grad_(False)


def test_frozen_and_unused_parameters_contribute_nothing(problem):
    net, dataset, _ = problem
    frozen_net = copy_net(net)
    model = _PartlyFrozen(frozen_net)
    monitor = NoiseScaleMonitor(source="per_example")
    trainer = quiet_trainer(max_epochs=60, callbacks=[monitor])
    trainer.fit(model, DataLoader(dataset, batch_size=32, shuffle=True))
    # Truth over the trainable, used parameters only.
    reference = copy_net(net)
    reference[0].requires_grad_(False)
    truth = exact_truth(reference, dataset)
    _assert_matches_truth(monitor.metric.compute(), truth)


def test_tensorboard_gets_tags_and_layout_csv_gets_tags(problem, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    net, dataset, _ = problem
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    monitor = NoiseScaleMonitor(prog_bar=True)
    trainer = quiet_trainer(max_epochs=4, callbacks=[monitor], logger=[tensorboard, csv], log_every_n_steps=4)
    trainer.fit(Classifier(copy_net(net), lr=0.05), DataLoader(dataset, batch_size=32, shuffle=True))
    tensorboard.experiment.flush()

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        f"gns/{k}"
        for k in (
            "b_simple",
            "b_simple_lower",
            "b_simple_upper",
            "trace_sigma",
            "grad_sq_norm",
            "b_crit",
            "batch_size",
            "num_skipped",
        )
    }
    assert expected <= tags
    assert len(events.Scalars("gns/b_simple")) == 32 // 4
    assert all(e.value == 32 for e in events.Scalars("gns/batch_size"))
    assert [e.value for e in events.Scalars("gns/examples")] == [32.0 * 4 * (i + 1) for i in range(8)]
    layout = layout_pb2.Layout()
    raw = [e for e in _raw_events(tmp_path / "tb" / "version_0") if e.HasField("summary")]
    layout_values = [
        v for e in raw for v in e.summary.value if v.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
    ]
    assert layout_values, "no custom-scalars layout in the event file"
    layout.ParseFromString(layout_values[0].tensor.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    band = charts["B_simple (with its band)"].margin.series[0]
    assert (band.value, band.lower, band.upper) == ("gns/b_simple", "gns/b_simple_lower", "gns/b_simple_upper")

    import csv as csv_module

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as file:
        rows = list(csv_module.DictReader(file))
    logged = [float(r["gns/b_simple"]) for r in rows if r.get("gns/b_simple")]
    assert len(logged) == 8
    assert logged[-1] == pytest.approx(float(monitor.estimates["b_simple"]), rel=1e-5)
    assert "gns/b_simple" in trainer.progress_bar_metrics


def _raw_events(directory):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(directory.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(path)).Load()


def test_resume_continues_smoothed_statistics_exactly(problem, tmp_path):
    net, dataset, _ = problem
    loader = DataLoader(dataset, batch_size=32, shuffle=False)  # the same order before and after the restart

    def run(epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(5)
        monitor = NoiseScaleMonitor(source="per_example")
        trainer = quiet_trainer(
            max_epochs=epochs, callbacks=[monitor, *callbacks], enable_checkpointing=bool(callbacks)
        )
        model = Classifier(copy_net(net), lr=0.05)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return monitor

    straight = run(4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run(2, callbacks=[checkpoint])
    resumed = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    for key in ("b_simple", "grad_sq_norm", "trace_sigma", "b_simple_lower", "effective_steps"):
        torch.testing.assert_close(resumed.estimates[key], straight.estimates[key], msg=key)
    torch.testing.assert_close(resumed.metric.compute()["num_steps"], straight.metric.compute()["num_steps"])


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_checkpoint_from_before_example_weights_resumes_with_its_mean_batch(problem):
    """A monitor checkpoint whose metric holds unit-weighted sums (no `sum_weight`) loads to the same averages."""
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example")
    _fit_fixed_weights(net, dataset, monitor, epochs=2, batch_size=32)
    expected = monitor.metric.compute()
    state = monitor.state_dict()
    old = dict(state["metric"])
    del old["sum_weight"], old["sum_weight_sq"]
    for name in ("sum_grad_sq_norm", "sum_trace_sigma", "sum_grad_sq_norm_sq", "sum_trace_sigma_sq", "sum_cross"):
        old[name] = old[name] / 32  # one weight per step, as such a checkpoint summed
    restored = NoiseScaleMonitor(source="per_example")
    restored.load_state_dict({**state, "metric": old})
    for key, value in expected.items():
        torch.testing.assert_close(restored.metric.compute()[key], value, equal_nan=True, msg=key)
    # Its 16 steps weigh the mean batch of the run (512 examples over 16 steps), like the steps still to come.
    assert float(restored.metric.sum_weight) == pytest.approx(512.0)
    assert float(restored.metric.sum_weight_sq) == pytest.approx(16 * 32.0**2)


def test_misconfiguration_errors(problem):
    net, dataset, _ = problem
    loader = DataLoader(dataset, batch_size=32)
    with pytest.raises(MisconfigurationException, match=r"source='ddp' needs at least 2 processes.*devices=2"):
        quiet_trainer(max_steps=1, callbacks=[NoiseScaleMonitor(source="ddp")]).fit(Classifier(copy_net(net)), loader)
    with pytest.raises(MisconfigurationException, match=r"accumulate_grad_batches.*>= 2, but it is 1"):
        quiet_trainer(max_steps=1, callbacks=[NoiseScaleMonitor(source="accumulation")]).fit(
            Classifier(copy_net(net)), loader
        )

    class Manual(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match=r"automatic optimization only"):
        quiet_trainer(max_steps=1, callbacks=[NoiseScaleMonitor()]).fit(Manual(copy_net(net)), loader)
    with pytest.raises(MisconfigurationException, match=r"`source` to be one of"):
        NoiseScaleMonitor(source="gradients")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"`horizon_examples` to be a finite number > 0"):
        NoiseScaleMonitor(horizon_examples=0)
    with pytest.raises(MisconfigurationException, match=r"`confidence` in \(0, 1\)"):
        NoiseScaleMonitor(confidence=0)


def test_batch_norm_is_refused_with_the_way_out(problem):
    _, dataset, _ = problem
    net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    with pytest.raises(Exception, match=r"(?s)BatchNorm.*(GroupNorm|LayerNorm)"):
        quiet_trainer(max_steps=2, callbacks=[NoiseScaleMonitor(source="per_example")]).fit(
            Classifier(net), DataLoader(dataset, batch_size=32)
        )


def test_estimates_view_is_read_only_and_nan_is_reported_not_clamped(problem):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example")
    assert dict(monitor.estimates) == {}
    _fit_fixed_weights(net, dataset, monitor, epochs=1, batch_size=32)
    with pytest.raises(TypeError):
        monitor.estimates["b_simple"] = torch.tensor(1.0)  # type: ignore[index]
    value = float(monitor.estimates["b_simple"])
    assert math.isnan(value) == (not bool(monitor.estimates["b_simple_valid"]))


def test_norm_layers_only_matches_exact_truth_of_those_parameters(problem):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example", per_example_include=(nn.LayerNorm,))
    _fit_fixed_weights(net, dataset, monitor, epochs=60, batch_size=32)
    # Independent truth: the exact per-example gradients of the LayerNorm parameters alone.
    reference = copy_net(net)
    for module in reference:
        module.requires_grad_(isinstance(module, nn.LayerNorm))
    truth = exact_truth(reference, dataset)
    _assert_matches_truth(monitor.metric.compute(), truth)


def test_per_layer_breakdown_matches_each_layers_exact_truth(problem, tmp_path):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example", per_layer=True)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    _fit_fixed_weights(net, dataset, monitor, epochs=60, batch_size=32, logger=csv, log_every_n_steps=8)
    assert monitor.layer_metric is not None
    out = monitor.layer_metric.compute()
    names = monitor.source.layer_names
    assert names == ["net.0", "net.1", "net.3"]  # the Linear layers and the LayerNorm (Tanh has no parameters)
    for index, name in enumerate(names):
        reference = copy_net(net)
        for module_name, module in reference.named_children():
            module.requires_grad_(f"net.{module_name}" == name)
        truth = exact_truth(reference, dataset)
        layer = {key: value[index] for key, value in out.items()}
        _assert_matches_truth(layer, truth)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as file:
        header = file.readline()
    assert all(f"gns/layer/{name}/b_simple" in header for name in names)


def test_per_layer_needs_the_per_example_source(problem):
    net, dataset, _ = problem
    with pytest.raises(MisconfigurationException, match=r"`per_layer=True` needs the per_example source"):
        quiet_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[NoiseScaleMonitor(per_layer=True)]).fit(
            Classifier(copy_net(net)), DataLoader(dataset, batch_size=32)
        )


def test_one_example_batches_are_skipped_not_fatal(problem):
    """An epoch whose last batch holds one example (257 = 8 × 32 + 1): per_example has no estimate for it."""
    net, dataset, _ = problem
    extra = torch.utils.data.TensorDataset(dataset.tensors[0][:1], dataset.tensors[1][:1])
    data = torch.utils.data.ConcatDataset([dataset, extra])
    monitor = NoiseScaleMonitor(source="per_example", log_every_n_steps=3)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(Classifier(copy_net(net), lr=0.0), DataLoader(data, batch_size=32, shuffle=False))
    out = monitor.metric.compute()
    assert float(out["num_skipped"]) == 2  # the one-example batch of each epoch
    assert float(out["num_steps"]) == 16
    # Each step of the run average weighs its examples; the skipped ones nothing.
    assert float(monitor.metric.sum_weight) == 2 * 256
    assert float(monitor.metric.sum_weight_sq) == 16 * 32**2
    assert math.isfinite(float(monitor.estimates["b_simple"]))
    assert float(monitor.estimates["examples"]) == 2 * 257


def test_one_example_per_step_is_refused_at_the_first_step(problem):
    """batch_size=1 under per_example: no step could carry an estimate; it says so instead of logging NaN forever."""
    net, dataset, _ = problem
    with pytest.raises(
        MisconfigurationException,
        match=r"(?s)one example per optimizer step has no batch-level spread.*batch_size >= 2.*"
        r"accumulate_grad_batches >= 2.*DDP",
    ):
        quiet_trainer(max_steps=3, callbacks=[NoiseScaleMonitor(source="per_example")]).fit(
            Classifier(copy_net(net)), DataLoader(dataset, batch_size=1)
        )
    # One example per micro-batch with accumulation has a spread to measure: the same loader trains.
    monitor = NoiseScaleMonitor(source="per_example")
    quiet_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[monitor]).fit(
        Classifier(copy_net(net)), DataLoader(dataset, batch_size=1)
    )
    assert float(monitor.metric.compute()["num_steps"]) == 3


class _NaNLoss(Classifier):
    """A NaN loss at the given optimizer steps. With ``guard`` the non-finite gradients are zeroed after the monitor
    read them (a skipped step, as AMP's); without, the SGD step writes NaN into the weights and every later loss is
    NaN as well."""

    def __init__(self, net: nn.Module, nan_steps: set[int], guard: bool) -> None:
        super().__init__(net, lr=0.05)
        self.nan_steps = nan_steps
        self.guard = guard

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def on_before_optimizer_step(self, optimizer):
        if self.guard:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)


def _frozen_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "estimates are frozen" in str(w.message)]


def _logged(tmp_path, key):
    import csv as csv_module

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as file:
        return [(int(r["step"]), float(r[key])) for r in csv_module.DictReader(file) if r.get(key)]


def test_nan_loss_that_poisons_the_weights_warns_once(problem, tmp_path):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example", log_every_n_steps=5)
    trainer = quiet_trainer(max_steps=40, callbacks=[monitor], logger=CSVLogger(tmp_path, name="csv", version=0))
    with pytest.warns(RuntimeWarning, match=r"(?s)not finite: the loss is NaN.*frozen at the last finite step") as rec:
        trainer.fit(_NaNLoss(copy_net(net), nan_steps={3}, guard=False), DataLoader(dataset, batch_size=32))
    assert len(_frozen_warnings(rec)) == 1  # once, though 37 steps in a row were skipped
    assert "the last 12 optimizer steps" in _frozen_warnings(rec)[0]  # steps 3-14: the first all-skipped period
    assert not any(math.isfinite(p.detach().sum().item()) for p in trainer.lightning_module.net.parameters())
    # The staleness is logged: steps 3, 4 skipped by the log at step 4, then 5 more every period.
    assert _logged(tmp_path, "gns/steps_since_estimate") == [(4, 2.0)] + [(s, s - 2.0) for s in range(9, 40, 5)]
    frozen = [value for step, value in _logged(tmp_path, "gns/b_simple") if step >= 4]
    assert len(set(frozen)) == 1  # the estimate of step 2, logged as it is
    assert float(monitor.metric.compute()["num_skipped"]) == 37


def test_a_single_nan_batch_is_quiet_and_a_recurring_run_of_them_warns_again(problem):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example", log_every_n_steps=5)
    single = _NaNLoss(copy_net(net), nan_steps={3}, guard=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=40, callbacks=[monitor]).fit(single, DataLoader(dataset, batch_size=32))
    assert float(monitor.metric.compute()["num_skipped"]) == 1
    assert float(monitor._steps_since_estimate) == 0
    assert _frozen_warnings(record) == []
    # Two runs of 15 NaN steps, with finite steps between: one warning each.
    twice = _NaNLoss(copy_net(net), nan_steps=set(range(5, 20)) | set(range(25, 40)), guard=True)
    with pytest.warns(RuntimeWarning, match=r"estimates are frozen") as record:
        quiet_trainer(max_steps=40, callbacks=[NoiseScaleMonitor(source="per_example", log_every_n_steps=5)]).fit(
            twice, DataLoader(dataset, batch_size=32)
        )
    assert len(_frozen_warnings(record)) == 2


def _fit_fixed_weights_with(model_cls, net, dataset, monitor, batch_size=16, **trainer_kwargs):
    trainer = quiet_trainer(callbacks=[monitor], **trainer_kwargs)
    trainer.fit(model_cls(copy_net(net), lr=0.0), DataLoader(dataset, batch_size=batch_size, shuffle=True))


class _SumReduced(Classifier):
    """Cross-entropy summed over the batch's examples."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels, reduction="sum")


@pytest.mark.parametrize(
    ("source", "accumulate", "batch_size"),
    # 256 examples: the last batch of an epoch holds 16 of 24, or 6 of 10 (an uneven last micro-batch).
    [("per_example", 1, 24), ("per_example", 2, 10), ("accumulation", 2, 10)],
)
def test_sum_reduced_loss_is_measured_in_the_mean_convention(problem, source, accumulate, batch_size):
    net, dataset, truth = problem
    runs = {}
    for reduction, module in (("mean", Classifier), ("sum", _SumReduced)):
        torch.manual_seed(5)  # the same batches for both
        monitor = NoiseScaleMonitor(source=source)  # loss_reduction="auto": read off the loss's graph
        _fit_fixed_weights_with(
            module, net, dataset, monitor, batch_size, max_epochs=40, accumulate_grad_batches=accumulate
        )
        assert monitor.source.loss_reduction == reduction
        runs[reduction] = monitor.metric.compute()
        _assert_matches_truth(runs[reduction], truth)
    # Step by step the same numbers, but for the mean-reduced loss's uneven last step under accumulation: its
    # `.grad` is the plain average of two micro-batch means (10 and 6 examples), the sum's the mean over all 16.
    rtol = 1e-4 if accumulate == 1 else 0.02
    for key in ("trace_sigma", "grad_sq_norm", "b_simple"):
        torch.testing.assert_close(runs["sum"][key], runs["mean"][key], rtol=rtol, atol=0, msg=key)


def test_declared_loss_reduction_against_the_graph(problem):
    net, dataset, _ = problem
    # Declaring the wrong one is kept (the user may know better) but named: here the old behaviour, tr Σ off by B².
    monitor = NoiseScaleMonitor(source="per_example", loss_reduction="mean")
    with pytest.warns(RuntimeWarning, match=r"`loss_reduction='mean'` is declared, but .* sum .*SumBackward0|NllLoss"):
        _fit_fixed_weights_with(_SumReduced, net, dataset, monitor, max_steps=2)
    assert monitor.source.loss_reduction == "mean"
    # Declared and detected agree: nothing to say.
    monitor = NoiseScaleMonitor(source="per_example", loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*loss_reduction.*")
        _fit_fixed_weights_with(_SumReduced, net, dataset, monitor, max_steps=2)
    assert monitor.source.loss_reduction == "sum"
    with pytest.raises(MisconfigurationException, match="`loss_reduction`"):
        NoiseScaleMonitor(loss_reduction="batchmean")


class _Regularised(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * sum(p.square().sum() for p in self.parameters())


def test_an_undecidable_loss_is_taken_for_a_mean_and_said_so(problem, caplog):
    net, dataset, _ = problem
    monitor = NoiseScaleMonitor(source="per_example")
    with caplog.at_level(logging.INFO):
        _fit_fixed_weights_with(_Regularised, net, dataset, monitor, max_steps=2)
    assert monitor.source.loss_reduction == "mean"
    assert (
        sum("assuming a mean. Pass `NoiseScaleMonitor(loss_reduction='sum')`" in r.message for r in caplog.records) == 1
    )


class _SkipsEveryThirdStep(Classifier):
    """``training_step`` runs the forward, then returns None on every third optimizer step (the first included)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if (batch_idx // self.trainer.accumulate_grad_batches) % 3 == 0 else loss


@pytest.mark.parametrize(("source", "accumulate"), [("per_example", 1), ("accumulation", 2)])
def test_steps_without_backward_are_skipped_and_counted(problem, tmp_path, source, accumulate):
    """The same logged estimates as a fit on only the batches that were backpropagated."""
    net, dataset, _ = problem
    batch, epochs = 16, 6
    steps = len(dataset) // (batch * accumulate)
    kept_steps = [s for s in range(steps) if s % 3 != 0]
    kept = torch.cat([torch.arange(s * batch * accumulate, (s + 1) * batch * accumulate) for s in kept_steps])
    subset = torch.utils.data.TensorDataset(*(t[kept] for t in dataset.tensors))
    logged = {}
    for name, module, data in (("skipping", _SkipsEveryThirdStep, dataset), ("reference", Classifier, subset)):
        # No finite-population correction: the two training sets differ in size.
        monitor = NoiseScaleMonitor(source=source, finite_population=False)
        trainer = quiet_trainer(
            max_epochs=epochs,
            callbacks=[monitor],
            accumulate_grad_batches=accumulate,
            logger=CSVLogger(tmp_path, name=name, version=0),
            log_every_n_steps=1,
        )
        trainer.fit(module(copy_net(net), lr=0.0), DataLoader(data, batch_size=batch, shuffle=False))
        with open(tmp_path / name / "version_0" / "metrics.csv") as file:
            rows = [row for row in csv.DictReader(file) if row.get("gns/b_simple")]
        logged[name] = {k: float(v) for k, v in rows[-1].items() if k.startswith("gns/")}
    skipped = epochs * (steps - len(kept_steps))
    assert logged["skipping"].pop("gns/num_skipped") == skipped
    assert logged["reference"].pop("gns/num_skipped") == 0
    # The last logged step may follow a skipped one: the staleness counts it, the estimates are the same.
    assert logged["reference"].pop("gns/steps_since_estimate") == 0
    assert logged["skipping"].pop("gns/steps_since_estimate") in (0, 1)
    assert logged["skipping"]["gns/examples"] == epochs * len(kept)
    assert logged["skipping"]["gns/batch_size"] == batch * accumulate
    assert logged["skipping"] == pytest.approx(logged["reference"], rel=1e-6)

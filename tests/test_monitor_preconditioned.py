"""The preconditioned noise scale (Adam's √v̂ + ε) in real Lightning fits, against the exact truth of a finite data set.

How the truth is made: a small classifier takes a few real Adam steps, which give it a real second-moment state
(``exp_avg_sq`` after ``step`` steps). The fit then runs :class:`FrozenAdam`, an Adam that holds that state but
whose ``step`` only evaluates the closure: the weights stay fixed and so does the state, so the preconditioner
P = 1/(√(v/(1-β₂ᵗ)) + ε) is the same at every step of the fit. The test computes P² from the saved state with its
own formula, weights every exact per-example gradient (``torch.func``) by P, and compares the monitor's run
averages with the finite-population expectations of |P⊙G|², tr(S_P²) and their ratio. Any mistake in the
weighting of a rule, a source's small or big norm, or the choice of v̂ moves the estimate by far more than 5%
(the preconditioned truth is far from the plain one, checked below). Sampling noise aside, a second test replays
the very batches of a fit through the exact P-weighted per-example gradients: the monitor must equal that to
float32 rounding.
"""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import NoiseScaleMonitor
from tests.helpers.ground_truth import (
    Classifier,
    SaveMonitorResults,
    copy_net,
    exact_truth,
    make_dataset,
    make_net,
    per_example_flat_grads,
    pretrain,
    quiet_trainer,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:NoiseScaleMonitor has no logger:RuntimeWarning"
)

BETAS = (0.9, 0.999)
EPS = 1e-8


class FrozenAdam(torch.optim.Adam):
    """Adam with a given state that it never changes: ``step`` evaluates the closure (forward and backward) only."""

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class FrozenAdamClassifier(Classifier):
    """The classifier with :class:`FrozenAdam` holding a saved Adam state (weights and state stay fixed)."""

    def __init__(self, net: nn.Module, optimizer_state: dict) -> None:
        super().__init__(net, lr=0.0)
        self.optimizer_state = optimizer_state

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = FrozenAdam(self.parameters(), lr=1e-3, betas=BETAS, eps=EPS)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        return optimizer


class OptimizerClassifier(Classifier):
    """The classifier with a chosen optimizer class (real steps)."""

    def __init__(self, net: nn.Module, optimizer: type[torch.optim.Optimizer], lr: float = 1e-3) -> None:
        super().__init__(net, lr=lr)
        self.optimizer_cls = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_cls(self.parameters(), lr=self.lr)


def adam_steps(net: nn.Module, dataset: TensorDataset, steps: int = 30, lr: float = 1e-4) -> dict:
    """Real Adam steps on mini-batches: the net barely moves and the optimizer gets its state, returned."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=BETAS, eps=EPS)
    pretrain(net, dataset, steps, optimizer=optimizer, batch_size=16, seed=2)
    return copy.deepcopy(optimizer.state_dict())


def sq_weights_from_state(net: nn.Module, state: dict) -> dict[str, Tensor]:
    """P² = 1/(√v̂ + ε)² with v̂ = v/(1 - β₂ᵗ), from a saved Adam state (parameters in order), in float64."""
    (group,) = state["param_groups"]
    beta2, eps = group["betas"][1], group["eps"]
    weights = {}
    for index, (name, _) in zip(group["params"], net.named_parameters(), strict=True):
        entry = state["state"][index]
        steps = float(entry["step"])
        v_hat = entry["exp_avg_sq"].double() / (1.0 - beta2**steps)
        weights[name] = (v_hat.sqrt() + eps) ** -2
    return weights


@pytest.fixture(scope="module")
def problem():
    """A classifier after a few SGD then Adam steps, its Adam state, and the exact P-weighted and plain truths."""
    torch.manual_seed(0)
    dataset = make_dataset()
    net = make_net()
    pretrain(net, dataset, steps=5, lr=0.1)
    state = adam_steps(net, dataset)
    sq_weights = sq_weights_from_state(net, state)
    return net, dataset, state, exact_truth(net, dataset, sq_weights), exact_truth(net, dataset)


def _relative_errors(out, truth) -> dict[str, float]:
    expected = {
        "trace_sigma": truth["expected_trace_sigma"],
        "grad_sq_norm": truth["expected_grad_sq_norm"],
        "b_simple": truth["expected_trace_sigma"] / truth["expected_grad_sq_norm"],
    }
    return {key: float(out[key]) / value - 1.0 for key, value in expected.items()}


def _report(source: str, out, errors: dict[str, float]) -> str:
    """The relative errors and, for scale, the run's own relative standard errors (steps taken as independent)."""
    stderr = {key: float(out[f"{key}_std"] / out[key]) for key in ("trace_sigma", "grad_sq_norm", "b_simple")}
    fmt = ", ".join(f"{key} {errors[key]:+.2%} (stderr {stderr[key]:.2%})" for key in errors)
    return f"{source}: preconditioned estimate vs exact truth: {fmt}"


def test_the_preconditioned_truth_is_far_from_the_plain_one(problem):
    _, _, _, weighted, plain = problem
    # B_simple 33 preconditioned against 18 plain: a source that ignored P would be off by far more than 5%.
    assert weighted["b_simple"] > 1.5 * plain["b_simple"] or weighted["b_simple"] < plain["b_simple"] / 1.5


@pytest.mark.parametrize(
    ("source", "accumulate", "batch_size"),
    [("per_example", 1, 32), ("accumulation", 4, 8)],
)
def test_preconditioned_estimate_matches_exact_truth(problem, source, accumulate, batch_size, record_property):
    net, dataset, state, truth, _ = problem
    monitor = NoiseScaleMonitor(source=source)  # "auto" preconditioning: FrozenAdam is an Adam
    trainer = quiet_trainer(max_epochs=60, callbacks=[monitor], accumulate_grad_batches=accumulate)
    model = FrozenAdamClassifier(copy_net(net), state)
    trainer.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=True))
    assert monitor.is_preconditioned
    torch.testing.assert_close(model.net[0].weight, net[0].weight)  # the weights did not move
    out = monitor.metric.compute()
    # The optimizer had its state from the start: every step is measured.
    assert float(out["num_steps"]) == 60 * 256 / (batch_size * accumulate)
    errors = _relative_errors(out, truth)
    record_property("relative_errors", errors)
    print("\n" + _report(source, out, errors))
    for key, error in errors.items():
        assert abs(error) < 0.05, key


class _KeepBatchIndices(Callback):
    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[2].clone())


class _IndexedFrozenAdamClassifier(FrozenAdamClassifier):
    """Batches carry their examples' indices (third tensor), so the test can replay them exactly."""

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels, _ = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)


@pytest.mark.parametrize(("source", "accumulate", "batch_size"), [("per_example", 1, 32), ("accumulation", 4, 8)])
def test_preconditioned_estimate_is_the_exact_estimator_on_the_batches_it_saw(problem, source, accumulate, batch_size):
    """Sampling noise aside: on the very batches of the fit, the monitor equals the two-batch estimator computed
    from the exact P-weighted per-example gradients (to float32 rounding), step by step averaged."""
    net, dataset, state, _, _ = problem
    indexed = TensorDataset(*dataset.tensors, torch.arange(len(dataset)))
    keep = _KeepBatchIndices()
    monitor = NoiseScaleMonitor(source=source)
    trainer = quiet_trainer(max_epochs=4, callbacks=[monitor, keep], accumulate_grad_batches=accumulate)
    trainer.fit(
        _IndexedFrozenAdamClassifier(copy_net(net), state), DataLoader(indexed, batch_size=batch_size, shuffle=True)
    )
    flat = per_example_flat_grads(net, dataset, sq_weights_from_state(net, state))
    micro = torch.stack(keep.batches)  # [micro-batches, batch_size]
    steps = micro.reshape(-1, accumulate, batch_size)  # [steps, accumulation, batch_size]
    if source == "per_example":
        batch_small, small = 1, flat.square().sum(1)[steps.flatten(1)].mean(1)
    else:
        batch_small, small = batch_size, flat[steps].mean(2).square().sum(2).mean(1)
    batch_big = batch_size * accumulate
    big = flat[steps.flatten(1)].mean(1).square().sum(1)
    trace = (small - big) / (1 / batch_small - 1 / batch_big)
    grad_sq_norm = (batch_big * big - batch_small * small) / (batch_big - batch_small) + trace / len(dataset)
    out = monitor.metric.compute()
    torch.testing.assert_close(out["trace_sigma"].double(), trace.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["grad_sq_norm"].double(), grad_sq_norm.mean(), rtol=1e-5, atol=0)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:NoiseScaleMonitor has no logger")
def test_ddp_preconditioned_estimate_matches_exact_truth(problem, tmp_path, record_property):
    net, dataset, state, truth, _ = problem
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=40,
        callbacks=[NoiseScaleMonitor(source="ddp", preconditioned=True), SaveMonitorResults(tmp_path)],
    )
    trainer.fit(FrozenAdamClassifier(copy_net(net), state), DataLoader(dataset, batch_size=16, shuffle=True))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, value in results[0]["run"].items():  # the preconditioner is the same on every rank
        torch.testing.assert_close(results[1]["run"][key], value, equal_nan=True, msg=key)
    assert results[0]["preconditioned"]
    assert results[0]["source"] == "ddp"
    out = results[0]["run"]
    assert float(out["num_steps"]) == 40 * 256 / (2 * 16)
    errors = _relative_errors(out, truth)
    record_property("relative_errors", errors)
    print("\n" + _report("ddp", out, errors))
    for key, error in errors.items():
        assert abs(error) < 0.05, key


@pytest.mark.parametrize(
    ("optimizer", "preconditioned"),
    [(torch.optim.SGD, False), (torch.optim.Adam, True), (torch.optim.AdamW, True)],
)
def test_auto_picks_plain_for_sgd_and_preconditioned_for_adam(problem, tmp_path, optimizer, preconditioned):
    net, dataset, _, _, _ = problem
    monitor = NoiseScaleMonitor(source="per_example")
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = quiet_trainer(max_steps=6, callbacks=[monitor], logger=logger, log_every_n_steps=1)
    trainer.fit(OptimizerClassifier(copy_net(net), optimizer), DataLoader(dataset, batch_size=32))
    assert monitor.is_preconditioned is preconditioned
    # Adam has no second moment before its first step: that step is left out, not measured plain.
    assert float(monitor.metric.compute()["num_steps"]) == (5 if preconditioned else 6)
    assert float(monitor.estimates["examples"]) == 6 * 32  # the left-out step's examples still count
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("gns/b_simple")]
    assert len(rows) == (5 if preconditioned else 6)
    assert {float(r["gns/preconditioned"]) for r in rows} == {float(preconditioned)}


def test_preconditioned_true_needs_an_adam_family_optimizer(problem):
    net, dataset, _, _, _ = problem
    loader = DataLoader(dataset, batch_size=32)
    with pytest.raises(MisconfigurationException, match=r"preconditioned=True.*SGD.*Adam-family.*preconditioned=False"):
        quiet_trainer(max_steps=1, callbacks=[NoiseScaleMonitor(preconditioned=True)]).fit(
            OptimizerClassifier(copy_net(net), torch.optim.SGD), loader
        )
    with pytest.raises(MisconfigurationException, match=r"`preconditioned` to be True, False or 'auto'"):
        NoiseScaleMonitor(preconditioned="yes")  # type: ignore[arg-type]


def test_preconditioned_false_measures_plain_with_adam(problem):
    net, dataset, state, _, plain = problem
    monitor = NoiseScaleMonitor(source="per_example", preconditioned=False)
    quiet_trainer(max_epochs=60, callbacks=[monitor]).fit(
        FrozenAdamClassifier(copy_net(net), state), DataLoader(dataset, batch_size=32, shuffle=True)
    )
    assert not monitor.is_preconditioned
    for key, error in _relative_errors(monitor.metric.compute(), plain).items():
        assert abs(error) < 0.05, key


class LooksLikeAdam(torch.optim.SGD):
    """SGD with momentum whose groups carry `betas` and `eps`: Adam-like on paper, without an `exp_avg_sq`."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr, momentum=0.9)
        for group in self.param_groups:
            group["betas"], group["eps"] = (0.9, 0.999), 1e-8


def test_an_optimizer_without_exp_avg_sq_falls_back_to_plain_or_raises(problem):
    net, dataset, _, _, _ = problem
    loader = DataLoader(dataset, batch_size=32)
    monitor = NoiseScaleMonitor(source="per_example")
    quiet_trainer(max_steps=6, callbacks=[monitor]).fit(OptimizerClassifier(copy_net(net), LooksLikeAdam), loader)
    # Step 1: no state yet; step 2: state without a second moment (the norms had weight 0): both left out.
    assert not monitor.is_preconditioned
    assert float(monitor.metric.compute()["num_steps"]) == 4
    with pytest.raises(MisconfigurationException, match=r"LooksLikeAdam holds no `exp_avg_sq`"):
        quiet_trainer(max_steps=6, callbacks=[NoiseScaleMonitor(preconditioned=True)]).fit(
            OptimizerClassifier(copy_net(net), LooksLikeAdam), loader
        )


def test_resuming_with_the_other_kind_starts_the_statistics_afresh(problem, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    net, dataset, _, _, _ = problem
    loader = DataLoader(dataset, batch_size=32)
    model = OptimizerClassifier(copy_net(net), torch.optim.Adam)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    plain = NoiseScaleMonitor(source="per_example", preconditioned=False)
    quiet_trainer(max_epochs=1, callbacks=[plain, checkpoint], enable_checkpointing=True).fit(model, loader)
    assert float(plain.metric.compute()["num_steps"]) == 8
    resumed = NoiseScaleMonitor(source="per_example", preconditioned=False)
    quiet_trainer(max_epochs=2, callbacks=[resumed]).fit(model, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert float(resumed.metric.compute()["num_steps"]) == 16  # the same kind: continued
    switched = NoiseScaleMonitor(source="per_example")  # auto: preconditioned under Adam
    with pytest.warns(RuntimeWarning, match=r"statistics are of the plain noise scale.*start afresh"):
        quiet_trainer(max_epochs=2, callbacks=[switched]).fit(model, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert switched.is_preconditioned
    # Only the resumed epoch, all measured: the restored optimizer already has its second moment.
    assert float(switched.metric.compute()["num_steps"]) == 8

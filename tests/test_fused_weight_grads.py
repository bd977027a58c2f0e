"""Convolutions whose weight gradient the engine sums from the per-example ones (``fuse_weight_grads``).

Autograd skips those weights' gradients and a node on the output hands in the rule's sum instead: whatever the
model does around the layer, ``.grad`` must be what plain autograd leaves there (to float rounding: the sum runs
in another order), and the per-example norms stay exact.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_gns.sources.per_example_norms import (
    NormRuleFallbackWarning,
    PerExampleGradNorms,
    UnmeasuredParameterWarning,
)
from lightning_gns.sources.rules import conv, registry
from lightning_gns.sources.rules.linear import linear_fuses_weight_grads
from tests.conftest import NUM_PROCESSES, free_port, setup_ddp
from tests.helpers.per_example import (
    MLP,
    SmallCNN,
    TransformerBlock,
    cross_entropy_per_example,
    random_weights,
    sq_norms_by_loop,
    sq_norms_by_vmap,
)

Step = Callable[[nn.Module], None]


def grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(got: dict[str, Tensor | None], expected: dict[str, Tensor | None], rtol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None, name
            # Sums of per-example gradients in another order: a few float eps of the largest entry (CPUs without
            # AVX take other BLAS kernels, which round differently).
            scale = max(1e-7, 16 * torch.finfo(value.dtype).eps) * value.abs().max()
            torch.testing.assert_close(got[name], value, rtol=rtol, atol=scale, msg=name)


def compare(model: nn.Module, step: Step, **engine_kwargs) -> PerExampleGradNorms:
    """Run ``step`` on a copy with the engine and on a plain copy; their ``.grad`` must agree."""
    plain = copy.deepcopy(model)
    step(plain)
    measured = copy.deepcopy(model)
    with PerExampleGradNorms(measured, **engine_kwargs) as norms:
        step(measured)
    assert_same_grads(grads(measured), grads(plain))
    return norms


def cnn_step(x: Tensor, y: Tensor, reduction: str = "mean") -> Step:
    def step(model: nn.Module) -> None:
        losses = cross_entropy_per_example(model(x), y)
        (losses.sum() if reduction == "sum" else losses.mean()).backward()

    return step


class Convs(nn.Module):
    """One convolution of each path and geometry, ending in a linear head."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.body = nn.Sequential(
            conv_cls(3, 4, 3, padding=1),  # unfolded: 3 channels
            nn.ReLU(inplace=True),
            conv_cls(4, 16, 3, stride=2, padding=1, padding_mode="reflect", groups=2, bias=False),  # unfolded
            nn.Tanh(),
            conv_cls(16, 16, 2, padding="same", dilation=2),  # grouped: 16 channels
            nn.ReLU(),
            conv_cls(16, 40, 3, stride=2),  # Gram form: few positions, many weights; autograd's own gradient
        )
        self.head = nn.LazyLinear(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.body(x))

    def finish(self, features: Tensor) -> Tensor:
        return self.head(features.flatten(1))


def convs(dims: int = 2, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor]:
    model = Convs(dims)
    x = torch.randn(5, 3, *(9,) * dims)
    model(x)  # materialise the lazy head
    return model.to(dtype), x.to(dtype), torch.randint(0, 3, (5,))


class Seqs(nn.Module):
    """Linear layers on sequences: long ones, narrow against the length (fused), and a short one (Gram form)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 8),  # 24 positions: fused
            nn.ReLU(inplace=True),
            nn.Linear(8, 8, bias=False),  # fused
            nn.Tanh(),
            nn.Linear(8, 16),  # fused
            nn.Unflatten(1, (2, 12)),
            nn.Flatten(2),  # [N, 2, 192]
            nn.Linear(192, 40),  # 2 positions, wide: Gram form, autograd's own gradient
            nn.Tanh(),
        )
        self.head = nn.Linear(40, 3)  # one position: rank-one form, autograd's own gradient

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.body(x))

    def finish(self, features: Tensor) -> Tensor:
        return self.head(features.mean(1))


def seqs(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor]:
    return Seqs().to(dtype), torch.randn(5, 24, 6, dtype=dtype), torch.randint(0, 3, (5,))


class Norms(nn.Module):
    """GroupNorm first (on the raw input: no input gradient unless the input asks) and after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(1, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.body(x))

    def finish(self, features: Tensor) -> Tensor:
        return self.head(features.flatten(1))


def norms(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor]:
    x = 2 * torch.randn(5, 3, 6, 6, dtype=dtype) + 1
    return Norms().to(dtype), x, torch.randint(0, 3, (5,))


BUILDERS = {"conv": convs, "linear": seqs, "group_norm": norms}
both_kinds = pytest.mark.parametrize("kind", list(BUILDERS))


# ---------------------------------------------------------------------- gradients and norms


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_grads_equal_plain_autograd_and_norms_stay_exact(dims, reduction):
    model, x, y = convs(dims)
    norms = compare(model, cnn_step(x, y, reduction))
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x, y) / (1 if reduction == "sum" else 5**2)
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_grads_equal_plain_autograd_and_norms_stay_exact(reduction):
    model, x, y = seqs()
    norms = compare(model, cnn_step(x, y, reduction))
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x, y) / (1 if reduction == "sum" else 5**2)
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_group_norm_runs_the_whole_backward_and_stays_exact(reduction):
    model, x, y = norms()
    x.requires_grad_(True)  # the first GroupNorm then hands back the input gradient too
    plain, x_plain = copy.deepcopy(model), x.detach().clone().requires_grad_(True)
    cnn_step(x_plain, y, reduction)(plain)
    seen: list[bool] = []
    for layer in (model.body[0], model.body[4]):
        layer.register_forward_hook(lambda m, args, out: seen.append(m.weight.requires_grad))
    with PerExampleGradNorms(model) as engine:
        cnn_step(x, y, reduction)(model)
    assert seen == [False, False]  # fused
    assert_same_grads(grads(model), grads(plain))
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-14)
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x.detach(), y) / (1 if reduction == "sum" else 25)
    torch.testing.assert_close(engine.sq_norms(), expected, rtol=1e-8, atol=0)


def test_linear_fusion_is_decided_by_the_shapes():
    model, x, y = seqs()
    seen: dict[str, bool] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, m.weight.requires_grad))
    computed: list[str] = []
    spec = registry.get_rule_spec(nn.Linear(1, 1))

    def counting(module, inputs, grad_output, weight, bias):
        computed.append(type(module).__name__)
        return spec.fused.batch_grads(module, inputs, grad_output, weight, bias)

    counted = dataclasses.replace(spec, fused=dataclasses.replace(spec.fused, batch_grads=counting))
    with mock.patch.dict(registry._RULE_SPECS, {nn.Linear: counted}):
        compare(model, cnn_step(x, y))
    # Switched off inside the forward where fused: the long narrow sequences, not the 2-position or 2-D layers.
    assert seen == {"body.0": False, "body.2": False, "body.4": False, "body.7": True, "head": True}
    assert computed == []  # every fused gradient came from the rule's sums
    assert linear_fuses_weight_grads(model.body[0], x)
    assert not linear_fuses_weight_grads(model.body[0], x[:, :2])


def test_every_path_is_exercised():
    model, x, _ = convs()
    paths, activation = [], x
    for layer in model.body:
        out = layer(activation)
        if isinstance(layer, nn.Conv2d):
            paths.append(conv._weight_path(layer, activation, out))
        activation = out
    assert paths == ["unfolded", "unfolded", "grouped", "gram"]


def test_float32_grads_match_to_rounding():
    model, x, y = convs(dtype=torch.float32)
    compare(model, cnn_step(x, y))
    model, x, y = seqs(dtype=torch.float32)
    compare(model, cnn_step(x, y))
    small = SmallCNN()
    compare(small, cnn_step(torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))))


def test_weight_grad_is_skipped_by_autograd_and_given_by_the_rule(monkeypatch):
    model, x, y = convs()
    computed: list[int] = []
    original = conv.batch_weight_grad
    monkeypatch.setattr(conv, "batch_weight_grad", lambda *a: computed.append(1) or original(*a))
    with PerExampleGradNorms(model):
        cnn_step(x, y)(model)
    assert len(computed) == 1  # only the Gram-form layer, whose rule builds no per-example gradients


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_preconditioned_norms_are_weighted_but_grads_are_not(monkeypatch, reduction):
    # With a preconditioner the norms weight the per-example entries by P², while autograd must still get the
    # plain sums of the per-example gradients: the real gradient, never a weighted one.
    model, x, y = convs()
    weights = random_weights(model)
    by_id = {id(p): weights[name] for name, p in model.named_parameters()}
    computed: list[int] = []
    original = conv.batch_weight_grad
    monkeypatch.setattr(conv, "batch_weight_grad", lambda *a: computed.append(1) or original(*a))
    measured = copy.deepcopy(model)
    by_id = {id(q): by_id[id(p)] for p, q in zip(model.parameters(), measured.parameters(), strict=True)}
    with PerExampleGradNorms(measured, preconditioner=lambda p: by_id[id(p)]) as norms:
        cnn_step(x, y, reduction)(measured)
    plain = copy.deepcopy(model)
    cnn_step(x, y, reduction)(plain)
    assert_same_grads(grads(measured), grads(plain))
    # Weighted norms never take the Gram form: every convolution's weight gradient comes from its rule.
    assert computed == []
    expected = sq_norms_by_loop(model, cross_entropy_per_example, x, y, weights) / (1 if reduction == "sum" else 25)
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_preconditioned_linear_norms_are_weighted_but_grads_are_not(reduction):
    model, x, y = seqs()
    weights = random_weights(model)
    measured = copy.deepcopy(model)
    by_id = {id(q): weights[name] for (name, _), q in zip(model.named_parameters(), measured.parameters(), strict=True)}
    seen: list[bool] = []
    measured.body[7].register_forward_hook(lambda m, args, out: seen.append(m.weight.requires_grad))
    with PerExampleGradNorms(measured, preconditioner=lambda p: by_id[id(p)]) as norms:
        cnn_step(x, y, reduction)(measured)
    # The 2-position layer takes the Gram form unweighted; weighted, it builds the per-example gradients anyway,
    # so it hands autograd their sum.
    assert seen == [False]
    plain = copy.deepcopy(model)
    cnn_step(x, y, reduction)(plain)
    assert_same_grads(grads(measured), grads(plain))
    expected = sq_norms_by_loop(model, cross_entropy_per_example, x, y, weights) / (1 if reduction == "sum" else 25)
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-8, atol=0)


def test_linear_tied_to_an_embedding():
    class TiedLM(nn.Module):  # the head's weight is the embedding's: one group, measured at the end of the pass
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(torch.tanh(self.mix(self.embed(ids))))

    model = TiedLM().double()
    ids = torch.randint(0, 11, (3, 30))
    assert linear_fuses_weight_grads(model.head, torch.zeros(3, 30, 4))

    def step(m: nn.Module) -> None:
        cross_entropy_per_example(m(ids), ids).sum().backward()

    norms = compare(model, step)
    torch.testing.assert_close(
        norms.sq_norms(), sq_norms_by_vmap(model, cross_entropy_per_example, ids, ids), rtol=1e-8, atol=0
    )


def _mlp() -> tuple[nn.Module, Tensor, Tensor]:
    return MLP(), torch.randn(5, 6), torch.randint(0, 3, (5,))


def _small_cnn() -> tuple[nn.Module, Tensor, Tensor]:
    return SmallCNN(), torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))


def _transformer() -> tuple[nn.Module, Tensor, Tensor]:
    ids = torch.randint(0, 13, (5, 8))
    return TransformerBlock(), ids, ids


OFF_SWITCH_MODELS = {
    "convs": lambda: convs(dtype=torch.float32),
    "seqs": lambda: seqs(dtype=torch.float32),
    "group_norm": lambda: norms(dtype=torch.float32),
    "mlp": _mlp,
    "small_cnn": _small_cnn,
    "transformer": _transformer,
}


@pytest.mark.parametrize("kind", list(OFF_SWITCH_MODELS))
def test_off_switch_leaves_autograd_alone(kind):
    # fuse_weight_grads=False: every parameter's .grad is bit-for-bit plain autograd's, whatever the layers are.
    model, x, y = OFF_SWITCH_MODELS[kind]()
    plain = copy.deepcopy(model)
    cnn_step(x, y)(plain)
    with PerExampleGradNorms(model, fuse_weight_grads=False) as norms:
        assert norms.fuse_weight_grads is False
        cnn_step(x, y)(model)
    assert len(norms) == 1
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


# ---------------------------------------------------------------------- training-loop situations


@both_kinds
def test_accumulation_over_micro_batches(kind):
    model, x, y = BUILDERS[kind]()

    def step(m: nn.Module) -> None:
        for part in (slice(0, 2), slice(2, 5)):
            cross_entropy_per_example(m(x[part]), y[part]).mean().div(2).backward()

    norms = compare(model, step)
    assert len(norms) == 2


@both_kinds
def test_frozen_weight_or_bias(kind):
    model, x, y = BUILDERS[kind]()
    model.body[0].weight.requires_grad_(False)  # bias alone: nothing to fuse
    model.body[4].bias.requires_grad_(False)  # weight alone
    compare(model, cnn_step(x, y))


@both_kinds
def test_weight_frozen_after_attach_is_left_frozen(kind):
    model, x, y = BUILDERS[kind]()
    with PerExampleGradNorms(model):
        model.body[4].weight.requires_grad_(False)
        cnn_step(x, y)(model)
    assert model.body[4].weight.grad is None
    assert not model.body[4].weight.requires_grad


@both_kinds
def test_input_gradient_and_inplace_ops_on_the_output(kind):
    model, x, y = BUILDERS[kind]()  # the first layer is followed by ReLU(inplace=True)
    plain, x_plain = copy.deepcopy(model), x.clone().requires_grad_(True)
    cnn_step(x_plain, y)(plain)
    x.requires_grad_(True)
    with PerExampleGradNorms(model):
        cnn_step(x, y)(model)
    assert_same_grads(grads(model), grads(plain))
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-12, atol=0)


def test_module_called_twice_and_tied_weights():
    shared = nn.Conv2d(4, 4, 3, padding=1).double()
    tied = nn.Conv2d(4, 4, 3, padding=1).double()
    tied.weight = shared.weight
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), tied).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    norms = compare(model, lambda m: m(x).square().sum().backward())
    assert norms.measured_modules == ["0+4"]


@both_kinds
def test_retained_graph_second_pass_and_autograd_grad(kind):
    model, x, y = BUILDERS[kind]()

    def step(m: nn.Module) -> None:
        loss = cross_entropy_per_example(m(x), y).mean()
        loss.backward(retain_graph=True)
        loss.backward()

    with pytest.warns(UnmeasuredParameterWarning, match="retain_graph"):
        compare(model, step)

    plain = copy.deepcopy(model)
    expected = torch.autograd.grad(cross_entropy_per_example(plain(x), y).mean(), list(plain.parameters()))
    with PerExampleGradNorms(model):
        got = torch.autograd.grad(cross_entropy_per_example(model(x), y).mean(), list(model.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


@both_kinds
def test_gradient_penalty_is_differentiated_like_plain_autograd(kind):
    model, x, y = BUILDERS[kind]()
    x.requires_grad_(True)

    def step(m: nn.Module) -> None:
        loss = cross_entropy_per_example(m(x), y).mean()
        (input_grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + input_grad.square().sum()).backward()

    with pytest.warns(UnmeasuredParameterWarning, match="create_graph=True"):
        compare(model, step)


@both_kinds
def test_non_reentrant_checkpointing(kind):
    model, x, y = BUILDERS[kind]()

    def step(m: nn.Module) -> None:
        features = checkpoint(m.body, x, use_reentrant=False)
        cross_entropy_per_example(m.finish(features), y).mean().backward()

    norms = compare(model, step)
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x, y) / 5**2
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-8, atol=0)


@both_kinds
def test_engine_removed_between_forward_and_backward(kind):
    model, x, y = BUILDERS[kind]()

    def step(m: nn.Module) -> None:
        loss = cross_entropy_per_example(m(x), y).mean()
        for layer in m.body:
            assert getattr(layer, "weight", None) is None or layer.weight.requires_grad
        engine.remove()
        loss.backward()

    plain = copy.deepcopy(model)
    cnn_step(x, y)(plain)
    engine = PerExampleGradNorms(model).attach()
    step(model)
    assert len(engine) == 0
    assert_same_grads(grads(model), grads(plain))


def test_parameters_are_switched_off_only_inside_the_forward_and_back_after_an_error():
    layer = nn.Conv2d(3, 4, 3)
    seen: list[tuple[bool, bool]] = []
    layer.register_forward_hook(lambda m, args, out: seen.append((m.weight.requires_grad, m.bias.requires_grad)))
    with PerExampleGradNorms(layer):
        layer(torch.randn(2, 3, 5, 5))
        assert (layer.weight.requires_grad, layer.bias.requires_grad) == (True, True)
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 5, 5, 5))  # wrong channels
        assert (layer.weight.requires_grad, layer.bias.requires_grad) == (True, True)
        with torch.no_grad():
            layer(torch.randn(2, 3, 5, 5))
    assert seen == [(False, False), (True, True)]  # fused in the first call; no graph, nothing to fuse, in the last


@both_kinds
def test_autocast_and_other_dtypes_are_left_to_autograd(kind):
    model, x, y = BUILDERS[kind](dtype=torch.float32)

    def step(m: nn.Module) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        cross_entropy_per_example(out.float(), y).mean().backward()

    plain = copy.deepcopy(model)
    step(plain)
    with PerExampleGradNorms(model):
        step(model)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@both_kinds
def test_parameter_hooks_see_the_fused_gradient_once(kind):
    model, x, y = BUILDERS[kind]()
    seen: list[Tensor] = []
    weight = model.body[0].weight
    weight.register_hook(lambda g: seen.append(g.clone()))
    with PerExampleGradNorms(model):
        cnn_step(x, y)(model)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], weight.grad)


def test_replayed_fallback_module_around_a_conv():
    class Scaled(nn.Module):  # no rule: replayed by the torch.func fallback, with its conv child measured apart
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
            self.conv = nn.Conv2d(3, 4, 3).double()

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) * self.scale.exp()  # `exp` of a parameter has no op-level rule

    model = Scaled()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(NormRuleFallbackWarning, match="Scaled .*no per-example norm rule"):
        compare(model, lambda m: m(x).square().sum().backward())


# ---------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, out_dir) -> None:
    setup_ddp(rank, world_size, port)
    try:
        torch.manual_seed(0)
        part = slice(rank * 2, rank * 2 + 2)
        results = {}
        built = {kind: build(dtype=torch.float32) for kind, build in BUILDERS.items()}  # same weights on every rank
        for kind, fused in itertools.product(BUILDERS, (False, True)):
            model, x, y = built[kind]
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
            engine = PerExampleGradNorms(ddp.module, fuse_weight_grads=fused).attach()
            for _ in range(2):  # the second pass accumulates
                F.cross_entropy(ddp(x[part]), y[part]).backward()
            engine.remove()
            results[kind, fused] = grads(ddp.module)
            # The wrapper's reducer holds the process group: freed here, not with this frame after the group is
            # destroyed (gloo's destructor then joins a worker thread that waits for the GIL: a teardown deadlock).
            del ddp
        torch.save(results, out_dir / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_all_reduces_the_fused_gradients(tmp_path):
    mp.start_processes(
        _ddp_worker, args=(NUM_PROCESSES, free_port(), tmp_path), nprocs=NUM_PROCESSES, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    for rank_results in results:
        for kind in BUILDERS:
            assert_same_grads(rank_results[kind, True], results[0][kind, False])


# ---------------------------------------------------------------------- through the monitor


@pytest.mark.parametrize("fuse", [True, False])
def test_monitor_switch_trains_like_plain_lightning(fuse):
    """A Lightning fit with the monitor reaches the weights of a fit without it; the switch decides the fusion."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gns import NoiseScaleMonitor
    from tests.helpers.ground_truth import Classifier

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=gen), torch.randint(4, (48,), generator=gen))

    def fit(callbacks: list[pl.Callback]) -> tuple[nn.Module, list[bool]]:
        torch.manual_seed(0)
        net = SmallCNN()
        seen: list[bool] = []
        net.features[0].register_forward_hook(lambda m, args, out: seen.append(m.weight.requires_grad))
        trainer = pl.Trainer(
            max_steps=4,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Classifier(net, lr=0.5), DataLoader(data, batch_size=12))
        return net, seen

    plain, plain_seen = fit([])
    monitor = NoiseScaleMonitor(source="per_example", per_example_fuse_weight_grads=fuse, log_every_n_steps=1)
    measured, seen = fit([monitor])
    assert plain_seen == [True] * 4
    assert seen == [not fuse] * 4
    for (name, p), q in zip(measured.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isfinite(monitor.estimates["trace_sigma"])
    assert monitor.estimates["trace_sigma"] > 0

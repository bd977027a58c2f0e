"""The hook engine end to end: whole models against exact per-example norms, and its bookkeeping."""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_gns.sources import per_example_norms
from lightning_gns.sources.per_example_norms import (
    NormRuleFallbackWarning,
    PerExampleGradNorms,
    UnmeasuredParameterWarning,
)
from lightning_gns.sources.rules import registry
from lightning_gns.sources.rules.attention import CapturedAttention
from lightning_gns.sources.rules.linear import linear_sq_norm
from tests.helpers.per_example import (
    MLP,
    SmallCNN,
    TransformerBlock,
    cross_entropy_per_example,
    random_weights,
    reduce_loss,
    reduction_factor,
    sq_norms_by_backward_per_example,
    sq_norms_by_loop,
    sq_norms_by_vmap,
    trainable,
)

RTOL = 1e-4


def assert_close(got: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(got.double(), expected.double(), rtol=RTOL, atol=1e-10)


def measure(model: nn.Module, inputs: Tensor, targets: Tensor, reduction: str, **kwargs) -> PerExampleGradNorms:
    with PerExampleGradNorms(model, **kwargs) as norms:
        reduce_loss(cross_entropy_per_example(model(inputs), targets), reduction).backward()
    return norms


# ---------------------------------------------------------------------- whole models


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mlp_matches_naive_loop(reduction):
    model = MLP()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    norms = measure(model, x, y, reduction)
    expected = sq_norms_by_loop(model, cross_entropy_per_example, x, y) * reduction_factor(7, reduction)
    assert_close(norms.sq_norms(), expected)
    assert sorted(norms.sq_norms_by_module()) == ["net.0", "net.3", "net.5"]
    assert_close(sum(norms.sq_norms_by_module().values()), norms.sq_norms())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cnn_with_group_norm_matches_vmap(reduction):
    model = SmallCNN()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    norms = measure(model, x, y, reduction)
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x, y) * reduction_factor(5, reduction)
    assert_close(norms.sq_norms(), expected)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_transformer_block_matches_naive_loop(reduction):
    model = TransformerBlock()
    ids, targets = torch.randint(0, 13, (4, 8)), torch.randint(0, 13, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer of the block has a rule: no fallback warning
        norms = measure(model, ids, targets, reduction)
    expected = sq_norms_by_loop(model, cross_entropy_per_example, ids, targets) * reduction_factor(4, reduction)
    assert_close(norms.sq_norms(), expected)
    assert set(norms.sq_norms_by_module()) == {
        "tokens",
        "positions",
        "ln1",
        "attn",
        "ln2",
        "mlp.0",
        "mlp.2",
        "ln_f",
        "head",
    }
    assert {id(p) for p in norms.measured_parameters} == {id(p) for p in model.parameters()}


def test_attention_dropout_in_training_is_exact():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True)
    x = torch.randn(3, 4, 8)
    torch.manual_seed(1)
    plain = layer(x)
    expected = sq_norms_by_backward_per_example(plain.square().sum((1, 2)), list(layer.parameters()))
    torch.manual_seed(1)
    with PerExampleGradNorms(layer) as norms:
        out = layer(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, plain)  # the same dropout masks, so the truth above is this forward's
    assert_close(norms.sq_norms(), expected)


def test_multihead_attention_is_captured_not_recomputed(monkeypatch):
    captured_calls = []
    original = CapturedAttention.sq_norm
    monkeypatch.setattr(
        CapturedAttention, "sq_norm", lambda self, *args: captured_calls.append(1) or original(self, *args)
    )
    norms = measure(TransformerBlock(), torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5)), "sum")
    assert captured_calls == [1]
    assert "attn" in norms.sq_norms_by_module()


class SineGate(nn.Module):
    """``sin`` of a raw parameter has no op-level rule: the module goes to the torch.func fallback."""

    def __init__(self, dropout: float = 0.0, seq_first_dropout: bool = False) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.randn(4))
        self.linear = nn.Sequential(nn.Linear(4, 3), nn.Dropout(dropout), nn.Linear(3, 4))
        self.seq_first_dropout = seq_first_dropout
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = x * torch.sin(self.phase)
        if self.seq_first_dropout:  # a random op whose batch dim is not first: its masks cannot be replayed
            h = F.dropout(h.transpose(0, 1).contiguous(), self.dropout, self.training).transpose(0, 1)
        return self.linear(h)


def _sq_norms_of_one_forward(model: nn.Module, x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    out = model(x)
    return out, sq_norms_by_backward_per_example(out.square().flatten(1).sum(1), list(model.parameters()))


def test_fallback_replays_the_forwards_dropout_masks():
    model = nn.Sequential(SineGate(dropout=0.5), nn.Dropout(0.5), SineGate(dropout=0.5))
    x = torch.randn(6, 4)
    plain, expected = _sq_norms_of_one_forward(model, x, seed=3)
    torch.manual_seed(3)
    with pytest.warns(NormRuleFallbackWarning, match=r"SineGate.*`sin` takes a parameter"):  # noqa: PT031, SIM117
        with PerExampleGradNorms(model) as norms:
            out = model(x)
            out.square().sum().backward()
    torch.testing.assert_close(out, plain)  # the same masks, so the truth above is this forward's
    assert_close(norms.sq_norms(), expected)


def test_fallback_that_cannot_replay_its_random_ops_leaves_the_module_out_and_goes_on():
    model = nn.Sequential(nn.Linear(4, 4), SineGate(dropout=0.5, seq_first_dropout=True))
    x = torch.randn(3, 5, 4)
    torch.manual_seed(0)
    model(x).square().sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PerExampleGradNorms(model) as norms:
            model(x).square().sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, UnmeasuredParameterWarning)]
    assert any("could not replay `1` (SineGate)" in m and "left out" in m for m in messages)
    for param, plain in zip(model.parameters(), plain_grads, strict=True):
        torch.testing.assert_close(param.grad, plain)  # training goes on, gradients untouched
    record = norms.pop()[0]
    assert set(record.by_module) == {"0", "1.linear.0", "1.linear.2"}
    assert record.unmeasured == ("1.phase",)
    with (
        pytest.raises(TypeError, match=r"SineGate .*no per-example norm rule"),
        PerExampleGradNorms(model, strict=True),
    ):
        model(x).square().sum().backward()


class Attention(nn.Module):
    """A MultiheadAttention call with every option the engine distinguishes, then a head."""

    def __init__(self, batch_first: bool, need_weights: bool, weights_in_loss: bool, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)
        self.head = nn.Linear(8, 3)
        self.need_weights, self.weights_in_loss = need_weights, weights_in_loss

    def forward(self, x: Tensor) -> Tensor:
        padding = x[..., 0] > 0.8  # a mask per example, so the naive loop sees the same one
        padding[:, 0] = False
        h = x if self.attn.batch_first else x.transpose(0, 1)
        out, weights = self.attn(h, h, h, key_padding_mask=padding, need_weights=self.need_weights)
        out = out if self.attn.batch_first else out.transpose(0, 1)
        logits = self.head(out)
        return logits + weights.sum(-1, keepdim=True) if self.weights_in_loss else logits


@pytest.mark.parametrize("capture", [True, False], ids=["captured", "recomputed"])
@pytest.mark.parametrize(
    ("batch_first", "need_weights", "weights_in_loss", "options"),
    [
        (True, False, False, {}),
        (False, False, False, {"kdim": 5, "vdim": 5}),  # separate projection weights
        (True, False, False, {"bias": False}),
        (True, True, False, {}),
        (False, True, True, {}),  # a gradient through the attention weights (recomputed: torch.func replay)
        (True, False, False, {"add_zero_attn": True}),  # torch.func replay either way
        (True, False, False, {"add_bias_kv": True}),  # torch.func replay either way
    ],
)
def test_multihead_attention_through_the_engine(
    monkeypatch, capture, batch_first, need_weights, weights_in_loss, options
):
    if not capture:
        monkeypatch.setattr(per_example_norms, "_captures_forward", lambda unit: False)
    model = Attention(batch_first, need_weights, weights_in_loss, **options)
    if "kdim" in options:
        # Separate q/k/v weights, but fed one tensor: kdim = vdim = 8 after construction.
        model.attn.kdim = model.attn.vdim = 8
        model.attn.k_proj_weight = nn.Parameter(torch.randn(8, 8) / 3)
        model.attn.v_proj_weight = nn.Parameter(torch.randn(8, 8) / 3)
    x, y = torch.randn(3, 5, 8), torch.randint(0, 3, (3, 5))
    norms = measure(model, x, y, "mean")
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y) / 9)


@pytest.mark.parametrize("need_weights", [False, True])
def test_captured_attention_dropout_with_returned_weights(need_weights):
    model = Attention(True, need_weights, weights_in_loss=need_weights, dropout=0.3)
    x, y = torch.randn(3, 5, 8), torch.randint(0, 3, (3, 5))
    torch.manual_seed(1)
    plain = model(x)
    expected = sq_norms_by_backward_per_example(cross_entropy_per_example(plain, y), list(model.parameters()))
    torch.manual_seed(1)
    with PerExampleGradNorms(model) as norms:
        out = model(x)
        cross_entropy_per_example(out, y).sum().backward()
    torch.testing.assert_close(out, plain)  # the same dropout masks, so the truth above is this forward's
    assert_close(norms.sq_norms(), expected)


# ---------------------------------------------------------------------- several backward passes


def test_each_backward_pass_is_its_own_record():
    model = MLP()
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))), (torch.randn(3, 6), torch.randint(0, 3, (3,)))]
    with PerExampleGradNorms(model) as norms:
        for x, y in batches:  # gradient accumulation: a forward and a backward per micro-batch
            (cross_entropy_per_example(model(x), y).mean() / 2).backward()
    assert len(norms) == 2
    for index, (x, y) in enumerate(batches):
        expected = sq_norms_by_loop(model, cross_entropy_per_example, x, y) / (2 * len(x)) ** 2
        assert_close(norms.sq_norms(index), expected)
    records = norms.pop()
    assert [r.batch_size for r in records] == [4, 3]
    assert len(norms) == 0
    with pytest.raises(RuntimeError, match="No per-example norms recorded"):
        norms.sq_norms()


def test_two_forwards_then_two_backwards_stay_apart():
    model = MLP()
    (x1, y1), (x2, y2) = (torch.randn(4, 6), torch.randint(0, 3, (4,))), (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with PerExampleGradNorms(model) as norms:
        loss1 = cross_entropy_per_example(model(x1), y1).sum()
        loss2 = cross_entropy_per_example(model(x2), y2).sum()
        loss1.backward()
        loss2.backward()
    assert_close(norms.sq_norms(0), sq_norms_by_loop(model, cross_entropy_per_example, x1, y1))
    assert_close(norms.sq_norms(1), sq_norms_by_loop(model, cross_entropy_per_example, x2, y2))


def test_no_record_without_parameter_gradients():
    model = MLP()
    x = torch.randn(3, 6, requires_grad=True)
    with PerExampleGradNorms(model) as norms:
        torch.autograd.grad(model(x).sum(), x)  # an input gradient: no parameter gets one
        with torch.no_grad():
            model(x)
    assert len(norms) == 0


def test_a_forward_without_backward_is_forgotten_before_the_next_one():
    # A training step that returns None runs the forward and never the backward. LayerNorm's call keeps its
    # autograd node, whose hook keeps the call: a cycle that holds the whole graph (and its inputs) until the
    # garbage collector runs, and leaves the calls pending.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.Linear(8, 4)
    )
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with PerExampleGradNorms(model) as norms:
            skipped = torch.randn(5, 3, 8, 8, requires_grad=True)
            skipped_alive = weakref.ref(skipped)
            model(skipped)
            del skipped  # now only the graph of that forward holds it
            norms.forget_pending()
            assert skipped_alive() is None
            assert all(not group.pending for group in norms._groups)
            reduce_loss(cross_entropy_per_example(model(x), y), "sum").backward()
    finally:
        if gc_was_enabled:
            gc.enable()
    assert len(norms) == 1
    assert_close(norms.sq_norms(), sq_norms_by_vmap(model, cross_entropy_per_example, x, y))
    # The parameter gradients are the batch's (the fused convolution path included), nothing of the skipped forward.
    expected = torch.autograd.grad(
        reduce_loss(cross_entropy_per_example(model(x), y), "sum"), list(trainable(model).values())
    )
    for param, grad_value in zip(trainable(model).values(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad_value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- shared modules and tied weights


class TwiceApplied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TiedLanguageModel(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.ln(self.embed(ids)))


def test_module_called_twice_sums_its_gradients_before_squaring():
    model = TwiceApplied()
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    norms = measure(model, x, y, "mean")
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y) / 25)
    losses = cross_entropy_per_example(model(x), y)
    shared_truth = sq_norms_by_backward_per_example(losses, list(model.shared.parameters())) / 25
    assert_close(norms.sq_norms_by_module()["shared"], shared_truth)
    # Summing the calls' squared norms instead would be wrong, and measurably so here.
    calls: list[tuple[Tensor, Tensor]] = []

    def keep_call(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        out.register_hook(lambda g: calls.append((args[0], g)))

    handle = model.shared.register_forward_hook(keep_call)
    cross_entropy_per_example(model(x), y).mean().backward()
    handle.remove()
    naive = sum(linear_sq_norm(model.shared, (a,), g) for a, g in calls)
    assert not torch.allclose(naive.double(), shared_truth, rtol=1e-2)


def test_tied_weights_are_one_unit():
    model = TiedLanguageModel()
    ids, targets = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    norms = measure(model, ids, targets, "sum")
    assert "embed+head" in norms.sq_norms_by_module()
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, ids, targets))


def test_include_brings_a_tied_partner_along():
    model = TiedLanguageModel()
    ids, targets = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    norms = measure(model, ids, targets, "sum", include=[nn.Embedding])
    assert norms.measured_modules == ["embed+head"]
    losses = cross_entropy_per_example(model(ids), targets)
    assert_close(norms.sq_norms(), sq_norms_by_backward_per_example(losses, [model.embed.weight]))


# ---------------------------------------------------------------------- fallback and coverage


class ScaledLinear(nn.Module):
    """A raw parameter next to a child with a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.scale)


class FunctionalHead(nn.Module):
    """Uses a child's weight without calling the child: hooks on the child never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.relu(self.body(x)), self.proj.weight, self.proj.bias)


def test_raw_parameter_is_measured_op_by_op_without_the_fallback():
    model = nn.Sequential(ScaledLinear(), nn.Tanh(), nn.Linear(3, 4), ScaledLinear())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `x * self.scale` has an op-level rule: no fallback, no warning
        with PerExampleGradNorms(model, strict=True) as norms:
            reduce_loss(cross_entropy_per_example(model(x), y), "mean").backward()
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y) / 25)
    assert set(norms.sq_norms_by_module()) == {"0", "0.linear", "2", "3", "3.linear"}


class Temperature(nn.Module):
    """A scalar raw parameter: its per-example gradients are ``[N]``."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(0.3))
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) / self.log_temperature.exp()


def test_fallback_for_a_scalar_parameter_warns_once():
    model = Temperature()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    pattern = r"Temperature.*`exp`.*register_norm_rule\(Temperature\)"
    with pytest.warns(NormRuleFallbackWarning, match=pattern) as rec:  # noqa: PT031, SIM117
        with PerExampleGradNorms(model) as norms:
            for _ in range(2):
                reduce_loss(cross_entropy_per_example(model(x), y), "sum").backward()
    assert len([w for w in rec if issubclass(w.category, NormRuleFallbackWarning)]) == 1
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))


def test_strict_refuses_the_fallback_at_the_first_forward():
    model = Temperature()
    # What a forward does is known only when it runs.
    pattern = r"Temperature .*no per-example norm rule.*strict=True"
    with PerExampleGradNorms(model, strict=True), pytest.raises(TypeError, match=pattern):
        model(torch.randn(3, 4))


def test_registered_rule_replaces_the_fallback(monkeypatch):
    monkeypatch.setattr(registry, "_RULE_SPECS", dict(registry._RULE_SPECS))

    @registry.register_norm_rule(ScaledLinear)
    def scaled_linear_sq_norm(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> Tensor:
        x = inputs[0]
        grad_in = grad_output @ module.linear.weight  # gradient of x * scale
        scale = (grad_in * x).square().sum(1)
        return scale + grad_output.square().sum(1) * ((x * module.scale).square().sum(1) + 1)

    model = ScaledLinear()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms = measure(model, x, y, "sum", strict=True)
    assert norms.measured_modules == ["(root)"]
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))


def test_unmeasured_parameter_is_named():
    model = FunctionalHead()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.warns(UnmeasuredParameterWarning, match=r"proj\.bias, proj\.weight"):
        norms = measure(model, x, y, "sum")
    assert norms.records[-1].unmeasured == ("proj.bias", "proj.weight")
    with pytest.raises(RuntimeError, match=r"no per-example hook measured: proj\.bias, proj\.weight"):
        measure(model, x, y, "sum", strict=True)


# ---------------------------------------------------------------------- BatchNorm


def test_batch_norm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 3, 6, 6)
    model(x)
    with PerExampleGradNorms(model), pytest.raises(ValueError, match=r"`1` \(BatchNorm2d\).*GroupNorm or LayerNorm"):
        model(x)
    with PerExampleGradNorms(model, include=[nn.Linear]), pytest.raises(ValueError, match="`ddp` or `accumulation`"):
        model(x)  # measuring only the head does not help: BatchNorm still mixes the examples upstream


def test_batch_norm_in_eval_mode_is_fine_frozen_or_not():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model(torch.randn(16, 4) * 3)  # non-trivial running statistics
    model[1].eval()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    norms = measure(model, x, y, "sum")
    assert "1" in norms.sq_norms_by_module()
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))
    model[1].requires_grad_(False)
    norms = measure(model, x, y, "sum")
    assert "1" not in norms.sq_norms_by_module()
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))


# ---------------------------------------------------------------------- include, frozen, hooks


def test_include_measures_only_those_modules():
    model = TransformerBlock()
    ids, targets = torch.randint(0, 13, (3, 6)), torch.randint(0, 13, (3, 6))
    norms = measure(model, ids, targets, "sum", include=[nn.LayerNorm])
    assert norms.measured_modules == ["ln1", "ln2", "ln_f"]
    ln_params = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    losses = cross_entropy_per_example(model(ids), targets)
    assert_close(norms.sq_norms(), sq_norms_by_backward_per_example(losses, ln_params))
    with PerExampleGradNorms(model, include=[nn.LayerNorm]):
        hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == ["ln1", "ln2", "ln_f"]


def test_frozen_parameters_are_skipped():
    model = SmallCNN()
    model.features[0].requires_grad_(False)
    model.features[1].weight.requires_grad_(False)
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 4, (3,))
    norms = measure(model, x, y, "sum")
    assert "features.0" not in norms.measured_modules
    assert_close(norms.sq_norms(), sq_norms_by_vmap(model, cross_entropy_per_example, x, y))
    assert len(trainable(model)) == len(norms.measured_parameters)


def test_attach_twice_raises_and_remove_leaves_no_hooks():
    model = TransformerBlock()
    model.insert_bn = nn.BatchNorm1d(3)  # BatchNorm gets a pre-hook: it must go too
    norms = PerExampleGradNorms(model).attach()
    with pytest.raises(RuntimeError, match=r"already attached.*remove\(\)"):
        norms.attach()
    assert norms.attached
    norms.remove()
    norms.remove()  # harmless
    assert not norms.attached
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
    for param in model.parameters():
        assert not param._backward_hooks
    model(torch.randint(0, 13, (2, 4))).sum().backward()
    assert len(norms) == 0
    norms.attach()  # attaching again after remove works
    model(torch.randint(0, 13, (2, 4))).sum().backward()
    assert len(norms) == 1
    norms.remove()


def test_hooks_of_a_removed_engine_do_not_record():
    model = MLP()
    norms = PerExampleGradNorms(model).attach()
    out = model(torch.randn(3, 6))
    norms.remove()
    out.sum().backward()
    assert len(norms) == 0


def test_a_failing_attention_forward_leaves_no_capture_behind():
    model = TransformerBlock()
    with PerExampleGradNorms(model):
        with pytest.raises(AssertionError):
            model.attn(torch.randn(2, 3, 16), torch.randn(2, 4, 16), torch.randn(2, 5, 16))  # key/value mismatch
        assert torch._C._len_torch_function_stack() == 0
        model.eval()
        with torch.no_grad():  # the inference fast path stays available
            model(torch.randint(0, 13, (2, 4)))
        assert torch._C._len_torch_function_stack() == 0


def test_include_rejects_non_module_types():
    with pytest.raises(TypeError, match="include"):
        PerExampleGradNorms(MLP(), include=[int])  # type: ignore[list-item]


@pytest.mark.parametrize("compiled", ["whole", "submodule", "method"])
def test_a_compiled_model_is_refused_at_attach(compiled):
    model = MLP()
    if compiled == "whole":
        model = torch.compile(model, backend="eager")
    elif compiled == "submodule":
        model.net[0] = torch.compile(model.net[0], backend="eager")
    else:
        model.net[3].compile(backend="eager")
    names = {"whole": r"\(model\)", "submodule": "net.0", "method": "net.3"}[compiled]
    with pytest.raises(ValueError, match=rf"torch.compile \(compiled: {names}\).*`accumulation`.*`ddp`.*uncompiled"):
        PerExampleGradNorms(model).attach()


def test_a_forward_compiled_outside_the_model_raises_in_its_backward_and_keeps_no_record():
    """Compiled code that attach cannot see (a compiled function calling the model): never a silent number."""
    model = MLP()
    step = torch.compile(lambda x: model(x), backend="aot_eager")
    x = torch.randn(5, 6)
    with PerExampleGradNorms(model) as norms:
        with pytest.raises(RuntimeError, match=r"ran under torch.compile.*No record is kept"):
            step(x).sum().backward()
        assert len(norms) == 0
        model(x).sum().backward()  # an eager step afterwards is measured as usual
    assert len(norms) == 1
    assert_close(norms.sq_norms(), sq_norms_by_backward_per_example(model(x).sum(1), list(model.parameters())))


# ---------------------------------------------------------------------- edge cases


def test_inplace_activation_after_a_conv_and_no_grad_inputs():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.randn(4, 2, 6), torch.randint(0, 2, (4,))
    norms = measure(model, x, y, "sum")
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))


def test_non_reentrant_checkpointing():
    model = MLP()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with PerExampleGradNorms(model) as norms:
        out = checkpoint(model.net, x, use_reentrant=False)
        cross_entropy_per_example(out, y).sum().backward()
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y))


def test_retained_graph_is_measured_once_then_reported():
    model = MLP()
    with PerExampleGradNorms(model) as norms:
        loss = model(torch.randn(3, 6)).sum()
        loss.backward(retain_graph=True)
        with pytest.warns(UnmeasuredParameterWarning, match="retain_graph=True"):
            loss.backward()
    assert len(norms) == 1


def test_input_gradient_first_then_parameter_backward():
    model = MLP()
    x, y = torch.randn(4, 6, requires_grad=True), torch.randint(0, 3, (4,))
    with PerExampleGradNorms(model) as norms:
        loss = cross_entropy_per_example(model(x), y).sum()
        torch.autograd.grad(loss, x, retain_graph=True)  # e.g. an input saliency: no parameter gradient
        loss.backward()
    assert len(norms) == 1
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x.detach(), y))


def test_gradient_penalty_is_warned():
    model = MLP()
    x = torch.randn(4, 6, requires_grad=True)
    with PerExampleGradNorms(model):
        with pytest.warns(UnmeasuredParameterWarning, match="create_graph=True"):
            (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        with pytest.warns(UnmeasuredParameterWarning, match=r"net\.5\.weight"):
            gx.square().sum().backward()  # the second-order path reaches the last weight outside its hook


def test_inconsistent_batch_sizes_raise():
    class UnbatchedPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = nn.Embedding(5, 4), nn.Embedding(7, 4)

        def forward(self, ids: Tensor) -> Tensor:
            return self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))

    model = UnbatchedPositions()
    with PerExampleGradNorms(model), pytest.raises(ValueError, match=r"different batch sizes.*arange\(T\)"):
        model(torch.randint(0, 5, (2, 7))).sum().backward()


def test_autocast_bfloat16_gives_float32_norms_close_to_float32():
    model = TransformerBlock()
    ids, targets = torch.randint(0, 13, (3, 6)), torch.randint(0, 13, (3, 6))
    reference = measure(model, ids, targets, "sum").sq_norms()
    with PerExampleGradNorms(model) as norms:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        cross_entropy_per_example(logits.float(), targets).sum().backward()
    assert norms.sq_norms().dtype == torch.float32
    torch.testing.assert_close(norms.sq_norms(), reference, rtol=0.1, atol=0)


def test_multihead_attention_sequence_first_with_padding_mask():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)  # batch_first=False: [T, N, E]
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            padding = x[..., 0] > 0.5  # depends on the example alone, so the naive loop sees the same mask
            padding[:, 0] = False
            h = x.transpose(0, 1)
            return self.head(self.attn(h, h, h, key_padding_mask=padding)[0].transpose(0, 1))

    model = Encoder()
    x, y = torch.randn(3, 5, 8), torch.randint(0, 3, (3, 5))
    norms = measure(model, x, y, "mean")
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y) / 9)


# ---------------------------------------------------------------------- preconditioned (weighted) norms


def _preconditioner(model: nn.Module, weights: dict[str, Tensor], leave_out: str = ""):
    """A preconditioner from fixed weights by parameter name; parameters whose name has ``leave_out`` get None."""
    by_id = {id(p): weights[name] for name, p in model.named_parameters() if p.requires_grad}
    names = {id(p): name for name, p in model.named_parameters()}
    return lambda p: None if leave_out and leave_out in names[id(p)] else by_id[id(p)]


@pytest.mark.parametrize(
    "make",
    [
        MLP,
        SmallCNN,
        TransformerBlock,  # embedding, layer norms, captured attention, sequence linears
        TiedLanguageModel,  # tied weights: per-example gradients summed, then weighted
        TwiceApplied,  # one module called twice
        lambda: nn.Sequential(ScaledLinear(), nn.Tanh(), nn.Linear(3, 4)),  # a raw parameter, op by op
        lambda: nn.Sequential(Temperature(), nn.Tanh(), nn.Linear(3, 4)),  # the torch.func fallback
        lambda: Attention(True, False, False, add_bias_kv=True),  # attention replayed by torch.func
    ],
    ids=["mlp", "cnn", "transformer", "tied", "twice", "op_level", "fallback", "attention_replayed"],
)
def test_preconditioned_norms_match_weighted_truth(make):
    model = make()
    if isinstance(model, TransformerBlock | TiedLanguageModel):
        x, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    elif isinstance(model, SmallCNN):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    elif isinstance(model, Attention):
        x, y = torch.randn(3, 5, 8), torch.randint(0, 3, (3, 5))
    else:
        x = torch.randn(5, 6 if isinstance(model, MLP) else (5 if isinstance(model, TwiceApplied) else 4))
        y = torch.randint(0, 3, (5,))
    weights = random_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormRuleFallbackWarning)
        norms = measure(model, x, y, "sum", preconditioner=_preconditioner(model, weights))
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y, weights))
    # The weights matter: the plain norms are far from these.
    plain = sq_norms_by_loop(model, cross_entropy_per_example, x, y)
    assert not torch.allclose(norms.sq_norms().double(), plain, rtol=0.05)


def test_preconditioner_none_means_weight_one():
    model = MLP()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    weights = random_weights(model)
    norms = measure(model, x, y, "mean", preconditioner=_preconditioner(model, weights, leave_out="net.3"))
    expected_weights = {n: torch.ones_like(w) if "net.3" in n else w for n, w in weights.items()}
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y, expected_weights) / 25)


def test_a_rule_without_weights_is_replayed_when_preconditioned(monkeypatch):
    monkeypatch.setattr(registry, "_RULE_SPECS", dict(registry._RULE_SPECS))

    @registry.register_norm_rule(ScaledLinear)
    def plain_only(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> Tensor:
        raise AssertionError("a rule without `weights` must not be asked for weighted norms")

    model = nn.Sequential(ScaledLinear(), nn.Tanh(), nn.Linear(3, 4))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    weights = random_weights(model)
    with pytest.warns(NormRuleFallbackWarning, match=r"ScaledLinear.*takes no `weights`"):
        norms = measure(model, x, y, "sum", preconditioner=_preconditioner(model, weights))
    assert_close(norms.sq_norms(), sq_norms_by_loop(model, cross_entropy_per_example, x, y, weights))


def test_inputs_are_released_as_soon_as_measured():
    # Each layer's input is dropped once its norm is taken, not at the end of the pass: autograd reuses the memory.
    model = MLP()
    x = torch.randn(4, 6, requires_grad=True)
    held: list[list[bool]] = []
    with PerExampleGradNorms(model) as norms:
        out = model(x)
        x.register_hook(lambda _: held.append([call.args is not None for call in norms._fired]))
        out.sum().backward()
    assert held == [[False, False, False]]
    assert len(norms) == 1


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("layer", ["group_norm", "layer_norm"])
def test_norm_layers_reuse_the_forward_statistics(monkeypatch, checkpointed, layer):
    seen: list[bool] = []
    if layer == "group_norm":
        # Fused (the default): the rule runs the layer's whole backward from the forward's statistics.
        original_whole = registry.group_norm_sq_norm_and_grads

        def spy_whole(module, inputs, grad_output, stats, input_grad, **kwargs):
            seen.append(stats is not None)
            return original_whole(module, inputs, grad_output, stats, input_grad, **kwargs)

        monkeypatch.setattr(registry, "group_norm_sq_norm_and_grads", spy_whole)
    else:
        spec = registry.get_rule_spec(nn.LayerNorm(1))
        original = spec.from_saved_stats.sq_norm

        def spy(module, inputs, grad_output, stats, **kwargs):
            seen.append(stats is not None)
            return original(module, inputs, grad_output, stats, **kwargs)

        spied = dataclasses.replace(spec.from_saved_stats, sq_norm=spy)
        monkeypatch.setitem(registry._RULE_SPECS, nn.LayerNorm, dataclasses.replace(spec, from_saved_stats=spied))
    if layer == "group_norm":
        model: nn.Module = SmallCNN()
        x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
        body, head = model.features, lambda h: model.head(h.mean((2, 3)))
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4))
        x, y = torch.randn(5, 7, 6), torch.randint(0, 4, (5, 7))
        body, head = model[:4], model[4]
    with PerExampleGradNorms(model) as norms:
        features = checkpoint(body, x, use_reentrant=False) if checkpointed else body(x)
        cross_entropy_per_example(head(features), y).sum().backward()
    # Checkpointing lets each saved tensor be unpacked once, by the layer's backward: the rule recomputes them.
    # Under checkpointing GroupNorm's fused rule still runs (from recomputed statistics); LayerNorm's plain rule does.
    assert seen == ([False, False] if layer == "group_norm" else []) if checkpointed else [True, True]
    assert_close(norms.sq_norms(), sq_norms_by_vmap(model, cross_entropy_per_example, x, y))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("length", [3, 40])  # short: the Gram form, the output a view; long: fused
def test_inplace_op_on_a_sequence_linear_output_is_measured(fuse, length):
    # nn.Linear on [N, T, K] returns a view; an in-place op on it (ReLU(inplace=True)) used to drop the hook.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)).double()
    x, y = torch.randn(5, length, 6, dtype=torch.float64), torch.randint(0, 4, (5, length))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmeasuredParameterWarning)
        with PerExampleGradNorms(model, fuse_weight_grads=fuse) as norms:
            cross_entropy_per_example(model(x), y).sum().backward()
    assert_close(norms.sq_norms(), sq_norms_by_vmap(model, cross_entropy_per_example, x, y))


def test_inplace_op_on_a_sequence_linear_output_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    x, y = torch.randn(5, 3, 6), torch.randint(0, 4, (5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmeasuredParameterWarning)
        with PerExampleGradNorms(model) as norms:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            cross_entropy_per_example(logits.float(), y).sum().backward()
    assert norms.measured_modules == ["0", "2"]
    # bfloat16 activations: the norms agree with the float32 truth to bfloat16 precision.
    expected = sq_norms_by_vmap(model, cross_entropy_per_example, x, y)
    torch.testing.assert_close(norms.sq_norms().double(), expected.double(), rtol=5e-2, atol=0)

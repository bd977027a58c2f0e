"""One registry of rule specs: a rule registered by a user can do all that a built-in one does.

Each capability (a norm rule, a call rule with keyword arguments and several outputs, a forward capture, a rule
from the node's saved statistics, fused weight gradients) is used by a user-registered class and checked against
per-example gradients from one backward per example (float64), with ``.grad`` unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns._compat.autograd import saved_tensors_hooks_active
from lightning_gns.sources.per_example_norms import PerExampleGradNorms
from lightning_gns.sources.rules import (
    FusedRule,
    NormRuleSpec,
    SavedStatsRule,
    get_norm_rule,
    get_rule_spec,
    register_norm_rule,
    register_rule_spec,
    registry,
    unregister_norm_rule,
)
from tests.helpers.per_example import sq_norms_by_backward_per_example


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_RULE_SPECS", dict(registry._RULE_SPECS))


class MyLinear(nn.Linear):
    """A subclass: gets no rule by inheritance (lookup is by exact type)."""


class MyLayerNorm(nn.LayerNorm):
    pass


class MyAttention(nn.MultiheadAttention):
    pass


class Gate(nn.Module):
    """Keyword arguments and two outputs: ``x * w * scale`` and ``x`` passed through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, x: Tensor, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        return torch.sin(x) * self.w * scale, x


def gate_sq_norm(
    module: nn.Module, args: tuple[Tensor, ...], kwargs: dict, grad_outputs: list[Tensor | None], weights=None
) -> Tensor:
    grad = grad_outputs[0]
    assert grad is not None
    per_example = (torch.sin(args[0]) * grad * kwargs.get("scale", 1.0)).flatten(1, -2).sum(1)
    squared = per_example.square()
    if weights is not None and "w" in weights:
        squared = squared * weights["w"]
    return squared.sum(1)


def measure(model: nn.Module, loss_of: callable, strict: bool = True) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(engine's norms, exact norms, .grad after the engine's backward) for one batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with PerExampleGradNorms(model, strict=strict) as engine:
            losses = loss_of(model)
            losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    losses = loss_of(model)
    exact = sq_norms_by_backward_per_example(losses, params)
    plain = torch.autograd.grad(losses.sum(), params)
    for (name, got), want in zip(grads.items(), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f".grad of {name} changed")
    return engine.sq_norms(), exact, grads


def test_a_built_in_spec_registered_for_a_subclass_keeps_every_capability():
    torch.manual_seed(0)
    assert get_rule_spec(MyLinear(2, 2)) is None
    register_rule_spec(MyLinear, spec=get_rule_spec(nn.Linear(1, 1)))
    register_rule_spec(MyLayerNorm, spec=get_rule_spec(nn.LayerNorm(1)))
    model = nn.Sequential(MyLinear(6, 8), MyLayerNorm(8), nn.Tanh(), MyLinear(8, 3)).double()
    x, y = torch.randn(4, 48, 6, dtype=torch.float64), torch.randint(0, 3, (4, 48))
    fused, read = [], []
    model[0].register_forward_hook(lambda m, a, o: fused.append(not m.weight.requires_grad))
    spec = get_rule_spec(model[1])
    spied = dataclasses.replace(spec.from_saved_stats, read=lambda *a: read.append(1) or spec.from_saved_stats.read(*a))
    register_rule_spec(MyLayerNorm, spec=dataclasses.replace(spec, from_saved_stats=spied), overwrite=True)

    def loss_of(m):
        return F.cross_entropy(m(x).transpose(1, 2), y, reduction="none").sum(1)

    got, exact, _ = measure(model, loss_of)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)
    # 48 positions of width 6 -> 8: the sequence Linear fuses under the engine (and not in the plain forward after).
    assert fused == [True, False]
    # The LayerNorm subclass read its node's saved mean and rstd, where torch can say that no saved-tensor hooks
    # hold them (torch 2.5 cannot: the rule recomputes them, exactly as well).
    assert read == ([] if saved_tensors_hooks_active() else [1])


def test_a_call_rule_with_keyword_arguments_and_two_outputs():
    torch.manual_seed(1)
    register_rule_spec(Gate, spec=NormRuleSpec(call=gate_sq_norm))
    model = nn.ModuleDict({"gate": Gate(5), "head": nn.Linear(5, 2).double()})
    x = torch.randn(6, 3, 5, dtype=torch.float64)

    def loss_of(m):
        gated, passed = m["gate"](x, scale=0.5)
        return (m["head"](gated + passed)).square().sum((1, 2))

    got, exact, _ = measure(model, loss_of)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)


def test_a_capture_registered_for_a_subclass_of_attention():
    torch.manual_seed(2)
    register_rule_spec(MyAttention, spec=get_rule_spec(nn.MultiheadAttention(4, 2)))
    attention = MyAttention(8, 2, batch_first=True, dtype=torch.float64)
    captured = []
    original = get_rule_spec(attention).capture

    def spying_capture(module):
        capture = original(module)
        captured.append(capture)
        return capture

    register_rule_spec(
        MyAttention, spec=dataclasses.replace(get_rule_spec(attention), capture=spying_capture), overwrite=True
    )
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)

    def loss_of(m):
        out, _ = m(x, x, x, attn_mask=mask, need_weights=False)
        return out.square().sum((1, 2))

    got, exact, _ = measure(attention, loss_of)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)
    assert len(captured) == 1
    assert captured[0].captured is not None  # the norms came from the capture, not a replay


def test_a_user_fused_rule_hands_autograd_its_sums():
    torch.manual_seed(3)
    calls = []
    linear = get_rule_spec(nn.Linear(1, 1))

    def counting_sums(module, args, grad_output, node, slot, **kw):
        calls.append(type(module).__name__)
        return linear.fused.sq_norm_and_grads(module, args, grad_output, node, slot, **kw)

    register_norm_rule(MyLinear, fused=FusedRule(counting_sums, linear.fused.batch_grads, linear.fused.input_grad))(
        linear.sq_norm
    )
    model = nn.Sequential(MyLinear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)  # short sequences: the built-in would not fuse, `worth_it` does

    def loss_of(m):
        return m(x).square().sum((1, 2))

    got, exact, _ = measure(model, loss_of)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)
    assert calls == ["MyLinear"]


def test_unregistering_a_built_in_rule_measures_the_layer_op_by_op():
    torch.manual_seed(4)
    removed = unregister_norm_rule(nn.LayerNorm)
    assert get_norm_rule(nn.LayerNorm(3)) is None
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def loss_of(m):
        return m(x).square().sum(1)

    got, exact, _ = measure(model, loss_of)  # strict: F.layer_norm has an op-level rule, no fallback
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=0)
    register_rule_spec(nn.LayerNorm, spec=removed[nn.LayerNorm])
    assert get_norm_rule(nn.LayerNorm(3)).__name__ == "layer_norm_sq_norm"


def test_registry_errors_name_the_fix():
    with pytest.raises(KeyError, match=r"No norm rule is registered for MyLinear; nothing was removed"):
        unregister_norm_rule(nn.Linear, MyLinear)
    assert get_norm_rule(nn.Linear(1, 1)) is not None  # nothing removed
    with pytest.raises(ValueError, match=r"already registered for Linear.*overwrite=True.*unregister_norm_rule"):
        register_rule_spec(nn.Linear, spec=NormRuleSpec(call=gate_sq_norm))
    with pytest.raises(TypeError, match="NormRuleSpec"):
        register_rule_spec(MyLinear, spec=gate_sq_norm)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one module class"):
        unregister_norm_rule()
    with pytest.raises(ValueError, match="needs `sq_norm=`"):
        NormRuleSpec()
    with pytest.raises(ValueError, match="give `sq_norm` too"):
        NormRuleSpec(call=gate_sq_norm, from_saved_stats=SavedStatsRule(lambda *a: None, lambda *a: None))
    with pytest.raises(ValueError, match="`capture=` needs `call=`"):
        NormRuleSpec(sq_norm=get_norm_rule(nn.Linear(1, 1)), capture=lambda module: None)


def test_weighted_is_read_from_the_signature():
    assert NormRuleSpec(call=gate_sq_norm).weighted is True
    assert NormRuleSpec(sq_norm=lambda module, inputs, grad_output: grad_output).weighted is False
    assert NormRuleSpec(sq_norm=lambda module, inputs, grad_output: grad_output, weighted=True).weighted is True
    assert all(spec.weighted for spec in registry._RULE_SPECS.values())  # every built-in takes weights

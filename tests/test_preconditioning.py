"""AdamPreconditioner against torch's own Adam update, and the sources' weighted norms against direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gns.sources.accumulation import AccumulationSource
from lightning_gns.sources.per_example import PerExampleSource
from lightning_gns.sources.preconditioning import AdamPreconditioner, is_adam_family, weighted_sq_norm
from tests.helpers.per_example import MLP


@pytest.mark.parametrize(
    "options",
    [{}, {"foreach": False}, {"fused": True}, {"amsgrad": True}, {"betas": (0.8, 0.95), "eps": 1e-3}],
    ids=["default", "single_tensor", "fused", "amsgrad", "betas_eps"],
)
@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_preconditioner_is_the_denominator_of_the_adam_update(optimizer_cls, options):
    """After step t, Adam moved θ by -lr·m̂_t/(√v̂_t + ε): P from the state after the step must reproduce it."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = optimizer_cls(model.parameters(), lr=0.1, weight_decay=0.0, **options)
    precondition = AdamPreconditioner(optimizer)
    beta1 = optimizer.param_groups[0]["betas"][0]
    for step in range(1, 4):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        model(torch.randn(8, 6) * step).square().sum().backward()
        optimizer.step()
        for param, old in zip(model.parameters(), before, strict=True):
            state = optimizer.state[param]
            first = state["exp_avg"] / (1 - beta1**step)
            update = -0.1 * first * precondition(param).sqrt()
            torch.testing.assert_close(param.detach() - old, update, rtol=1e-4, atol=1e-7)


def test_parameters_without_a_second_moment_get_weight_zero_and_the_state_is_not_touched():
    used, unused = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.Adam([*used.parameters(), *unused.parameters()])
    precondition = AdamPreconditioner(optimizer)
    assert not precondition.ready
    assert not precondition.stepped
    used(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert precondition.ready
    torch.testing.assert_close(precondition(unused.weight), torch.zeros(2, 2))
    assert unused.weight not in optimizer.state  # looking it up created no entry
    assert precondition(used.weight).gt(0).all()


def test_a_parameter_group_added_later_is_found():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.Adam(first.parameters(), eps=1e-3)
    precondition = AdamPreconditioner(optimizer)
    optimizer.add_param_group({"params": list(second.parameters()), "eps": 0.5})
    (first(torch.ones(1, 2)).sum() + second(torch.ones(1, 2)).sum()).backward()
    optimizer.step()
    # v̂ = g² after one step: the bias gradients are all 1, so P² = 1/(1 + eps)².
    torch.testing.assert_close(precondition(second.bias), torch.full((2,), 1 / 1.5**2))
    torch.testing.assert_close(precondition(first.bias), torch.full((2,), 1 / 1.001**2))


def test_adam_family_detection():
    params = list(nn.Linear(2, 2).parameters())
    assert is_adam_family(torch.optim.Adam(params))
    assert is_adam_family(torch.optim.NAdam(params))
    assert not is_adam_family(torch.optim.SGD(params, lr=0.1))
    assert not is_adam_family(torch.optim.Adamax(params))  # betas and eps, but an infinity norm
    assert not is_adam_family(torch.optim.RMSprop(params))


def test_weighted_sq_norm_keeps_float64():
    value = weighted_sq_norm(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.5]))
    assert value.dtype == torch.float64
    assert float(value) == 3.0


@pytest.mark.parametrize("source_cls", [AccumulationSource, PerExampleSource])
def test_sources_weight_the_small_and_the_big_norm(source_cls):
    """Two micro-batches of a real model, against their gradients weighted by hand."""
    torch.manual_seed(0)
    model = MLP()
    sq_weights = {id(p): torch.rand_like(p) * 10 for p in model.parameters()}
    source = source_cls(loss_divisor=2, preconditioner=lambda p: sq_weights[id(p)])
    source.attach(model)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    micro_grads = []
    for x, y in batches:
        before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
        micro_grads.append([p.grad - b for p, b in zip(model.parameters(), before, strict=True)])
        source.micro_batch_done(4)
    norms = source.step_norms()
    source.detach()

    def weighted(grads):
        return sum((g.square() * sq_weights[id(p)]).sum() for p, g in zip(model.parameters(), grads, strict=True))

    big = weighted([p.grad for p in model.parameters()])
    torch.testing.assert_close(norms.sq_norm_big, big, rtol=1e-5, atol=0)
    if source_cls is AccumulationSource:
        # Each micro-batch gradient is a mean over 4 examples, divided by 2: undone.
        small = sum(weighted([g * 2 for g in grads]) for grads in micro_grads) / 2
    else:
        small = (
            sum(
                weighted(
                    torch.autograd.grad(
                        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
                    )
                )
                for x, y in batches
                for i in range(4)
            )
            / 8
        )
    torch.testing.assert_close(norms.sq_norm_small, small, rtol=1e-4, atol=0)


def test_per_layer_norms_are_weighted_like_the_total():
    torch.manual_seed(0)
    model = MLP()
    sq_weights = {id(p): torch.rand_like(p) * 10 for p in model.parameters()}
    source = PerExampleSource(per_layer=True, preconditioner=lambda p: sq_weights[id(p)])
    source.attach(model)
    nn.functional.cross_entropy(model(torch.randn(6, 6)), torch.randint(0, 3, (6,))).backward()
    source.micro_batch_done(6)
    total = source.step_norms()
    layers = source.last_layer_norms
    source.detach()
    assert layers is not None
    torch.testing.assert_close(layers.sq_norm_small.sum(), total.sq_norm_small, rtol=1e-5, atol=0)
    torch.testing.assert_close(layers.sq_norm_big.sum(), total.sq_norm_big, rtol=1e-5, atol=0)
    head = model.net[5]
    expected_head = sum((p.grad.square() * sq_weights[id(p)]).sum() for p in head.parameters())
    torch.testing.assert_close(layers.sq_norm_big[-1], expected_head, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sparse"])
def test_plain_squared_norm_on_every_path(dtype, layout):
    """The BLAS dot (dense CPU floats), vector_norm and the sparse path agree with a float64 sum of squares."""
    from lightning_gns.sources.preconditioning import weighted_sq_norm

    dense = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    tensor = {"contiguous": dense, "transposed": dense.t(), "sparse": dense.to_sparse()}[layout]
    if layout == "sparse":  # an uncoalesced gradient repeats indices: their entries must add up before squaring
        half = dense.to_sparse()
        tensor = torch.sparse_coo_tensor(
            torch.cat([half.indices(), half.indices()], 1), torch.cat([half.values(), half.values()]) / 2, dense.shape
        )
        assert not tensor.is_coalesced()
    expected = dense.double().square().sum()
    got = weighted_sq_norm(tensor)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    weight = torch.rand(dense.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weighted = weighted_sq_norm(tensor, weight.t() if layout == "transposed" else weight.to(got.dtype))
    torch.testing.assert_close(weighted.double(), (dense.double().square() * weight).sum(), rtol=1e-5, atol=0)


def test_sources_measure_sparse_embedding_gradients():
    """A sparse embedding gradient gives the accumulation source the norms of the same dense one."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (2, 6, 3))  # two micro-batches; ids repeat within each

    def run(sparse: bool) -> tuple[float, float]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Embedding(7, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 1))
        source = AccumulationSource(loss_divisor=2)
        source.attach(model)
        for micro in ids:
            (model(micro).square().mean() / 2).backward()
            source.micro_batch_done(micro.shape[0])
        norms = source.step_norms()
        assert model[0].weight.grad.is_sparse == sparse
        return float(norms.sq_norm_small), float(norms.sq_norm_big)

    dense_small, dense_big = run(False)
    sparse_small, sparse_big = run(True)
    assert sparse_small == pytest.approx(dense_small, rel=1e-6)
    assert sparse_big == pytest.approx(dense_big, rel=1e-6)

"""Op-level norm rules and batch-free outputs, against exact per-example gradients (torch.func, float64)."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns.sources.per_example_norms import PerExampleGradNorms
from lightning_gns.sources.rules.ops import OpCall


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: ``addmm`` on the flattened rows, weight stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class OffsetRMSNorm(nn.Module):
    """A litgpt/Gemma-style RMSNorm: the weight enters as ``1 + w``, cast to float."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight.float()).to(x.dtype)


class LayerScale(nn.Module):
    """timm's layer scale, in place, around a child with its own rule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(dim))
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(x).mul_(self.gamma)


class TokensAndPositions(nn.Module):
    """A ViT-style embedding: a class token expanded to the batch and learned positions added by broadcast."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, steps + 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.positions


class FunctionalNorms(nn.Module):
    """``F.layer_norm`` and ``F.rms_norm`` with the module's own affine parameters, and an ``F.linear`` head."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.ln_weight = nn.Parameter(torch.randn(dim))
        self.ln_bias = nn.Parameter(torch.randn(dim))
        self.rms_weight = nn.Parameter(torch.randn(dim))
        self.head = nn.Parameter(torch.randn(out, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (x.shape[-1],), self.ln_weight, self.ln_bias)
        x = F.rms_norm(x, (x.shape[-1],), self.rms_weight)
        return F.linear(x, self.head)


class Stack(nn.Module):
    def __init__(self, dim: int = 6, steps: int = 5) -> None:
        super().__init__()
        self.embed = TokensAndPositions(dim, steps)
        self.proj = Conv1D(dim, dim)
        self.norm = OffsetRMSNorm(dim)
        self.scale = LayerScale(dim)
        self.out = FunctionalNorms(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.scale(self.norm(torch.tanh(self.proj(self.embed(x))))))


def exact_sq_norms(model: nn.Module, x: Tensor) -> Tensor:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], x_i: Tensor) -> Tensor:
        return functional_call(model, p, (x_i.unsqueeze(0),)).square().sum()

    grads = vmap(grad(loss), in_dims=(None, 0))(params, x)
    return sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())


def test_modules_without_rules_are_exact_op_by_op_and_leave_grads_alone():
    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no unmeasured parameter
        with PerExampleGradNorms(model, strict=True) as norms:
            model(x).square().sum().backward()
    torch.testing.assert_close(norms.sq_norms(), exact_sq_norms(model, x), rtol=1e-6, atol=0)
    assert set(norms.sq_norms_by_module()) == {"embed", "proj", "norm", "scale", "scale.linear", "out"}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-6, atol=1e-9)


def test_op_level_norms_are_weighted_by_a_preconditioner():
    torch.manual_seed(1)
    model = Stack().double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    weights = {id(p): torch.rand_like(p) + 0.1 for p in model.parameters()}
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], x_i: Tensor) -> Tensor:
        return functional_call(model, p, (x_i.unsqueeze(0),)).square().sum()

    grads = vmap(grad(loss), in_dims=(None, 0))(params, x)
    by_name = dict(model.named_parameters())
    expected = sum(
        (g.square() * weights[id(by_name[name])]).reshape(g.shape[0], -1).sum(1) for name, g in grads.items()
    )
    with PerExampleGradNorms(model, preconditioner=lambda p: weights[id(p)]) as norms:
        model(x).square().sum().backward()
    torch.testing.assert_close(norms.sq_norms(), expected, rtol=1e-6, atol=0)


class PositionEmbeddingLM(nn.Module):
    """Positions looked up from ``arange(T)[None]``, a [1, T] batch-free input, as Hugging Face models do."""

    def __init__(self, vocab: int = 11, dim: int = 6, steps: int = 5) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(steps, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(positions)))


@pytest.mark.parametrize("told", [False, True], ids=["read_from_the_input", "set_by_the_caller"])
def test_a_batch_free_position_embedding_is_measured_per_example(told):
    torch.manual_seed(2)
    model = PositionEmbeddingLM().double()
    ids = torch.randint(0, 11, (4, 5))
    with PerExampleGradNorms(model) as norms:
        if told:
            norms.batch_size = 4
            out = model.head(torch.tanh(model.tokens(ids) + model.positions(torch.arange(5)[None])))
        else:
            out = model(ids)
        out.square().sum().backward()
    torch.testing.assert_close(norms.sq_norms(), exact_sq_norms(model, ids), rtol=1e-6, atol=0)


def test_a_parameter_of_unknown_use_falls_back_and_stays_exact():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.phase = nn.Parameter(torch.randn(6))

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.cos(self.phase)

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), Odd(), nn.Linear(6, 2)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"Odd .*`cos` takes a parameter"), PerExampleGradNorms(model) as norms:
        model(x).square().sum().backward()
    torch.testing.assert_close(norms.sq_norms(), exact_sq_norms(model, x), rtol=1e-6, atol=0)


class DroppedEmbedding(TokensAndPositions):
    """Hugging Face ViT's embeddings in training: class token and positions, then dropout, in one forward.

    ``mask`` (``[N, T + 1, D]``, 1 where kept) replays a draw instead, for the torch.func truth.
    """

    def __init__(self, dim: int, steps: int, p: float) -> None:
        super().__init__(dim, steps)
        self.p = p

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = super().forward(x)
        return F.dropout(h, self.p, self.training) if mask is None else h * mask / (1 - self.p)


class DroppedViT(nn.Module):
    def __init__(self, dim: int = 6, steps: int = 5, p: float = 0.3) -> None:
        super().__init__()
        self.embed = DroppedEmbedding(dim, steps, p)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(torch.tanh(self.embed(x, mask)))


def test_dropout_inside_a_module_measured_op_by_op_is_exact_and_draws_as_without():
    """ViT's pattern: the embeddings' parameters measured op by op, with a dropout drawn under the op capture.

    The capture is a ``TorchFunctionMode`` around that forward: it must not change the draw (the output, and so
    ``.grad``, equal those of a run without the engine), and the norms are those of this forward's mask.
    """
    torch.manual_seed(5)
    model = DroppedViT().double().train()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    kept: list[Tensor] = []
    handle = model.embed.register_forward_hook(lambda module, args, out: kept.append(out.detach() != 0))
    torch.manual_seed(6)
    plain = model(x)
    handle.remove()
    plain.square().sum().backward()
    plain_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no unmeasured parameter
        torch.manual_seed(6)
        with PerExampleGradNorms(model, strict=True) as norms:
            out = model(x)
            out.square().sum().backward()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the same draw
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-10, atol=0)
    (mask,) = kept
    assert bool(mask.any())
    assert not bool(mask.all())
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], x_i: Tensor, m_i: Tensor) -> Tensor:
        return functional_call(model, p, (x_i.unsqueeze(0), m_i.unsqueeze(0).to(x_i.dtype))).square().sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, mask)
    exact = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())
    torch.testing.assert_close(norms.sq_norms(), exact, rtol=1e-6, atol=0)
    assert set(norms.sq_norms_by_module()) == {"embed", "head"}


def test_a_projection_op_by_op_builds_no_per_example_gradient():
    """Conv1D's weight and bias each have a norm without building G_i: nothing is materialised (GPT-2's cost)."""
    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    with (
        mock.patch.object(OpCall, "per_example_grads", side_effect=AssertionError("built per-example gradients")),
        PerExampleGradNorms(model, strict=True) as norms,
    ):
        model(x).square().sum().backward()
    torch.testing.assert_close(norms.sq_norms(), exact_sq_norms(model, x), rtol=1e-9, atol=0)
    assert set(norms.sq_norms_by_module()) == {"0", "2"}

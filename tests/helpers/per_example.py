"""Ground truth for per-example gradient norms, and small models to measure.

Three independent truths, from the most to the least general:

- :func:`sq_norms_by_backward_per_example`: one batched forward, then one backward per example's
  own loss term (``retain_graph``). Exact for any model whose examples do not interact, with
  dropout included (every example keeps the mask it had in the batch).
- :func:`sq_norms_by_loop`: the naive loop, a forward and backward per example on its own.
- :func:`sq_norms_by_vmap`: ``torch.func.vmap(grad(...))`` over the examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def random_weights(model: nn.Module, seed: int = 0, spread: float = 1.5) -> dict[str, Tensor]:
    """Positive elementwise weights (a stand-in for a preconditioner's P²) spread over orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.exp(spread * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        for name, p in trainable(model).items()
    }


def _weighted_per_example(grads: dict[str, Tensor], weights: dict[str, Tensor] | None) -> Tensor:
    """Σ_j w_j g_ij² per example i, in float64, from per-example gradients ``{name: [N, *shape]}``."""
    total = None
    for name, g in grads.items():
        squared = g.double().square()
        if weights is not None:
            squared = squared * weights[name].double()
        value = squared.reshape(squared.shape[0], -1).sum(1)
        total = value if total is None else total + value
    assert total is not None
    return total


def _sq_norm(grads: tuple[Tensor | None, ...]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if g is not None:
            total = total + g.double().square().sum()
    return total


def sq_norms_by_backward_per_example(losses: Tensor, params: list[Tensor]) -> Tensor:
    """|∇ losses[i]|² for each i, from the graph of one batched forward."""
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        out.append(_sq_norm(grads))
    return torch.stack(out)


def sq_norms_by_loop(
    model: nn.Module, loss_fn: PerExampleLoss, inputs: Tensor, targets: Tensor, weights: dict[str, Tensor] | None = None
) -> Tensor:
    """The naive loop: each example through the model alone (batch of one); entries weighted by ``weights``."""
    named = trainable(model)
    params = list(named.values())
    out = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if weights is None:
            out.append(_sq_norm(grads))
        else:
            present = {n: g[None] for n, g in zip(named, grads, strict=True) if g is not None}
            out.append(_weighted_per_example(present, weights)[0])
    return torch.stack(out)


def sq_norms_by_vmap(
    model: nn.Module, loss_fn: PerExampleLoss, inputs: Tensor, targets: Tensor, weights: dict[str, Tensor] | None = None
) -> Tensor:
    """torch.func per-example gradients: vmap over examples of grad of the example's loss (entries weighted)."""
    params = {name: p.detach() for name, p in trainable(model).items()}
    buffers = {name: b for name, b in model.named_buffers()}

    def example_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**buffers, **p}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return _weighted_per_example(grads, weights)


def layer_sq_norms_by_vmap(
    layer: nn.Module, inputs: Tensor, grad_output: Tensor, weights: dict[str, Tensor] | None = None
) -> Tensor:
    """Exact |g_i|² (or Σ_j w_j g_ij²) of one layer for the loss Σ_i <layer(x)_i, grad_output_i>."""
    params = {name: p.detach() for name, p in trainable(layer).items()}
    buffers = {name: b for name, b in layer.named_buffers()}

    def example_dot(p: dict[str, Tensor], x: Tensor, g: Tensor) -> Tensor:
        return (functional_call(layer, {**buffers, **p}, (x.unsqueeze(0),)) * g.unsqueeze(0)).sum()

    grads = vmap(grad(example_dot), in_dims=(None, 0, 0))(params, inputs, grad_output)
    return _weighted_per_example(grads, weights)


def layer_sq_norms_by_backward(
    layer: nn.Module, inputs: Tensor, grad_output: Tensor, weights: dict[str, Tensor] | None = None
) -> Tensor:
    """The same truth as :func:`layer_sq_norms_by_vmap`, from one batched forward and a backward per example."""
    per_example = (layer(inputs) * grad_output).flatten(1).sum(1)
    params = trainable(layer)
    if weights is None:
        return sq_norms_by_backward_per_example(per_example, list(params.values()))
    out = []
    for i in range(per_example.shape[0]):
        grads = torch.autograd.grad(per_example[i], list(params.values()), retain_graph=True)
        out.append(_weighted_per_example({n: g[None] for n, g in zip(params, grads, strict=True)}, weights)[0])
    return torch.stack(out)


def reduce_loss(per_example: Tensor, reduction: str) -> Tensor:
    return per_example.sum() if reduction == "sum" else per_example.mean()


def reduction_factor(batch: int, reduction: str) -> float:
    """What a reduction does to squared per-example norms: 1 for sum, 1/N² for mean."""
    return 1.0 if reduction == "sum" else 1.0 / batch**2


# ---------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, in_features: int = 6, hidden: int = 16, out_features: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class TransformerBlock(nn.Module):
    """Embedding, pre-LayerNorm self-attention (nn.MultiheadAttention) and a GELU MLP, then a head."""

    def __init__(self, vocab: int = 13, dim: int = 16, heads: int = 2, max_len: int = 8, causal: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.causal = causal

    def forward(self, ids: Tensor) -> Tensor:
        batch, length = ids.shape
        # Positions expanded to [N, T]: an unbatched [T] call would sum the examples' gradients.
        h = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device).expand(batch, length))
        a = self.ln1(h)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device) if self.causal else None
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False, is_causal=self.causal)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


def cross_entropy_per_example(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example loss: summed over the positions of a sequence (an example is a sequence)."""
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, targets, reduction="none")
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return losses.sum(1)

r"""Per-example gradients of a parameter used by several calls, combined without the :mod:`torch.func` replay.

A parameter that is used more than once in one forward (a language model's embedding table tied to its output
head, a module called twice) has per-example gradients that are the *sum* of every call's:
:math:`G_i = \sum_c G_i^{(c)}`, and :math:`\|G_i\|^2` has cross terms between calls. The layers that share
weights in practice (Linear, Embedding) give their per-example gradient as a sum of outer products over
positions, :class:`OuterTerms`:

.. math::

    G_i^{(c)} = \sum_t l^{(c)}_{i,t} \, r^{(c)\,T}_{i,t}

with :math:`l` the output gradient and :math:`r` the input of a Linear, or :math:`l` the one-hot row of the id
and :math:`r` the output gradient of an Embedding. The squared norm of the sum is then a sum over pairs of
calls of Gram products over positions ("ghost norms", as for one Linear):

.. math::

    \|G_i\|^2 = \sum_{c,d} \sum_{t,s} (l^{(c)}_{i,t} \cdot l^{(d)}_{i,s}) (r^{(c)}_{i,t} \cdot r^{(d)}_{i,s})

where an id's one-hot row dotted with a dense row is a lookup (:math:`l^{(d)}_{i,s}[id^{(c)}_{i,t}]`) and two
one-hot rows dot to ``[id = id']``. For a GPT-2 head of vocabulary ``V`` and width ``D`` tied to its table,
that is ``T²(V + D)`` per example, against ``T·V·D`` to build :math:`G_i` (which :func:`combined_sq_norm` does
instead when it is cheaper, and always for weighted norms, whose weights apply entrywise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_gns.sources.rules.embedding import embedding_rows
from lightning_gns.sources.rules.linear import accumulation_dtype, weighted_sum_sq

__all__ = ["OuterTerms", "OuterTermsRule", "combined_sq_norm", "embedding_outer_terms", "linear_outer_terms"]

OuterTermsRule = Callable[[nn.Module, tuple[Tensor, ...], Tensor], "dict[str, OuterTerms] | None"]
"""``(module, inputs, grad_output) -> {parameter name: OuterTerms} | None``: a layer's per-example gradients as
factors, for every trainable parameter of the module (``None``: this call cannot, it is replayed instead)."""


@dataclass(frozen=True)
class OuterTerms:
    """A per-example gradient ``G_i = Σ_t l_{i,t} r_{i,t}ᵀ`` of a parameter, kept as its factors.

    Attributes:
        left: ``[N, T, R]`` dense rows, or ``[N, T]`` integer ids, each the one-hot row of length ``R`` (an
            embedding's looked-up rows).
        right: ``[N, T, C]``.
        shape: the parameter's shape: ``(R, C)``, or ``(R,)`` for a vector (a bias, with ``C = 1``).

    Example::

        >>> g, a = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
        >>> OuterTerms(g, a, (4, 5)).materialise()[0, 0, 0]  # Σ_t 1·1 over 3 positions
        tensor(3.)
    """

    left: Tensor
    right: Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        rows = self.shape[0]
        columns = 1 if len(self.shape) == 1 else self.shape[1]
        dense = self.left.dim() == 3
        if len(self.shape) not in (1, 2) or self.right.dim() != 3 or self.right.shape[2] != columns:
            raise ValueError(f"`right` must be [N, T, {columns}] for a parameter of shape {self.shape}.")
        if self.left.shape[:2] != self.right.shape[:2] or (dense and self.left.shape[2] != rows):
            raise ValueError(
                f"`left` must be [N, T, {rows}] (or [N, T] ids) with the N, T of `right` {tuple(self.right.shape)}; "
                f"got {tuple(self.left.shape)}."
            )

    @property
    def is_ids(self) -> bool:
        """Whether ``left`` holds ids (one-hot rows) rather than dense rows."""
        return self.left.dim() == 2

    @property
    def batch_size(self) -> int:
        """``N``."""
        return int(self.right.shape[0])

    def materialise(self) -> Tensor:
        """``[N, *shape]``: the per-example gradients, built."""
        batch, steps, columns = self.right.shape
        if self.is_ids:
            built = self.right.new_zeros(batch, self.shape[0], columns)
            built.scatter_add_(1, self.left.unsqueeze(-1).expand(batch, steps, columns), self.right)
        else:
            built = torch.bmm(self.left.transpose(1, 2), self.right)
        return built.reshape(batch, *self.shape)

    def materialise_cost(self) -> int:
        """Multiply-adds per example to build ``G_i``."""
        steps, columns = self.right.shape[1], self.right.shape[2]
        return steps * columns * (1 if self.is_ids else self.shape[0])


def _cross(a: OuterTerms, b: OuterTerms) -> Tensor:
    """``[N]``: ``<G_i^a, G_i^b>`` from the factors, by Gram products over the positions of both."""
    right_gram = torch.bmm(a.right, b.right.transpose(1, 2))  # [N, Ta, Tb]
    if a.is_ids and b.is_ids:
        left_gram = (a.left.unsqueeze(2) == b.left.unsqueeze(1)).to(right_gram.dtype)
    elif a.is_ids:
        # l^b_s[id^a_t]: the dense rows of b read at a's ids.
        left_gram = b.left.gather(2, a.left.unsqueeze(1).expand(-1, b.left.shape[1], -1)).transpose(1, 2)
    elif b.is_ids:
        left_gram = a.left.gather(2, b.left.unsqueeze(1).expand(-1, a.left.shape[1], -1))
    else:
        left_gram = torch.bmm(a.left, b.left.transpose(1, 2))
    return (left_gram * right_gram).sum((1, 2))


def _gram_cost(a: OuterTerms, b: OuterTerms) -> int:
    left = 0 if a.is_ids or b.is_ids else a.shape[0]
    return a.right.shape[1] * b.right.shape[1] * (left + a.right.shape[2])


def combined_sq_norm(terms: Sequence[OuterTerms | Tensor], weight: Tensor | None = None) -> Tensor:
    """``[N]``: the squared norm of each example's gradient summed over calls, ``Σ_j W_j (Σ_c G^{(c)}_{ij})²``.

    Gram products over positions when every call gives :class:`OuterTerms`, the weight is ``None`` and that is
    cheaper than building the gradients; otherwise every call's ``G_i`` is built (dense tensors ``[N, *shape]``
    are taken as built) and summed.

    Args:
        terms: each call's per-example gradient of one parameter, all with the same ``N`` and shape.
        weight: the elementwise weight of the squared entries (the parameter's shape), or ``None``.

    Returns:
        ``[N]`` in float32, or float64 when any term is float64.

    Raises:
        ValueError: if the calls saw different batch sizes.

    Example::

        >>> ids = torch.tensor([[0, 1]])  # a table row 0 and 1 looked up; a head reading the same table
        >>> table = OuterTerms(ids, torch.ones(1, 2, 3), (4, 3))
        >>> head = OuterTerms(torch.ones(1, 1, 4), torch.ones(1, 1, 3), (4, 3))
        >>> combined_sq_norm([table, head])  # rows 0, 1 hold 2s, rows 2, 3 hold 1s
        tensor([30.])
        >>> combined_sq_norm([table.materialise(), head.materialise()])
        tensor([30.])
    """
    sizes = {int(t.batch_size if isinstance(t, OuterTerms) else t.shape[0]) for t in terms}
    if len(sizes) > 1:
        raise ValueError(
            f"The calls that share a parameter saw different batch sizes ({sorted(sizes)}); per-example norms "
            "need every call to see the same N examples along dim 0."
        )
    dtype = torch.float64 if any(_dtype(t) == torch.float64 for t in terms) else torch.float32
    factored = [t for t in terms if isinstance(t, OuterTerms)]
    if weight is None and len(factored) == len(terms):
        gram_cost = sum(_gram_cost(a, b) for i, a in enumerate(factored) for b in factored[i:])
        if gram_cost < sum(t.materialise_cost() for t in factored) + _numel(factored[0].shape):
            factored = [_as_dtype(t, dtype) for t in factored]
            total = sum(_cross(a, a) for a in factored)
            for i, a in enumerate(factored):
                for b in factored[i + 1 :]:
                    total = total + 2 * _cross(a, b)
            assert isinstance(total, Tensor)  # at least one term
            return total
    summed: Tensor | None = None
    for term in terms:
        built = (_as_dtype(term, dtype).materialise() if isinstance(term, OuterTerms) else term).to(dtype)
        summed = built if summed is None else summed + built
    assert summed is not None  # at least one term
    return weighted_sum_sq(summed, None if weight is None else weight.to(dtype))


def linear_outer_terms(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, OuterTerms]:
    """The per-example gradients of a :class:`torch.nn.Linear` as factors: output gradient ⊗ input, per position.

    Example::

        >>> layer = nn.Linear(3, 2)
        >>> terms = linear_outer_terms(layer, (torch.ones(4, 5, 3),), torch.ones(4, 5, 2))
        >>> terms["weight"].materialise().shape, terms["bias"].materialise()[0]
        (torch.Size([4, 2, 3]), tensor([5., 5.]))
    """
    batch = grad_output.shape[0]
    grad = grad_output.reshape(batch, -1, grad_output.shape[-1])
    terms = {}
    weight, bias = module.weight, module.bias
    if isinstance(weight, Tensor) and weight.requires_grad:
        activation = inputs[0].reshape(batch, -1, inputs[0].shape[-1])
        terms["weight"] = OuterTerms(grad, activation, tuple(weight.shape))
    if isinstance(bias, Tensor) and bias.requires_grad:
        terms["bias"] = OuterTerms(grad, grad.new_ones(*grad.shape[:2], 1), tuple(bias.shape))
    return terms


def embedding_outer_terms(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
) -> dict[str, OuterTerms] | None:
    """The per-example gradients of a :class:`torch.nn.Embedding` as factors: the id's one-hot row ⊗ its gradient.

    Example::

        >>> emb = nn.Embedding(5, 2)
        >>> terms = embedding_outer_terms(emb, (torch.tensor([[1, 1]]),), torch.ones(1, 2, 2))
        >>> terms["weight"].materialise()[0, 1]  # row 1 looked up twice
        tensor([2., 2.])
    """
    if not isinstance(module, nn.Embedding):
        return None
    if not module.weight.requires_grad:
        return {}
    ids, rows = embedding_rows(
        inputs[0], grad_output, module.num_embeddings, module.padding_idx, module.scale_grad_by_freq
    )
    return {"weight": OuterTerms(ids, rows, tuple(module.weight.shape))}


def _dtype(term: OuterTerms | Tensor) -> torch.dtype:
    return accumulation_dtype(term.right if isinstance(term, OuterTerms) else term)


def _as_dtype(term: OuterTerms, dtype: torch.dtype) -> OuterTerms:
    left = term.left if term.is_ids else term.left.to(dtype)
    return OuterTerms(left, term.right.to(dtype), term.shape)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())

"""Parameters used by several calls (tied embedding and head, a module called twice), combined from factors.

The engine sums each example's gradient over the calls before squaring, from the factors of Linear and
Embedding (rules.shared), never through the torch.func replay. Truth: one backward per example's own loss
term through a batched forward (exact, also for ``scale_grad_by_freq``, whose counts are batch-wide).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import Tensor, nn

from lightning_gns.sources import per_example_norms
from lightning_gns.sources.per_example_norms import PerExampleGradNorms
from lightning_gns.sources.rules.shared import OuterTerms, combined_sq_norm
from tests.helpers.per_example import (
    cross_entropy_per_example,
    random_weights,
    sq_norms_by_backward_per_example,
)


class TiedLM(nn.Module):
    """Table and head share one weight; positions from a second table, the head with its own bias."""

    def __init__(self, vocab: int, dim: int, steps: int, padding_idx: int | None, scale: bool, bias: bool) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=padding_idx, scale_grad_by_freq=scale)
        self.positions = nn.Embedding(steps, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=bias)
        self.head.weight = self.tokens.weight

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]).expand_as(ids))
        return self.head(torch.tanh(self.mix(hidden)))


def _truth(model: nn.Module, ids: Tensor, targets: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
    losses = cross_entropy_per_example(model(ids), targets)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights is None:
        return sq_norms_by_backward_per_example(losses, list(named.values()))
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(named.values()), retain_graph=True)
        out.append(sum((g.double().square() * weights[n].double()).sum() for n, g in zip(named, grads, strict=True)))
    return torch.stack(out)


def _no_replay(*args, **kwargs):
    raise AssertionError("the torch.func replay ran for a group whose calls have outer terms")


@pytest.mark.parametrize(
    ("vocab", "dim", "steps", "padding_idx", "scale", "bias", "built"),
    [
        (50, 8, 3, None, False, False, False),  # short sequences against the table: Gram products
        (40, 8, 4, 0, True, True, False),  # padding row and batch-wide frequency scaling; a head bias
        (5, 4, 40, 2, False, True, True),  # long sequences against a small table: the gradients are built
    ],
)
def test_tied_table_and_head_are_exact_without_the_replay(vocab, dim, steps, padding_idx, scale, bias, built):
    torch.manual_seed(0)
    model = TiedLM(vocab, dim, steps, padding_idx, scale, bias).double()
    ids, targets = torch.randint(0, vocab, (5, steps)), torch.randint(0, vocab, (5, steps))
    ids[0, 1:3] = ids[0, 0]  # an id repeated within an example
    materialise = mock.patch.object(OuterTerms, "materialise", autospec=True, side_effect=OuterTerms.materialise)
    with (
        mock.patch.object(per_example_norms, "per_example_grads", _no_replay),
        materialise as materialised,
        PerExampleGradNorms(model) as norms,
    ):
        cross_entropy_per_example(model(ids), targets).sum().backward()
    assert "tokens+head" in norms.sq_norms_by_module()
    built_shapes = {call.args[0].shape for call in materialised.call_args_list}
    assert ((vocab, dim) in built_shapes) == built  # the shared table (a head bias, alone, is always summed)
    torch.testing.assert_close(norms.sq_norms().double(), _truth(model, ids, targets), rtol=1e-9, atol=0)


def test_tied_weights_preconditioned():
    torch.manual_seed(1)
    model = TiedLM(11, 5, 7, 0, False, True).double()
    ids, targets = torch.randint(0, 11, (4, 7)), torch.randint(0, 11, (4, 7))
    weights = random_weights(model)
    by_id = {id(p): weights[n] for n, p in model.named_parameters()}
    with PerExampleGradNorms(model, preconditioner=lambda p: by_id[id(p)]) as norms:
        cross_entropy_per_example(model(ids), targets).sum().backward()
    expected = _truth(model, ids, targets, weights)
    torch.testing.assert_close(norms.sq_norms().double(), expected, rtol=1e-9, atol=0)
    assert not torch.allclose(expected, _truth(model, ids, targets), rtol=0.05)  # the weights matter


def test_linear_called_on_two_sequences():
    torch.manual_seed(2)
    shared, head = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()
    model = nn.ModuleDict({"shared": shared, "head": head})
    x = torch.randn(6, 8, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (6, 8))

    def forward() -> Tensor:
        return head(torch.tanh(shared(torch.tanh(shared(x)))))

    with mock.patch.object(per_example_norms, "per_example_grads", _no_replay), PerExampleGradNorms(model) as norms:
        cross_entropy_per_example(forward(), targets).sum().backward()
    losses = cross_entropy_per_example(forward(), targets)
    expected = sq_norms_by_backward_per_example(losses, list(model.parameters()))
    torch.testing.assert_close(norms.sq_norms().double(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("left_ids", [False, True])
@pytest.mark.parametrize("right_ids", [False, True])
def test_combined_sq_norm_gram_and_built_forms_agree(left_ids, right_ids):
    gen = torch.Generator().manual_seed(3)
    batch, rows, columns = 3, 7, 5

    def terms(ids: bool, steps: int) -> OuterTerms:
        left = (
            torch.randint(0, rows, (batch, steps), generator=gen)
            if ids
            else torch.randn(batch, steps, rows, generator=gen, dtype=torch.float64)
        )
        return OuterTerms(left, torch.randn(batch, steps, columns, generator=gen, dtype=torch.float64), (rows, columns))

    a, b = terms(left_ids, 2), terms(right_ids, 3)  # few positions: the Gram form is the cheaper
    built = a.materialise() + b.materialise()
    # An independent build of G_i: explicit one-hot rows.
    dense = [t.left if not t.is_ids else nn.functional.one_hot(t.left, rows).double() for t in (a, b)]
    explicit = sum(torch.einsum("ntr,ntc->nrc", d, t.right) for d, t in zip(dense, (a, b), strict=True))
    torch.testing.assert_close(built, explicit)
    expected = explicit.square().sum((1, 2))
    torch.testing.assert_close(combined_sq_norm([a, b]), expected)
    torch.testing.assert_close(combined_sq_norm([a, b.materialise()]), expected)
    weight = torch.rand(rows, columns, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(combined_sq_norm([a, b], weight), (explicit.square() * weight).sum((1, 2)))


def test_calls_with_different_batch_sizes_are_refused():
    a = OuterTerms(torch.ones(2, 3, 4), torch.ones(2, 3, 5), (4, 5))
    b = OuterTerms(torch.ones(3, 3, 4), torch.ones(3, 3, 5), (4, 5))
    with pytest.raises(ValueError, match=r"different batch sizes \(\[2, 3\]\)"):
        combined_sq_norm([a, b])
    with pytest.raises(ValueError, match=r"`right` must be \[N, T, 5\]"):
        OuterTerms(torch.ones(2, 3, 4), torch.ones(2, 3, 6), (4, 5))

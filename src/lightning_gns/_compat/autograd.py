"""How a loss reduces over its examples, read off the top of its autograd graph (private node attributes)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["loss_reduction_of"]

# Nodes a loss passes through on its way from the reduction to backward when it is only rescaled by a constant
# (Lightning divides by accumulate_grad_batches; users weight a loss; AMP scales it).
_SCALINGS = ("DivBackward0", "DivBackward1", "MulBackward0", "MulBackward1", "NegBackward0")
# `_saved_reduction` of loss nodes (NllLossBackward0, MseLossBackward0, ...): torch's Reduction enum.
_REDUCTION_ENUM = {1: "mean", 2: "sum"}


def loss_reduction_of(loss: Tensor) -> Literal["mean", "sum"] | None:
    """``"mean"`` or ``"sum"`` if the graph of ``loss`` shows how it reduced over examples, else ``None``.

    Follows the graph down through multiplications and divisions by constants to the first other node: a
    ``mean()``/``sum()``, or a loss function whose node saved its ``reduction`` (cross-entropy, MSE, ...).
    Anything else (a sum of two losses, a custom reduction) is not recognised.

    Example::

        >>> import torch
        >>> logits, labels = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
        >>> loss_reduction_of(torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / 2)
        'sum'
        >>> loss_reduction_of(logits.square().mean()), loss_reduction_of(logits.sum() + logits.mean())
        ('mean', None)
    """
    node = loss.grad_fn
    for _ in range(16):
        if node is None:
            return None
        name = type(node).__name__
        if name in _SCALINGS:
            inputs = [fn for fn, _ in node.next_functions if fn is not None]
            if len(inputs) != 1:  # scaled by another tensor that needs a gradient: not a constant
                return None
            node = inputs[0]
            continue
        if name == "MeanBackward0":
            return "mean"
        if name in ("SumBackward0", "SumBackward1"):
            return "sum"
        reduction = getattr(node, "_saved_reduction", None)
        return _REDUCTION_ENUM.get(int(reduction)) if isinstance(reduction, int) else None  # type: ignore[return-value]
    return None

"""How the training loss reduces over the examples of a micro-batch: declared, or read off its autograd graph."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from torch import Tensor

from lightning_gns._compat.autograd import saved_operand, saved_reduction

__all__ = ["LossReduction", "ReductionInGraph", "check_loss_reduction", "infer_loss_reduction", "reduction_in_graph"]

LossReduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")


def check_loss_reduction(value: str) -> LossReduction:
    """``value`` if it is ``"mean"`` or ``"sum"``, else a ``ValueError`` that says what is accepted."""
    if value not in _REDUCTIONS:
        raise ValueError(
            f"Expected `loss_reduction` to be 'mean' (the loss is the mean over the micro-batch's examples, the "
            f"default of every torch loss) or 'sum' (their sum), but got {value!r}."
        )
    return value  # type: ignore[return-value]  # checked just above


class ReductionInGraph(NamedTuple):
    """What the top of a loss's autograd graph says about its reduction over examples.

    Attributes:
        reduction: ``"mean"`` or ``"sum"`` for the node that reduces over the examples, ``None`` when the walk met
            a node it does not know.
        factor: the product of the constant factors between that node and the loss (Lightning's
            ``1 / accumulate_grad_batches``, AMP's loss scale, the user's own).
        node: the class name of the node where the walk stopped (for messages).
    """

    reduction: LossReduction | None
    factor: float
    node: str


# Nodes that pass a scalar through unchanged (a dtype cast under AMP, a view) or negate it.
_PASS_THROUGH = {"ToCopyBackward0", "CloneBackward0", "AliasBackward0", "ViewBackward0"}
_NEGATE = "NegBackward0"
# torch's reduction enum as loss nodes save it (`torch.nn._reduction.get_enum`): 0 none, 1 mean, 2 sum.
_SAVED_REDUCTION: dict[int, LossReduction] = {1: "mean", 2: "sum"}


def reduction_in_graph(loss: Tensor, max_depth: int = 16) -> ReductionInGraph:
    """Walk down from ``loss`` through constant factors to the node that reduces over the examples.

    Recognised: ``x.sum()`` and ``x.mean()`` (also over given dims), and every loss node that saves its
    ``reduction`` (``cross_entropy``/``nll_loss``, ``mse_loss``, ``smooth_l1_loss``, ``huber_loss``, the binary
    cross-entropies), under any number of multiplications or divisions by a constant (a Python number or a tensor
    that needs no gradient), casts and negations. Reading a constant tensor's value syncs with its device: this
    is meant to run once, at the first backward pass.

    Node class names and what the nodes saved are not a public interface of torch: the saved values are read
    through :mod:`lightning_gns._compat.autograd` (checked on torch 2.5-2.13), so that a torch upgrade that
    renames them costs one function there. An unknown node ends the walk with ``reduction=None``, never an
    error.
    """
    node = loss.grad_fn
    factor = 1.0
    for _ in range(max_depth):
        if node is None:
            return ReductionInGraph(None, factor, "None")
        name = type(node).__name__
        reduction = saved_reduction(node)
        if name in ("SumBackward0", "SumBackward1"):
            return ReductionInGraph("sum", factor, name)
        if name in ("MeanBackward0", "MeanBackward1"):
            return ReductionInGraph("mean", factor, name)
        if reduction is not None:
            return ReductionInGraph(_SAVED_REDUCTION.get(reduction), factor, name)
        inputs = [next_node for next_node, _ in node.next_functions if next_node is not None]
        if name in _PASS_THROUGH or name == _NEGATE:
            factor = -factor if name == _NEGATE else factor
        elif name in ("MulBackward0", "DivBackward0", "MulBackward1", "DivBackward1") and len(inputs) == 1:
            # `x * c`, `c * x` or `x / c` with a constant c: the input that carries a gradient is the loss.
            loss_is_self = node.next_functions[0][0] is not None
            if name.startswith("Div") and not loss_is_self:
                return ReductionInGraph(None, factor, name)  # c / x is no constant factor
            constant = saved_operand(node, "other" if loss_is_self else "self")
            if isinstance(constant, Tensor):
                if constant.numel() != 1:
                    return ReductionInGraph(None, factor, name)
                constant = constant.item()
            if not isinstance(constant, int | float) or constant == 0:
                return ReductionInGraph(None, factor, name)
            factor = factor / constant if name.startswith("Div") else factor * constant
        else:
            return ReductionInGraph(None, factor, name)
        node = inputs[0] if len(inputs) == 1 else None
    return ReductionInGraph(None, factor, "(deeper)")


def infer_loss_reduction(
    loss: Tensor, loss_divisor: float = 1.0, num_examples: int | None = None, loss_scale: float = 1.0
) -> tuple[LossReduction | None, ReductionInGraph]:
    """The reduction of a Lightning training loss over its micro-batch's examples, or ``None`` when unsure.

    A mean stays a mean whatever it is multiplied by. A sum is a sum only when the factors above it are exactly
    the known ones (Lightning's ``1 / loss_divisor`` and AMP's ``loss_scale``); a sum divided by the micro-batch's
    ``num_examples`` (``kl_div(reduction="batchmean")``, ``loss.sum() / len(x)``) is a mean; a sum under any other
    factor (a token count, a weight) is left undecided, since the graph cannot tell what the factor means.

    Args:
        loss: the loss as the first backward pass receives it.
        loss_divisor: what Lightning divided it by (``accumulate_grad_batches``).
        num_examples: the micro-batch's examples, or ``None`` if unknown.
        loss_scale: the AMP loss scale it carries (1 without a GradScaler).

    Returns:
        ``(reduction or None, what the graph showed)``.
    """
    found = reduction_in_graph(loss)
    if found.reduction != "sum":
        return found.reduction, found
    # The sign does not matter to gradient norms (a negated log-likelihood sum is a sum).
    user_factor = abs(found.factor) * loss_divisor / loss_scale
    if math.isclose(user_factor, 1.0, rel_tol=1e-6):
        return "sum", found
    if num_examples is not None and math.isclose(user_factor * num_examples, 1.0, rel_tol=1e-6):
        return "mean", found
    return None, found

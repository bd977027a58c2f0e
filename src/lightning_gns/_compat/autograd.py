"""What a node of an autograd graph saved for its backward: private attributes of torch's generated nodes.

Autograd nodes (``loss.grad_fn`` and its ``next_functions``) are public objects, but the names of their classes
(``SumBackward0``) and the ``_saved_*`` attributes holding what the forward saved are generated from torch's
``derivatives.yaml`` and carry no stability promise. :mod:`lightning_gns.sources.loss_reduction` reads them only
through these functions, each of which answers ``None`` (never raises) for a node that does not have what it asks.
"""

from __future__ import annotations

from typing import Any

__all__ = ["saved_operand", "saved_reduction"]


def saved_reduction(node: Any) -> int | None:
    """The ``reduction`` a loss node saved (torch's enum: 0 none, 1 mean, 2 sum), or ``None`` if it saved none.

    Checked on torch 2.5.0-2.13.0: ``NllLossBackward0``, ``MseLossBackward0``, ``SmoothL1LossBackward0``,
    ``HuberLossBackward0``, ``BinaryCrossEntropyBackward0`` and ``BinaryCrossEntropyWithLogitsBackward0`` save it
    as ``_saved_reduction``.

    Example::

        >>> import torch
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> saved_reduction(torch.nn.functional.mse_loss(x, torch.zeros(3, 2), reduction="sum").grad_fn)
        2
        >>> saved_reduction(x.sum().grad_fn) is None
        True
    """
    value = getattr(node, "_saved_reduction", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def saved_operand(node: Any, which: str) -> Any:
    """The operand a ``Mul``/``Div`` node saved: ``which="other"`` for ``x * c``/``x / c``, ``"self"`` for ``c * x``.

    A tensor (0-d for a Python number, which torch wraps), or a Python number where the node keeps the scalar
    (``MulBackward1``/``DivBackward1``); ``None`` when the node saved no such operand.

    Checked on torch 2.5.0-2.13.0 (``_saved_other``, ``_saved_self``).

    Example::

        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> saved_operand((x.sum() / 4).grad_fn, "other"), saved_operand((x.sum() * torch.tensor(3.0)).grad_fn, "other")
        (tensor(4), tensor(3.))
    """
    if which not in ("self", "other"):
        raise ValueError(f"Expected `which` to be 'self' or 'other', but got {which!r}.")
    return getattr(node, f"_saved_{which}", None)

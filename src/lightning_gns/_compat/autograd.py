"""The autograd engine's private surface: what a node saved for its backward, and the engine's own state.

Autograd nodes (``loss.grad_fn`` and its ``next_functions``) are public objects, but the names of their classes
(``SumBackward0``) and the ``_saved_*`` attributes holding what the forward saved are generated from torch's
``derivatives.yaml`` and carry no stability promise. :mod:`lightning_gns.sources.loss_reduction` and the norm
rules read them only through these functions, each of which answers ``None`` (never raises) for a node that does
not have what it asks.

The per-example engine also needs to know, from inside a hook, which backward pass is running and whether it
reaches a node, and to run a callback when that pass ends: ``torch._C`` functions and the execution engine's
``queue_callback``, read here only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "as_non_view",
    "current_graph_task_id",
    "is_view",
    "queue_engine_callback",
    "saved_mean_rstd",
    "saved_operand",
    "saved_reduction",
    "saved_tensors_hooks_active",
    "will_engine_execute",
]


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


def saved_mean_rstd(node: Any) -> tuple[Tensor, Tensor] | None:
    """The mean and reciprocal standard deviation a layer or group norm node saved, or ``None``.

    Checked on torch 2.5.0-2.13.0: ``NativeLayerNormBackward0`` and ``NativeGroupNormBackward0`` save them as
    ``_saved_result1`` and ``_saved_result2``. ``None`` also when they were already freed (a second backward).

    Example::

        >>> import torch
        >>> out = torch.nn.functional.layer_norm(torch.tensor([[3.0, 1.0]], requires_grad=True), (2,))
        >>> saved_mean_rstd(out.grad_fn)
        (tensor([[2.]]), tensor([[1.0000]]))
        >>> saved_mean_rstd(out.sum().grad_fn) is None
        True
    """
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):  # renamed, or already freed
        return None
    if not (isinstance(mean, Tensor) and isinstance(rstd, Tensor)):
        return None
    return mean, rstd


def current_graph_task_id() -> int:
    """An id of the backward pass running on this thread, ``-1`` outside one.

    Checked on torch 2.5.0-2.13.0 (``torch._C._current_graph_task_id``); each ``backward()`` or
    ``torch.autograd.grad`` call gets a new id, which tensor and module hooks read while it runs.

    Example::

        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> seen = []
        >>> _ = x.register_hook(lambda g: seen.append(current_graph_task_id()))
        >>> x.sum().backward()
        >>> current_graph_task_id(), seen[0] != -1
        (-1, True)
    """
    return int(torch._C._current_graph_task_id())


def will_engine_execute(node: Any) -> bool:
    """Whether the backward pass running now executes ``node`` (an autograd node, e.g. a leaf's accumulator).

    Checked on torch 2.5.0-2.13.0 (``torch._C._will_engine_execute_node``). Raises ``RuntimeError`` outside a
    backward pass, and within ``torch.autograd.grad`` for a node that it does not say (a leaf's accumulator).

    Example::

        >>> import torch
        >>> a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> nodes = [torch.autograd.graph.get_gradient_edge(t).node for t in (a, b)]
        >>> seen = []
        >>> _ = a.register_hook(lambda g: seen.extend(will_engine_execute(n) for n in nodes))
        >>> (a * 2).sum().backward()
        >>> seen
        [True, False]
    """
    return bool(torch._C._will_engine_execute_node(node))


def queue_engine_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` once when the backward pass running now has finished (on the thread that started it).

    Checked on torch 2.5.0-2.13.0 (``torch.autograd.Variable._execution_engine.queue_callback``); it must be
    called from inside a backward pass (a hook), else ``RuntimeError``.

    Example::

        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> order = []
        >>> _ = x.register_hook(lambda g: queue_engine_callback(lambda: order.append("end")) or order.append("hook"))
        >>> x.sum().backward()
        >>> order
        ['hook', 'end']
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def saved_tensors_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, CPU offloading) pack what the forward saves right now.

    Checked on torch 2.5.0-2.13.0: exact where torch can be asked
    (``torch._C._autograd._top_saved_tensors_default_hooks``: 2.13.0 can, 2.5.0 cannot); a torch that cannot be
    asked always answers ``True``: the caller then assumes hooks are there and does not unpack saved tensors
    itself (LayerNorm and GroupNorm recompute their statistics instead of reading them).

    Example::

        >>> import torch
        >>> with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        ...     saved_tensors_hooks_active()
        True
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def is_view(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a view of another tensor (shares its storage and autograd history's base).

    Checked on torch 2.5.0-2.13.0 (``Tensor._is_view``).

    Example::

        >>> import torch
        >>> x = torch.ones(2, 3)
        >>> is_view(x[0]), is_view(x)
        (True, False)
    """
    return bool(tensor._is_view())


class _NotAView(torch.autograd.Function):
    """Identity whose output is not a view, so that a hook on it survives in-place ops."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def as_non_view(tensor: Tensor) -> Tensor:
    """``tensor`` itself if it is not a view, else an alias of it that is not a view, with the same gradient.

    A hook registered on a view is lost when a later in-place op (``ReLU(inplace=True)``) rebases the view's
    history; a hook on the alias survives it. Checked on torch 2.5.0-2.13.0 (``Tensor._is_view``).

    Example::

        >>> import torch
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> alias = as_non_view(x[0])
        >>> is_view(alias), torch.equal(alias, x[0])
        (False, True)
    """
    if not is_view(tensor):
        return tensor
    return _NotAView.apply(tensor)

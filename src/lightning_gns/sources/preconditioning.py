r"""The diagonal preconditioner of an Adam-family optimizer, as a weight on squared gradient entries.

Adam moves each parameter by its gradient divided by :math:`\sqrt{\hat v} + \epsilon`, elementwise. The noise
scale that describes such an update is that of the *preconditioned* gradient :math:`P \odot g` with
:math:`P = 1/(\sqrt{\hat v} + \epsilon)` (AdaptDL/Pollux). Every squared norm then becomes
:math:`|P \odot g|^2 = \sum_j P_j^2 g_j^2`: the sources only need the elementwise weight :math:`P^2` of each
parameter, which a :data:`Preconditioner` hands them, computed on the fly (no parameter-sized buffer is kept).

Which :math:`\hat v`: the optimizer's state *before* the step, :math:`\hat v_{t-1} = v_{t-1}/(1-\beta_2^{t-1})`,
as Pollux does. It is what the state holds while the step's gradients are measured (all backward passes and the
norms come before ``optimizer.step()``), it is the same on every DDP rank (the state is replicated), and it does
not depend on the step's own examples, so the two-batch estimators stay unbiased. The update itself divides by
:math:`\hat v_t`, which adds the step's own squared gradient with weight :math:`1-\beta_2` (0.1% by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns._compat.tensors import fused_norms

__all__ = ["AdamPreconditioner", "Preconditioner", "is_adam_family", "weighted_grad_sq_norms", "weighted_sq_norm"]

Preconditioner = Callable[[Tensor], Tensor | None]
"""``preconditioner(param) -> P²``: the elementwise weight of the parameter's squared gradient entries in every
norm (float32, the parameter's shape), or ``None`` for weight 1 (a plain norm)."""

# Optimizers whose update divides by √v̂ + ε with v = exp_avg_sq (fused and foreach variants are the same classes).
_ADAM_FAMILY: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)
# Have `betas` and `eps` but no exp_avg_sq in their state.
_NOT_ADAM: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adamax,)


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    r"""Whether an optimizer divides its update by :math:`\sqrt{\hat v}+\epsilon` with ``exp_avg_sq`` as ``v``.

    Adam, AdamW and NAdam (and their subclasses) are; so is any other optimizer whose every parameter group has
    ``betas`` (a pair) and ``eps``, except Adamax (an infinity norm, no ``exp_avg_sq``). Whether the state really
    holds ``exp_avg_sq`` is known only after the first step: :attr:`AdamPreconditioner.ready` checks it then.

    Args:
        optimizer: any optimizer.

    Returns:
        ``True`` for the Adam family.

    Example::

        >>> layer = nn.Linear(2, 2)
        >>> is_adam_family(torch.optim.AdamW(layer.parameters())), is_adam_family(torch.optim.SGD(layer.parameters()))
        (True, False)
    """
    if isinstance(optimizer, _ADAM_FAMILY):
        return True
    if isinstance(optimizer, _NOT_ADAM) or not optimizer.param_groups:
        return False
    return all(
        isinstance(group.get("betas"), tuple | list) and len(group["betas"]) == 2 and "eps" in group
        for group in optimizer.param_groups
    )


def weighted_sq_norm(tensor: Tensor, sq_weight: Tensor | None = None) -> Tensor:
    r""":math:`\sum_j w_j t_j^2` in float32 (float64 stays float64): a plain squared norm when ``sq_weight`` is None.

    Args:
        tensor: a gradient (or a batch of them, with ``sq_weight`` broadcasting over the leading dims).
        sq_weight: the elementwise weight :math:`P^2`, or ``None``.

    Returns:
        A scalar tensor.

    Example::

        >>> weighted_sq_norm(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.25]))  # 4·1 + 0.25·4
        tensor(5.)
    """
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if tensor.layout != torch.strided:
        # A sparse gradient (`nn.Embedding(sparse=True)`) may repeat an index: its entries add up first.
        tensor = tensor.coalesce().values() if sq_weight is None else tensor.to_dense()
    if sq_weight is None:
        if _dot_is_fastest(tensor):
            flat = tensor.view(-1)
            return torch.dot(flat, flat)
        return torch.linalg.vector_norm(tensor, dtype=dtype).square()
    return (tensor.to(dtype).square() * sq_weight).sum()


def _dot_is_fastest(tensor: Tensor) -> bool:
    # On CPU the BLAS dot product takes a dense float tensor's squared norm in half the time of vector_norm or
    # _foreach_norm: it matters for sources that read every gradient once or twice per step.
    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.dtype in (torch.float32, torch.float64)
        and tensor.is_contiguous()
    )


def weighted_grad_sq_norms(params: Iterable[nn.Parameter], preconditioner: Preconditioner | None) -> list[Tensor]:
    """Squared norms of the ``.grad`` of each parameter that has one, weighted by the preconditioner.

    Args:
        params: parameters; those without ``.grad`` are skipped.
        preconditioner: gives each parameter's :math:`P^2`, or ``None`` for plain norms.

    Returns:
        One float32 scalar per parameter with a gradient, in order.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return []
    grads = [p.grad for p in with_grad if p.grad is not None]
    if preconditioner is None and not any(_dot_is_fastest(g) or g.layout != torch.strided for g in grads):
        # One fused kernel per dtype group.
        return [n.float().square() for n in fused_norms(grads)]
    return [
        weighted_sq_norm(grad, None if preconditioner is None else preconditioner(p)).float()
        for p, grad in zip(with_grad, grads, strict=True)
    ]


class AdamPreconditioner:
    r"""The :data:`Preconditioner` of an Adam-family optimizer, read from its state before the step.

    .. math::

        P^2 = \big(\sqrt{v_{t-1} / (1-\beta_2^{\,t-1})} + \epsilon\big)^{-2}

    with ``v = exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad=True``), :math:`t-1` the state's ``step`` and
    :math:`\beta_2`, :math:`\epsilon` those of the parameter's group, as ``torch.optim.Adam`` computes its
    denominator. Nothing is cached: each call builds the weight of one parameter from the live state, a
    temporary of that parameter's size; the state is only read, never created.

    A parameter without ``exp_avg_sq`` (the optimizer has not stepped it yet: it never had a gradient, or it is
    not in the optimizer) gets weight 0: it is left out of the small and the big norm alike, so both describe the
    same gradient. Before the optimizer's first step nothing has a state (:attr:`ready` is ``False``) and the
    caller should not use the norms.

    Args:
        optimizer: the Adam-family optimizer whose update the noise scale should describe.

    Example::

        >>> layer = nn.Linear(2, 1, bias=False)
        >>> optimizer = torch.optim.Adam(layer.parameters(), betas=(0.9, 0.99), eps=0.0)
        >>> precondition = AdamPreconditioner(optimizer)
        >>> precondition.ready
        False
        >>> layer.weight.grad = torch.tensor([[2.0, -0.5]])
        >>> optimizer.step()
        >>> precondition.ready
        True
        >>> precondition(layer.weight)  # v̂ = g² after one step, so P² = 1/g²
        tensor([[0.2500, 4.0000]])
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # Keyed by the parameter itself, as `optimizer.state` is: a stale id cannot match another tensor.
        self._groups: dict[Tensor, dict[str, Any]] = {}

    @property
    def ready(self) -> bool:
        """Whether the optimizer's state holds a second moment (from its first step on)."""
        return any("exp_avg_sq" in state for state in self.optimizer.state.values())

    @property
    def stepped(self) -> bool:
        """Whether the optimizer holds any state (it has stepped), with or without a second moment."""
        return any(len(state) > 0 for state in self.optimizer.state.values())

    def _group(self, param: Tensor) -> dict[str, Any] | None:
        group = self._groups.get(param)
        if group is None:
            # Groups may have been added since (`add_param_group`): index them again.
            self._groups = {p: g for g in self.optimizer.param_groups for p in g["params"]}
            group = self._groups.get(param)
        return group

    def __call__(self, param: Tensor) -> Tensor | None:
        """The elementwise :math:`P^2` of ``param`` (zeros where the optimizer has no second moment for it)."""
        # `.get`: the state is a defaultdict, and looking a parameter up must not create an entry.
        state = self.optimizer.state.get(param)
        group = self._group(param)
        if not state or group is None or "exp_avg_sq" not in state:
            return torch.zeros_like(param, dtype=torch.float32)
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        beta2, eps = group["betas"][1], group["eps"]
        step = state["step"]
        if isinstance(step, Tensor):
            # The step stays a tensor (on the device under `capturable`/`fused`): no host sync.
            correction_sqrt = (1 - beta2 ** step.double()).sqrt()
        else:
            correction_sqrt = torch.tensor(math.sqrt(1 - beta2**step), dtype=torch.float64)
        # A CPU step divides a device tensor as a scalar would.
        denominator = second.float().sqrt() / correction_sqrt.float() + eps
        return denominator.square().reciprocal()

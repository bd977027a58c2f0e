r"""The one registry from module class to per-example norm rule.

A rule is a pure function ``rule(module, inputs, grad_output) -> Tensor[N]``: the squared
L2 norm of each example's gradient over the module's own trainable parameters (and those
of its submodules: a module with a rule is measured as one unit), computed from the
positional inputs of its forward and the gradient flowing into its single output tensor.
A rule does not rescale: with a mean-reduced loss the gradient that flows is ``g_i / N``
and the rule returns ``|g_i|² / N²``.

Lookup is by exact type, so a subclass with a different forward never silently inherits a
rule that does not fit it: register it explicitly.

For the preconditioned noise scale a rule may also take a keyword argument ``weights``: a
mapping from the names of the module's parameters (``"weight"``, ``"bias"``, relative to the
module) to the elementwise weight of their squared gradient entries (a preconditioner's
:math:`P^2`, the parameter's shape; a missing name has weight 1), and then returns
:math:`\sum_j W_j g_{ij}^2`. Every built-in rule does. A rule without it is left out when
weights are needed: the engine measures that module with the :mod:`torch.func` fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_gns.sources.rules.attention import multihead_attention_sq_norm
from lightning_gns.sources.rules.conv import conv_sq_norm
from lightning_gns.sources.rules.embedding import embedding_sq_norm
from lightning_gns.sources.rules.linear import linear_sq_norm
from lightning_gns.sources.rules.normalization import (
    batch_norm_sq_norm,
    group_norm_sq_norm,
    instance_norm_sq_norm,
    layer_norm_sq_norm,
    rms_norm_sq_norm,
)

NormRule = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]
"""``(module, inputs, grad_output) -> Tensor[N]`` squared per-example gradient norms."""

_NORM_RULES: dict[type[nn.Module], NormRule] = {
    nn.Linear: linear_sq_norm,
    NonDynamicallyQuantizableLinear: linear_sq_norm,
    nn.Conv1d: conv_sq_norm,
    nn.Conv2d: conv_sq_norm,
    nn.Conv3d: conv_sq_norm,
    nn.Embedding: embedding_sq_norm,
    nn.LayerNorm: layer_norm_sq_norm,
    nn.RMSNorm: rms_norm_sq_norm,
    nn.GroupNorm: group_norm_sq_norm,
    nn.InstanceNorm1d: instance_norm_sq_norm,
    nn.InstanceNorm2d: instance_norm_sq_norm,
    nn.InstanceNorm3d: instance_norm_sq_norm,
    nn.BatchNorm1d: batch_norm_sq_norm,
    nn.BatchNorm2d: batch_norm_sq_norm,
    nn.BatchNorm3d: batch_norm_sq_norm,
    nn.SyncBatchNorm: batch_norm_sq_norm,
}

CallRule = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Sequence[Tensor | None]], Tensor | None]
"""``(module, args, kwargs, grad_outputs) -> Tensor[N] | None``: a rule that needs the keyword
arguments of the call or several outputs; ``None`` hands that call to the torch.func fallback."""

# Built-in rules for modules whose forward takes keyword arguments and returns several tensors.
_CALL_RULES: dict[type[nn.Module], CallRule] = {
    nn.MultiheadAttention: multihead_attention_sq_norm,
}


def register_norm_rule(*module_classes: type[nn.Module], overwrite: bool = False) -> Callable[[NormRule], NormRule]:
    """Decorator that registers a per-example norm rule for one or more module classes.

    Args:
        *module_classes: the classes the rule applies to (matched by exact type).
        overwrite: replace an existing rule instead of raising.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Raises:
        TypeError: if no class is given or one is not an ``nn.Module`` subclass.
        ValueError: if a class already has a rule and ``overwrite`` is ``False``.

    Example::

        >>> import torch
        >>> class Scale(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.scale = nn.Parameter(torch.ones(()))
        ...
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return self.scale * x
        >>> @register_norm_rule(Scale)
        ... def scale_sq_norm(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> Tensor:
        ...     return (inputs[0] * grad_output).flatten(1).sum(1).square()
        >>> get_norm_rule(Scale())(Scale(), (torch.ones(2, 3),), torch.ones(2, 3))
        tensor([9., 9.])
        >>> _ = _NORM_RULES.pop(Scale)  # keep the doctest from leaking a rule
    """
    if not module_classes:
        raise TypeError("`register_norm_rule` needs at least one module class, e.g. `@register_norm_rule(MyLayer)`.")
    for cls in module_classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"Expected `nn.Module` subclasses, but got {cls!r}.")

    def decorator(rule: NormRule) -> NormRule:
        taken = [cls.__name__ for cls in module_classes if cls in _NORM_RULES]
        if taken and not overwrite:
            raise ValueError(
                f"A norm rule is already registered for {', '.join(taken)}. "
                "Pass `overwrite=True` to `register_norm_rule` to replace it."
            )
        for cls in module_classes:
            _NORM_RULES[cls] = rule
        return rule

    return decorator


def get_norm_rule(module: nn.Module) -> NormRule | None:
    """The norm rule registered for a module's exact type.

    Args:
        module: any module.

    Returns:
        The rule, or ``None`` when the type has none (the engine then uses the
        :mod:`torch.func` fallback).

    Example::

        >>> get_norm_rule(nn.Linear(2, 3)).__name__
        'linear_sq_norm'
        >>> get_norm_rule(nn.ReLU()) is None
        True
    """
    return _NORM_RULES.get(type(module))


def get_call_rule(module: nn.Module) -> CallRule | None:
    """The built-in call rule for a module's exact type (for modules with keyword arguments or several outputs).

    Args:
        module: any module.

    Returns:
        The rule, or ``None``. A rule registered with :func:`register_norm_rule` for the same
        type takes precedence in the engine.

    Example::

        >>> get_call_rule(nn.MultiheadAttention(4, 2)).__name__
        'multihead_attention_sq_norm'
    """
    return _CALL_RULES.get(type(module))

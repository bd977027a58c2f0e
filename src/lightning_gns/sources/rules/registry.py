r"""The one registry from module class to how the engine measures it: a :class:`NormRuleSpec` per layer family.

A spec says everything the per-example engine knows about a layer family, and a rule registered by a user can
do all that a built-in one does:

- ``sq_norm``: a pure function ``rule(module, inputs, grad_output) -> Tensor[N]``, the squared L2 norm of each
  example's gradient over the module's own trainable parameters (and those of its submodules: a module with a
  rule is measured as one unit), from the positional inputs of its forward and the gradient flowing into its
  single output tensor. A rule does not rescale: with a mean-reduced loss the gradient that flows is
  ``g_i / N`` and the rule returns ``|g_i|² / N²``.
- or ``call``: ``rule(module, args, kwargs, grad_outputs) -> Tensor[N] | None`` for a forward that takes keyword
  arguments or returns several tensors (``None`` hands that call to the :mod:`torch.func` fallback);
- ``capture``: a factory of a context manager entered around the module's forward, which keeps what the
  norms need (:class:`ForwardCapture`; multi-head attention keeps its projections this way);
- ``from_saved_stats``: a faster form of ``sq_norm`` from statistics the layer's autograd node saved
  (:class:`SavedStatsRule`; LayerNorm and GroupNorm read their mean and rstd);
- ``fused``: a form that builds the per-example gradients of ``weight`` and ``bias`` anyway and hands autograd
  their sums (:class:`FusedRule`; convolutions, GroupNorm, Linear on sequences).
- ``outer_terms``: the per-example gradients as factors (:class:`~lightning_gns.sources.rules.shared.OuterTerms`,
  ``Σ_t l_t r_tᵀ``), for a parameter used by several calls in one forward (tied embeddings and heads, a module
  called twice): the engine combines the calls by Gram products instead of replaying them with
  :mod:`torch.func` (Linear, Embedding).

Lookup is by exact type, so a subclass with a different forward never silently inherits a rule that does not
fit it: register it explicitly.

For the preconditioned noise scale a rule may also take a keyword argument ``weights``: a mapping from the
names of the module's parameters (``"weight"``, ``"bias"``, relative to the module) to the elementwise weight of
their squared gradient entries (a preconditioner's :math:`P^2`, the parameter's shape; a missing name has weight
1), and then returns :math:`\sum_j W_j g_{ij}^2`. Every built-in rule does. A rule without it is left out when
weights are needed: the engine measures that module with the :mod:`torch.func` fallback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_gns.sources.rules.attention import MultiheadAttentionCapture, multihead_attention_sq_norm
from lightning_gns.sources.rules.conv import conv_batch_grads, conv_sq_norm, conv_sq_norm_and_grads
from lightning_gns.sources.rules.embedding import embedding_sq_norm
from lightning_gns.sources.rules.fused import BatchGrads, GradSlot, InputGrad
from lightning_gns.sources.rules.linear import (
    linear_batch_grads,
    linear_fuses_weight_grads,
    linear_input_grad,
    linear_sq_norm,
    linear_sq_norm_and_grads,
)
from lightning_gns.sources.rules.normalization import (
    batch_norm_sq_norm,
    group_norm_batch_grads,
    group_norm_saved_stats,
    group_norm_sq_norm,
    group_norm_sq_norm_and_grads,
    group_norm_sq_norm_from_stats,
    instance_norm_sq_norm,
    layer_norm_saved_stats,
    layer_norm_sq_norm,
    layer_norm_sq_norm_from_stats,
    rms_norm_sq_norm,
)
from lightning_gns.sources.rules.shared import OuterTermsRule, embedding_outer_terms, linear_outer_terms

__all__ = [
    "CallRule",
    "CapturedForward",
    "ForwardCapture",
    "FusedRule",
    "NormRule",
    "NormRuleSpec",
    "SavedStatsRule",
    "get_call_rule",
    "get_norm_rule",
    "get_rule_spec",
    "register_norm_rule",
    "register_rule_spec",
    "unregister_norm_rule",
]

NormRule = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]
"""``(module, inputs, grad_output) -> Tensor[N]`` squared per-example gradient norms."""

CallRule = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Sequence[Tensor | None]], Tensor | None]
"""``(module, args, kwargs, grad_outputs) -> Tensor[N] | None``: a rule that needs the keyword
arguments of the call or several outputs; ``None`` hands that call to the torch.func fallback."""


class CapturedForward(Protocol):
    """What a :class:`ForwardCapture` kept of one forward: tensors whose gradients its norms need, and the norms."""

    @property
    def projections(self) -> Sequence[Tensor]:
        """Live intermediate tensors of the forward; the engine hooks their gradients as well as the outputs'."""
        ...

    def sq_norm(
        self,
        module: nn.Module,
        grad_output: Tensor | None,
        projection_grads: Sequence[Tensor | None],
        weights: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``[N]`` squared norms from the first output's gradient and those of :attr:`projections`."""
        ...


class ForwardCapture(Protocol):
    """A context manager entered just before a module's forward and left just after it.

    After leaving, :attr:`captured` is what it kept, or ``None`` when this call is not covered (the engine then
    uses the spec's ``call`` rule, or the fallback).
    """

    @property
    def captured(self) -> CapturedForward | None:
        """What the forward kept, once the capture is left."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Any: ...


@dataclass(frozen=True)
class SavedStatsRule:
    """A faster ``sq_norm`` from statistics the layer's forward saved on its autograd node.

    The engine keeps the output's ``grad_fn`` only when no saved-tensor hooks (checkpointing, offloading) are
    active, since reading a saved tensor unpacks it.

    Attributes:
        read: ``(node, module, grad_output) -> stats | None``; ``None`` (a node of another kind, freed tensors)
            makes the engine call the spec's plain ``sq_norm``.
        sq_norm: ``(module, inputs, grad_output, stats, *, weights=None) -> Tensor[N]``.
    """

    read: Callable[[Any, nn.Module, Tensor], Any]
    sq_norm: Callable[..., Tensor]


@dataclass(frozen=True)
class FusedRule:
    """How a rule that builds the per-example gradients of ``weight`` and ``bias`` hands autograd their sums.

    The layer must have ``weight`` (and optionally ``bias``) as its own leaf parameters. When ``worth_it`` says
    so at the forward, the engine runs the layer with their ``requires_grad`` off and passes the output through
    :class:`~lightning_gns.sources.rules.fused.FusedParamGrads`.

    Attributes:
        sq_norm_and_grads: ``(module, inputs, grad_output, node, slot, *, weights=None) -> Tensor[N]``: the
            norms, with the batch sums of the unweighted per-example gradients left in ``slot``
            (a :class:`~lightning_gns.sources.rules.fused.GradSlot`); ``node`` is the layer's autograd node when
            the spec has ``from_saved_stats`` and it may be read, else ``None``.
        batch_grads: the batch gradients as autograd computes them, for whatever the slot lacks.
        input_grad: the input gradient from the live weight, for a layer whose own backward saved its weight
            with ``requires_grad`` off (Linear); ``None`` when the layer's own backward is right.
        worth_it: ``(module, inputs, weighted) -> bool`` decided at the forward; always by default.
    """

    sq_norm_and_grads: Callable[..., Tensor]
    batch_grads: BatchGrads
    input_grad: InputGrad | None = None
    worth_it: Callable[[nn.Module, Tensor, bool], bool] = field(default=lambda module, inputs, weighted: True)


@dataclass(frozen=True)
class NormRuleSpec:
    """Everything the engine knows about measuring one layer family (see the module's docstring).

    Give ``sq_norm`` or ``call`` (or both: ``sq_norm`` is then used). ``weighted`` says whether the rules take
    the keyword ``weights`` (preconditioned norms); by default it is read from the signature of ``sq_norm``
    (else ``call``).

    Raises:
        ValueError: if neither ``sq_norm`` nor ``call`` is given, or ``fused``/``from_saved_stats`` comes
            without ``sq_norm``, or ``capture`` without ``call``.

    Example::

        >>> spec = NormRuleSpec(sq_norm=lambda module, inputs, grad_output: grad_output.square().sum(1))
        >>> spec.weighted
        False
    """

    sq_norm: NormRule | None = None
    call: CallRule | None = None
    capture: Callable[[nn.Module], ForwardCapture] | None = None
    from_saved_stats: SavedStatsRule | None = None
    fused: FusedRule | None = None
    outer_terms: OuterTermsRule | None = None
    weighted: bool | None = None

    def __post_init__(self) -> None:
        if self.sq_norm is None and self.call is None:
            raise ValueError("A `NormRuleSpec` needs `sq_norm=` (one input, one output) or `call=` (any call).")
        if self.sq_norm is None and (
            self.fused is not None or self.from_saved_stats is not None or self.outer_terms is not None
        ):
            raise ValueError(
                "`fused=`, `from_saved_stats=` and `outer_terms=` are forms of `sq_norm=`: give `sq_norm` too."
            )
        if self.capture is not None and self.call is None:
            raise ValueError("`capture=` needs `call=` for the calls the capture does not cover.")
        if self.weighted is None:
            rule = self.sq_norm if self.sq_norm is not None else self.call
            object.__setattr__(self, "weighted", _accepts_weights(rule))


_RULE_SPECS: dict[type[nn.Module], NormRuleSpec] = {}


def _check_classes(module_classes: tuple[type[nn.Module], ...], function: str) -> None:
    if not module_classes:
        raise TypeError(f"`{function}` needs at least one module class, e.g. `{function}(MyLayer)`.")
    for cls in module_classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"Expected `nn.Module` subclasses, but got {cls!r}.")


def register_rule_spec(*module_classes: type[nn.Module], spec: NormRuleSpec, overwrite: bool = False) -> NormRuleSpec:
    """Register how the engine measures one or more module classes (matched by exact type).

    Args:
        *module_classes: the classes the spec applies to.
        spec: the rules (see :class:`NormRuleSpec`).
        overwrite: replace an existing spec instead of raising.

    Returns:
        ``spec``.

    Raises:
        TypeError: if no class is given, one is not an ``nn.Module`` subclass, or ``spec`` is not a
            :class:`NormRuleSpec`.
        ValueError: if a class already has a rule and ``overwrite`` is ``False``.

    Example::

        >>> import torch
        >>> class Gate(nn.Module):  # output = x * w, with a second output the rule does not need
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.ones(3))
        ...
        ...     def forward(self, x: Tensor, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        ...         return x * self.w * scale, x
        >>> def gate_sq_norm(module, args, kwargs, grad_outputs):
        ...     return (args[0] * grad_outputs[0] * kwargs.get("scale", 1.0)).square().sum(1)
        >>> _ = register_rule_spec(Gate, spec=NormRuleSpec(call=gate_sq_norm))
        >>> get_rule_spec(Gate()).call is gate_sq_norm
        True
        >>> _ = unregister_norm_rule(Gate)
    """
    _check_classes(module_classes, "register_rule_spec")
    if not isinstance(spec, NormRuleSpec):
        raise TypeError(f"Expected `spec` to be a `NormRuleSpec`, but got {type(spec).__name__}.")
    taken = [cls.__name__ for cls in module_classes if cls in _RULE_SPECS]
    if taken and not overwrite:
        raise ValueError(
            f"A norm rule is already registered for {', '.join(taken)}. "
            "Pass `overwrite=True` to replace it, or `unregister_norm_rule` it first."
        )
    for cls in module_classes:
        _RULE_SPECS[cls] = spec
    return spec


def register_norm_rule(
    *module_classes: type[nn.Module],
    overwrite: bool = False,
    from_saved_stats: SavedStatsRule | None = None,
    fused: FusedRule | None = None,
    outer_terms: OuterTermsRule | None = None,
) -> Callable[[NormRule], NormRule]:
    """Decorator that registers a per-example norm rule for one or more module classes.

    Args:
        *module_classes: the classes the rule applies to (matched by exact type).
        overwrite: replace an existing rule instead of raising.
        from_saved_stats: a faster form of the rule from what the layer's node saved (see
            :class:`SavedStatsRule`).
        fused: a form that also hands autograd the batch gradients of ``weight`` and ``bias`` (see
            :class:`FusedRule`).
        outer_terms: the per-example gradients as factors, for parameters shared between calls (see
            :class:`~lightning_gns.sources.rules.shared.OuterTerms`).

    Returns:
        A decorator that registers the rule (as ``NormRuleSpec(sq_norm=rule, ...)``) and returns it unchanged.

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
        >>> unregister_norm_rule(Scale)[Scale].sq_norm is scale_sq_norm  # keep the doctest from leaking a rule
        True
    """
    _check_classes(module_classes, "register_norm_rule")

    def decorator(rule: NormRule) -> NormRule:
        spec = NormRuleSpec(sq_norm=rule, from_saved_stats=from_saved_stats, fused=fused, outer_terms=outer_terms)
        register_rule_spec(*module_classes, spec=spec, overwrite=overwrite)
        return rule

    return decorator


def unregister_norm_rule(*module_classes: type[nn.Module]) -> dict[type[nn.Module], NormRuleSpec]:
    """Remove the rules of module classes, built-in ones included; the engine then measures them op by op.

    Args:
        *module_classes: classes that have a rule.

    Returns:
        The removed specs by class, to register again with :func:`register_rule_spec`.

    Raises:
        TypeError: if no class is given or one is not an ``nn.Module`` subclass.
        KeyError: if a class has no rule (nothing is removed then).

    Example::

        >>> removed = unregister_norm_rule(nn.LayerNorm)
        >>> get_norm_rule(nn.LayerNorm(3)) is None
        True
        >>> _ = register_rule_spec(nn.LayerNorm, spec=removed[nn.LayerNorm])
        >>> get_norm_rule(nn.LayerNorm(3)).__name__
        'layer_norm_sq_norm'
    """
    _check_classes(module_classes, "unregister_norm_rule")
    missing = [cls.__name__ for cls in module_classes if cls not in _RULE_SPECS]
    if missing:
        raise KeyError(f"No norm rule is registered for {', '.join(missing)}; nothing was removed.")
    return {cls: _RULE_SPECS.pop(cls) for cls in module_classes}


def get_rule_spec(module: nn.Module) -> NormRuleSpec | None:
    """The spec registered for a module's exact type, or ``None``.

    Example::

        >>> spec = get_rule_spec(nn.Conv2d(1, 1, 3))
        >>> spec.sq_norm.__name__, spec.fused is not None, spec.weighted
        ('conv_sq_norm', True, True)
        >>> get_rule_spec(nn.ReLU()) is None
        True
    """
    return _RULE_SPECS.get(type(module))


def get_norm_rule(module: nn.Module) -> NormRule | None:
    """The norm rule (``sq_norm``) registered for a module's exact type.

    Args:
        module: any module.

    Returns:
        The rule, or ``None`` when the type has none (the engine then measures the module op by op, or with
        the :mod:`torch.func` fallback).

    Example::

        >>> get_norm_rule(nn.Linear(2, 3)).__name__
        'linear_sq_norm'
        >>> get_norm_rule(nn.ReLU()) is None
        True
    """
    spec = get_rule_spec(module)
    return None if spec is None else spec.sq_norm


def get_call_rule(module: nn.Module) -> CallRule | None:
    """The call rule registered for a module's exact type (for modules with keyword arguments or several outputs).

    Args:
        module: any module.

    Returns:
        The rule, or ``None``. A spec with both uses ``sq_norm``.

    Example::

        >>> get_call_rule(nn.MultiheadAttention(4, 2)).__name__
        'multihead_attention_sq_norm'
    """
    spec = get_rule_spec(module)
    return None if spec is None else spec.call


def _accepts_weights(rule: Callable[..., Any] | None) -> bool:
    """Whether a rule takes the keyword argument ``weights`` (preconditioned norms)."""
    if rule is None:
        return False
    try:
        parameters = inspect.signature(rule).parameters
    except (TypeError, ValueError):
        return False
    return "weights" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# ---------------------------------------------------------------------------------------------- built-in rules


def _sums_only(
    sq_norm_and_grads: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]],
) -> Callable[..., Tensor]:
    """Adapt a rule that returns norms and parameter sums to fill a slot."""

    def fill(
        module: nn.Module, args: tuple[Any, ...], grad_output: Tensor, node: Any, slot: GradSlot, **kw: Any
    ) -> Tensor:
        sq_norms, slot.weight, slot.bias = sq_norm_and_grads(module, args, grad_output, **kw)
        return sq_norms

    return fill


def _group_norm_whole_backward(
    module: nn.Module, args: tuple[Any, ...], grad_output: Tensor, node: Any, slot: GradSlot, **kw: Any
) -> Tensor:
    # GroupNorm's rule runs the layer's whole backward in one kernel call (norms, parameter sums, input gradient).
    stats = group_norm_saved_stats(node, module, grad_output) if node is not None else None
    sq_norms, slot.weight, slot.bias, slot.inputs = group_norm_sq_norm_and_grads(
        module, args, grad_output, stats, slot.wants_inputs, **kw
    )
    slot.whole_backward = True
    return sq_norms


def _capture_attention(module: nn.Module) -> MultiheadAttentionCapture:
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"Expected nn.MultiheadAttention, got `{type(module).__name__}`.")
    return MultiheadAttentionCapture(module)


def _register_builtins() -> None:
    linear = NormRuleSpec(
        sq_norm=linear_sq_norm,
        fused=FusedRule(
            _sums_only(linear_sq_norm_and_grads), linear_batch_grads, linear_input_grad, linear_fuses_weight_grads
        ),
        outer_terms=linear_outer_terms,
    )
    register_rule_spec(nn.Linear, NonDynamicallyQuantizableLinear, spec=linear)
    conv = NormRuleSpec(sq_norm=conv_sq_norm, fused=FusedRule(_sums_only(conv_sq_norm_and_grads), conv_batch_grads))
    register_rule_spec(nn.Conv1d, nn.Conv2d, nn.Conv3d, spec=conv)
    register_rule_spec(nn.Embedding, spec=NormRuleSpec(sq_norm=embedding_sq_norm, outer_terms=embedding_outer_terms))
    layer_norm_stats = SavedStatsRule(layer_norm_saved_stats, layer_norm_sq_norm_from_stats)
    register_rule_spec(nn.LayerNorm, spec=NormRuleSpec(sq_norm=layer_norm_sq_norm, from_saved_stats=layer_norm_stats))
    register_rule_spec(nn.RMSNorm, spec=NormRuleSpec(sq_norm=rms_norm_sq_norm))
    group_norm = NormRuleSpec(
        sq_norm=group_norm_sq_norm,
        from_saved_stats=SavedStatsRule(group_norm_saved_stats, group_norm_sq_norm_from_stats),
        fused=FusedRule(_group_norm_whole_backward, group_norm_batch_grads),
    )
    register_rule_spec(nn.GroupNorm, spec=group_norm)
    instance_norm = NormRuleSpec(sq_norm=instance_norm_sq_norm)
    register_rule_spec(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, spec=instance_norm)
    batch_norm = NormRuleSpec(sq_norm=batch_norm_sq_norm)
    register_rule_spec(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, spec=batch_norm)
    attention = NormRuleSpec(call=multihead_attention_sq_norm, capture=_capture_attention)
    register_rule_spec(nn.MultiheadAttention, spec=attention)


_register_builtins()

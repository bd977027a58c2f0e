"""Per-example squared gradient norms from layer hooks: the engine behind the ``per_example`` source.

:class:`PerExampleGradNorms` hooks the modules of a model that own trainable parameters.
A forward hook keeps each call's inputs (in the engine, never on the module) and hangs a
hook on the call's output tensor; when the gradient of that output arrives in backward,
the module's norm rule (:mod:`lightning_gns.sources.rules`) turns inputs and output
gradient into ``[N]`` squared per-example norms, and a callback at the end of the
backward pass sums them into one record. Nothing syncs with the device.

What is measured as one unit:

- a module with a norm rule, with all trainable parameters of its subtree;
- :class:`torch.nn.MultiheadAttention`, which multiplies with ``out_proj.weight`` without
  calling ``out_proj`` (hooks on ``out_proj`` would never fire): its rule covers all its
  parameters, and its forward runs under a capture that keeps the attention internals, so
  that no recomputation is needed (:mod:`~lightning_gns.sources.rules.attention`);
- any other module that owns trainable parameters directly: the :mod:`torch.func` fallback
  (:mod:`~lightning_gns.sources.rules.fallback`) for those parameters only, its children
  being measured on their own.

A module called several times in one backward pass (weight sharing), and modules that
share a parameter (tied weights), have per-example gradients that are *sums* over calls:
their squared norm is not the sum of the calls' squared norms. The engine notices both
(calls still waiting for their gradient when one arrives; parameters owned by two units)
and materialises those units' per-example gradients with the fallback, sums them over
calls and squares once. Every parameter that receives a gradient must belong to a unit
that measured it; one that does not is named in a warning (an error with ``strict=True``).

With a preconditioner (:mod:`~lightning_gns.sources.preconditioning`) every per-example
squared norm is weighted entrywise by each parameter's :math:`P^2`: built-in rules take the
weights (keyword ``weights``), and units whose rule does not are measured by the fallback.

A convolution's rule, and a Linear's on long sequences, build the per-example weight
gradients whose sum is the batch's weight gradient; by default the engine hands autograd that
sum instead of letting autograd compute the gradient again (``fuse_weight_grads``,
:class:`~lightning_gns.sources.rules.fused.FusedParamGrads`). GroupNorm's rule runs the layer's
whole backward (input gradient included) in the one kernel call that gives its norms. The sum
is of the unweighted per-example gradients, preconditioned norms or not.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from lightning_gns._compat.autograd import (
    as_non_view,
    current_graph_task_id,
    is_view,
    queue_engine_callback,
    saved_tensors_hooks_active,
    will_engine_execute,
)
from lightning_gns._compat.dynamo import compiled_parts
from lightning_gns._compat.nn import BatchNormBase
from lightning_gns._compat.pytree import tree_leaves, tree_map
from lightning_gns.sources.preconditioning import Preconditioner
from lightning_gns.sources.rules.fallback import (
    BatchLayout,
    RngSnapshot,
    batch_layout,
    per_example_grads,
    sq_norm_of_grads,
)
from lightning_gns.sources.rules.fused import FusedParamGrads, GradSlot
from lightning_gns.sources.rules.normalization import (
    batch_norm_coupling_error,
    batch_norm_uses_batch_statistics,
)
from lightning_gns.sources.rules.ops import OpCall, ParamOpCapture
from lightning_gns.sources.rules.registry import (
    CallRule,
    CapturedForward,
    ForwardCapture,
    FusedRule,
    NormRule,
    NormRuleSpec,
    SavedStatsRule,
    get_rule_spec,
)
from lightning_gns.sources.rules.shared import OuterTerms, combined_sq_norm

__all__ = [
    "NormRuleFallbackWarning",
    "PerExampleGradNorms",
    "SqNormRecord",
    "UnmeasuredParameterWarning",
    "compiled_model_refusal",
]

_ROOT_NAME = "(root)"
# Modules that use their children's parameters without calling the children.
_WHOLE_UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class NormRuleFallbackWarning(UserWarning):
    """A module type has no norm rule and is measured by the slower :mod:`torch.func` fallback."""


class UnmeasuredParameterWarning(RuntimeWarning):
    """A parameter received a gradient that no per-example hook measured: the norms miss it."""


@dataclass(frozen=True)
class SqNormRecord:
    """The per-example squared gradient norms of one backward pass.

    Attributes:
        sq_norms: ``[N]``, summed over the measured modules.
        by_module: ``{qualified name: [N]}`` for each measured unit that received a gradient;
            tied units are keyed by their names joined with ``+``.
        unmeasured: names of parameters that received a gradient no hook measured.
    """

    sq_norms: Tensor
    by_module: dict[str, Tensor]
    unmeasured: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        """The number of examples ``N``."""
        return int(self.sq_norms.shape[0])


@dataclass(eq=False)
class _Unit:
    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    spec: NormRuleSpec | None
    group: _Group | None = None
    # Whether the rule (or call rule) takes the keyword `weights` (preconditioned norms).
    weighted: bool = True
    rule: NormRule | None = field(init=False)
    call_rule: CallRule | None = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.rule = None if spec is None else spec.sq_norm
        self.call_rule = None if spec is None or spec.sq_norm is not None else spec.call
        self.weighted = spec is None or bool(spec.weighted)

    @property
    def op_level(self) -> bool:
        """Whether the unit is measured op by op (its own parameters, without a module rule)."""
        return self.rule is None and self.call_rule is None and not isinstance(self.module, _WHOLE_UNIT_TYPES)


@dataclass(eq=False)
class _Group:
    """Units that share parameters (one unit, unless weights are tied)."""

    name: str
    units: list[_Unit]
    params: list[nn.Parameter]
    tied: bool
    # Calls whose output gradient has not arrived yet. Weak, so a forward whose graph is
    # dropped without a backward is forgotten with it.
    pending: weakref.WeakSet[_Call] = field(default_factory=weakref.WeakSet)


class _Call:
    """One forward call of a unit, kept until its output gradient arrives."""

    __slots__ = (
        "__weakref__",
        "args",
        "autocast",
        "captured",
        "generation",
        "grad_slot",
        "kwargs",
        "node",
        "num_outputs",
        "ops",
        "outputs",
        "rng",
        "unit",
    )

    def __init__(
        self,
        unit: _Unit,
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        num_outputs: int,
        autocast: tuple[str, bool, torch.dtype],
        generation: int,
    ) -> None:
        self.unit = unit
        self.args = args
        self.kwargs = kwargs
        self.num_outputs = num_outputs
        self.autocast = autocast
        self.generation = generation
        # Set when the forward ran under a capture (MultiheadAttention): the gradients that arrive
        # are then those of the output and of the captured projections.
        self.captured: CapturedForward | None = None
        # Set when autograd left the parameter gradients to the rule (fuse_weight_grads): the sums of the
        # per-example gradients that the rule builds go here.
        self.grad_slot: GradSlot | None = None
        # The autograd node of the output, for rules that read what the forward saved (GroupNorm, LayerNorm).
        self.node: Any = None
        # Set for a unit measured op by op (rules.ops): its parameter uses and their output gradients.
        self.ops: OpCall | None = None
        # Set for a fallback call that drew random numbers: the generator state before, and the outputs, so the
        # replay draws the same dropout masks and is checked against what the forward returned.
        self.rng: RngSnapshot | None = None
        self.outputs: list[Tensor] | None = None


class PerExampleGradNorms:
    r"""Per-example squared gradient norms of a model, measured by hooks during its backward passes.

    For a loss :math:`L = \sum_i \ell_i` the record holds :math:`|g_i|^2 = |\nabla_\theta \ell_i|^2`
    for every example :math:`i` of the batch (dim 0 of every input). Norms are of the
    gradients that flow: a mean-reduced loss gives :math:`|g_i|^2 / N^2`, a loss divided by
    an accumulation factor or multiplied by an AMP loss scale gives those factors squared;
    undoing them is the caller's job. Nothing is synced to the host.

    Every backward pass appends one :class:`SqNormRecord`: the examples of different
    backward passes (e.g. the micro-batches of gradient accumulation) are different
    examples and are never summed together. Within one backward pass, all calls of the
    hooked modules are taken to see the same ``N`` examples. Read the latest with
    :meth:`sq_norms` / :meth:`sq_norms_by_module`, or take all with :meth:`pop`, which also
    frees them (records pile up until popped or :meth:`reset`).

    Args:
        model: the model to measure. Attach after freezing parameters: frozen ones are
            skipped.
        include: measure only modules that are instances of these types (e.g.
            ``[nn.LayerNorm]``, the cheap signal); no other module is hooked, except a module
            whose weights are tied to a selected one. Submodules of a unit measured as a
            whole (``out_proj`` inside ``nn.MultiheadAttention``) go with their unit. ``None``
            measures every trainable parameter and checks that none is missed.
        strict: raise instead of warning when a module needs the :mod:`torch.func`
            fallback (at :meth:`attach`) or a parameter's gradient escapes the hooks
            (after a backward pass).
        preconditioner: gives each parameter's elementwise weight :math:`P^2` of the
            squared gradient entries (or ``None`` for weight 1); ``None``: plain norms. An
            attribute, so it can be set between backward passes.
        fuse_weight_grads: let the rules of convolutions, and of Linear layers on sequences long
            against their width (:func:`~lightning_gns.sources.rules.linear.linear_fuses_weight_grads`),
            and of GroupNorm, supply the batch gradients of weight and bias, as the sums of the per-example gradients
            they build, instead of autograd computing them a second time (on the benchmark CNN this
            removes almost half of the overhead). During the forward of such a layer, its weight and
            bias then have ``requires_grad`` switched off, and a node on its output hands autograd
            their gradients; ``.grad``, accumulation, parameter hooks, DDP and second-order
            backward passes see the same gradients as without (to float rounding: the sum runs in
            another order). Layers under autocast, in other dtypes than float32/float64, or with
            parameters that are not plain leaves are left to autograd. With a preconditioner the
            norms are weighted, and the gradients handed to autograd are still the plain sums.

    Raises:
        TypeError: if ``include`` holds something that is not an ``nn.Module`` subclass.

    Limitations: inputs must be batch-first (except ``nn.MultiheadAttention``, whose
    ``batch_first`` flag is honoured); a module fed ``[N·T, K]`` after flattening sees
    tokens as examples (an inconsistent ``N`` across modules raises); the fallback cannot
    replay random ops (dropout in training mode inside the replayed module, not elsewhere)
    and raises then; a graph kept with
    ``retain_graph=True`` is measured by its first backward pass only (a second one reports
    the parameters as unmeasured); gradient penalties (``create_graph=True``) add
    second-order terms no hook sees (warned); reentrant activation checkpointing is not
    supported (its modules are reported as unmeasured), non-reentrant is. ``torch.compile``: the hooks do not
    see inside compiled code, so :meth:`attach` refuses a compiled model or one with a compiled module in it
    (``ValueError``), and a forward that still ran compiled (a compiled function outside the model called it)
    makes its backward pass raise ``RuntimeError`` instead of recording wrong norms.

    Example::

        >>> layer = nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> with PerExampleGradNorms(layer) as norms:
        ...     layer(x).sum().backward()
        >>> norms.sq_norms()  # each example's gradient is (x_i, 1): |x_i|² + 1
        tensor([ 6., 26.])
        >>> norms.pop()[0].by_module
        {'(root)': tensor([ 6., 26.])}

        Several layers, against a per-example loop:

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> x = torch.randn(5, 3)
        >>> with PerExampleGradNorms(model) as norms:
        ...     model(x).sum().backward()
        >>> norms.sq_norms().shape
        torch.Size([5])
        >>> exact = [sum(g.square().sum() for g in torch.autograd.grad(model(x[i : i + 1]).sum(), model.parameters()))
        ...          for i in range(5)]
        >>> torch.allclose(norms.sq_norms(), torch.stack(exact))
        True
        >>> sorted(norms.sq_norms_by_module())
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        include: Sequence[type[nn.Module]] | None = None,
        strict: bool = False,
        preconditioner: Preconditioner | None = None,
        fuse_weight_grads: bool = True,
    ) -> None:
        if include is not None:
            bad = [cls for cls in include if not (isinstance(cls, type) and issubclass(cls, nn.Module))]
            if bad:
                raise TypeError(f"Expected `include` to hold nn.Module subclasses, but got {bad!r}.")
        self.model = model
        self.include: tuple[type[nn.Module], ...] | None = tuple(include) if include is not None else None
        self.strict = strict
        self.preconditioner = preconditioner
        self._warned_unweighted: set[type[nn.Module]] = set()
        self.fuse_weight_grads = fuse_weight_grads
        self._units: list[_Unit] = []
        self._groups: list[_Group] = []
        self._param_names: dict[int, str] = {}
        self._handles: list[RemovableHandle] = []
        self._captures: dict[int, list[ForwardCapture | None]] = {}
        self._op_captures: dict[int, list[ParamOpCapture | None]] = {}
        self._warned_fallback: set[type[nn.Module]] = set()
        self._warned_failed: set[str] = set()
        self.batch_size: int | None = None
        self._fusing: dict[int, list[list[nn.Parameter]]] = {}
        self._grad_nodes: dict[int, Any] = {}
        self._attached = False
        self._generation = 0
        self._replaying = False
        self._records: list[SqNormRecord] = []
        self._warned_unmeasured: set[tuple[str, ...]] = set()
        self._warned_double_backward = False
        # Set by a forward hook traced by TorchDynamo (compiled code that attach could not see): the next backward
        # pass raises instead of recording wrong norms.
        self._compiled_forward = False
        # State of the backward pass in progress.
        self._task_id: int | None = None
        self._eager: dict[_Group, Tensor] = {}
        self._stash: dict[_Group, list[tuple[_Call, tuple[Tensor | None, ...]]]] = {}
        self._received: set[int] = set()
        self._fired: list[_Call] = []
        self._started_ops: list[_Call] = []
        self._failed: set[_Group] = set()

    # ------------------------------------------------------------------ attach / remove

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._attached

    @property
    def measured_modules(self) -> list[str]:
        """Qualified names of the hooked units (tied units joined with ``+``), in model order."""
        return [group.name for group in self._groups]

    @property
    def measured_groups(self) -> dict[str, list[nn.Parameter]]:
        """Each measured unit's name (the keys of :meth:`sq_norms_by_module`) and its parameters, in model order."""
        return {group.name: list(group.params) for group in self._groups}

    @property
    def measured_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients the hooks measure (each once), in model order; set by :meth:`attach`."""
        return [p for group in self._groups for p in group.params]

    def attach(self) -> PerExampleGradNorms:
        """Register the hooks.

        Returns:
            ``self``, so that ``norms = PerExampleGradNorms(model).attach()`` works.

        Raises:
            RuntimeError: if the hooks are already attached.
            TypeError: with ``strict=True``, if a module needs the :mod:`torch.func` fallback.
            ValueError: if the model, or a module in it, is compiled with ``torch.compile``
                (:func:`~lightning_gns._compat.dynamo.compiled_parts`).
        """
        if self._attached:
            raise RuntimeError(
                "PerExampleGradNorms is already attached to the model; call `remove()` before attaching again."
            )
        compiled = compiled_parts(self.model)
        if compiled:
            raise ValueError(
                f"PerExampleGradNorms {compiled_model_refusal(compiled)} Measure a compiled model with the "
                "`accumulation` source (gradient accumulation) or the `ddp` source (2+ processes), which read "
                "parameter gradients that compiled code leaves as they are; or attach to an uncompiled model and "
                "run it uncompiled."
            )
        self._compiled_forward = False
        groups = self._group_units(self._find_units())
        if self.include is not None:
            # A tied partner of a selected module comes along: the shared parameter's gradient is their sum.
            groups = [g for g in groups if any(isinstance(u.module, self.include) for u in g.units)]
        units = [unit for group in groups for unit in group.units]
        self._units = units
        self._groups = groups
        self._generation += 1
        self._reset_backward_state()
        self._captures = {}
        self._op_captures = {}
        self._fusing = {}
        self._grad_nodes = {}
        self._handles.append(self.model.register_forward_pre_hook(self._read_batch_size, with_kwargs=True))
        for unit in units:
            self._handles.append(unit.module.register_forward_pre_hook(self._note_compiling))
            if unit.op_level:
                self._op_captures[id(unit)] = []
                self._handles.append(
                    unit.module.register_forward_pre_hook(partial(self._start_ops, unit), with_kwargs=True)
                )
            if _captures_forward(unit):
                self._captures[id(unit)] = []
                self._handles.append(
                    unit.module.register_forward_pre_hook(partial(self._start_capture, unit), with_kwargs=True)
                )
            if self.fuse_weight_grads and _fuses_weight_grad(unit):
                self._fusing[id(unit)] = []
                self._handles.append(
                    unit.module.register_forward_pre_hook(partial(self._start_fusion, unit), with_kwargs=True)
                )
            self._handles.append(
                # always_call: a capture opened or a weight switched off before the forward must be closed or
                # switched back on even if the forward raises.
                unit.module.register_forward_hook(
                    partial(self._on_forward, unit),
                    with_kwargs=True,
                    always_call=id(unit) in self._captures or id(unit) in self._fusing or unit.op_level,
                )
            )
        names = {id(p): name for name, p in self.model.named_parameters()}
        measured = {id(p): p for unit in units for p in unit.params.values()}
        if self.include is None:
            measured.update({id(p): p for p in self.model.parameters() if p.requires_grad})
        self._param_names = {pid: names.get(pid, "?") for pid in measured}
        for pid, param in measured.items():
            self._handles.append(param.register_hook(partial(self._on_param_grad, pid)))
        for name, module in self.model.named_modules():
            if isinstance(module, BatchNormBase):
                self._handles.append(module.register_forward_pre_hook(partial(self._check_batch_norm, name)))
        self._attached = True
        return self

    def remove(self) -> None:
        """Remove every hook this engine registered; records stay readable. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grad_nodes = {}
        self._attached = False
        self._reset_backward_state()

    def __enter__(self) -> PerExampleGradNorms:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()

    def _find_units(self) -> list[_Unit]:
        units: list[_Unit] = []
        seen: set[int] = set()

        def visit(name: str, module: nn.Module) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            spec = get_rule_spec(module)
            if spec is not None or isinstance(module, _WHOLE_UNIT_TYPES):
                params = {n: p for n, p in module.named_parameters() if p.requires_grad}
                if params:
                    units.append(_Unit(name or _ROOT_NAME, module, params, spec))
                return
            direct = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if direct:
                units.append(_Unit(name or _ROOT_NAME, module, direct, None))
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)

        visit("", self.model)
        return units

    @staticmethod
    def _group_units(units: list[_Unit]) -> list[_Group]:
        # Union-find over shared parameters: tied weights make one group.
        parent = list(range(len(units)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        owner: dict[int, int] = {}
        for index, unit in enumerate(units):
            for param in unit.params.values():
                if id(param) in owner:
                    parent[find(index)] = find(owner[id(param)])
                else:
                    owner[id(param)] = index
        members: dict[int, list[_Unit]] = {}
        for index, unit in enumerate(units):
            members.setdefault(find(index), []).append(unit)
        groups = []
        for group_units in members.values():
            params = list({id(p): p for unit in group_units for p in unit.params.values()}.values())
            group = _Group("+".join(u.name for u in group_units), group_units, params, tied=len(group_units) > 1)
            for unit in group_units:
                unit.group = group
            groups.append(group)
        return groups

    # ------------------------------------------------------------------ hooks

    @staticmethod
    def _in_backward() -> bool:
        return current_graph_task_id() != -1

    def _check_batch_norm(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._replaying or not torch.is_grad_enabled() or not isinstance(module, BatchNormBase):
            return
        if not batch_norm_uses_batch_statistics(module):
            return
        carries_grad = any(p.requires_grad for p in module.parameters()) or any(
            isinstance(a, Tensor) and a.requires_grad for a in args
        )
        if carries_grad:
            raise batch_norm_coupling_error(name, module)

    def _note_compiling(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # A hook of its own, which TorchDynamo traces whole: the flag it sets is a side effect that the compiled
        # code replays every time it runs (in a hook that breaks the graph further on, Dynamo may run the whole
        # hook eagerly again, where `is_compiling()` is False, and the flag would be lost).
        if torch.compiler.is_compiling() and torch.is_grad_enabled():
            self._compiled_forward = True

    def _recording(self) -> bool:
        # Not recorded: no graph, our own replays, and recomputation inside backward (checkpointing).
        return not self._replaying and torch.is_grad_enabled() and not self._in_backward()

    def _start_capture(self, unit: _Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        capture = None
        if self._recording() and unit.spec is not None and unit.spec.capture is not None:
            capture = unit.spec.capture(module)
            capture.__enter__()
        self._captures[id(unit)].append(capture)

    def _read_batch_size(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._recording():
            first = _first_tensor(args, kwargs)
            if first is not None and first.dim() > 0:
                self.batch_size = int(first.shape[0])

    def _start_ops(self, unit: _Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        capture = None
        if self._recording():
            first = _first_tensor(args, kwargs)
            batch = self.batch_size
            if batch is None and first is not None and first.dim() > 0:
                batch = int(first.shape[0])
            if batch is not None:
                capture = ParamOpCapture(unit.params, batch, first)
                capture.__enter__()
        self._op_captures[id(unit)].append(capture)

    def _start_fusion(self, unit: _Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Not while replaying (the fallback swaps the parameters) and not without a graph. Recomputation inside
        # backward (non-reentrant checkpointing) fuses like the forward it repeats, so both save the same tensors.
        params = _fusable_params(module)
        fuse = (
            bool(params)
            and not self._replaying
            and torch.is_grad_enabled()
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], Tensor)
            and all(p.dtype == args[0].dtype for p in params)
            and args[0].dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(args[0].device.type)
            # Weighted norms of a layer with several positions build the per-example gradients anyway.
            and _fused_rule(unit).worth_it(module, args[0], self.preconditioner is not None and unit.weighted)
        )
        if fuse:
            for param in params:
                param.requires_grad_(False)
        self._fusing[id(unit)].append(params if fuse else [])

    def _on_forward(
        self, unit: _Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        ops = _close_innermost(self._op_captures.get(id(unit)))
        capture = _close_innermost(self._captures.get(id(unit)))
        captured = capture.captured if capture is not None else None
        slot = None
        layer_node = output.grad_fn if isinstance(output, Tensor) else None
        fusing = self._fusing.get(id(unit))
        fused = fusing.pop() if fusing else []
        if fused:
            for param in fused:
                param.requires_grad_(True)
            if isinstance(output, Tensor):
                # The parameters' gradients now flow through this node, from the rule's per-example gradients.
                slot = GradSlot(wants_inputs=args[0].requires_grad)
                rule = _fused_rule(unit)
                output = FusedParamGrads.apply(
                    output, module.weight, module.bias, args[0], module, slot, rule.batch_grads, rule.input_grad
                )
        replaced = output if slot is not None else None
        if output is None or not self._recording():
            return replaced
        if ops is not None:
            if ops.unsupported is None:
                if ops.call.records:
                    self._add_op_call(unit, ops.call)
                return replaced
            self._note_fallback(unit, ops.unsupported)
        elif slot is None and not unit.op_level:
            expanded = self._expand_broadcast(output, args)
            if expanded is not None:
                output = replaced = expanded[0]
                args = expanded[1]
        if isinstance(output, Tensor) and output.requires_grad and is_view(output):
            # A hook on a view (Linear on [N, T, K] returns one) is lost when an in-place op (ReLU(inplace=True))
            # rebases the view's history; an alias that is not a view keeps it.
            output = replaced = as_non_view(output)
        if isinstance(output, Tensor):  # the common case, without walking a pytree
            outputs = [output]
        else:
            outputs = [leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor)]
        hooked = [i for i, out in enumerate(outputs) if out.requires_grad]
        if not hooked:
            return replaced
        if unit.rule is not None and len(outputs) != 1:
            raise TypeError(
                f"The norm rule for {type(module).__name__} (`{unit.name}`) needs a single output tensor, but the "
                f"module returned {len(outputs)}. Register a rule that fits it or measure it with the fallback."
            )
        device_type = outputs[0].device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        if unit.rule is not None and unit.weighted and len(args) == 1 and isinstance(args[0], Tensor):  # common case
            call = _Call(unit, (args[0].detach(),), None, len(outputs), autocast, self._generation)
        else:
            # One detached tensor per distinct input, so rules can still tell that q, k and v are the same tensor.
            detached: dict[int, Tensor] = {}

            def detach(value: Any) -> Any:
                if not isinstance(value, Tensor):
                    return value
                return detached.setdefault(id(value), value.detach())

            call = _Call(
                unit,
                tree_map(detach, args),
                # A rule that cannot weight its norms may have to replay the call (preconditioned norms).
                tree_map(detach, kwargs) if unit.rule is None or not unit.weighted else None,
                len(outputs),
                autocast,
                self._generation,
            )
        call.grad_slot = slot
        if ops is not None and ops.rng is not None:
            call.rng = ops.rng
            call.outputs = [out.detach() for out in outputs]
        if unit.rule is not None and _saved_stats_rule(unit) is not None and _saves_tensors_plainly():
            call.node = layer_node
        assert unit.group is not None  # set by attach
        unit.group.pending.add(call)
        if captured is not None and outputs[0].requires_grad:
            # The projections' gradients include what flows through the returned attention weights.
            call.captured = captured
            projections = [i for i, p in enumerate(captured.projections) if p.requires_grad]
            torch.autograd.graph.register_multi_grad_hook(
                [*(outputs[i] for i in hooked), *(captured.projections[i] for i in projections)],
                partial(self._on_captured_grads, call, hooked, projections),
                mode="all",
            )
        elif len(hooked) == 1 and len(outputs) == 1:
            outputs[0].register_hook(partial(self._on_output_grad, call))
        else:
            torch.autograd.graph.register_multi_grad_hook(
                [outputs[i] for i in hooked], partial(self._on_output_grads, call, hooked), mode="all"
            )
        return replaced

    def _expand_broadcast(self, output: Any, args: tuple[Any, ...]) -> tuple[Tensor, tuple[Any, ...]] | None:
        """A batch-free call's output expanded to the batch, with its inputs.

        ``[1, ...]`` from inputs that are all ``[1, ...]`` (Hugging Face's ``position_ids``): its gradient then
        arrives per example.
        """
        batch = self.batch_size
        if batch is None or batch < 2 or not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != 1:
            return None
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not tensors or any(a.dim() == 0 or a.shape[0] != 1 for a in tensors):
            return None
        expanded = tuple(
            a.expand(batch, *a.shape[1:]) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
            for a in args
        )
        return output.expand(batch, *output.shape[1:]), expanded

    def _add_op_call(self, unit: _Unit, ops: OpCall) -> None:
        device_type = ops.device_type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        call = _Call(unit, (), None, 0, autocast, self._generation)
        call.ops = ops
        ops.on_start = partial(self._on_ops_start, call)
        ops.on_complete = partial(self._on_ops_complete, call)
        assert unit.group is not None  # set by attach
        unit.group.pending.add(call)

    def _on_ops_start(self, call: _Call, ops: OpCall) -> None:
        if self._attached and call.generation == self._generation:
            self._start_backward()
            self._started_ops.append(call)

    def _on_ops_complete(self, call: _Call, ops: OpCall) -> None:
        self._receive(call, ())

    def _note_fallback(self, unit: _Unit, reason: str) -> None:
        cls = type(unit.module)
        message = (
            f"{cls.__name__} (first at `{unit.name}`) has no per-example norm rule and {reason}: its per-example "
            "gradients are materialised by the slower torch.func fallback. Register a rule with "
            f"`@lightning_gns.sources.rules.register_norm_rule({cls.__name__})`, or leave the type out with "
            "`include=`."
        )
        if self.strict:
            raise TypeError(message + " (`strict=True` turns this warning into an error.)")
        if cls not in self._warned_fallback:
            self._warned_fallback.add(cls)
            warnings.warn(message, NormRuleFallbackWarning, stacklevel=3)

    def _on_output_grad(self, call: _Call, grad_output: Tensor) -> None:
        self._receive(call, (grad_output,))

    def _on_output_grads(self, call: _Call, indices: list[int], grads: Sequence[Tensor | None]) -> None:
        full: list[Tensor | None] = [None] * call.num_outputs
        for index, grad_value in zip(indices, grads, strict=True):
            full[index] = grad_value
        self._receive(call, tuple(full))

    def _on_captured_grads(
        self, call: _Call, outputs: list[int], projections: list[int], grads: Sequence[Tensor | None]
    ) -> None:
        # Laid out as the outputs' gradients (as the replay wants them), then the projections'.
        assert call.captured is not None  # set with this hook
        full: list[Tensor | None] = [None] * (call.num_outputs + len(call.captured.projections))
        for index, grad_value in zip([*outputs, *(call.num_outputs + i for i in projections)], grads, strict=True):
            full[index] = grad_value
        self._receive(call, tuple(full))

    def _on_param_grad(self, param_id: int, grad_value: Tensor) -> None:
        if self._attached:
            self._start_backward()
            self._received.add(param_id)

    def _receive(self, call: _Call, grads: tuple[Tensor | None, ...]) -> None:
        if not self._attached or call.generation != self._generation:
            return
        self._start_backward()
        if call.args is None:
            # Already measured by an earlier backward pass through a retained graph: its inputs are gone.
            # Its parameters then show up as unmeasured, which is reported.
            return
        if any(g is not None and g.requires_grad for g in grads):
            self._report_double_backward(call.unit.name)
        self._fired.append(call)
        group = call.unit.group
        assert group is not None  # set by attach
        group.pending.discard(call)
        if group.tied or len(group.pending) > 0 or group in self._stash:
            if group in self._eager:
                raise _late_call_error(group)
            # Measured at the end of the pass, too late for the weight gradient: autograd's node computes its own.
            call.grad_slot = None
            self._stash.setdefault(group, []).append((call, grads))
            return
        if group in self._eager:
            raise _late_call_error(group)
        try:
            self._eager[group] = self._single_call_sq_norm(call, grads)
        except _MeasurementFailed as err:
            self._fail(group, err)
            return
        if self._pass_reaches(group.params):
            # Done with the inputs: freed now rather than at the end of the pass, autograd reuses their memory for
            # the rest of the backward pass (keeping every layer's input to the end cost a CNN ~10% of a step).
            _release(call)

    def _pass_reaches(self, params: list[nn.Parameter]) -> bool:
        """Whether the backward pass in progress accumulates a gradient into one of ``params``.

        ``False`` when it cannot tell: ``torch.autograd.grad`` does not say whether it captures a leaf's gradient.
        """
        try:
            return any(will_engine_execute(self._grad_accumulator(p)) for p in params if p.requires_grad)
        except RuntimeError:
            return False

    def _grad_accumulator(self, param: nn.Parameter) -> Any:
        # Looking the node up builds a view each time; the node lasts as long as someone holds it (autograd keeps
        # only a weak reference). A stale one is in no graph and answers False: the inputs are then freed at the end.
        node = self._grad_nodes.get(id(param))
        if node is None:
            node = self._grad_nodes[id(param)] = get_gradient_edge(param).node
        return node

    # ------------------------------------------------------------------ backward pass

    def _start_backward(self) -> None:
        task_id = current_graph_task_id()
        if task_id == self._task_id:
            return
        # A new backward pass; whatever an aborted one left behind is dropped.
        self._reset_backward_state()
        self._task_id = task_id
        queue_engine_callback(self._finish_backward)

    def _reset_backward_state(self) -> None:
        self._task_id = None
        self._eager = {}
        self._stash = {}
        self._received = set()
        self._fired = []
        self._started_ops = []
        self._failed = set()

    def _finish_backward(self) -> None:
        try:
            if self._compiled_forward:
                self._compiled_forward = False
                raise RuntimeError(
                    "PerExampleGradNorms: the forward of this backward pass ran under torch.compile (a compiled "
                    f"wrapper or function outside the model called it): {_COMPILED_REASON} No record is kept. Run "
                    "the measured model uncompiled, or measure it with the `accumulation` or `ddp` source."
                )
            for call in self._started_ops:
                # A unit measured op by op, some of whose op outputs got no gradient in this pass.
                if call.ops is not None and call.args is not None and not call.ops.complete:
                    self._receive(call, ())
            contributions = dict(self._eager)
            for group, calls in self._stash.items():
                try:
                    contributions[group] = self._combined_sq_norm(group, calls)
                except _MeasurementFailed as err:
                    self._fail(group, err)
            received = self._received
            by_module: dict[str, Tensor] = {}
            measured: set[int] = set()
            for group in self._groups:
                if group in contributions and any(id(p) in received for p in group.params):
                    by_module[group.name] = contributions[group]
                    measured.update(id(p) for p in group.params)
            failed = {id(p) for group in self._failed for p in group.params}
            missed = received - measured
            unmeasured = tuple(sorted(self._param_names[p] for p in missed if p in self._param_names))
            unexplained = tuple(sorted(self._param_names[p] for p in missed - failed if p in self._param_names))
            if unexplained:
                self._report_unmeasured(unexplained)
            if by_module:
                self._records.append(SqNormRecord(_total(by_module), by_module, unmeasured))
        finally:
            # Inputs are freed once their gradients reached the parameters. A pass that gave the parameters
            # nothing (a gradient with respect to inputs only) leaves them for the backward pass still to come.
            for call in self._fired:
                fired_group = call.unit.group
                if fired_group is not None and any(id(p) in self._received for p in fired_group.params):
                    _release(call)
            self._reset_backward_state()

    def _fail(self, group: _Group, err: Exception) -> None:
        """Leave a unit that could not be measured out of this pass's record.

        Its parameters are listed as unmeasured; said once, never fatal to the training step unless ``strict``.
        """
        if self.strict:
            raise err
        self._failed.add(group)
        if group.name not in self._warned_failed:
            self._warned_failed.add(group.name)
            warnings.warn(
                f"{err} Its parameters are left out of the per-example norms (the record lists them as unmeasured).",
                UnmeasuredParameterWarning,
                stacklevel=2,
            )

    def _report_unmeasured(self, names: tuple[str, ...]) -> None:
        message = (
            f"Parameters received a gradient that no per-example hook measured: {', '.join(names)}. The per-example "
            "norms miss them: their owner module was not called (e.g. `F.linear(x, self.proj.weight)` instead of "
            "`self.proj(x)`), they were used outside any module, or a graph kept with `retain_graph=True` was "
            "backpropagated again (each forward is measured once). Register a norm rule for the module that uses "
            "them with `register_norm_rule`, or restrict the measurement with `include=`."
        )
        if self.strict:
            raise RuntimeError(message)
        if names not in self._warned_unmeasured:
            self._warned_unmeasured.add(names)
            warnings.warn(message, UnmeasuredParameterWarning, stacklevel=2)

    def _report_double_backward(self, name: str) -> None:
        message = (
            f"A backward pass with `create_graph=True` went through `{name}` (e.g. a gradient penalty): a later "
            "backward through that graph adds second-order gradient terms to the parameters that per-example hooks "
            "cannot see, so the per-example norms of that pass are incomplete."
        )
        if self.strict:
            raise RuntimeError(message)
        if not self._warned_double_backward:
            self._warned_double_backward = True
            warnings.warn(message, UnmeasuredParameterWarning, stacklevel=2)

    def _unit_weights(self, unit: _Unit) -> dict[str, Tensor] | None:
        """The preconditioner's weight of each of the unit's parameters, by name; ``None`` for plain norms."""
        if self.preconditioner is None:
            return None
        weights = {}
        for name, param in unit.params.items():
            weight = self.preconditioner(param)
            if weight is not None:
                weights[name] = weight
        if weights and not unit.weighted and type(unit.module) not in self._warned_unweighted:
            self._warned_unweighted.add(type(unit.module))
            warnings.warn(
                f"The norm rule for {type(unit.module).__name__} (first at `{unit.name}`) takes no `weights`, so "
                "its preconditioned norms are measured by the slower torch.func fallback. Give the rule a keyword "
                "argument `weights` (the elementwise weight of each parameter's squared gradient entries, by name).",
                NormRuleFallbackWarning,
                stacklevel=2,
            )
        return weights or None

    def _single_call_sq_norm(self, call: _Call, grads: tuple[Tensor | None, ...]) -> Tensor:
        unit = call.unit
        weights = self._unit_weights(unit)
        if call.ops is not None:
            try:
                with torch.no_grad(), _autocast_off(call.ops.device_type):
                    return call.ops.sq_norm(weights)
            except Exception as err:
                raise _MeasurementFailed(
                    f"The op-level rule for `{unit.name}` ({type(unit.module).__name__}) failed: {err}"
                ) from err
        rule_kwargs = {} if weights is None else {"weights": weights}
        usable = weights is None or unit.weighted
        if unit.rule is not None and usable:
            grad_output = grads[0]
            assert grad_output is not None  # the hook fired with it
            assert call.args is not None  # released only after use
            with torch.no_grad(), _autocast_off(grad_output.device.type):
                slot = call.grad_slot
                if slot is not None:
                    # Weighted norms (with weights), but the plain sums of the per-example gradients for autograd.
                    fill = _fused_rule(unit).sq_norm_and_grads
                    return fill(unit.module, call.args, grad_output, call.node, slot, **rule_kwargs)
                if call.node is not None:
                    from_stats = _saved_stats_rule(unit)
                    assert from_stats is not None  # call.node is kept only for such rules
                    stats = from_stats.read(call.node, unit.module, grad_output)
                    if stats is not None:
                        return from_stats.sq_norm(unit.module, call.args, grad_output, stats, **rule_kwargs)
                return unit.rule(unit.module, call.args, grad_output, **rule_kwargs)
        if call.captured is not None:
            with torch.no_grad(), _autocast_off(_device_type(grads)):
                return call.captured.sq_norm(unit.module, grads[0], grads[call.num_outputs :], weights)
        if unit.call_rule is not None and usable:
            assert call.args is not None  # released only after use
            with torch.no_grad(), _autocast_off(_device_type(grads)):
                result = unit.call_rule(unit.module, call.args, call.kwargs or {}, grads, **rule_kwargs)
            if result is not None:
                return result
        return sq_norm_of_grads(self._replay(call, grads), weights)

    def _combined_sq_norm(self, group: _Group, calls: list[tuple[_Call, tuple[Tensor | None, ...]]]) -> Tensor:
        if len(calls) == 1:
            return self._single_call_sq_norm(*calls[0])
        # Per-example gradients add up over calls (and over tied units) before squaring: each call gives them as
        # factors where its rule can (Linear, Embedding), else built by the replay.
        by_param: dict[int, list[OuterTerms | Tensor]] = {}
        for call, grads in calls:
            for name, value in self._per_example_terms(call, grads).items():
                by_param.setdefault(id(call.unit.params[name]), []).append(value)
        params = {id(p): p for p in group.params}
        total: Tensor | None = None
        for key, terms in by_param.items():
            weight = None if self.preconditioner is None else self.preconditioner(params[key])
            try:
                value = combined_sq_norm(terms, weight)
            except ValueError as err:
                raise ValueError(f"`{group.name}`: {err}") from err
            total = value if total is None else total + value
        assert total is not None  # the calls had parameters
        return total

    def _per_example_terms(self, call: _Call, grads: tuple[Tensor | None, ...]) -> dict[str, OuterTerms | Tensor]:
        """One call's per-example gradients of each of its unit's parameters: factors where the spec has them."""
        unit = call.unit
        outer_terms = None if unit.spec is None else unit.spec.outer_terms
        grad_output = grads[0] if grads else None
        if outer_terms is not None and call.ops is None and call.captured is None and grad_output is not None:
            assert call.args is not None  # released only after use
            try:
                with torch.no_grad(), _autocast_off(grad_output.device.type):
                    terms = outer_terms(unit.module, call.args, grad_output)
            except Exception as err:
                raise _MeasurementFailed(
                    f"The outer-terms rule for `{unit.name}` ({type(unit.module).__name__}) failed: {err}"
                ) from err
            if terms is not None and terms.keys() >= unit.params.keys():
                return {name: terms[name] for name in unit.params}
        return dict(self._replay(call, grads))

    def _replay(self, call: _Call, grads: tuple[Tensor | None, ...]) -> dict[str, Tensor]:
        unit = call.unit
        assert call.args is not None  # released only after use
        if call.ops is not None:
            try:
                with torch.no_grad():
                    return call.ops.per_example_grads()
            except Exception as err:
                raise _MeasurementFailed(
                    f"The op-level rule for `{unit.name}` ({type(unit.module).__name__}) failed: {err}"
                ) from err
        if call.captured is not None:
            grads = grads[: call.num_outputs]  # the outputs' gradients, without the captured projections
        layout: BatchLayout = batch_layout(unit.module, call.args, call.kwargs or {}, call.num_outputs)
        device_type, enabled, dtype = call.autocast
        self._replaying = True
        try:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                if call.rng is None:
                    return per_example_grads(unit.module, dict(unit.params), layout, grads)
                # Random ops (dropout): the replay draws from the generator state the forward started from, one
                # example's slice each, and is checked against the outputs the forward returned.
                with call.rng.restored():
                    return per_example_grads(
                        unit.module, dict(unit.params), layout, grads, randomness="different", outputs=call.outputs
                    )
        except Exception as err:
            raise _MeasurementFailed(
                f"The torch.func fallback could not replay `{unit.name}` ({type(unit.module).__name__}) one example "
                f"at a time: {err} The fallback needs a forward whose random ops (dropout) draw in the same order "
                "for one example as for the batch, and no data-dependent Python control flow. Register a norm rule "
                f"with `register_norm_rule({type(unit.module).__name__})`, or leave it out with `include=`."
            ) from err
        finally:
            self._replaying = False

    # ------------------------------------------------------------------ results

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[SqNormRecord]:
        """The records of the backward passes since the last :meth:`pop` or :meth:`reset`, oldest first."""
        return list(self._records)

    def sq_norms(self, index: int = -1) -> Tensor:
        """Per-example squared gradient norms of one backward pass, summed over the measured modules.

        Args:
            index: which backward pass since the last :meth:`pop`/:meth:`reset` (default: the latest).

        Returns:
            ``[N]`` squared norms.
        """
        return self._record(index).sq_norms

    def sq_norms_by_module(self, index: int = -1) -> dict[str, Tensor]:
        """Per-example squared gradient norms of one backward pass, per measured unit.

        Args:
            index: which backward pass since the last :meth:`pop`/:meth:`reset` (default: the latest).

        Returns:
            ``{qualified module name: [N]}``.
        """
        return dict(self._record(index).by_module)

    def pop(self) -> list[SqNormRecord]:
        """Take every record since the last :meth:`pop` or :meth:`reset` (one per backward pass, oldest first).

        Returns:
            The records; the engine holds none afterwards.
        """
        records, self._records = self._records, []
        return records

    def reset(self) -> None:
        """Drop the records and any half-finished backward pass."""
        self._records = []
        self._reset_backward_state()

    def forget_pending(self) -> None:
        """Drop the module calls whose output gradient has not arrived: their forward will see no backward pass.

        Call it between a forward pass and the next one when the first was never backpropagated (a training step
        that skipped its backward). Its calls would otherwise stay pending until the garbage collector breaks the
        reference cycle between a normalization layer's autograd node and its hook, holding the layer inputs and
        the whole graph, and sending every later call of those modules down the slower path for modules called
        several times per pass (measured at the end of the pass, without fused weight gradients).
        """
        self._compiled_forward = False
        for group in self._groups:
            if group.pending:
                for call in list(group.pending):
                    _release(call)
                group.pending.clear()

    def _record(self, index: int) -> SqNormRecord:
        if not self._records:
            raise RuntimeError(
                "No per-example norms recorded yet: run a forward and a backward pass with the hooks attached "
                "(`attach()` or `with PerExampleGradNorms(model):`) before reading them."
            )
        return self._records[index]


_COMPILED_REASON = "the per-example hooks do not see inside compiled code, and the norms would be wrong."


def compiled_model_refusal(parts: Sequence[str]) -> str:
    """Why a model compiled with ``torch.compile`` cannot be measured per example; the caller adds the remedy.

    Args:
        parts: the compiled modules, as :func:`~lightning_gns._compat.dynamo.compiled_parts` names them.

    Returns:
        ``"cannot measure a model compiled with torch.compile (compiled: ...): ..."``, a sentence to follow a
        subject (``"PerExampleGradNorms"``).
    """
    return f"cannot measure a model compiled with torch.compile (compiled: {', '.join(parts)}): {_COMPILED_REASON}"


def _close_innermost(stack: list[Any] | None) -> Any:
    """Leave the capture that this module call's pre-hook opened (the innermost one: calls can nest)."""
    if not stack:
        return None
    capture = stack.pop()
    if capture is not None:
        capture.__exit__(None, None, None)
    return capture


def _device_type(grads: tuple[Tensor | None, ...]) -> str:
    return next(g.device.type for g in grads if g is not None)


class _MeasurementFailed(RuntimeError):
    """A unit's per-example norms could not be taken in this backward pass."""


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _release(call: _Call) -> None:
    call.args = None
    call.kwargs = None
    call.ops = None
    call.rng = None
    call.outputs = None
    call.captured = None
    call.grad_slot = None
    call.node = None


def _saves_tensors_plainly() -> bool:
    # Reading what a node saved unpacks it; saved-tensor hooks (checkpointing, offloading) may allow that only once.
    return not saved_tensors_hooks_active()


def _fuses_weight_grad(unit: _Unit) -> bool:
    # Rules that build the per-example gradients that autograd would sum anyway.
    return unit.rule is not None and unit.spec is not None and unit.spec.fused is not None


def _fused_rule(unit: _Unit) -> FusedRule:
    # Only units that passed _fuses_weight_grad fuse.
    assert unit.spec is not None
    assert unit.spec.fused is not None
    return unit.spec.fused


def _saved_stats_rule(unit: _Unit) -> SavedStatsRule | None:
    return None if unit.spec is None else unit.spec.from_saved_stats


def _fusable_params(module: nn.Module) -> list[nn.Parameter]:
    """The trainable weight and bias of a layer, if they are its own leaf parameters (not recomputed ones)."""
    params = [getattr(module, "weight", None), getattr(module, "bias", None)]
    return [p for p in params if isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf]


def _captures_forward(unit: _Unit) -> bool:
    # A call rule with a capture (attention) is exact and cheaper when the forward runs under it.
    return unit.call_rule is not None and unit.spec is not None and unit.spec.capture is not None


def _total(by_module: dict[str, Tensor]) -> Tensor:
    values = iter(by_module.items())
    first_name, total = next(values)
    for name, value in values:
        if value.shape != total.shape:
            raise ValueError(
                f"Modules saw different batch sizes in one backward pass: `{first_name}` has {total.shape[0]} "
                f"examples and `{name}` has {value.shape[0]}. Per-example norms need batch-first inputs with the "
                "same N along dim 0 in every module: a layer fed `x.view(-1, features)` sees tokens as examples, "
                "and a position embedding called on `arange(T)` sums the examples' gradients (call it on "
                "`arange(T).expand(N, T)`)."
            )
        total = total + value.to(total.dtype)
    return total


def _late_call_error(group: _Group) -> RuntimeError:
    return RuntimeError(
        f"`{group.name}` received the gradient of another call after its per-example norms were already taken "
        "in this backward pass; this happens when a module is called during the backward pass itself (reentrant "
        "checkpointing), which per-example norms do not support. Use `use_reentrant=False`."
    )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    # Rules accumulate in float32; an autocast region still active in backward would downcast their matmuls.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
